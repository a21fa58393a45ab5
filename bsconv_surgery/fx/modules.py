"""Module-level helpers shared by the passes, the initialisers and the counters: swapping a
submodule by qualified name (``torch.fx.experimental.optimization``'s ``_parent_name`` +
``setattr``), counting parameters, switching modes for a block, and the eval-mode affine map of
a BatchNorm."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["parent_name", "swap_module", "param_count", "temporary_mode", "batchnorm_affine"]


def parent_name(target: str) -> Tuple[str, str]:
    """``'a.b.c'`` -> ``('a.b', 'c')`` (torch.fx.experimental.optimization's helper)."""
    *parent, name = target.rsplit(".", 1)
    return (parent[0] if parent else ""), name


def swap_module(model: nn.Module, name: str, new: nn.Module) -> List[str]:
    """Replace the submodule at ``name`` by ``new`` under every name that refers to the same
    object (aliases); returns the names replaced. Keeps the old module's train/eval mode."""
    old = model.get_submodule(name)
    new.train(old.training)
    aliases = [n for n, m in model.named_modules(remove_duplicate=False) if m is old]
    for alias in aliases:
        parent, child = parent_name(alias)
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return aliases


def param_count(module: nn.Module) -> int:
    """Number of parameter elements of ``module`` (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


@contextmanager
def temporary_mode(*models: nn.Module, training: bool) -> Iterator[None]:
    """``model.train(training)`` for the block; afterwards each submodule's own mode is restored
    (a user may keep some submodules in eval mode inside a training model)."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.train(training)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def batchnorm_affine(norm: Optional[nn.Module]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(s, t)`` in float64 with ``norm(x) = s x + t`` per channel in eval mode, or ``None`` when
    ``norm`` has no running statistics to fold (GroupNorm, InstanceNorm, a BatchNorm with
    ``track_running_stats=False``: their output depends on the batch or the sample)."""
    mean, var = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
    if mean is None or var is None or isinstance(norm, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        return None
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.track_running_stats:
        return None
    mean, var = mean.detach().to(torch.float64), var.detach().to(torch.float64)
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    gamma = weight.detach().to(torch.float64) if weight is not None else torch.ones_like(mean)
    beta = bias.detach().to(torch.float64) if bias is not None else torch.zeros_like(mean)
    s = gamma / torch.sqrt(var + norm.eps)
    return s, beta - mean * s
