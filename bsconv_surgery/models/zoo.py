"""Model specs (``timm:NAME``, ``torchvision:NAME``/``tv:NAME``, bare ``NAME``), model creation
with random init (optionally loading a checkpoint), default input sizes and the zoos' names."""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

import timm
import torchvision
from torch import nn

from ..errors import SurgeryError
from .checkpoints import load_checkpoint

__all__ = [
    "ModelSpec",
    "parse_model_spec",
    "create_model",
    "default_input_size",
    "parse_input_size",
    "timm_model_names",
    "torchvision_model_names",
    "DEFAULT_INPUT_SIZE",
]

_SOURCE_ALIASES = {"timm": "timm", "torchvision": "torchvision", "tv": "torchvision"}
DEFAULT_INPUT_SIZE = (3, 224, 224)


@dataclass(frozen=True)
class ModelSpec:
    """A model named by its zoo: ``source`` is ``"timm"`` or ``"torchvision"``."""

    source: str
    name: str

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


def timm_model_names() -> List[str]:
    """Every model name timm knows (the CIFAR models of ``models/cifar.py`` included)."""
    return timm.list_models()


def torchvision_model_names() -> List[str]:
    """torchvision's classification models."""
    return torchvision.models.list_models(module=torchvision.models)


def _unknown(name: str, candidates: List[str], where: str) -> SurgeryError:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return SurgeryError(
        f"Unknown model '{name}' ({where}).{hint} "
        "Use 'timm:NAME', 'torchvision:NAME' (or 'tv:NAME'), or a bare NAME looked up in timm first."
    )


def parse_model_spec(text: str) -> ModelSpec:
    """Resolve ``text`` to a ``ModelSpec``; a bare name is looked up in timm, then torchvision."""
    text = text.strip()
    if ":" in text:
        prefix, name = text.split(":", 1)
        source = _SOURCE_ALIASES.get(prefix.lower())
        if source is None:
            raise SurgeryError(
                f"Unknown model source '{prefix}' in '{text}'. Valid sources: timm, torchvision, tv."
            )
        if source == "timm":
            if not timm.is_model(name):
                raise _unknown(name, timm_model_names(), "not in timm")
        elif name not in torchvision_model_names():
            raise _unknown(name, torchvision_model_names(), "not a torchvision classification model")
        return ModelSpec(source, name)
    if timm.is_model(text):
        return ModelSpec("timm", text)
    if text in torchvision_model_names():
        return ModelSpec("torchvision", text)
    raise _unknown(text, timm_model_names() + torchvision_model_names(), "neither in timm nor torchvision")


def create_model(
    spec: ModelSpec,
    num_classes: Optional[int] = None,
    checkpoint: Optional[Path] = None,
) -> nn.Module:
    """Build ``spec`` with random init (no download), optionally loading ``checkpoint``."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's init_weights FutureWarning and friends
            if spec.source == "timm":
                model = timm.create_model(spec.name, pretrained=False, **kwargs)
            else:
                model = torchvision.models.get_model(spec.name, weights=None, **kwargs)
    except Exception as exc:  # a model constructor rejecting its arguments
        raise SurgeryError(f"Could not build {spec} ({type(exc).__name__}: {exc}).") from exc
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def default_input_size(spec: Optional[ModelSpec], model: nn.Module) -> Tuple[int, int, int]:
    """timm's pretrained config, the size a torchvision ViT was built for, torchvision's weights
    crop size, else ``3,224,224``."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("input_size"):
        return tuple(int(v) for v in cfg["input_size"])
    image_size = getattr(model, "image_size", None)  # torchvision ViTs are built for one size
    if isinstance(image_size, int) and image_size > 0:
        return (3, image_size, image_size)
    if spec is not None and spec.source == "torchvision":
        try:
            weights = torchvision.models.get_model_weights(spec.name).DEFAULT
            crop = weights.transforms.keywords.get("crop_size")
            if crop:
                crop = crop[0] if isinstance(crop, (list, tuple)) else crop
                return (3, int(crop), int(crop))
        except Exception:  # no weights enum for this model: fall back
            pass
    return DEFAULT_INPUT_SIZE


def parse_input_size(text: str) -> Tuple[int, int, int]:
    """Parse ``C,H,W`` (e.g. ``3,224,224``)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise SurgeryError(f"Bad input size '{text}': expected three positive integers C,H,W such as 3,224,224.")
    return values
