"""Data for calibration, sensitivity, budgets, recalibration and distillation: ``Dataset``.

A ``Dataset`` wraps a named set or any iterable of batches (``calibration.py`` says how a batch
is read), with an optional ``transform_fn`` and a ``limit`` on the batches used.

Named sets:

- ``digits``: the held-out split of scikit-learn's digits exactly as ``train`` builds it
  (``datasets.py``: 8x8 scaled to the input size, 3 channels, the training normalisation);
  the one real image set available offline, and what the worked example's model was trained on.
- ``random``: standard-normal inputs from a fixed seed (about the statistics of normalised images).
- ``imagefolder:PATH``: images under ``PATH/val`` (or ``PATH``), one sub-folder per class, resized
  and centre-cropped to the input size, as ``train`` evaluates them, and normalised as the model
  says (``DataSettings``: timm's data config, torchvision's weights; ImageNet statistics when the
  model declares none; ``datasets.normalization`` decides).
- ``images:PATH``: every image file under ``PATH`` at any depth, unlabelled, preprocessed the same
  way; a file that cannot be read is an error naming it.
- In Python, any iterable of batches (``calibration.py``: tensors, tuples of inputs for
  multi-input models, ``Labelled(pairs)`` for labelled ones): audio, video and detection models
  are calibrated on their own data. ``batches`` limits how many are used (all by default).

"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..core.bounds import bounded_number
from ..core.errors import SurgeryError, arg
from ..models.data_config import DataSettings, data_settings_for
from ..models.inputs import ExampleInputs
from .calibration import Batch, iter_batches
from .datasets import ImageFiles, build_datasets, build_transforms, image_files, image_folder, normalization

__all__ = ["Dataset", "as_dataset", "CALIB_NAMES", "Calibration", "parse_calib", "check_calib", "calibration_batches",
           "DEFAULT_CALIB_BATCHES", "DEFAULT_BATCH_SIZE"]

CALIB_NAMES = ("digits", "random", "imagefolder:PATH", "images:PATH")
DEFAULT_BATCH_SIZE = 16
#: Batches of a named set used when none are asked for (``--calib-batches``).
DEFAULT_CALIB_BATCHES = 4
#: The most batches a Dataset keeps in memory (``limit``).
MAX_KEPT_BATCHES = 10_000
RANDOM_SEED = 0

#: What ``calib=`` may be: a set's name, a parsed one, or any iterable of batches.
CalibSource = Union[str, "Calibration", Iterable]


@dataclass(frozen=True)
class Calibration:
    kind: str
    path: Optional[Path] = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" if self.path is not None else self.kind


def parse_calib(text: str) -> Calibration:
    """``digits``, ``random``, ``imagefolder:PATH`` or ``images:PATH`` (the folder must exist)."""
    kind, sep, rest = str(text).partition(":")
    kind = kind.strip().lower()
    if kind in ("digits", "random") and not sep:
        return Calibration(kind)
    if kind in ("imagefolder", "images") and rest.strip():
        path = Path(rest.strip()).expanduser()
        if not path.is_dir():
            raise SurgeryError(f"Calibration folder '{path}' does not exist or is not a directory.")
        return Calibration(kind, path)
    raise SurgeryError(f"Unknown calibration set '{text}'. Valid sets: {', '.join(CALIB_NAMES)}.")


def check_calib(calib: Calibration, inputs: ExampleInputs) -> None:
    """Digits and image folders are images: they need a ``C,H,W`` input of an image model."""
    family, size = inputs.family, inputs.size
    if calib.kind == "random":
        return
    if not (family.images or (family.name == "tensor" and len(size) == 3)) or len(size) != 3:
        raise SurgeryError(f"{arg('calibration')} {calib.kind} holds images; a {family.name} model at input size "
                           f"{','.join(map(str, size))} can only be calibrated with {arg('calibration')} random.")


def _digits(size: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    c, h, w = size
    val = build_datasets("digits", h).val
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    if w != h:
        images = nn.functional.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
    if c != images.shape[1]:
        images = images.mean(1, keepdim=True).expand(-1, c, -1, -1)
    return images, labels


def _folder(calib: Calibration, size: Sequence[int], settings: Optional[DataSettings]):
    settings = DataSettings(tuple(size)) if settings is None else dataclasses.replace(settings, input_size=tuple(size))
    if calib.kind == "images":
        files = image_files(calib.path, "calibration images")
        stats = normalization(str(calib), settings).stats
        return ImageFiles(files, build_transforms(None, size[1], stats, train=False, settings=settings))
    root = calib.path / "val" if (calib.path / "val").is_dir() else calib.path
    return image_folder(root, size[1], what="calibration images", settings=settings)


def calibration_batches(calib: Calibration, size: Sequence[int], batches: int, batch_size: int = DEFAULT_BATCH_SIZE,
                        settings: Optional[DataSettings] = None) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Up to ``batches`` pairs ``(inputs (B, *size), labels (B) or None)`` (fewer when the set
    is smaller); ``random`` and ``images`` have no labels; ``random`` takes any ``size``, the
    others ``C,H,W``. Photos are resized and normalised as the model's ``settings`` say
    (``data_settings_for``; ``None``: ImageNet statistics, bilinear)."""
    if calib.kind == "random":
        gen = torch.Generator().manual_seed(RANDOM_SEED)
        for _ in range(batches):
            yield torch.randn(batch_size, *size, generator=gen), None
        return
    c, h, w = size
    if calib.kind == "digits":
        images, labels = _digits(size)
        for i in range(min(batches, math.ceil(len(images) / batch_size))):
            yield images[i * batch_size:(i + 1) * batch_size], labels[i * batch_size:(i + 1) * batch_size]
        return
    folder = _folder(calib, size, settings)
    loader = torch.utils.data.DataLoader(folder, batch_size=batch_size, shuffle=False)
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            return
        if x.shape[1] != c:
            x = x.mean(1, keepdim=True).expand(-1, c, -1, -1)
        if tuple(x.shape[2:]) != (h, w):
            x = nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        yield x, (None if calib.kind == "images" else y)


