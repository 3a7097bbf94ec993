"""Task accuracy with EleutherAI's lm-evaluation-harness (lm-eval), on a modelpress model.

    report = evaluate_tasks(loaded, ["my_tasks/tiny_mc.yaml"])      # or registered lm-eval task names
    report.results["tiny_mc"]["acc"]                                 # -> 0.75

The model is handed to lm-eval's own `HFLM` as an already-built transformers model: a modelpress model *is*
one (its linear layers are QuantLinear / SparseLinear modules inside the usual architecture), so lm-eval's
loglikelihood, loglikelihood_rolling and generate_until run our packed layers through code the harness
maintains and the field trusts, instead of a second implementation of its request batching, context
truncation and stop sequences. `lm_eval_model` returns that LM for people who call lm-eval themselves.

lm-eval is an optional extra (`pip install 'modelpress[tasks]'`): it pulls datasets, pyarrow, pandas,
scikit-learn and scipy (about 155 MB of wheels), which nothing else in modelpress needs.

A task is a YAML file in lm-eval's task format (its `task:` key names it; its folder is added to the
search path, so a local `dataset_path: json` with `data_files` beside it needs no network), or the name of
a task lm-eval ships (whose data then comes from the Hugging Face hub or its cache).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from modelpress.errors import ModelpressError
from modelpress.io.model import LoadedModel

INSTALL_HINT = "install the optional extra: pip install 'modelpress[tasks]' (lm-eval 0.4.13)"


@dataclass(frozen=True)
class TaskReport:
    results: dict[str, dict[str, float]]     # task -> metric -> value (lm-eval's "acc,none" is "acc" here)
    samples: dict[str, int]                  # task -> documents scored
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ModelpressError(f"task evaluation needs lm-eval ({err}); {INSTALL_HINT}") from None
    return lm_eval, HFLM


def lm_eval_model(loaded: LoadedModel, batch_size: int = 8):
    """lm-eval's LM (HFLM) over `loaded.model` as it is: packed layers, its device, its tokenizer."""
    _, HFLM = _lm_eval()
    if loaded.tokenizer is None:
        raise ModelpressError(f"{loaded.source} has no tokenizer; lm-eval tasks need one")
    if not hasattr(loaded.model, "config") or not hasattr(loaded.model, "generate"):
        raise ModelpressError(f"lm-eval scores transformers causal LMs; {type(loaded.model).__name__} is not one")
    device = next(loaded.model.parameters()).device
    return HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, device=str(device))


def task_names(tasks: Sequence[str | Path]) -> tuple[list[str], list[str]]:
    """(task names, folders to search): a YAML file gives its `task:` name and its folder."""
    import yaml

    names, folders = [], []
    for task in tasks:
        path = Path(task)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise ModelpressError(f"task file {path} does not exist")
            try:
                spec = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as err:
                raise ModelpressError(f"task file {path} is not valid YAML: {err}") from None
            if not isinstance(spec, dict) or not isinstance(spec.get("task"), str):
                raise ModelpressError(f"task file {path} has no `task:` name (lm-eval's task format)")
            names.append(spec["task"])
            folders.append(str(path.resolve().parent))
        else:
            names.append(str(task))
    return names, sorted(set(folders))


def evaluate_tasks(loaded: LoadedModel, tasks: Sequence[str | Path], limit: int | None = None,
                   batch_size: int = 8) -> TaskReport:
    """Score `loaded` on each task (YAML files or lm-eval task names); `limit`: at most that many documents
    per task. Zero-shot, lm-eval's defaults otherwise."""
    lm_eval, _ = _lm_eval()
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, (str, Path)) or not tasks:
        raise ModelpressError(f"tasks is a non-empty list of task files or names, got {tasks!r}")
    names, folders = task_names(tasks)
    start = time.perf_counter()
    # lm-eval's own task index (thousands of YAML files, most of a minute on a busy 2-core CPU) only when a
    # task is named rather than given as a file
    files_only = len(folders) > 0 and all(Path(t).suffix in (".yaml", ".yml") for t in tasks)
    manager = TaskManager(include_path=folders or None, include_defaults=not files_only)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ModelpressError(f"lm-eval knows no task {unknown[0]!r} (a YAML task file, or one of lm-eval's tasks)")
    output = lm_eval.simple_evaluate(model=lm_eval_model(loaded, batch_size), tasks=names, task_manager=manager,
                                     limit=limit, bootstrap_iters=0, log_samples=False)
    results = {name: _metrics(output["results"][name]) for name in names}
    samples = {name: int(output.get("n-samples", {}).get(name, {}).get("effective", 0)) for name in names}
    return TaskReport(results, samples, round(time.perf_counter() - start, 3))


def _metrics(row: dict) -> dict[str, float]:
    """lm-eval's {"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...} -> {"acc": 0.5}."""
    out = {}
    for key, value in row.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        out[metric if filter_name == "none" else f"{metric},{filter_name}"] = float(value)
    return out
