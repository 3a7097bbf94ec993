"""Resuming a sequential run: after each block, its finished state and the next block's inputs go to disk.

Directory layout (safetensors + JSON, no pickle):
- state.json                  commit point, rewritten atomically after each block: fingerprint of the run,
                              blocks done, the record of every compressed module, per-layer notes
- block-0003.safetensors      block 3's state dict once compressed
- hidden-0004.safetensors     the hidden states block 4 starts from ("batch.0", "batch.1", ...); in a run of
                              N ranks, one file per rank: hidden-0004-rank1of2.safetensors holds rank 1's
                              share of the batches (engine/distributed.py). Rank 0 writes everything else.
state.json records the sha256 of every tensor file it commits and a digest of its own content, so a damaged
file (a flipped byte that still parses) is refused by name rather than resumed into another model.
A run killed at any moment leaves either the previous commit or the new one. A resumed run restores the
finished blocks, loads the hidden states and goes on with the next block; everything it computes from
there is what an uninterrupted run computes. A distributed run resumes with the same number of ranks (the
fingerprint holds it), each rank from its own hidden file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from modelpress.engine.distributed import Ranks
from modelpress.errors import ModelpressError
from modelpress.io.atomic import atomic_file, remove_stale_siblings
from modelpress.io.integrity import file_sha256
from modelpress.nn.layers import replace_module
from modelpress.nn.registry import compressed_module_kind, module_for_kind

STATE_FILE = "state.json"
RESUME_VERSION = 2   # 2: the fingerprint holds the engine settings and a digest of the config


@dataclass
class ResumeState:
    fingerprint: dict
    blocks_done: int = 0
    records: dict[str, dict[str, dict]] = field(default_factory=dict)   # block index -> module name -> record
    notes: dict[str, dict] = field(default_factory=dict)                 # full layer name -> notes
    unobserved: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)                  # tensor file name -> its sha256
    digest: str = ""                                                     # of all the above (state_digest)


STATE_TYPES = {"fingerprint": dict, "blocks_done": int, "records": dict, "notes": dict, "unobserved": list,
               "files": dict, "digest": str}


def state_digest(state: ResumeState) -> str:
    content = {k: v for k, v in asdict(state).items() if k != "digest"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def check_state(saved: dict) -> ResumeState:
    """A ResumeState from state.json's content, every field of its type, the digest matching (states written
    before digests were recorded have none). Raises ValueError/TypeError naming what is wrong."""
    unknown = sorted(set(saved) - set(STATE_TYPES))
    if unknown:
        raise ValueError(f"unknown fields {unknown}")
    for key, kind in STATE_TYPES.items():
        if key in saved and (not isinstance(saved[key], kind) or isinstance(saved[key], bool)):
            raise TypeError(f"`{key}` should be a {kind.__name__}, found {saved[key]!r:.60}")
    state = ResumeState(**saved)
    if state.digest and state.digest != state_digest(state):
        raise ValueError("its content differs from the digest it recorded")
    if state.blocks_done < 0 or not all(isinstance(r, dict) and all(isinstance(m, dict) for m in r.values())
                                        for r in state.records.values()):
        raise ValueError("blocks_done or records of the wrong shape")
    return state


def run_fingerprint(algorithm_description: str, block_path: str, num_blocks: int, calibration_ids: torch.Tensor,
                    batch_size: int, settings: object = None, config: object = None, ranks: int = 1) -> dict:
    """What a resumed run must share with the saved one. `settings` (the engine's: skip, batch size) and
    `config` (the algorithm's) enter with every dataclass field, so a field added later is covered without
    anyone remembering to add it to describe()."""
    ids = calibration_ids.detach().to("cpu", torch.int64).contiguous()
    fingerprint = {
        "version": RESUME_VERSION,
        "algorithm": algorithm_description,
        "blocks": f"{block_path} x{num_blocks}",
        "calibration": f"{tuple(ids.shape)} sha256:{hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]}",
        "batch_size": batch_size,
    }
    if settings is not None:
        fingerprint["settings"] = plain_data(settings)
    if config is not None:
        fingerprint["config"] = f"sha256:{hashlib.sha256(json.dumps(plain_data(config)).encode()).hexdigest()[:16]}"
    if ranks > 1:   # each rank's hidden file holds its share of the batches: resumable with as many ranks
        fingerprint["ranks"] = ranks
    return json.loads(json.dumps(fingerprint))   # as it reads back from state.json (tuples become lists)


def config_description(name: str, config: object) -> str:
    """`name` and every field of the dataclass `config` as one line: what an algorithm's describe() returns.
    Derived from dataclasses.asdict, so no field (`skip` was one) can be left out of the resume check; a long
    value (a per-layer scheme map) enters as a digest."""
    parts = []
    for key, value in plain_data(config).items():   # type: ignore[union-attr]
        text = str(value) if value is None or isinstance(value, (str, bool, int, float)) else json.dumps(value)
        if len(text) > 80:
            text = f"sha256:{hashlib.sha256(text.encode()).hexdigest()[:12]}"
        parts.append(f"{key}={text}")
    return " ".join([name, *parts])


def plain_data(value: object) -> object:
    """A dataclass (or anything) as sorted JSON-ready data, the same in every process."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    return json.loads(json.dumps(value, sort_keys=True, default=_json_default))


def _json_default(value: object) -> object:
    if isinstance(value, (set, frozenset)):
        return sorted(map(str, value))
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} sha256:{hashlib.sha256(value.detach().cpu().numpy().tobytes()).hexdigest()[:16]}"
    if callable(value) and hasattr(value, "__qualname__"):   # a function's repr holds its address: differs per process
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return repr(value)


def block_records(block: nn.Module) -> dict[str, dict]:
    return {name: {"kind": kind, **module.record()} for name, module in block.named_modules()
            if (kind := compressed_module_kind(module)) is not None}


class ResumeStore:
    def __init__(self, directory: str | os.PathLike, ranks: Ranks = Ranks()) -> None:
        self.dir = Path(directory)
        self.ranks = ranks

    def hidden_name(self, index: int) -> str:
        """This rank's file of the inputs of block `index`."""
        r = self.ranks
        return f"hidden-{index:04d}.safetensors" if not r.distributed else \
            f"hidden-{index:04d}-rank{r.rank}of{r.world}.safetensors"

    def load(self, fingerprint: dict) -> ResumeState:
        """The saved state if it belongs to this run, a fresh one if there is none; an error if it belongs
        to another run (other model, settings or calibration data)."""
        path = self.dir / STATE_FILE
        if not path.exists():
            return ResumeState(fingerprint)
        try:
            saved = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self.damaged(path, err) from None
        if not isinstance(saved, dict) or "fingerprint" not in saved:
            raise self.damaged(path, ValueError("no run fingerprint in it"))
        if saved["fingerprint"] != fingerprint:
            raise ModelpressError(
                f"{self.dir} holds a run with other settings or data ({saved['fingerprint']}); this run is "
                f"{fingerprint}. Use another --resume directory or delete this one"
            )
        try:
            return check_state(saved)
        except (TypeError, ValueError) as err:
            raise self.damaged(path, err) from None

    def damaged(self, path: Path, err: BaseException) -> ModelpressError:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return ModelpressError(f"{path} is damaged or missing ({reason}); delete the --resume directory {self.dir} "
                               f"to start the run over")

    def _read_tensors(self, state: ResumeState, name: str, device: str | torch.device = "cpu"
                      ) -> dict[str, torch.Tensor]:
        path = self.dir / name
        try:
            if name in state.files and file_sha256(path) != state.files[name]:
                raise ValueError("its sha256 differs from the one state.json recorded")
            return load_file(str(path), device=str(device))
        except (OSError, ValueError, SafetensorError) as err:
            raise self.damaged(path, err) from None

    def _write_tensors(self, state: ResumeState, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(self.dir / name)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.partial-", dir=self.dir)
        os.close(fd)
        try:
            save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, self.dir / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        state.files[name] = file_sha256(self.dir / name)

    def commit_block(self, state: ResumeState, index: int, block: nn.Module, next_hidden: list[torch.Tensor]) -> None:
        """Save block `index` as finished, with the inputs of block index + 1. Across ranks: rank 0 writes the
        block, each rank its hidden states; state.json (rank 0) commits once every rank's file is written."""
        ranks, before = self.ranks, dict(state.files)
        error = None
        try:
            if ranks.is_main:
                self._write_tensors(state, f"block-{index:04d}.safetensors", block.state_dict())
            self._write_tensors(state, self.hidden_name(index + 1), {f"batch.{i}": h for i, h in enumerate(next_hidden)})
        except Exception as err:  # noqa: BLE001 - every rank raises it together in check()
            error = err
        ranks.check(error)
        for written in ranks.gather({k: v for k, v in state.files.items() if before.get(k) != v}):
            state.files.update(written)
        old = [name for name in state.files if name.startswith(f"hidden-{index:04d}")]
        for name in old:
            state.files.pop(name)
        state.blocks_done = index + 1
        state.records[str(index)] = block_records(block)
        state.digest = state_digest(state)
        if ranks.is_main:
            with atomic_file(self.dir / STATE_FILE) as handle:
                json.dump(asdict(state), handle, indent=1, sort_keys=True)
        ranks.barrier()
        (self.dir / self.hidden_name(index)).unlink(missing_ok=True)

    def restore_block(self, state: ResumeState, index: int, block: nn.Module) -> None:
        for name, record in state.records.get(str(index), {}).items():
            try:
                replace_module(block, name, module_for_kind(record["kind"]).from_record(record))
            except (ModelpressError, LookupError, TypeError, ValueError, AttributeError, ArithmeticError) as err:
                raise self.damaged(self.dir / STATE_FILE, ValueError(f"block {index} layer {name}: {err}")) from None
        name = f"block-{index:04d}.safetensors"
        tensors = self._read_tensors(state, name)
        try:
            block.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            raise self.damaged(self.dir / name, err) from None

    def load_hidden(self, state: ResumeState, device: torch.device) -> list[torch.Tensor]:
        name = self.hidden_name(state.blocks_done)
        tensors = self._read_tensors(state, name, device)
        try:
            return [tensors[f"batch.{i}"] for i in range(len(tensors))]
        except KeyError as err:
            raise self.damaged(self.dir / name, err) from None
