"""The building blocks: BSConv-U, BSConv-S, the subspace projection (``bsconv.py``) and the
compiler-friendly forms of their steps (``lowered.py``); 1-D and 3-D layers too. Plain ``nn.Module`` code, no graph work."""

from . import bsconv, lowered
from .bsconv import (
    CONV_CLASSES,
    NORM_CLASSES,
    REGULARIZED_TYPES,
    BSConvS,
    BSConvS1d,
    BSConvS3d,
    BSConvU,
    BSConvU1d,
    BSConvU3d,
    SubspaceProjection,
    SubspaceProjection1d,
    SubspaceProjection3d,
    bsconv_class,
    bsconv_macs,
    bsconv_s_params,
    bsconv_u_params,
    conv_dims,
    conv_macs,
    kernel_volume,
    make_depthwise,
    mid_channels_for,
    orthonormal_error,
)
from .lowered import DepthwiseAsStencil, PointwiseAsLinear

__all__ = bsconv.__all__ + lowered.__all__
