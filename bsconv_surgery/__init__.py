"""bsconv-surgery: rewrite timm and torchvision CNNs with blueprint separable convolutions."""

from . import cifar_models  # registers the paper's CIFAR architectures in timm's model registry
from .errors import SurgeryError
from .inference import compile_aot, fold_batchnorm, prepare_for_inference
from .layers import BSConvS, BSConvU, SubspaceProjection, orthonormal_error
from .lowering import lower_bsconv
from .models import ModelSpec, create_model, parse_model_spec
from .regularization import regularization_loss, regularization_sites
from .saving import load_converted, save_converted
from .surgery import ConversionResult, SurgeryOptions, convert

__version__ = "0.1.0"

__all__ = [
    "BSConvS",
    "BSConvU",
    "ConversionResult",
    "ModelSpec",
    "SubspaceProjection",
    "SurgeryError",
    "SurgeryOptions",
    "compile_aot",
    "convert",
    "create_model",
    "fold_batchnorm",
    "load_converted",
    "lower_bsconv",
    "orthonormal_error",
    "parse_model_spec",
    "prepare_for_inference",
    "regularization_loss",
    "regularization_sites",
    "save_converted",
]
