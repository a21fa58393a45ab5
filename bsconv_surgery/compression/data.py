"""The data of ``compress``: one pool of samples split once, with a fixed seed, into a *held-out*
split (evaluation only: never trained, calibrated or recalibrated on) and a *training* split
(sensitivity, BatchNorm recalibration and distillation); ``TrainStream``: the training split as
an endless, resumable stream of shuffled batches.

The pool is every sample of the data's batches: batches whose inputs are tensors of one shape
(and labels, when there are any) are split sample by sample; any other data (lists of images,
inputs of varying size) is split batch by batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch

from ..core.bounds import bounded_number
from ..core.errors import SurgeryError, arg
from ..data.calibration import Batch

__all__ = ["DataSplit", "split_data", "TrainStream", "MIN_SPLIT", "CALIBRATION_BATCHES"]

#: The fewest samples (or batches) each split may have.
MIN_SPLIT = 8
#: Batches of the training split that measure sensitivity and convert's fidelity.
CALIBRATION_BATCHES = 4
#: Samples per batch of the calibration, recalibration and held-out batches.
EVAL_BATCH = 16


@dataclass
class _Pool:
    """Every sample: ``args`` stacked along dim 0 (by sample), or the batches as they are."""

    args: Optional[tuple]
    labels: Optional[torch.Tensor]
    batches: Optional[List[Batch]]

    @property
    def size(self) -> int:
        return len(self.batches) if self.batches is not None else int(self.args[0].shape[0])

    def take(self, index: torch.Tensor, batch_size: int) -> List[Batch]:
        if self.batches is not None:
            return [self.batches[int(i)] for i in index]
        out = []
        for part in index.split(batch_size):
            out.append(Batch(tuple(a[part] for a in self.args), None if self.labels is None else self.labels[part]))
        return out


def _by_sample(batches: Sequence[Batch]) -> bool:
    first = batches[0]
    if not first.args or not all(isinstance(a, torch.Tensor) and a.dim() >= 1 for a in first.args):
        return False
    for b in batches:
        if len(b.args) != len(first.args) or (b.labels is None) != (first.labels is None):
            return False
        n = b.args[0].shape[0]
        if any(not isinstance(a, torch.Tensor) or a.shape[0] != n or a.shape[1:] != f.shape[1:]
               for a, f in zip(b.args, first.args)):
            return False
        if b.labels is not None and b.labels.reshape(-1).shape[0] != n:
            return False
    return True


def _pool(batches: Sequence[Batch]) -> _Pool:
    if not _by_sample(batches):
        return _Pool(None, None, list(batches))
    args = tuple(torch.cat([b.args[k] for b in batches]) for k in range(len(batches[0].args)))
    labels = torch.cat([b.labels.reshape(-1) for b in batches]) if batches[0].labels is not None else None
    return _Pool(args, labels, None)


@dataclass
class DataSplit:
    """The held-out and training splits: ``holdout`` and ``train`` in batches of 16 (or the
    data's own batches), ``calibration`` the first training batches, ``pool`` the training
    samples for the stream; ``holdout_index`` / ``train_index`` name the samples (or batches) of
    the data in each."""

    label: str
    unit: str  # "samples" or "batches"
    seed: int
    holdout_index: List[int]
    train_index: List[int]
    holdout: List[Batch]
    train: List[Batch]
    calibration: List[Batch]
    pool: _Pool

    @property
    def fingerprint(self) -> str:
        """Same data split the same way: the same fingerprint (a resumed run checks it)."""
        digest = hashlib.sha256()
        digest.update(f"{self.unit}:{self.holdout_index}:{self.train_index}".encode())
        for batch in self.holdout[:2] + self.train[:2]:
            for a in batch.args:
                if isinstance(a, torch.Tensor):
                    digest.update(a.detach().cpu().contiguous().numpy().tobytes()[:65536])
        return digest.hexdigest()[:16]

    def to_json(self) -> Dict[str, Any]:
        return {"data": self.label, "unit": self.unit, "seed": self.seed, "holdout": len(self.holdout_index),
                "train": len(self.train_index), "calibration_batches": len(self.calibration),
                "fingerprint": self.fingerprint}


def _holdout_count(holdout: Union[float, int], total: int) -> int:
    if isinstance(holdout, bool):
        raise SurgeryError(f"{arg('holdout')} is a fraction such as 0.2 or a count of samples, not {holdout}.")
    if isinstance(holdout, float):
        value = bounded_number(holdout, "holdout", low=0, high=1)
        if not 0 < value < 1:
            raise SurgeryError(f"{arg('holdout')} {holdout}: a fraction must lie strictly between 0 and 1.")
        return int(round(value * total))
    return int(bounded_number(holdout, "holdout", integer=True, low=1, high=2**31))


def split_data(batches: Sequence[Batch], label: str, holdout: Union[float, int] = 0.2, seed: int = 0) -> DataSplit:
    """Split the samples of ``batches`` (see the module docstring) with a permutation of ``seed``:
    ``holdout`` (a fraction, or a count) of them held out. Too few samples for two splits of at
    least ``MIN_SPLIT`` each is a ``SurgeryError``."""
    pool = _pool(batches)
    total, unit = pool.size, ("batches" if pool.batches is not None else "samples")
    held = _holdout_count(holdout, total)
    if held < MIN_SPLIT or total - held < MIN_SPLIT:
        raise SurgeryError(
            f"The data ({label}) holds {total} {unit}: too few to set aside a held-out split of {holdout} and keep "
            f"{MIN_SPLIT} or more {unit} in each split. Give more data, or a different {arg('holdout')} (a fraction "
            f"such as 0.2, or a count).")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))
    hold_index, train_index = order[:held].sort().values, order[held:]
    train_batches = pool.take(train_index, EVAL_BATCH)
    train_pool = _Pool(tuple(a[train_index] for a in pool.args), None if pool.labels is None else pool.labels[train_index],
                       None) if pool.batches is None else _Pool(None, None, train_batches)
    return DataSplit(label, unit, int(seed), hold_index.tolist(), train_index.tolist(), pool.take(hold_index, EVAL_BATCH),
                     train_batches, train_batches[:CALIBRATION_BATCHES], train_pool)


class TrainStream:
    """The training split as endless batches of ``batch_size`` (labels dropped), reshuffled every
    epoch from ``seed``; batch ``i`` depends only on ``(seed, i)``, so a stream made with
    ``start=k`` yields what the first one yields from its ``k``-th batch on (a resumed
    distillation sees the batches the interrupted one would have)."""

    def __init__(self, split: DataSplit, batch_size: int, seed: int, start: int = 0):
        self.pool, self.seed, self.start = split.pool, int(seed), int(start)
        self.batch_size = max(1, min(int(batch_size), self.pool.size)) if split.unit == "samples" else 1
        self.per_epoch = max(1, self.pool.size // self.batch_size)  # the last, partial batch of an epoch is dropped

    def batch(self, i: int) -> Batch:
        epoch, offset = divmod(i, self.per_epoch)
        order = torch.randperm(self.pool.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        index = order[offset * self.batch_size:(offset + 1) * self.batch_size]
        if self.pool.batches is not None:
            return Batch(self.pool.batches[int(index[0])].args)
        return Batch(tuple(a[index] for a in self.pool.args))

    def __iter__(self) -> Iterator[Batch]:
        i = self.start
        while True:
            yield self.batch(i)
            i += 1
