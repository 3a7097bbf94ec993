"""Data-parallel calibration and evaluation across the processes `torchrun` starts (torch.distributed).

One process per rank runs the same engine; each holds a share of the calibration (or evaluation) batches,
batch i on rank i % world. What crosses ranks, and why it gives the single-process result:
- per-layer statistics (Hessian sums, activation sums and maxima, row counts) are summed (or maxed) across
  ranks before any layer is solved. Sums are kept in float64, so the order ranks add them in changes them
  by ~1e-16 relative and they round to the same float32 values the single process sees;
- the layer solves of a block are split across ranks (the largest first, each to the least loaded rank)
  and every solution is broadcast from the rank that made it, so every rank installs the same weights;
- a failure in a local step on any rank is gathered at the next agreement point (`check`) and raised on
  every rank as one error naming the rank, so no rank waits forever in a collective.
`Ranks()` (world 1) is the single process: every collective is the identity, so the engine has one path.
The process group is torch's own state: `Ranks.active()` reads it; `init_from_environment` (for the CLI)
creates it when torchrun's variables are set (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from modelpress.errors import ModelpressError

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")   # where collectives run: CPU for gloo, this rank's GPU for NCCL

    @classmethod
    def active(cls) -> Ranks:
        """The default process group if one is initialised, else the single process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: i % world == rank (interleaved, so the last, shorter batch lands last)."""
        return list(items[self.rank::self.world])

    def assign(self, costs: Sequence[float]) -> list[int]:
        """A rank per item: largest first, each to the least loaded rank (deterministic: same on every rank)."""
        load = [0.0] * self.world
        owners = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            owner = min(range(self.world), key=lambda r: (load[r], r))
            owners[i] = owner
            load[owner] += costs[i]
        return owners

    # ---- collectives (identity in a single process) -------------------------------------------------------

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over ranks, in place."""
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` maximised elementwise over ranks, in place."""
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def sum_ints(self, values: Sequence[int]) -> list[int]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        return [int(v) for v in self.sum_(t).tolist()]

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if not self.distributed:
            return tensor
        if tensor.device == self.device:
            dist.all_reduce(tensor, op=op)
            return tensor
        moved = tensor.to(self.device)
        dist.all_reduce(moved, op=op)
        tensor.copy_(moved)
        return tensor

    def broadcast(self, value: T, src: int) -> T:
        """`value` as rank `src` has it, on every rank (pickled between the ranks of this one job; send CPU
        tensors, the receiver moves them where it needs them)."""
        if not self.distributed:
            return value
        box = [value if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.device)
        return box[0]  # type: ignore[return-value]

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        out: list = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # ---- agreeing on failure ------------------------------------------------------------------------------

    def check(self, error: BaseException | None) -> None:
        """An agreement point after a local step: if any rank failed, every rank raises one error naming
        the first rank that failed (its own exception chained where it is the one)."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        messages = self.gather(None if error is None else _describe(error))
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if not failed:
            return
        rank, message = failed[0]
        raise ModelpressError(f"rank {rank} of {self.world} failed: {message}") from error

    def on_main(self, step: Callable[[], T]) -> T:
        """`step()` run on rank 0 only, its result (or its failure) on every rank."""
        if not self.distributed:
            return step()
        result, error = None, None
        if self.is_main:
            try:
                result = step()
            except Exception as err:  # noqa: BLE001 - reported on every rank below
                error = err
        self.check(error)
        return self.broadcast(result, src=0)


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    return text if isinstance(error, ModelpressError) and text else f"{type(error).__name__}: {text}"


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE")) and int(os.environ["WORLD_SIZE"]) > 1


def init_from_environment(device: str = "cpu", timeout_s: float = 1800.0) -> tuple[Ranks, str]:
    """Under torchrun (RANK, WORLD_SIZE, ... set): the process group (NCCL when calibrating on CUDA, gloo on
    CPU) and this rank's device (`cuda` becomes `cuda:LOCAL_RANK`). Otherwise the single process, unchanged."""
    if not launched_by_torchrun():
        return Ranks(), device
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ModelpressError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} not: start distributed runs "
                              f"with torchrun --nproc-per-node N -m modelpress ...")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ModelpressError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices; "
                                  f"use --nproc-per-node {torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return Ranks.active(), device
