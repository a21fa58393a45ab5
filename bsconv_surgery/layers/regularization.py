"""The orthonormal regulariser of BSConv-S (paper eq. 9), found from the module tree.

Sites are recognised by their class (``BSConvS``, ``SubspaceProjection`` and their 1-D and 3-D
forms, ``layers.REGULARIZED_TYPES``), never by state
attached to a model instance, so the loss is the same on the bare model, inside
``DistributedDataParallel`` (``.module``), after ``torch.compile`` (``._orig_mod``) and after
``load_converted``.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch
from torch import nn

from . import REGULARIZED_TYPES

__all__ = ["regularization_sites", "regularization_loss"]

_SITE_TYPES = REGULARIZED_TYPES


def regularization_sites(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(qualified name, module)`` for every BSConv-S site in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _SITE_TYPES):
            yield name, module


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum over all BSConv-S sites of ``||W_B W_B^T - I||_F``, a differentiable scalar.

    Returns a zero tensor (on the model's device) when the model has no BSConv-S site.

    >>> import torch, bsconv_surgery as bs
    >>> net = torch.nn.Sequential(bs.BSConvS(16, 32, 3), torch.nn.ReLU())  # W_B: 4 x 16
    >>> with torch.no_grad():
    ...     _ = net[0].pw1.weight.copy_(2 * torch.eye(16)[:4].reshape(4, 16, 1, 1))
    >>> bs.regularization_loss(net)  # W_B W_B^T = 4 I (4x4), so ||3 I||_F = 3 * 2
    tensor(6., grad_fn=<SumBackward0>)
    >>> float(bs.regularization_loss(torch.nn.Conv2d(3, 8, 3)))
    0.0
    """
    losses = [module.orthonormal_loss() for _, module in regularization_sites(model)]
    if losses:
        return torch.stack(losses).sum()
    param = next(model.parameters(), None)
    return torch.zeros((), device=param.device if param is not None else None)
