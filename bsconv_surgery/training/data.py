"""Datasets for ``train``: scikit-learn's bundled digits (offline), CIFAR-10/100 and image folders.

``digits``: 1,797 real 8x8 images shipped inside scikit-learn, scaled to ``image_size``, repeated
to 3 channels, split 80/20 with a fixed seed (stratified), so every run sees the same split.
``cifar10``/``cifar100``: torchvision's datasets under ``data.root``, downloaded only with
``--download``. ``imagefolder:PATH``: ``PATH/train/<class>/*`` and ``PATH/val/<class>/*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch.utils.data import Dataset

from ..errors import SurgeryError

__all__ = ["DATASET_NAMES", "DataBundle", "parse_data_name", "build_datasets", "build_transforms"]

DATASET_NAMES = ("digits", "cifar10", "cifar100", "imagefolder:PATH")

_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    description: str


def parse_data_name(name: str) -> Tuple[str, Optional[Path]]:
    """``'digits'`` -> ``('digits', None)``; ``'imagefolder:/data/dogs'`` -> ``('imagefolder', Path)``."""
    kind, sep, rest = name.partition(":")
    kind = kind.strip().lower()
    if kind == "imagefolder" and sep and rest.strip():
        return kind, Path(rest.strip()).expanduser()
    if kind in ("digits", "cifar10", "cifar100") and not sep:
        return kind, None
    raise SurgeryError(f"Unknown dataset '{name}'. Valid datasets: {', '.join(DATASET_NAMES)}.")


class RandomGamma(torch.nn.Module):
    """``x ** gamma`` with ``gamma`` drawn uniformly from ``[low, high]`` (images in [0, 1])."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.low + (self.high - self.low) * torch.rand(()).item()
        return x.clamp(min=0).pow(gamma)


def build_transforms(aug, size: int, stats, *, train: bool, native_size: Optional[int] = None):
    """The per-sample pipeline; ``native_size`` set means the images already have that square size."""
    from torchvision.transforms import v2

    steps = [v2.ToImage()]
    if train and aug.random_resized_crop:
        steps.append(v2.RandomResizedCrop(size, scale=tuple(aug.scale), antialias=True))
    elif native_size != size:  # resize the short side, then crop: at random to train, centred to evaluate
        steps += [v2.Resize(aug.resize or round(size / 0.875), antialias=True),
                  v2.RandomCrop(size) if train else v2.CenterCrop(size)]
    if train and aug.crop_padding:
        steps.append(v2.RandomCrop(size, padding=aug.crop_padding))
    if train and aug.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if train and aug.color_jitter:
        steps.append(v2.ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if train and aug.gamma:
        steps.append(RandomGamma(*aug.gamma))
    steps.append(v2.Normalize(*stats))
    return v2.Compose(steps)


class _TensorImages(Dataset):
    """Images held as one float tensor ``(N, 3, H, W)`` in [0, 1], with a per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), int(self.labels[index])


def _digits(cfg) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(cfg.image_size,) * 2, mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, val_idx = train_test_split(
        list(range(len(labels))), test_size=DIGITS_VAL_FRACTION, random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    mean = images[train_idx].mean().item()
    std = images[train_idx].std().item()
    stats = ((mean,) * 3, (std,) * 3)
    aug, size = cfg.augment, cfg.image_size
    return DataBundle(
        _TensorImages(images[train_idx], labels[train_idx], build_transforms(aug, size, stats, train=True, native_size=size)),
        _TensorImages(images[val_idx], labels[val_idx], build_transforms(aug, size, stats, train=False, native_size=size)),
        10,
        f"digits (scikit-learn, 8x8 -> {size}x{size}): {len(train_idx)} train / {len(val_idx)} val",
    )


def _cifar(kind: str, cfg) -> DataBundle:
    import torchvision

    if not cfg.root:
        raise SurgeryError(f"{kind} needs --data-dir DIR (data.root): the folder that holds (or will hold) the dataset.")
    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    stats = _CIFAR_STATS[kind]
    try:
        train = cls(cfg.root, train=True, download=cfg.download,
                    transform=build_transforms(cfg.augment, cfg.image_size, stats, train=True, native_size=32))
        val = cls(cfg.root, train=False, download=cfg.download,
                  transform=build_transforms(cfg.augment, cfg.image_size, stats, train=False, native_size=32))
    except RuntimeError as exc:
        hint = "" if cfg.download else " Pass --download to fetch it (needs internet)."
        raise SurgeryError(f"{kind} not found under '{cfg.root}' ({exc}).{hint}") from None
    except OSError as exc:  # download failures
        raise SurgeryError(f"Could not get {kind} into '{cfg.root}': {exc}.") from None
    return DataBundle(train, val, len(train.classes), f"{kind} ({cfg.root}): {len(train)} train / {len(val)} val")


def _imagefolder(root: Path, cfg) -> DataBundle:
    import torchvision

    split_dirs = [root / "train", root / "val"]
    missing = [str(d) for d in split_dirs if not d.is_dir()]
    if missing:
        raise SurgeryError(
            f"imagefolder:{root} needs train/ and val/ folders with one sub-folder per class; missing: {', '.join(missing)}."
        )
    sets = []
    for split, train in zip(split_dirs, (True, False)):
        try:
            sets.append(torchvision.datasets.ImageFolder(
                str(split), transform=build_transforms(cfg.augment, cfg.image_size, _IMAGENET_STATS, train=train)))
        except (FileNotFoundError, RuntimeError) as exc:
            raise SurgeryError(f"Could not read images under '{split}': {exc}") from None
    train, val = sets
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))
        raise SurgeryError(f"train/ and val/ under '{root}' have different class folders (e.g. {', '.join(only[:5])}).")
    return DataBundle(train, val, len(train.classes), f"imagefolder {root}: {len(train)} train / {len(val)} val, "
                      f"{len(train.classes)} classes")


def build_datasets(cfg) -> DataBundle:
    """The train and validation sets named by ``cfg.name`` (a ``DataConfig``)."""
    if not cfg.name:
        raise SurgeryError(f"No dataset: pass --data NAME (data.name in the recipe). Valid datasets: {', '.join(DATASET_NAMES)}.")
    kind, path = parse_data_name(cfg.name)
    if kind == "digits":
        return _digits(cfg)
    if kind in _CIFAR_STATS:
        return _cifar(kind, cfg)
    return _imagefolder(path, cfg)

