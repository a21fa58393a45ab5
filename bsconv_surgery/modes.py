"""Switch models to train or eval mode for a block and give every submodule its own mode back."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

__all__ = ["temporary_mode"]


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
