"""Graph passes: each one matches sites in the traced graph, guards them, swaps modules on the
eager model by qualified name and records what it changed (or why it left a site alone).

A pass is one small class with a ``transform(model, ctx)``; ``surgery.convert`` runs the
passes a variant names, in order. Sites claimed by an earlier pass are left to it.

- ``conv.py``: standard conv -> BSConv-U / BSConv-S
"""

from .base import SurgeryContext, SurgeryPass, param_count, swap_module
from .conv import ConvToBSConv

__all__ = ["SurgeryContext", "SurgeryPass", "ConvToBSConv", "swap_module", "param_count"]
