"""The built-in variants, registered in ``VARIANTS``: the passes each runs, in order (earlier
passes claim their sites first). Here, beside the passes, so every module that runs a variant
(``conversion``, ``recovery.sensitivity``) finds them registered, whatever was imported first."""

from __future__ import annotations

from ..core.registry import INITIALIZERS, VARIANTS
from . import initializers  # noqa: F401  (registers the "default", "svd" and "auto" initialisers)
from .bottleneck import BottleneckToBSConvS
from .conv import ConvToBSConv
from .dsc import DSCToBSConvU

__all__: list = []

VARIANTS.register("u", lambda o: [DSCToBSConvU(INITIALIZERS.get(o.init)), ConvToBSConv("u", INITIALIZERS.get(o.init))])
VARIANTS.register("s", lambda o: [BottleneckToBSConvS(), ConvToBSConv("s", INITIALIZERS.get(o.init))])
