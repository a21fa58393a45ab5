"""Models and helpers the tests share (test modules import from here, never from each other)."""

import torch
from torch import nn


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics.

    timm ResNets zero-initialise the last BN gamma of each residual block, so at random init a
    residual branch outputs zero and an equivalence test on it passes trivially (NOTES.md).
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


def standard_convs(model: nn.Module, kernel=None):
    """Names of standard (groups 1, kernel > 1) ``nn.Conv2d`` modules, optionally of one kernel."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1 and tuple(m.kernel_size) != (1, 1):
            if kernel is None or tuple(m.kernel_size) == kernel:
                out.append(name)
    return out
