"""Classifier heads: how many classes a model predicts, and a fresh head of another size.

One implementation for every place that fits a head: ``--num-classes`` with pretrained
torchvision weights (which fix their own class count), and ``train`` when the data has another
number of classes than the model.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..core.errors import SurgeryError

__all__ = ["output_classes", "replace_head"]


def output_classes(model: nn.Module, input_size: Sequence[int]) -> int:
    """The classes ``model`` predicts: the width of its eval-mode logits for one input of
    ``input_size`` (each submodule's mode is restored afterwards)."""
    modes = [(m, m.training) for m in model.modules()]
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(1, *input_size, dtype=param.dtype if param is not None else None,
                                    device=param.device if param is not None else None))
    finally:
        for m, mode in modes:
            m.training = mode
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise SurgeryError(f"The model returns {type(out).__name__} of shape {tuple(getattr(out, 'shape', ()))}, "
                           "not logits (batch, classes); only a classifier's head can be replaced.")
    return int(out.shape[1])


def replace_head(model: nn.Module, num_classes: int, have: int) -> str:
    """Give ``model`` a fresh ``num_classes`` classifier in place of its ``have``-class one and
    return the qualified name of what was replaced: timm's ``reset_classifier``, else the last
    ``nn.Linear`` with ``have`` outputs, else the last 1x1 conv with ``have`` output channels
    (SqueezeNet). The new head starts with the layer's default random init."""
    if hasattr(model, "reset_classifier") and hasattr(model, "get_classifier"):  # timm
        model.reset_classifier(num_classes)
        return "classifier (timm reset_classifier)"
    modules = list(model.named_modules())
    found = [(n, m) for n, m in modules if isinstance(m, nn.Linear) and m.out_features == have]
    if not found:
        found = [(n, m) for n, m in modules if isinstance(m, nn.Conv2d) and m.out_channels == have
                 and tuple(m.kernel_size) == (1, 1) and m.groups == 1]
    if not found:
        raise SurgeryError(f"The model predicts {have} classes and {num_classes} were asked for, but no final "
                           f"nn.Linear (or 1x1 conv) with {have} outputs was found to replace.")
    name, old = found[-1]
    factory = {"device": old.weight.device, "dtype": old.weight.dtype}
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None, **factory)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, 1, bias=old.bias is not None, **factory)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return name
