"""bsconv-surgery: rewrite timm and torchvision CNNs with blueprint separable convolutions.

``import bsconv_surgery`` is cheap: a public name's module (and torch, timm, torchvision with it)
is imported the first time the name is used (PEP 562), so the command line's ``--help`` answers
at once and ``bsconv_surgery.convert`` still works as before.
"""

from __future__ import annotations

import importlib
from typing import Any, List

from .errors import SurgeryError

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_PUBLIC = {
    "Batch": "bsconv_surgery.calibration",
    "Labelled": "bsconv_surgery.calibration",
    "compile_aot": "bsconv_surgery.inference",
    "fold_batchnorm": "bsconv_surgery.inference",
    "prepare_for_inference": "bsconv_surgery.inference",
    "save_converted": "bsconv_surgery.io.saving",
    "BSConvS": "bsconv_surgery.layers",
    "BSConvS1d": "bsconv_surgery.layers",
    "BSConvS3d": "bsconv_surgery.layers",
    "BSConvU": "bsconv_surgery.layers",
    "BSConvU1d": "bsconv_surgery.layers",
    "BSConvU3d": "bsconv_surgery.layers",
    "SubspaceProjection": "bsconv_surgery.layers",
    "SubspaceProjection1d": "bsconv_surgery.layers",
    "SubspaceProjection3d": "bsconv_surgery.layers",
    "orthonormal_error": "bsconv_surgery.layers",
    "ModelSpec": "bsconv_surgery.models",  # importing models registers the paper's CIFAR models in timm
    "create_model": "bsconv_surgery.models",
    "parse_model_spec": "bsconv_surgery.models",
    "lower_bsconv": "bsconv_surgery.passes.lowering",
    "recalibrate_batchnorm": "bsconv_surgery.recalibration",
    "stale_batchnorms": "bsconv_surgery.recalibration",
    "regularization_loss": "bsconv_surgery.regularization",
    "regularization_sites": "bsconv_surgery.regularization",
    "measure_sensitivity": "bsconv_surgery.sensitivity",
    "ConversionResult": "bsconv_surgery.surgery",
    "SurgeryOptions": "bsconv_surgery.surgery",
    "convert": "bsconv_surgery.surgery",
    "load_converted": "bsconv_surgery.surgery",
    "distill": "bsconv_surgery.training.distill",
}

__all__ = sorted(["SurgeryError", *_PUBLIC], key=str.lower)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> List[str]:
    return sorted({*globals(), *__all__})
