"""Where the engine keeps the hidden states it carries from block to block: on the calibration device, or
in host memory with each batch copied to the device when it is read.

The engine holds every calibration batch's hidden states between blocks: one stream (the compressed
model's), two with a float reference (GPTQ's float target), and while a block's outputs are being made the
old stream and the new one at once (`peak_streams`). On a GPU that can exceed what the block and its
statistics leave free: 128 windows of 2048 tokens of a 4096-wide model are 4.3 GB per stream in float32.
`HostStates` keeps them in host memory instead; the block still runs on the device, one batch at a time,
so the results are bit for bit those of a run that kept everything on the device, at the cost of one
host-to-device copy per batch per pass (a 4.3 GB stream crosses PCIe 4 in about 0.2 s).

`offload_decision` is the automatic rule the engine applies on CUDA: keep the streams on the device unless
their peak would take more than half of the device memory left after the block (and its float copy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar

import torch

MAX_DEVICE_SHARE = 0.5   # of the memory free after the block(s): the rest is for statistics, solves, activations
_POLICY: ContextVar[bool | None] = ContextVar("modelpress_offload_hidden", default=None)


@contextlib.contextmanager
def offload_policy(offload: bool | None) -> Iterator[None]:
    """Inside: engine runs that are not told otherwise offload (True), keep (False) or decide (None). How
    `--offload-hidden` (CalibrationSettings.offload_hidden) reaches the engine through any method's runner."""
    token = _POLICY.set(offload)
    try:
        yield
    finally:
        _POLICY.reset(token)


def current_policy() -> bool | None:
    return _POLICY.get()


def peak_streams(float_reference: bool) -> int:
    """Streams alive at once on the device when nothing is offloaded: the inputs of the block and its new
    outputs (plus, with a float reference, the reference stream, whose own update holds it twice instead)."""
    return 3 if float_reference else 2


class HostStates(Sequence[torch.Tensor]):
    """Per-batch tensors held in host memory, each handed out on `device` when read. Built from an iterable
    (a generator of block outputs, say), each tensor leaves the device before the next is made."""

    def __init__(self, tensors: Iterable[torch.Tensor], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.host = [t.detach().to("cpu") for t in tensors]

    def __len__(self) -> int:
        return len(self.host)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return HostStates(self.host[index], self.device)
        return self.host[index].to(self.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for tensor in self.host:
            yield tensor.to(self.device)


def carry(tensors: Iterable[torch.Tensor], device: torch.device, offload: bool) -> list[torch.Tensor] | HostStates:
    """The engine's container for a stream: a list on the device, or HostStates."""
    return HostStates(tensors, device) if offload else list(tensors)


def stored(states: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    """The tensors of a stream as they are held (host copies for HostStates), for saving without a round trip."""
    if states is None:
        return []
    return list(states.host) if isinstance(states, HostStates) else list(states)


def crowds(hidden_bytes: int, free_bytes: int, block_bytes: int) -> bool:
    """The rule: hidden states at their peak take more than MAX_DEVICE_SHARE of what the block leaves free."""
    return hidden_bytes > MAX_DEVICE_SHARE * max(free_bytes - block_bytes, 0)


def offload_decision(device: torch.device, stream_bytes: int, streams: int, block_bytes: int
                     ) -> tuple[bool, str | None]:
    """(offload, why) for CUDA: True when `streams` x `stream_bytes` exceed MAX_DEVICE_SHARE of the device memory
    free after `block_bytes` (free memory counts what PyTorch's allocator holds unused). Other devices: never."""
    if device.type != "cuda":
        return False, None
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if not crowds(streams * stream_bytes, free, block_bytes):
        return False, None
    room = max(free - block_bytes, 0)
    return True, (f"calibration hidden states kept in host memory: {streams} x {stream_bytes / 1e9:.2f} GB would "
                  f"take more than {MAX_DEVICE_SHARE:.0%} of the {room / 1e9:.2f} GB left on {device} after the block")
