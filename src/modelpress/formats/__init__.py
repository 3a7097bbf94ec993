"""Number formats, weight schemes and packed storage.

Importing this package registers every built-in format (one file per family).
"""

from modelpress.formats import codebook, fp8, integer, ternary  # noqa: F401  (registration)
from modelpress.formats.base import QFormat, format_names, get_format, register_format
from modelpress.formats.packed import PackedWeight, quantize_weight
from modelpress.formats.scheme import WeightScheme, scheme_for

__all__ = [
    "PackedWeight",
    "QFormat",
    "WeightScheme",
    "format_names",
    "get_format",
    "quantize_weight",
    "register_format",
    "scheme_for",
]
