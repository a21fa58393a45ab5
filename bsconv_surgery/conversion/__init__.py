"""The stages of ``convert`` (``stages.py``), its result (``result.py``) and the variants (``variants.py``)."""

from .result import ConversionResult
from .variants import register_variant

__all__ = ["ConversionResult", "register_variant"]
