"""Integrity of a saved directory: what modelpress.json records about its files and tensors, checked on load.

- `files`: per tensor file, its size and sha256. A file of another size or checksum is named as damaged
  before anything is built from it (saves from before this was recorded load without the check).
- every stored tensor must have the shape (and, in compressed layers, the dtype) that the layer's record in
  modelpress.json implies: group size, format bits, permutation length. A mismatch names the layer.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from modelpress.errors import ModelpressError

HASH_CHUNK = 1 << 22   # bytes read at a time while hashing


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(directory: Path, names: list[str]) -> dict[str, dict]:
    """The `files` entry of modelpress.json: size and sha256 of each named file in `directory`."""
    return {name: {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
            for name in names}


def verify_files(directory: Path, files: dict, checksums: bool = True) -> None:
    """Every recorded file is there with its recorded size (and, with `checksums`, its sha256)."""
    for name, record in files.items():
        path = directory / name
        if not path.is_file():
            raise ModelpressError(f"{path} is missing; the directory is incomplete, save the model again")
        size = path.stat().st_size
        if size != record.get("bytes", size):
            raise ModelpressError(f"{path} is damaged: {size} bytes, modelpress.json recorded {record['bytes']}")
        if checksums and "sha256" in record and file_sha256(path) != record["sha256"]:
            raise ModelpressError(f"{path} is damaged: its sha256 differs from the one modelpress.json recorded")


def check_tensors_match(model: nn.Module, tensors: dict[str, torch.Tensor], layers: dict[str, dict],
                        file: Path) -> None:
    """The stored tensors are exactly the (meta) model's, each of its shape; in compressed layers (built from
    their records) also of its dtype. Errors name the layer whose record the file contradicts."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    for name in missing + unexpected:
        layer = owner(name, layers)
        where = f"layer {layer}'s {layers[layer]['kind']} record in modelpress.json" if layer else "config.json"
        what = "lacks" if name in missing else "has"
        raise ModelpressError(f"{file} {what} {name}, unlike what {where} describes; the directory is damaged "
                              f"or mixed up")
    for name, want in expected.items():
        got = tensors[name]
        layer = owner(name, layers)
        if tuple(got.shape) != tuple(want.shape) or (layer is not None and got.dtype != want.dtype):
            where = f"layer {layer} ({layers[layer]['kind']} record in modelpress.json)" if layer else "config.json"
            raise ModelpressError(f"{file}: {name} is {tuple(got.shape)} {got.dtype}, but {where} implies "
                                  f"{tuple(want.shape)} {want.dtype}; the directory is damaged or mixed up")


def owner(tensor_name: str, layers: dict[str, dict]) -> str | None:
    """The compressed layer a tensor belongs to (the longest layer name prefixing it), or None."""
    found = [layer for layer in layers if tensor_name.startswith(f"{layer}.")]
    return max(found, key=len) if found else None
