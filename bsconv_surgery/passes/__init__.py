"""Graph passes: each one matches sites in the traced graph, guards them, swaps modules on the
eager model by qualified name and records what it changed (or why it left a site alone).

A pass is one small class with a ``transform(model, ctx)``; ``surgery.convert`` runs the
passes a variant names, in order. Sites claimed by an earlier pass are left to it.

- ``conv.py``: standard conv -> BSConv-U / BSConv-S
- ``dsc.py``: depthwise-separable pair -> BSConv-U by reordering (paper 4.1); the chain helpers
- ``bottleneck.py``: inverted-residual projection -> BSConv-S ``W_B`` (paper 4.2)
"""

from .base import SurgeryContext, SurgeryPass, param_count, swap_module
from .bottleneck import BottleneckToBSConvS
from .conv import ConvToBSConv
from .dsc import DSCToBSConvU

__all__ = [
    "SurgeryContext",
    "SurgeryPass",
    "ConvToBSConv",
    "DSCToBSConvU",
    "BottleneckToBSConvS",
    "swap_module",
    "param_count",
]
