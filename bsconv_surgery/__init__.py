"""bsconv-surgery: rewrite timm, torchvision and your own CNNs with blueprint separable convolutions.

A model in, typed objects around it::

    import torch, bsconv_surgery as bs

    model = bs.load_model("timm:resnet18")                  # or any nn.Module of yours
    result = bs.convert(model, "u", example_inputs=torch.randn(1, 3, 224, 224))
    result.save("out/resnet18-u")
"""

from .conversion.result import ConversionResult
from .conversion.variants import register_variant
from .core.errors import SurgeryError
from .core.options import Scope, SurgeryOptions, Target
from .core.registry import INITIALIZERS, VARIANTS
from .analysis.counting import Budget, count_budget
from .data.calibration import Batch, Labelled
from .data.dataset import Dataset
from .inference import export_onnx, fold_batchnorm, prepare_for_inference
from .inference.benchmark import benchmark
from .layers import BSConvS, BSConvU, SubspaceProjection
from .layers.regularization import regularization_loss
from .models import cifar  # noqa: F401  (registers the paper's CIFAR architectures in timm's model registry)
from .models.inputs import ExampleInputs
from .models.zoo import example_inputs_for, load_model, model_source
from .recovery.distill import distill
from .recovery.fidelity import measure_fidelity
from .recovery.recalibration import recalibrate_batchnorm
from .recovery.sensitivity import measure_sensitivity
from .surgery import convert, load_converted

__version__ = "0.1.0"

__all__ = [
    # models in
    "load_model",
    "model_source",
    "ExampleInputs",
    "example_inputs_for",
    # conversion
    "convert",
    "load_converted",
    "ConversionResult",
    "SurgeryOptions",
    "Scope",
    "Target",
    "register_variant",
    # data and recovery
    "Dataset",
    "Batch",
    "Labelled",
    "measure_fidelity",
    "measure_sensitivity",
    "recalibrate_batchnorm",
    "distill",
    "regularization_loss",
    # counting, speed, deployment
    "Budget",
    "count_budget",
    "benchmark",
    "prepare_for_inference",
    "fold_batchnorm",
    "export_onnx",
    # layers
    "BSConvU",
    "BSConvS",
    "SubspaceProjection",
    "SurgeryError",
]
