"""bsconv-surgery: rewrite timm, torchvision and your own CNNs with blueprint separable convolutions.

A model in, typed objects around it::

    import torch, bsconv_surgery as bs

    model = bs.load_model("timm:resnet18")                  # or any nn.Module of yours
    result = bs.convert(model, "u", example_inputs=torch.randn(1, 3, 224, 224))
    result.save("out/resnet18-u")

``import bsconv_surgery`` is cheap: a public name's module (and torch, timm, torchvision with it)
is imported the first time the name is used (PEP 562), so the command line's ``--help`` answers
at once and ``bsconv_surgery.convert`` works as any attribute.
"""

from __future__ import annotations

import importlib
from typing import Any, List

from .core.errors import SurgeryError

__version__ = "0.1.0"

#: Public name -> the module that defines it, in the order the reference lists them.
_PUBLIC = {
    # models in
    "load_model": "bsconv_surgery.models.zoo",
    "model_source": "bsconv_surgery.models.zoo",
    "ExampleInputs": "bsconv_surgery.models.inputs",
    "example_inputs_for": "bsconv_surgery.models.zoo",
    "data_settings_for": "bsconv_surgery.models.data_config",
    "DataSettings": "bsconv_surgery.models.data_config",
    # conversion
    "convert": "bsconv_surgery.surgery",
    "load_converted": "bsconv_surgery.surgery",
    "ConversionResult": "bsconv_surgery.conversion.result",
    "SurgeryOptions": "bsconv_surgery.core.options",
    "Scope": "bsconv_surgery.core.options",
    "Target": "bsconv_surgery.core.options",
    "register_variant": "bsconv_surgery.conversion.variants",
    # data and recovery
    "Dataset": "bsconv_surgery.data.dataset",
    "Batch": "bsconv_surgery.data.calibration",
    "Labelled": "bsconv_surgery.data.calibration",
    "measure_fidelity": "bsconv_surgery.recovery.fidelity",
    "measure_sensitivity": "bsconv_surgery.recovery.sensitivity",
    "recalibrate_batchnorm": "bsconv_surgery.recovery.recalibration",
    "distill": "bsconv_surgery.recovery.distill",
    "regularization_loss": "bsconv_surgery.layers.regularization",
    "compress": "bsconv_surgery.compression.pipeline",
    "CompressResult": "bsconv_surgery.compression.result",
    # counting, speed, deployment
    "Budget": "bsconv_surgery.analysis.counting",
    "count_budget": "bsconv_surgery.analysis.counting",
    "benchmark": "bsconv_surgery.inference.benchmark",
    "prepare_for_inference": "bsconv_surgery.inference",
    "fold_batchnorm": "bsconv_surgery.inference",
    "export_onnx": "bsconv_surgery.inference",
    "export_converted": "bsconv_surgery.inference.export",
    # layers
    "BSConvU": "bsconv_surgery.layers",
    "BSConvS": "bsconv_surgery.layers",
    "SubspaceProjection": "bsconv_surgery.layers",
}

#: Attributes that are not the public API's names but are handy to reach: the registries.
_ALSO = {"VARIANTS": "bsconv_surgery.core.registry", "INITIALIZERS": "bsconv_surgery.core.registry"}

__all__ = [*_PUBLIC, "SurgeryError"]


def __getattr__(name: str) -> Any:
    where = _PUBLIC.get(name) or _ALSO.get(name)
    if where is None:  # a subpackage (bs.models, bs.recovery, ...) is imported on first use too
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> List[str]:
    return sorted({*globals(), *__all__, *_ALSO})
