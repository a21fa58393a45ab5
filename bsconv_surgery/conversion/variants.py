"""The variants: a name -> the passes ``convert`` runs, in order."""

from __future__ import annotations

from typing import Callable, List

from ..core.options import SurgeryOptions
from ..core.registry import INITIALIZERS, VARIANTS
from ..passes import BottleneckToBSConvS, ConvToBSConv, DSCToBSConvU, SurgeryPass
from ..passes import initializers  # noqa: F401  (registers the "default", "svd" and "auto" initialisers)

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


register_variant("u", lambda o: [DSCToBSConvU(INITIALIZERS.get(o.init)), ConvToBSConv("u", INITIALIZERS.get(o.init))])
register_variant("s", lambda o: [BottleneckToBSConvS(), ConvToBSConv("s", INITIALIZERS.get(o.init))])
