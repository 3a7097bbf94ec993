"""Blocks streamed from disk: calibrate a model whose float weights do not fit in host memory.

The model is built on the meta device (shapes only, no storage), everything outside the repeated blocks
(embeddings, final norm, head) is read from the checkpoint, and each block is materialized from the
safetensors files only while the engine works on it:

    holding(block i):  read block i's tensors (single file or HF shards via model.safetensors.index.json)
                       → engine compresses it → its compressed state goes to `<out>/block-000i.safetensors`
                       (+ the record of its compressed modules) → its storage is dropped (back to meta)

So host memory holds one float block, its compressed form and the calibration activations, whatever the
depth. `BlockSource` (the base class) is the in-memory case: blocks are already there and stay there.
Non-persistent buffers (rotary tables) are computed at construction, not stored: they are built for real
(see `parameters_on_meta`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from modelpress.engine.blocks import BlockStack
from modelpress.errors import ModelpressError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class BlockSource:
    """Blocks held in memory for the whole run: nothing to load, nothing to release."""

    @contextlib.contextmanager
    def holding(self, stack: BlockStack, index: int, keep: bool = False) -> Iterator[None]:
        """Block `index` is materialized inside the context; with `keep` its state afterwards is the result."""
        yield


class Checkpoint:
    """Tensors of a safetensors checkpoint by name, read one at a time (single file or HF shards)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        index = self.dir / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelpressError(f"{index} has no weight_map; it is not a sharded safetensors index")
            self.files = {name: self.dir / file for name, file in weight_map.items()}
        elif (self.dir / SINGLE_FILE).exists():
            with safe_open(self.dir / SINGLE_FILE, "pt") as handle:
                self.files = {name: self.dir / SINGLE_FILE for name in handle.keys()}
        else:
            raise ModelpressError(f"{self.dir} has neither {SINGLE_FILE} nor {INDEX_FILE}: streaming reads safetensors only")

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.files]
        if missing:
            raise ModelpressError(f"{self.dir} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, wanted in by_file.items():
            with safe_open(file, "pt") as handle:
                for name in wanted:
                    tensor = handle.get_tensor(name)
                    out[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return out


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the context lives on the meta device; buffers are built for real
    (rotary tables are computed, not stored). A parameter is created by its module as an uninitialised CPU
    tensor (untouched pages cost no memory) and replaced at once, so no initialisation runs on real data."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_on_meta(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of an HF directory with every parameter on meta (see `parameters_on_meta`)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from modelpress.io.model import is_causal_lm

    config = AutoConfig.from_pretrained(directory)
    auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    with parameters_on_meta():
        model = auto.from_config(config, dtype=dtype)
    return model.eval()


def _stored_names(module: nn.Module) -> list[str]:
    """Names in `module.state_dict()` (parameters and persistent buffers), tied tensors once each."""
    seen: set[int] = set()
    names = []
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            names.append(name)
    return names


def load_outside_blocks(model: nn.Module, stack: BlockStack, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
    """Materialize everything but the blocks (embeddings, norms, head) from the checkpoint; ties restored."""
    inside = f"{stack.path}."
    names = [n for n in _stored_names(model) if not n.startswith(inside)]
    present = [n for n in names if n in checkpoint.files]
    model.load_state_dict(checkpoint.read(present, dtype), strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still = [n for n, t in model.state_dict(keep_vars=True).items() if not n.startswith(inside) and t.is_meta]
    if still:
        raise ModelpressError(f"{checkpoint.dir} lacks tensors {still[:5]} outside the blocks")


class CheckpointBlocks(BlockSource):
    """Blocks read from `checkpoint` when held and, once compressed, written to `out_dir` and dropped."""

    def __init__(self, checkpoint: Checkpoint, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        self.checkpoint, self.dtype = checkpoint, dtype
        self.out_dir = Path(out_dir)

    def block_file(self, index: int) -> Path:
        return self.out_dir / f"block-{index:04d}.safetensors"

    @contextlib.contextmanager
    def holding(self, stack: BlockStack, index: int, keep: bool = False) -> Iterator[None]:
        block = stack.blocks[index]
        prefix = f"{stack.block_name(index)}."
        names = [prefix + n for n in _stored_names(block)]
        tensors = self.checkpoint.read(names, self.dtype)
        block.load_state_dict({n[len(prefix):]: t for n, t in tensors.items()}, strict=True, assign=True)
        del tensors
        try:
            yield
            if keep:
                self._write(stack, index)
        finally:
            release(stack.blocks[index])

    def _write(self, stack: BlockStack, index: int) -> None:
        from modelpress.engine.resume import block_records
        from modelpress.io.atomic import atomic_file

        block = stack.blocks[index]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
        path = self.block_file(index)
        tmp = path.with_name(f".{path.name}.partial")
        save_file(state, str(tmp))
        tmp.replace(path)
        with atomic_file(path.with_suffix(".json")) as handle:
            json.dump(block_records(block), handle, sort_keys=True)


def release(module: nn.Module) -> None:
    """Drop the storage of every parameter and persistent buffer (back to meta); the structure stays."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and not param.is_meta:
                sub._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        for name, buf in list(sub._buffers.items()):
            if buf is not None and not buf.is_meta and name not in sub._non_persistent_buffers_set:
                sub._buffers[name] = buf.to("meta")
