"""WeightScheme: a number format plus how weights are grouped under one scale, and how scales are stored.

Spec strings name a scheme in one token, for the CLI and reports: FORMAT[/GRANULARITY][/dq][/zp][/DTYPE], where
GRANULARITY is gN (groups of N consecutive inputs of a row), `channel` (one scale per output row) or
`tensor`; `zp` gives an asymmetric format integer zero points. Examples: int4/g128, int4-asym/g32,
int4-asym/g128/zp, int8/channel, nf4/g64/dq, fp8-e4m3/tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from modelpress.errors import ModelpressError
from modelpress.formats.base import QFormat, get_format

Granularity = Literal["tensor", "channel", "group"]
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class WeightScheme:
    format: str
    granularity: Granularity = "group"
    group_size: int | None = 128
    scale_dtype: str = "float16"
    double_quant: bool = False
    double_quant_block: int = 256
    integer_zero: bool = False   # asymmetric: offset = −z·scale with an integer z (see stored_ranges)

    def __post_init__(self) -> None:
        get_format(self.format)  # raises with the list of known formats
        object.__setattr__(self, "format", self.format.lower())
        if self.granularity not in ("tensor", "channel", "group"):
            raise ModelpressError(f"granularity must be tensor, channel or group, got {self.granularity!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size <= 0:
                raise ModelpressError(f"group size must be a positive integer, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ModelpressError(f"{self.granularity} granularity takes no group size (got {self.group_size})")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ModelpressError(f"scale dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        for name in ("double_quant", "integer_zero"):
            if not isinstance(getattr(self, name), bool):
                raise ModelpressError(f"{name} must be true or false, got {getattr(self, name)!r}")
        block = self.double_quant_block
        if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
            raise ModelpressError(f"double-quant block must be a positive integer, got {block!r}")
        if self.integer_zero:
            self._check_integer_zero()

    def _check_integer_zero(self) -> None:
        if not self.qformat.affine:
            raise ModelpressError(f"integer zero points (zp) apply to asymmetric formats (int4-asym, ...), "
                                  f"not {self.format}")
        if self.double_quant:
            raise ModelpressError("integer zero points (zp) need the scales as stored, not double-quantized (dq)")
        if self.zero_scale_bits < 6:
            raise ModelpressError(f"{self.format} with integer zero points would keep only {self.zero_scale_bits} "
                                  f"significant bits of each {self.scale_dtype} scale; use float32 scales")

    @property
    def qformat(self) -> QFormat:
        return get_format(self.format)

    @property
    def bits(self) -> int:
        return self.qformat.bits

    @property
    def zero_scale_bits(self) -> int:
        """Significant bits a scale keeps under integer zero points, so that z·scale (z < 2^bits) is exact in
        the scale dtype: the offset is then stored exactly and equals −z·scale (what compressed-tensors,
        AutoGPTQ and vLLM store), and the model exports with no re-rounding."""
        significand = {torch.float16: 11, torch.bfloat16: 8, torch.float32: 24}[self.torch_scale_dtype]
        return significand - self.bits

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def group_length(self, in_features: int) -> int:
        """Inputs per scale along a row (the last group of a row may be shorter)."""
        return in_features if self.granularity != "group" else min(self.group_size, in_features)  # type: ignore[type-var]

    def num_groups(self, in_features: int) -> int:
        g = self.group_length(in_features)
        return (in_features + g - 1) // g

    @property
    def spec(self) -> str:
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        extra = ("/dq" if self.double_quant else "") + ("/zp" if self.integer_zero else "")
        dtype = "" if self.scale_dtype == "float16" else f"/{self.scale_dtype}"
        return f"{self.format}/{gran}{extra}{dtype}"

    def theoretical_bits_per_weight(self, in_features: int | None = None) -> float:
        """Code bits plus scale (and offset) bits per weight; ragged last groups counted if K is given."""
        scale_bits = torch.finfo(self.torch_scale_dtype).bits
        if self.double_quant:
            scale_bits = 8 + 32 / self.double_quant_block
        per_group = scale_bits + (torch.finfo(self.torch_scale_dtype).bits if self.qformat.affine else 0)
        if self.granularity == "tensor":
            return float(self.bits)
        if in_features is None:
            if self.granularity == "channel":
                return float(self.bits)
            return self.bits + per_group / self.group_size  # type: ignore[operator]
        return self.bits + per_group * self.num_groups(in_features) / in_features

    def stored_ranges(self, scale: torch.Tensor, offset: torch.Tensor | None = None, name: str = "weight"
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The one scale-storage rule (packing, RTN, GPTQ, AWQ, SparseGPT all use it): scale and offset
        rounded to the storage dtype, returned in that dtype. Scales floor at the dtype's smallest subnormal
        (tiny·eps, not the smallest normal: a group of tiny weights keeps its own scale); a scale beyond the
        dtype's range is an error (silently clamping it would clip the group); offsets clamp to the range."""
        dtype = self.torch_scale_dtype
        finfo = torch.finfo(dtype)
        scale = scale.float()
        if (scale > finfo.max).any():
            raise ModelpressError(f"{name}: a scale exceeds {self.scale_dtype} range; use float32 scales")
        if self.integer_zero and offset is not None:
            return self._integer_zero_ranges(scale, offset.float())
        scale = scale.clamp(min=finfo.tiny * finfo.eps).to(dtype)
        if offset is not None:
            offset = offset.float().clamp(-finfo.max, finfo.max).to(dtype)
        return scale, offset

    def _integer_zero_ranges(self, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """offset = −z·scale with an integer code z: the grid holds 0 exactly, so a range that does not reach 0
        is first widened to it (as AutoGPTQ does); scales are rounded to zero_scale_bits significant bits and z
        is the code nearest to −offset/scale: the products are exact, so the offset is stored exactly."""
        finfo = torch.finfo(self.torch_scale_dtype)
        top = 2 ** self.bits - 1
        low, high = offset.clamp(max=0), (offset + top * scale).clamp(min=0)
        scale = ((high - low) / top).clamp(min=finfo.smallest_normal)
        mantissa, exponent = torch.frexp(scale)
        step = 2.0 ** self.zero_scale_bits
        scale = torch.ldexp(torch.round(mantissa * step) / step, exponent)
        zero = torch.round(-low / scale).clamp(0, top)
        return scale.to(self.torch_scale_dtype), (-zero * scale).to(self.torch_scale_dtype)

    def round_trip(self, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """x rounded to the nearest level of the grid `scale` (and `offset`, the value of code 0), both already
        broadcastable to x and as stored: decode(encode((x − offset) / scale)) · scale + offset, in float32."""
        fmt = self.qformat
        x = x.float()
        shifted = x if offset is None else x - offset
        values = fmt.decode(fmt.encode(shifted / scale)) * scale
        return values if offset is None else values + offset

    @classmethod
    def parse(cls, spec: str) -> WeightScheme:
        parts = [p for p in spec.strip().lower().split("/") if p]
        if not parts:
            raise ModelpressError("empty scheme spec; expected e.g. int4/g128")
        fields: dict = {"format": parts[0]}
        fields.update(default_grouping(parts[0]))
        for part in parts[1:]:
            if part in ("tensor", "channel"):
                fields.update(granularity=part, group_size=None)
            elif part.startswith("g") and part[1:].lstrip("-").isdigit():
                fields.update(granularity="group", group_size=int(part[1:]))
            elif part == "dq":
                fields["double_quant"] = True
            elif part == "zp":
                fields["integer_zero"] = True
            elif part in SCALE_DTYPES:
                fields["scale_dtype"] = part
            else:
                raise ModelpressError(f"cannot read {part!r} in scheme spec {spec!r}; expected gN, channel, tensor, dq, zp or a scale dtype")
        return cls(**fields)

    def with_grouping(self, group_size: int | str | None) -> WeightScheme:
        """Copy with a grouping given as an int (group), 'channel', 'tensor', or None (keep)."""
        if group_size is None:
            return self
        if group_size in ("channel", "tensor"):
            return replace(self, granularity=group_size, group_size=None)
        return replace(self, granularity="group", group_size=group_size)


def default_grouping(format_name: str) -> dict:
    """8-bit formats default to one scale per output channel, narrower ones to groups (64 for NF4)."""
    fmt = get_format(format_name)
    if fmt.bits >= 8:
        return {"granularity": "channel", "group_size": None}
    return {"granularity": "group", "group_size": 64 if fmt.name == "nf4" else 128}


def scheme_for(format_name: str, group_size: int | str | None = None, symmetric: bool | None = None,
               double_quant: bool = False, scale_dtype: str = "float16", integer_zero: bool = False) -> WeightScheme:
    """Build a scheme from CLI-style pieces; `symmetric=False` picks the -asym variant of an int format."""
    name = format_name.lower()
    if symmetric is False and not name.endswith("-asym"):
        if not name.startswith("int"):
            raise ModelpressError(f"format {format_name!r} has no asymmetric variant; asymmetric applies to int2..int8")
        name = f"{name}-asym"
    if symmetric is True and name.endswith("-asym"):
        raise ModelpressError(f"format {format_name!r} is asymmetric but --symmetric was given")
    base = WeightScheme(format=name, scale_dtype=scale_dtype, double_quant=double_quant, integer_zero=integer_zero,
                        **default_grouping(name))
    return base.with_grouping(group_size)


def as_scheme(value: WeightScheme | str) -> WeightScheme:
    """A config's `scheme` field as given from Python: a WeightScheme, or its spec string ("int4/g128")."""
    if isinstance(value, WeightScheme):
        return value
    if isinstance(value, str):
        return WeightScheme.parse(value)
    raise ModelpressError(f"a weight scheme is a WeightScheme or a spec string such as 'int4/g128', "
                          f"got {type(value).__name__} {value!r}")
