"""Graph passes: each one matches sites in the traced graph, guards them, swaps modules on the
eager model by qualified name and records what it changed (or why it left a site alone).

A pass is one small class on the template of ``base.py`` (``match`` sites, ``guard`` each,
``swap`` the rest); ``surgery.convert`` runs the passes a variant names, in order, and sites
claimed by an earlier pass are left to it. Folding and lowering run on their own
(``fold_batchnorm``, ``lower_bsconv``, used by ``inference.prepare_for_inference``).

- ``conv.py``: standard conv -> BSConv-U / BSConv-S
- ``dsc.py``: depthwise-separable pair -> BSConv-U by reordering (paper 4.1)
- ``bottleneck.py``: inverted-residual projection -> BSConv-S ``W_B`` (paper 4.2)
- ``batchnorm.py``: eval-mode BatchNorm folded into the conv before it (inference)
- ``lowering.py``: BSConv steps as matmul + depthwise stencil (inference, under the compiler)
- ``variants.py``: the built-in variants ``u`` and ``s`` (which passes each runs), registered in ``VARIANTS``
"""

from .base import SITE_KEY, SurgeryContext, SurgeryPass
from .batchnorm import FoldBatchNorm, FoldReport, fold_batchnorm
from .bottleneck import BottleneckToBSConvS
from .conv import ConvToBSConv
from .dsc import DSCToBSConvU
from .lowering import LowerBSConv, LoweringReport, lower_bsconv
from . import variants  # noqa: F401  (registers the built-in variants u and s)

__all__ = [
    "SITE_KEY",
    "SurgeryContext",
    "SurgeryPass",
    "ConvToBSConv",
    "DSCToBSConvU",
    "BottleneckToBSConvS",
    "FoldBatchNorm",
    "LowerBSConv",
    "FoldReport",
    "fold_batchnorm",
    "LoweringReport",
    "lower_bsconv",
]
