"""How a model wants its images: ``data_settings_for(model, example_inputs)`` -> ``DataSettings``.

The one reader of a model's own data config: input size and channels from how the model is fed
(the conversion's ``ExampleInputs``: a converted folder's ``surgery.json``), normalisation and
resizing from what the model says about itself:

- timm (and any module with a timm-style ``pretrained_cfg`` / ``default_cfg`` mapping, your own
  models too): ``timm.data.resolve_data_config`` (timm's ``tf_*`` and inception ports: mean = std
  = 0.5; bicubic resizing and their crop fraction);
- torchvision: the transforms of the weights the model was built with (``--pretrained`` /
  ``--weights``), else of its ``DEFAULT`` weights (how torchvision trains that architecture);
  detection models normalise inside (their transforms only scale to [0, 1]);
- otherwise the model says nothing: ``mean``/``std`` are ``None`` and the data decides
  (``data/datasets.py: normalization``: ImageNet statistics for photos, a labelled set's own).

``sources`` says where each value came from; reports and the resolved recipe show it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torchvision
from timm.data import resolve_data_config
from torch import nn

from .inputs import ExampleInputs, Inputs
from .zoo import example_inputs_for, model_source, parse_model_spec

__all__ = ["DataSettings", "data_settings_for", "IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_CROP_PCT"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The crop fraction of evaluation resizing when the model names none (short side = size / 0.875).
DEFAULT_CROP_PCT = 0.875
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class DataSettings:
    """A model's data settings: ``input_size`` (``C,H,W``; ``None`` when the model is not fed
    images), ``mean``/``std`` per channel (``None``: the model declares none), ``interpolation``
    (``bilinear``/``bicubic``/``nearest``), ``crop_pct`` (the centre crop's share of the resized
    short side; ``None``: not known), and ``sources``: field -> where its value came from.

    >>> import bsconv_surgery as bs
    >>> settings = bs.DataSettings((1, 16, 16))
    >>> settings.channels, settings.side, settings.mean
    (1, 16, None)
    """

    input_size: Optional[Tuple[int, ...]] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    interpolation: str = "bilinear"
    crop_pct: Optional[float] = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    notes: Tuple[str, ...] = field(default=(), compare=False)

    @property
    def images(self) -> bool:
        """Whether the model takes images (``C,H,W``)."""
        return self.input_size is not None and len(self.input_size) == 3

    @property
    def channels(self) -> int:
        return self.input_size[0] if self.input_size else 3

    @property
    def side(self) -> Optional[int]:
        """The image side data is made at: the height (a non-square conversion is noted)."""
        return self.input_size[-2] if self.images else None

    def to_json(self) -> Dict[str, Any]:
        return {"input_size": list(self.input_size) if self.input_size else None,
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
                "interpolation": self.interpolation, "crop_pct": self.crop_pct, "sources": dict(self.sources),
                "notes": list(self.notes)}


def _own_config(model: nn.Module) -> Optional[Mapping[str, Any]]:
    for name in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, name, None)
        if isinstance(cfg, Mapping) and (cfg.get("mean") is not None or cfg.get("std") is not None):
            return cfg
    return None


def _floats(values: Any) -> Optional[Tuple[float, ...]]:
    if values is None:
        return None
    values = (values,) if isinstance(values, (int, float)) else tuple(values)
    return tuple(float(v) for v in values) if values else None


def _from_timm_config(model: nn.Module, cfg: Mapping[str, Any]) -> Dict[str, Any]:
    resolved = resolve_data_config({}, model=model)
    tag = cfg.get("architecture") or type(model).__name__
    tag = f"{tag}.{cfg['tag']}" if cfg.get("tag") else tag
    where = f"the model's pretrained_cfg ({tag}, timm.data.resolve_data_config)"
    interpolation = str(resolved.get("interpolation") or "bilinear")
    return {"mean": _floats(resolved.get("mean")), "std": _floats(resolved.get("std")),
            "interpolation": interpolation if interpolation in INTERPOLATIONS else "bilinear",
            "crop_pct": float(resolved["crop_pct"]) if resolved.get("crop_pct") else None, "where": where}


def _torchvision_weights(model: nn.Module):
    """The torchvision weights entry the model was built with, else its ``DEFAULT`` one, and a label."""
    source = model_source(model)
    if source is None or not source.spec or not source.spec.startswith(("tv:", "torchvision:")):
        return None, ""
    if source.pretrained is not None and source.pretrained.zoo == "torchvision":
        try:
            return torchvision.models.get_weight(source.pretrained.name), f"{source.pretrained.name} transforms"
        except (ValueError, KeyError, AttributeError):
            pass
    try:
        entry = torchvision.models.get_model_weights(parse_model_spec(source.spec).name).DEFAULT
    except Exception:  # no weights enum for this model
        return None, ""
    return entry, f"{type(entry).__name__}.{entry.name} transforms (torchvision's DEFAULT weights of {source.spec})"


def _from_torchvision(model: nn.Module) -> Optional[Dict[str, Any]]:
    entry, label = _torchvision_weights(model)
    if entry is None:
        return None
    transforms = entry.transforms()
    kind = type(transforms).__name__
    if kind == "ObjectDetection":  # the model normalises inside; its input is the [0, 1] image
        mean, std, label = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), f"{label}: the model normalises inside"
    elif kind == "OpticalFlow":  # scales to [-1, 1]
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    else:
        mean, std = _floats(getattr(transforms, "mean", None)), _floats(getattr(transforms, "std", None))
    mode = getattr(transforms, "interpolation", None)
    interpolation = getattr(mode, "value", "bilinear")
    crop, resize = getattr(transforms, "crop_size", None), getattr(transforms, "resize_size", None)
    crop_pct = crop[0] / resize[0] if crop and resize else None
    return {"mean": mean, "std": std, "interpolation": interpolation if interpolation in INTERPOLATIONS else "bilinear",
            "crop_pct": crop_pct, "where": f"torchvision weights: {label}"}


def _declared(model: nn.Module) -> Optional[Dict[str, Any]]:
    cfg = _own_config(model)
    if cfg is not None:
        return _from_timm_config(model, cfg)
    return _from_torchvision(model)


def data_settings_for(model: nn.Module, example_inputs: Inputs = None, *,
                      inputs_from: str = "the example inputs") -> DataSettings:
    """The data settings of ``model`` fed as ``example_inputs`` say (default: its own input size,
    ``example_inputs_for``); ``inputs_from`` names where those came from (``"the conversion"``).

    >>> import timm, bsconv_surgery as bs
    >>> s = bs.data_settings_for(timm.create_model("tf_mobilenetv3_small_minimal_100"), (3, 16, 16))
    >>> s.input_size, s.mean, s.interpolation
    ((3, 16, 16), (0.5, 0.5, 0.5), 'bilinear')
    """
    if example_inputs is None:
        inputs = example_inputs_for(model)
        inputs_from = "the model's default input size"
    else:
        inputs = example_inputs if isinstance(example_inputs, ExampleInputs) else example_inputs_for(model, example_inputs)
    size = tuple(inputs.size)
    image = len(size) == 3 and (inputs.family.images or inputs.family.name == "tensor")
    sources: Dict[str, str] = {"input_size": inputs_from}
    notes: List[str] = []
    declared = _declared(model)
    if declared is None:
        sources["mean"] = sources["std"] = "none declared by the model"
        return DataSettings(size, None, None, "bilinear", None, sources, tuple(notes))
    mean, std = declared["mean"], declared["std"]
    if image and mean is not None and len(mean) not in (1, size[0]):
        notes.append(f"the model's mean has {len(mean)} values for {size[0]} channel(s): not used")
        mean = std = None
    for key in ("mean", "std", "interpolation", "crop_pct"):
        sources[key] = declared["where"]
    if image and size[-1] != size[-2]:
        notes.append(f"a non-square input {size[-2]}x{size[-1]}: square data is made at {size[-2]} px")
    return DataSettings(size, mean, std, declared["interpolation"], declared["crop_pct"], sources, tuple(notes))

