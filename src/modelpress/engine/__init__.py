"""The sequential engine: find blocks, capture their inputs, observe and solve layers block by block."""

from modelpress.engine.algorithm import InputGroup, LayerAlgorithm, LayerSolution, LayerTarget
from modelpress.engine.runner import EngineSettings, RunReport, run_sequential

__all__ = ["EngineSettings", "InputGroup", "LayerAlgorithm", "LayerSolution", "LayerTarget", "RunReport",
           "run_sequential"]
