"""The ``models`` command's library side: which models match a pattern, and what the surgery would
find in each without converting the user's model (the passes run on a throwaway copy built on
the meta device: no memory, no weight init, so surveying is cheap)."""

from __future__ import annotations

import copy
import fnmatch
import warnings
from typing import List, Optional

import torch
from torch import nn

from ..core.errors import SurgeryError
from ..fx.modules import param_count
from ..models.zoo import ModelSpec, load_model, timm_model_names, torchvision_model_names
from ..core.records import count_by_kind
from ..core.registry import VARIANTS
from ..surgery import convert

__all__ = ["match_models", "survey_model"]


def match_models(pattern: Optional[str]) -> List[ModelSpec]:
    """Specs whose name (or ``source:name``) matches the glob; timm first, then torchvision."""
    pattern = pattern or "*"
    prefix, _, name_glob = pattern.rpartition(":")
    sources = {"": ("timm", "torchvision"), "timm": ("timm",), "torchvision": ("torchvision",), "tv": ("torchvision",)}
    if prefix not in sources:
        raise SurgeryError(f"Unknown model source '{prefix}' in '{pattern}'. Valid sources: timm, torchvision, tv.")
    out = []
    for source in sources[prefix]:
        names = timm_model_names() if source == "timm" else torchvision_model_names()
        out += [ModelSpec(source, n) for n in names if fnmatch.fnmatchcase(n, name_glob)]
    return out


def _build(spec: ModelSpec) -> nn.Module:
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_model(spec)
    except Exception:  # some constructors compute real values (.item()) and need a real device
        return load_model(spec)


def survey_model(spec: ModelSpec) -> dict:
    """Counts by site kind for each variant, the conv census, the model's family and the tracing
    method (``fx``, ``fx parts`` for a model traced in parts, or the fallback)."""
    model = _build(spec)
    row = {"model": str(spec), "family": spec.family, "params": param_count(model)}
    for variant in sorted(VARIANTS):
        report = convert(copy.deepcopy(model), variant, count=False).report
        row["conv_census"] = report.conv_census
        row["tracing"] = report.tracing.method
        row[variant] = {"sites": count_by_kind(report.replaced), "skipped": len(report.skipped)}
    return row
