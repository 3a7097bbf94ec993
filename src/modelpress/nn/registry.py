"""Compressed module kinds known to save/load: each kind's class writes a JSON record of itself and can
build an empty instance from one. A new kind of compressed layer registers here and nowhere else."""

from __future__ import annotations

from torch import nn

_KINDS: dict[str, type[nn.Module]] = {}


def register_module_kind(kind: str):
    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        if kind in _KINDS:
            raise ValueError(f"compressed module kind {kind!r} is already registered")
        for method in ("record", "from_record"):
            if not hasattr(cls, method):
                raise TypeError(f"{cls.__name__} needs a {method} method to be saved as {kind!r}")
        cls.module_kind = kind
        _KINDS[kind] = cls
        return cls

    return decorate


def compressed_module_kind(module: nn.Module) -> str | None:
    kind = getattr(type(module), "module_kind", None)
    return kind if kind in _KINDS and _KINDS[kind] is type(module) else None


def module_for_kind(kind: str) -> type[nn.Module]:
    from modelpress.errors import ModelpressError

    try:
        return _KINDS[kind]
    except KeyError:
        raise ModelpressError(f"saved model uses layer kind {kind!r}, unknown to this modelpress") from None
