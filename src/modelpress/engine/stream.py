"""Blocks streamed from disk: calibrate a model whose float weights do not fit in host memory.

The model is built on the meta device (shapes only, no storage), everything outside the repeated blocks
(embeddings, final norm, head) is read from the checkpoint, and each block is materialized from the
safetensors files only while the engine works on it:

    holding(block i):  read block i's tensors (single file or HF shards via model.safetensors.index.json)
                       → engine compresses it → its compressed state goes to `<out>/block-000i.safetensors`
                       (+ the record of its compressed modules) → its storage is dropped (back to meta)

So host memory holds one float block, its compressed form and the calibration activations, whatever the
depth. `BlockSource` (the base class) is the in-memory case: blocks are already there and stay there.
Non-persistent buffers (rotary tables) are computed at construction, not stored: they are built for real.
A streamed model carries its source (`attach`), so the engine (`source_of`) and the saver find the blocks
without every quantizer passing it along; methods that touch every weight outside the engine (RTN,
SmoothQuant's final pass) cannot stream and say so.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from modelpress.engine.blocks import BlockStack
from modelpress.errors import ModelpressError
from modelpress.io.streamed_safetensors import read_header, read_tensors

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
            self.files = {name: self.dir / SINGLE_FILE for name in read_header(self.dir / SINGLE_FILE)[0]}
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
            for name, tensor in read_tensors(file, wanted).items():
                out[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return out


def build_on_meta(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of an HF directory with every parameter on meta; buffers built for real (rotary tables
    are computed at construction, not stored). accelerate's context, as io/save.py loads with."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from modelpress.io.model import is_causal_lm

    config = AutoConfig.from_pretrained(directory)
    auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    with init_empty_weights(include_buffers=False):
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

    def __init__(self, checkpoint: Checkpoint, stack: BlockStack, out_dir: str | Path,
                 dtype: torch.dtype = torch.float32) -> None:
        self.checkpoint, self.stack, self.dtype = checkpoint, stack, dtype
        self.out_dir = Path(out_dir)
        self._open: tuple[int, dict[str, torch.Tensor]] | None = None   # the one compressed block read back

    def stored_tensor(self, name: str) -> torch.Tensor:
        """A tensor of a compressed block by its full name, read back from `out_dir`; one block file is
        held at a time, so reading in state-dict order keeps memory at one compressed block."""
        from safetensors.torch import load_file

        head = f"{self.stack.path}."
        index_text = name[len(head):].split(".", 1)[0] if name.startswith(head) else ""
        if not index_text.isdigit():
            raise ModelpressError(f"{name} is not inside the streamed blocks {self.stack.path}")
        index = int(index_text)
        if self._open is None or self._open[0] != index:
            path = self.block_file(index)
            if not path.exists():
                raise ModelpressError(f"block {index} was never compressed ({path} is missing); run the "
                                      f"calibration to the end before saving")
            self._open = (index, load_file(str(path)))
        return self._open[1][name[len(f"{head}{index}."):]]

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
        from safetensors.torch import save_file

        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in stack.blocks[index].state_dict().items()}
        path = self.block_file(index)
        tmp = path.with_name(f".{path.name}.partial")
        save_file(state, str(tmp))
        tmp.replace(path)
        if self._open is not None and self._open[0] == index:
            self._open = None


ATTRIBUTE = "modelpress_block_source"


def attach(model: nn.Module, source: BlockSource) -> None:
    """Mark `model` as streamed: its blocks come from (and go to) `source`."""
    setattr(model, ATTRIBUTE, source)


def source_of(model: nn.Module) -> BlockSource:
    """Where the engine finds `model`'s blocks: its attached source, or memory."""
    return getattr(model, ATTRIBUTE, None) or BlockSource()


def open_streamed(directory: str | Path, work_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An HF safetensors model ready to calibrate block by block: built on meta, everything outside the
    blocks read, the blocks left on disk (compressed blocks go to `work_dir`)."""
    from modelpress.engine.blocks import find_blocks

    checkpoint = Checkpoint(directory)
    model = build_on_meta(directory, dtype)
    stack = find_blocks(model)
    load_outside_blocks(model, stack, checkpoint, dtype)
    attach(model, CheckpointBlocks(checkpoint, stack, work_dir, dtype))
    return model


def release(module: nn.Module) -> None:
    """Drop the storage of every parameter and persistent buffer (back to meta); the structure stays."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and not param.is_meta:
                sub._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        for name, buf in list(sub._buffers.items()):
            if buf is not None and not buf.is_meta and name not in sub._non_persistent_buffers_set:
                sub._buffers[name] = buf.to("meta")
