"""The building blocks: BSConv-U, BSConv-S, the subspace projection (``bsconv.py``) and the
compiler-friendly forms of their steps (``lowered.py``). Plain ``nn.Module`` code, no graph work."""

from . import bsconv, lowered
from .bsconv import (
    BSConvS,
    BSConvU,
    SubspaceProjection,
    bsconv_s_params,
    bsconv_u_params,
    make_depthwise,
    mid_channels_for,
    orthonormal_error,
)
from .lowered import DepthwiseAsStencil, PointwiseAsLinear

__all__ = bsconv.__all__ + lowered.__all__
