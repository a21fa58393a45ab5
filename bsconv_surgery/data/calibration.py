"""Calibration batches from anywhere: the one convention for data given in Python.

Fidelity, sensitivity, budget selection, BatchNorm recalibration and distillation all read
*batches*. In Python any iterable of them works:

- a **tensor** is one batch of a single-input model: ``model(x)``;
- a **tuple or list** is the positional inputs of a multi-input model: ``model(*batch)``
  (an audio model's ``(waveform, lengths)``, a detection model's ``([img1, img2],)``);
- a ``Batch(args, labels)`` carries both explicitly;
- ``Labelled(iterable)`` marks an iterable of ``(inputs, labels)`` pairs, such as a
  ``DataLoader`` over an image-classification dataset; ``inputs`` follows the two rules above.
  Without ``Labelled`` a pair ``(x, y)`` is read as the *two inputs* of a model, never as a
  labelled batch: the convention has one reading, so it never guesses.

Labels are used for accuracy only (fidelity and sensitivity); recalibration and distillation
ignore them. The named sets of the command line (``digits``, ``random``, ``imagefolder:PATH``,
``images:PATH``) are produced by ``fidelity.py`` as ``Batch`` objects too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, List, Optional

import torch
from torch import nn

from ..core.errors import SurgeryError

__all__ = ["Batch", "Labelled", "as_args", "iter_batches", "take_batches", "move_args", "batch_samples"]


@dataclass
class Batch:
    """One calibration batch: the model's positional inputs and, for a labelled set, the labels.

    >>> import torch, bsconv_surgery as bs
    >>> batch = bs.Batch((torch.zeros(4, 3, 8, 8),), labels=torch.tensor([0, 1, 2, 3]))
    >>> batch.samples, len(batch.args)
    (4, 1)
    """

    args: tuple
    labels: Optional[torch.Tensor] = None

    @property
    def samples(self) -> int:
        return batch_samples(self.args)


class Labelled:
    """An iterable of ``(inputs, labels)`` pairs (see the module docstring).

    >>> import torch, bsconv_surgery as bs
    >>> batch = next(iter(bs.Labelled([(torch.zeros(4, 3, 8, 8), [0, 1, 0, 1])])))
    >>> len(batch.args), batch.labels
    (1, tensor([0, 1, 0, 1]))
    """

    def __init__(self, pairs: Iterable):
        self.pairs = pairs

    def __iter__(self) -> Iterator[Batch]:
        for item in self.pairs:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise SurgeryError(f"Labelled(...) expects (inputs, labels) pairs; got {_describe(item)}.")
            inputs, labels = item
            yield Batch(as_args(inputs), labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels))


def _describe(item: Any) -> str:
    if isinstance(item, torch.Tensor):
        return f"a tensor of shape {tuple(item.shape)}"
    if isinstance(item, (tuple, list)):
        return f"a {type(item).__name__} of {len(item)}"
    return f"a {type(item).__name__}"


def as_args(inputs: Any) -> tuple:
    """A batch's positional model inputs: a tensor -> ``(x,)``; a tuple or list -> as they are."""
    if isinstance(inputs, Batch):
        return inputs.args
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs:
        return tuple(inputs)
    raise SurgeryError(f"A calibration batch must be a tensor or a tuple of model inputs; got {_describe(inputs)}.")


def iter_batches(source: Iterable) -> Iterator[Batch]:
    """Every batch of ``source`` as a ``Batch`` (see the module docstring)."""
    if isinstance(source, (torch.Tensor, Batch)):
        raise SurgeryError("Calibration data must be an iterable of batches (e.g. a list of tensors), not a single "
                           "batch: wrap it in a list.")
    try:
        items = iter(source)
    except TypeError:
        raise SurgeryError(f"Calibration data must be an iterable of batches; got {type(source).__name__}.") from None
    for item in items:
        yield item if isinstance(item, Batch) else Batch(as_args(item))


def take_batches(source: Iterable, limit: Optional[int] = None) -> List[Batch]:
    """Up to ``limit`` batches of ``source`` (all when ``None``), kept: they are run more than once."""
    out: List[Batch] = []
    for batch in iter_batches(source):
        if limit is not None and len(out) >= limit:
            break
        out.append(batch)
    if not out:
        raise SurgeryError("The calibration data holds no batches.")
    return out


def batch_samples(args: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (a list of images: its length)."""
    if isinstance(args, torch.Tensor):
        return int(args.shape[0]) if args.dim() else 1
    if isinstance(args, tuple):
        return batch_samples(args[0]) if args else 0
    if isinstance(args, list):
        return len(args)
    if isinstance(args, dict):
        return batch_samples(next(iter(args.values()))) if args else 0
    return 1


def placement(model: nn.Module):
    """``(device, dtype)`` of the model's first floating parameter (CPU float32 without one)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)


def move_args(args: Any, device=None, dtype=None) -> Any:
    """Inputs on ``device``; floating tensors in ``dtype`` (integer ones keep theirs)."""
    if isinstance(args, torch.Tensor):
        return args.to(device=device, dtype=dtype if args.is_floating_point() and dtype is not None else None)
    if isinstance(args, dict):
        return {k: move_args(v, device, dtype) for k, v in args.items()}
    if isinstance(args, (list, tuple)):
        return type(args)(move_args(v, device, dtype) for v in args)
    return args
