"""Adapters that quantize a float model with another library, for side-by-side benchmarks.

Each module exposes `available() -> version` (raises ImportError when the library is missing),
`quantize(model, bits, group_size, ...) -> (model, PeerInfo)` (in place, on a copy the caller owns; the
returned model runs a float32 forward) and `DEFAULT_SCHEMES`, the (bits, group_size) pairs a benchmark
runs by default. Install the libraries from bench/requirements-peers.txt with -c constraints.txt.
"""

from __future__ import annotations

import importlib
from types import ModuleType

PEERS = {"quanto": "bench.peers.quanto", "hqq": "bench.peers.hqq", "bnb": "bench.peers.bnb"}


def load_peer(name: str) -> ModuleType:
    try:
        return importlib.import_module(PEERS[name])
    except KeyError:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}") from None
