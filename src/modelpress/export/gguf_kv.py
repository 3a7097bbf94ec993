"""Read the key-value section of a GGUF file quickly.

gguf-py's GGUFReader maps the file and builds a numpy view per array element, which takes tens of seconds for a
tokenizer of 49k tokens and 49k merges. Copying keys needs only their values, so this reads the header once into
memory and walks it with struct: the layout is magic "GGUF", version (u32), tensor count (u64), key count (u64),
then per key: key (u64 length + UTF-8), value type (u32), value; an array value is element type (u32), count (u64),
elements; a string is u64 length + UTF-8 (little-endian files only, as written by llama.cpp and gguf-py).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from modelpress.errors import ModelpressError

V = GGUFValueType
SCALARS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
           V.FLOAT32: "f", V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.data, self.at)[0]
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.take("Q")
        value = self.data[self.at: self.at + length].decode("utf-8", errors="surrogateescape")
        self.at += length
        return value

    def array(self, fmt: str, count: int) -> list:
        values = np.frombuffer(self.data, dtype=np.dtype("<" + fmt), count=count, offset=self.at)
        self.at += values.nbytes
        return values.tolist()


def read_kv(path: str | Path, max_bytes: int = 1 << 30) -> list[tuple[str, GGUFValueType, GGUFValueType | None, object]]:
    """(key, value type, element type for arrays, value) for every key of the file, in file order."""
    with open(path, "rb") as handle:
        data = handle.read(max_bytes)
    cursor = _Cursor(data)
    try:
        if data[:4] != b"GGUF":
            raise ModelpressError(f"{path} is not a GGUF file")
        cursor.at = 4
        cursor.take("I")
        cursor.take("Q")
        pairs = []
        for _ in range(cursor.take("Q")):
            key = cursor.string()
            vtype = V(cursor.take("I"))
            if vtype == V.ARRAY:
                sub = V(cursor.take("I"))
                count = cursor.take("Q")
                value = [cursor.string() for _ in range(count)] if sub == V.STRING else cursor.array(SCALARS[sub], count)
                pairs.append((key, vtype, sub, value))
            else:
                pairs.append((key, vtype, None, cursor.string() if vtype == V.STRING else cursor.take(SCALARS[vtype])))
    # OverflowError: an array count past what numpy can index (found by tests/io/test_fuzz.py)
    except (struct.error, ValueError, KeyError, UnicodeDecodeError, OverflowError) as err:
        raise ModelpressError(f"{path}: damaged GGUF key-value section ({err})") from None
    return pairs
