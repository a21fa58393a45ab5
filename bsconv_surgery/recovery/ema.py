"""An exponential moving average of a model's weights (``distill(..., ema=0.999)``).

The average covers every floating-point parameter **and buffer** (BatchNorm running statistics
included, so the averaged model's normalisation follows the averaged weights); integer buffers
(``num_batches_tracked``) are copied. The decay warms up as ``min(decay, (1 + t) / (10 + t))`` after
``t`` updates, so a short run is not dominated by the starting weights (0.94 after 150 updates,
0.985 after 600, ``decay`` from about 9,000 on).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """``update(model)`` after every optimizer step; ``model`` is the averaged copy (eval it, or
    ``copy_to(student)`` to leave the average in the student)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        mine = self.model.state_dict()
        for name, value in model.state_dict().items():
            target = mine[name]
            if target.is_floating_point():
                target.mul_(d).add_(value.detach().to(target.device, target.dtype), alpha=1 - d)
            else:
                target.copy_(value)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        mine = self.model.state_dict()
        for name, value in model.state_dict().items():
            value.copy_(mine[name])
