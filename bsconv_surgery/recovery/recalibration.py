"""BatchNorm running statistics after surgery (``convert --recalibrate-bn``, the ``recalibrate_bn``
recipe key) and the stale-statistics trap of training.

**Recalibration.** A converted site computes something a little different from the conv it
replaced, so every BatchNorm downstream sees inputs whose mean and variance have moved, while
its running statistics still describe the original's. ``recalibrate_batchnorm(model, batches)``
runs the calibration batches once with only the BatchNorms in training mode (everything else in
eval mode, no gradients), as ``torch.optim.swa_utils.update_bn`` does, and sets each BatchNorm's
``running_mean`` / ``running_var`` to the exact mean and unbiased variance of its input over
*all* calibration samples (per channel, over the batch and every spatial position), merged batch
by batch with Chan's parallel formulas in float64. torch's own ``momentum=None`` cumulative
average would average the per-batch variances instead, which leaves out the spread between batch
means (measured: up to 5.7% of the variance on digits) and weighs batches of unequal size wrongly.
``num_batches_tracked`` becomes the number of batches. Momentum, modes and every other buffer are
left as they were.

**Stale statistics.** A BatchNorm whose ``momentum`` is ``0`` never updates its running
statistics in training, and one with ``momentum=None`` whose ``num_batches_tracked`` is already
large (a pretrained model) updates them by ``1/num_batches_tracked`` per step, i.e. hardly at
all. Some ported models ship like that; after fine-tuning, evaluation then uses the source
model's statistics and the loss falls while eval accuracy stays at chance (measured: 9.7% after a
distillation that reached 99.4% in training mode). ``stale_batchnorms`` finds them and
``fresh_momentum`` gives them a normal momentum for the length of a training run.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..data.calibration import iter_batches, move_args, placement
from ..fx.modules import temporary_mode

__all__ = ["batchnorms", "recalibrate_batchnorm", "Recalibration", "stale_batchnorms", "fresh_momentum",
           "DEFAULT_MOMENTUM"]

#: The momentum ``fresh_momentum`` gives stale BatchNorms during training: torch's default.
DEFAULT_MOMENTUM = 0.1


def batchnorms(model: nn.Module) -> List[Tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BatchNorms of ``model`` that keep running statistics, by qualified name."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


@dataclass
class Recalibration:
    """What ``recalibrate_batchnorm`` did."""

    batchnorms: int
    batches: int
    samples: int
    seconds: float

    def to_json(self) -> Dict[str, float]:
        return {"batchnorms": self.batchnorms, "batches": self.batches, "samples": self.samples,
                "seconds": round(self.seconds, 4)}


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def add(self, x: torch.Tensor) -> None:
        dims = [0] + list(range(2, x.dim()))
        x = x.detach().to(torch.float64)
        n = x.numel() // x.shape[1]
        if n == 0:
            return
        mean = x.mean(dims)
        m2 = (x - mean.reshape(1, -1, *([1] * (x.dim() - 2)))).square().sum(dims)
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, max_batches: Optional[int] = None) -> Recalibration:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (any iterable of batches,
    ``calibration.py``; labels are ignored). See the module docstring.

    >>> import torch, bsconv_surgery as bs
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    >>> done = bs.recalibrate_batchnorm(net, batches)
    >>> y = net[0](torch.cat(batches)).transpose(0, 1).flatten(1)  # every sample and position
    >>> (done.batchnorms, done.batches, done.samples), torch.allclose(net[1].running_var, y.var(1), atol=1e-5)
    ((1, 3, 12), True)
    """
    started = time.perf_counter()
    norms = batchnorms(model)
    if not norms:
        return Recalibration(0, 0, 0, 0.0)
    moments = {name: _Moments() for name, _ in norms}
    hooks = [bn.register_forward_pre_hook(lambda mod, inputs, name=name: moments[name].add(inputs[0]))
             for name, bn in norms]
    device, dtype = placement(model)
    used = samples = 0
    try:
        with temporary_mode(model, training=False):
            for _, bn in norms:
                bn.train()
            for batch in iter_batches(batches):
                if max_batches is not None and used >= max_batches:
                    break
                model(*move_args(batch.args, device, dtype))
                used += 1
                samples += batch.samples
    finally:
        for hook in hooks:
            hook.remove()
    for name, bn in norms:
        m = moments[name]
        if m.mean is None:  # the BatchNorm was not called on this data: leave it as it was
            continue
        bn.running_mean.copy_(m.mean.to(bn.running_mean.dtype))
        bn.running_var.copy_((m.m2 / max(m.n - 1, 1)).to(bn.running_var.dtype))
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(used)
    return Recalibration(len(norms), used, samples, time.perf_counter() - started)


def stale_batchnorms(model: nn.Module) -> List[str]:
    """BatchNorms whose running statistics training would not move: ``momentum`` 0, or ``None``
    (a cumulative average) continuing from ``num_batches_tracked > 0``."""
    out = []
    for name, bn in batchnorms(model):
        if bn.momentum is None:
            if bn.num_batches_tracked is not None and int(bn.num_batches_tracked) > 0:
                out.append(name)
        elif bn.momentum == 0:
            out.append(name)
    return out


@contextmanager
def fresh_momentum(model: nn.Module, names: Iterable[str], momentum: float = DEFAULT_MOMENTUM) -> Iterator[List[str]]:
    """``momentum`` for the BatchNorms ``names`` during the block (a training run); their own
    momentum is restored afterwards, the statistics they learnt stay."""
    names = list(names)
    saved = {name: model.get_submodule(name).momentum for name in names}
    for name in names:
        model.get_submodule(name).momentum = momentum
    try:
        yield names
    finally:
        for name, value in saved.items():
            model.get_submodule(name).momentum = value
