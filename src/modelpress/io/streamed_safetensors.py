"""Writing and reading safetensors files one tensor at a time, for models whose tensors are not all in
memory at once (streamed calibration, engine/stream.py).

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON
header naming each tensor's dtype, shape and byte range (padded with spaces to a multiple of 8), then the
tensors' bytes back to back. The header needs only dtypes and shapes, which a meta tensor has; the bytes
are fetched tensor by tensor while writing. `safetensors.safe_open` / `load_file` read the result.
Reading (`read_tensors`) copies each tensor's byte range straight into a fresh tensor: unlike a memory map,
no file pages are counted against the process, so host memory is the tensors asked for and nothing else.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from modelpress.errors import ModelpressError

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


NAMES = {name: dtype for dtype, name in DTYPES.items()}


def read_header(path: str | Path) -> tuple[dict[str, dict], int]:
    """(tensor name -> {dtype, shape, data_offsets}, offset of the data) of a safetensors file."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 2**20:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as err:
        raise ModelpressError(f"{path} is not a readable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def read_tensors(path: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors file, each read into its own memory."""
    header, start = read_header(path)
    out = {}
    with open(path, "rb") as handle:
        for name in names:
            info = header.get(name)
            if info is None or info.get("dtype") not in NAMES:
                raise ModelpressError(f"{path} has no tensor {name} of a known dtype")
            begin, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=NAMES[info["dtype"]])
            if tensor.numel() * tensor.element_size() != end - begin:
                raise ModelpressError(f"{path}: tensor {name} spans {end - begin} bytes, not {info['shape']} "
                                      f"of {info['dtype']}")
            if tensor.numel():
                handle.seek(start + begin)
                if handle.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != end - begin:
                    raise ModelpressError(f"{path} is truncated inside tensor {name}")
            out[name] = tensor
    return out


def write_streamed(path: str | Path, specs: dict[str, torch.Tensor], fetch: Callable[[str], torch.Tensor],
                   metadata: dict[str, str] | None = None) -> None:
    """Write `specs` (name -> tensor or meta tensor giving dtype and shape) to `path`, in that order; each
    tensor's values come from `fetch(name)` just before it is written."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, spec in specs.items():
        if spec.dtype not in DTYPES:
            raise ModelpressError(f"tensor {name} has dtype {spec.dtype}, which safetensors cannot store")
        size = spec.numel() * spec.element_size()
        header[name] = {"dtype": DTYPES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for name, spec in specs.items():
            tensor = fetch(name)
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != tuple(spec.shape):
                raise ModelpressError(f"tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, but the model "
                                      f"declares {spec.dtype} {tuple(spec.shape)}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                handle.write(data.view(torch.uint8).numpy().tobytes())
