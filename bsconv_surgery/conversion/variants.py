"""``register_variant``: add a variant (a name -> the passes ``convert`` runs, in order); the
built-in ``u`` and ``s`` are registered beside the passes (``passes/variants.py``)."""

from __future__ import annotations

from typing import Callable, List

from ..core.options import SurgeryOptions
from ..core.registry import VARIANTS
from ..passes import SurgeryPass

__all__ = ["register_variant"]


def register_variant(name: str, make_passes: Callable[[SurgeryOptions], List[SurgeryPass]]) -> None:
    """``make_passes(options)`` gives the passes of variant ``name``, run in order; earlier passes
    claim their sites first.

    >>> import bsconv_surgery as bs
    >>> from bsconv_surgery.passes import ConvToBSConv
    >>> bs.register_variant("u-convs-only", lambda options: [ConvToBSConv("u")])
    >>> "u-convs-only" in bs.VARIANTS
    True
    """
    VARIANTS.register(name, make_passes)