class Dataset:
    """Data for ``convert`` (fidelity, budgets, recalibration), ``measure_sensitivity`` and
    ``distill``: a named set (``"digits"``, ``"random"``, ``"imagefolder:PATH"``,
    ``"images:PATH"``) or any iterable of batches (tensors, tuples of a model's inputs, ``Batch``,
    ``Labelled(pairs)``, a ``DataLoader``), as NNCF's ``Dataset(source, transform_fn)``.

    ``transform_fn`` maps each item of an iterable to a batch (for a named set: each input batch
    ``(B, *size)`` to another tensor); ``limit`` caps the batches used (a named set: 4 batches of
    ``batch_size`` by default; an iterable: all). The batches are read once and kept (fidelity
    runs them more than once). Bad names and missing folders fail here, before any work.

    >>> import torch, bsconv_surgery as bs
    >>> data = bs.Dataset([torch.randn(2, 3, 8, 8) for _ in range(5)], limit=3)
    >>> len(data.batches()), data.label
    (3, 'list of batches (Python)')
    >>> len(bs.Dataset("random", limit=2).batches(bs.ExampleInputs.of("classification", (3, 8, 8))))
    2
    """

    def __init__(self, source: Any, transform_fn: Optional[Callable[[Any], Any]] = None, limit: Optional[int] = None,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        if isinstance(source, Dataset):
            raise SurgeryError("Dataset(source): the source is already a Dataset.")
        if limit is not None:
            limit = bounded_number(limit, "limit", integer=True, low=1, high=MAX_KEPT_BATCHES)
        batch_size = bounded_number(batch_size, "batch_size", integer=True, low=1, high=2**16)
        if transform_fn is not None and not callable(transform_fn):
            raise SurgeryError(f"transform_fn must be callable, not {type(transform_fn).__name__}.")
        self.named = parse_calib(source) if isinstance(source, (str, Calibration)) else None
        if self.named is None and (isinstance(source, (torch.Tensor, Batch)) or not hasattr(source, "__iter__")):
            raise SurgeryError(f"A Dataset is a named set ({', '.join(CALIB_NAMES)}) or an iterable of batches (e.g. a "
                               f"list of tensors), not {_what(source)}.")
        self.source, self.transform_fn, self.limit, self.batch_size = source, transform_fn, limit, batch_size
        self._kept: Optional[List[Batch]] = None

    @property
    def label(self) -> str:
        """How reports name the data: ``digits``, ``images:PATH``, ``list of batches (Python)``."""
        return str(self.named) if self.named is not None else f"{type(self.source).__name__} of batches (Python)"

    def batches(self, inputs: Optional[ExampleInputs] = None, settings: Optional[DataSettings] = None) -> List[Batch]:
        """The batches, kept in memory. A named set needs the model's example ``inputs`` (its
        family and input size: images are resized to it, a detection model gets lists of images),
        and photos are normalised as the model's ``settings`` say (``data_settings_for(model,
        inputs)``; ``None``: ImageNet statistics)."""
        if self.named is not None:
            return self._named_batches(inputs, settings)
        if self._kept is None:
            kept: List[Batch] = list(iter(self))
            if not kept:
                raise SurgeryError(f"The data ({self.label}) holds no batches.")
            self._kept = kept
        return self._kept

    def batches_for(self, model: nn.Module, inputs: Optional[ExampleInputs]) -> List[Batch]:
        """``batches(inputs)`` of a model: a named set of photos is normalised and resized as
        ``model`` says (``data_settings_for``)."""
        settings = data_settings_for(model, inputs) if self.named is not None and inputs is not None else None
        return self.batches(inputs, settings)

    def __iter__(self) -> Iterator[Batch]:
        """The batches one at a time, read afresh from an iterable source on every pass (as
        ``distill`` cycles through them); a named set needs ``batches(example_inputs)``."""
        if self.named is not None:
            raise SurgeryError(f"The named set '{self.named}' needs the model's example inputs: iterate "
                               "dataset.batches(example_inputs) instead.")
        if self._kept is not None:
            return iter(self._kept)
        items = self.source if self.limit is None else itertools.islice(self.source, self.limit)
        return iter_batches(items if self.transform_fn is None else map(self.transform_fn, items))

    def _named_batches(self, inputs: Optional[ExampleInputs], settings: Optional[DataSettings]) -> List[Batch]:
        if inputs is None:
            raise SurgeryError(f"The calibration set '{self.named}' needs the model's example_inputs (its input size).")
        check_calib(self.named, inputs)
        transform = self.transform_fn or (lambda x: x)
        out = [Batch(inputs.from_batch(transform(x)), y) for x, y in
               calibration_batches(self.named, inputs.size, self.limit or DEFAULT_CALIB_BATCHES, self.batch_size,
                                   settings)]
        if not out:
            raise SurgeryError(f"The calibration set '{self.named}' has no images.")
        return out

    def __repr__(self) -> str:
        return f"Dataset({self.label!r}, limit={self.limit})"


def as_dataset(data: Any, limit: Optional[int] = None) -> Dataset:
    """``data`` as a ``Dataset``: one is returned as it is; a name or an iterable is wrapped
    (with ``limit`` batches)."""
    return data if isinstance(data, Dataset) else Dataset(data, limit=limit)


def _what(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a single tensor of shape {tuple(value.shape)} (wrap it in a list)"
    return f"a {type(value).__name__}"
