"""bsconv-surgery: rewrite timm and torchvision CNNs with blueprint separable convolutions."""

from .data.calibration import Batch, Labelled
from .core.errors import SurgeryError
from .inference import compile_aot, fold_batchnorm, prepare_for_inference
from .io.saving import save_converted
from .layers import (
    BSConvS,
    BSConvS1d,
    BSConvS3d,
    BSConvU,
    BSConvU1d,
    BSConvU3d,
    SubspaceProjection,
    SubspaceProjection1d,
    SubspaceProjection3d,
    orthonormal_error,
)
from .models import ModelSpec, create_model, parse_model_spec
from .models import cifar  # noqa: F401  (registers the paper's CIFAR architectures in timm's model registry)
from .passes.lowering import lower_bsconv
from .recovery.recalibration import recalibrate_batchnorm, stale_batchnorms
from .layers.regularization import regularization_loss, regularization_sites
from .recovery.sensitivity import measure_sensitivity
from .surgery import ConversionResult, SurgeryOptions, convert, load_converted
from .recovery.distill import distill

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "BSConvS",
    "BSConvS1d",
    "BSConvS3d",
    "BSConvU",
    "BSConvU1d",
    "BSConvU3d",
    "ConversionResult",
    "ModelSpec",
    "SubspaceProjection",
    "SubspaceProjection1d",
    "SubspaceProjection3d",
    "SurgeryError",
    "SurgeryOptions",
    "compile_aot",
    "convert",
    "create_model",
    "distill",
    "fold_batchnorm",
    "Labelled",
    "load_converted",
    "lower_bsconv",
    "measure_sensitivity",
    "orthonormal_error",
    "parse_model_spec",
    "prepare_for_inference",
    "recalibrate_batchnorm",
    "regularization_loss",
    "regularization_sites",
    "save_converted",
    "stale_batchnorms",
]
