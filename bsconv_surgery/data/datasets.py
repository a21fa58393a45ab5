"""Image datasets for training (``training/data.py``) and calibration (``fidelity.py``):
scikit-learn's bundled digits (offline), CIFAR-10/100 and image folders, with their transforms.

``digits``: 1,797 real 8x8 images shipped inside scikit-learn, scaled to ``image_size``, repeated
to 3 channels, split 80/20 with a fixed seed (stratified), so every run sees the same split.
``cifar10``/``cifar100``: torchvision's datasets under ``root``, downloaded only with
``download``. ``imagefolder:PATH``: ``PATH/train/<class>/*`` and ``PATH/val/<class>/*``.
``images:PATH``: every image file under ``PATH``, at any depth, *without labels* (label ``-1``):
for label-free distillation and calibration; every tenth file (in sorted order) is held out as
the validation split, where the student is scored by its agreement with the teacher.

The functions take plain arguments; ``augment`` is any object with the fields of the recipe's
``data.augment`` section (``None``: no augmentation, the evaluation transforms).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import PIL.Image
import torch
import torchvision
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..core.errors import SurgeryError, describe_exception

__all__ = ["DATASET_NAMES", "IMAGENET_STATS", "CIFAR_STATS", "DataBundle", "parse_data_name", "build_datasets",
           "build_transforms", "image_folder", "load_image", "ImageFiles", "image_files", "walk_files", "UNLABELLED"]

DATASET_NAMES = ("digits", "cifar10", "cifar100", "imagefolder:PATH", "images:PATH")
#: The label of a sample from an unlabelled set (``images:PATH``).
UNLABELLED = -1
#: File name endings read as images by ``images:PATH``.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: Optional[int]  # None: unlabelled (images:PATH)
    description: str

    @property
    def labelled(self) -> bool:
        return self.num_classes is not None


def parse_data_name(name: str) -> Tuple[str, Optional[Path]]:
    """``'digits'`` -> ``('digits', None)``; ``'imagefolder:/data/dogs'`` -> ``('imagefolder', Path)``."""
    kind, sep, rest = name.partition(":")
    kind = kind.strip().lower()
    if kind in ("imagefolder", "images") and sep and rest.strip():
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


def build_transforms(aug: Any, size: int, stats, *, train: bool, native_size: Optional[int] = None):
    """The per-sample pipeline; ``native_size`` set means the images already have that square size.
    ``aug=None``: no augmentation and the default resize (evaluation)."""
    train = train and aug is not None
    resize = getattr(aug, "resize", None)
    steps = [v2.ToImage()]
    if train and aug.random_resized_crop:
        steps.append(v2.RandomResizedCrop(size, scale=tuple(aug.scale), antialias=True))
    elif native_size != size:  # resize the short side, then crop: at random to train, centred to evaluate
        steps += [v2.Resize(resize or round(size / 0.875), antialias=True),
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


def _digits(size: int, aug: Any) -> DataBundle:
    # scikit-learn takes about a second to import; only the digits set needs it
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(size,) * 2, mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, val_idx = train_test_split(
        list(range(len(labels))), test_size=DIGITS_VAL_FRACTION, random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    mean = images[train_idx].mean().item()
    std = images[train_idx].std().item()
    stats = ((mean,) * 3, (std,) * 3)
    return DataBundle(
        _TensorImages(images[train_idx], labels[train_idx], build_transforms(aug, size, stats, train=True, native_size=size)),
        _TensorImages(images[val_idx], labels[val_idx], build_transforms(aug, size, stats, train=False, native_size=size)),
        10,
        f"digits (scikit-learn, 8x8 -> {size}x{size}): {len(train_idx)} train / {len(val_idx)} val",
    )


def _cifar(kind: str, size: int, aug: Any, root: Optional[str], download: bool) -> DataBundle:
    if not root:
        raise SurgeryError(f"{kind} needs --data-dir DIR (data.root): the folder that holds (or will hold) the dataset.")
    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    stats = CIFAR_STATS[kind]
    try:
        train = cls(root, train=True, download=download,
                    transform=build_transforms(aug, size, stats, train=True, native_size=32))
        val = cls(root, train=False, download=download,
                  transform=build_transforms(aug, size, stats, train=False, native_size=32))
    except RuntimeError as exc:
        hint = "" if download else " Pass --download to fetch it (needs internet)."
        raise SurgeryError(f"{kind} not found under '{root}' ({exc}).{hint}") from None
    except OSError as exc:  # download failures
        raise SurgeryError(f"Could not get {kind} into '{root}': {exc}.") from None
    return DataBundle(train, val, len(train.classes), f"{kind} ({root}): {len(train)} train / {len(val)} val")


def load_image(path: str):
    """An image file as RGB; a file that is not a readable image is a ``SurgeryError`` naming it."""
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
        raise SurgeryError(f"Could not read image '{path}' ({describe_exception(exc, 160)}); remove or "
                           "replace the file.") from None


def walk_files(root: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> List[Path]:
    """Every file under ``root`` at any depth whose name ends in one of ``suffixes`` (any case),
    sorted: the one folder walker of image folders. Links are followed, but every folder is
    entered once (known by its device and inode, after links), so a link loop ends and a folder
    linked from inside itself counts each image once. Hidden files and folders are skipped."""
    suffixes = tuple(s.lower() for s in suffixes)
    entered, found, pending = set(), [], [Path(root)]
    while pending:
        folder = pending.pop()
        try:
            info = folder.stat()
            identity = (info.st_dev, info.st_ino)
            if identity in entered:
                continue
            entered.add(identity)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise SurgeryError(f"Could not read the folder '{folder}' ({exc.strerror or describe_exception(exc)}).") \
                from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    pending.append(Path(entry.path))
                elif entry.is_file() and entry.name.lower().endswith(suffixes):
                    found.append(Path(entry.path))
            except OSError:  # a link to nowhere, a file gone since the listing
                continue
    return sorted(found)


class _ImageFolder(torchvision.datasets.ImageFolder):
    """``ImageFolder`` whose classes are the visible sub-folders and whose files are found by
    ``walk_files`` (torchvision's ``os.walk(followlinks=True)`` never ends on a link loop)."""

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples = [(str(path), index) for name, index in sorted(class_to_idx.items())
                   for path in walk_files(Path(directory) / name, extensions or IMAGE_SUFFIXES)]
        empty = sorted(set(class_to_idx) - {Path(p).relative_to(directory).parts[0] for p, _ in samples})
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}. Supported extensions "
                                    f"are: {', '.join(IMAGE_SUFFIXES)}")
        return samples


def image_folder(path: Path, size: int, aug: Any = None, *, train: bool = False, what: str = "images") -> Dataset:
    """One folder of images, one sub-folder per class, ImageNet normalisation; an unreadable
    image fails with its file name when it is loaded."""
    try:
        return _ImageFolder(
            str(path), transform=build_transforms(aug, size, IMAGENET_STATS, train=train), loader=load_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise SurgeryError(f"Could not read {what} under '{path}': {exc}") from None


class ImageFiles(Dataset):
    """Image files without labels (``images:PATH``): ``(image, UNLABELLED)`` per file, RGB, with a
    per-sample transform. A file that cannot be read is a ``SurgeryError`` naming it."""

    def __init__(self, files, transform):
        self.files, self.transform = list(files), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        return self.transform(load_image(str(self.files[index]))), UNLABELLED


def image_files(root: Path, what: str = "images") -> list:
    """Every image file under ``root`` at any depth (hidden files and folders skipped), sorted."""
    if not root.is_dir():
        raise SurgeryError(f"The {what} folder '{root}' does not exist or is not a directory.")
    files = walk_files(root)
    if not files:
        raise SurgeryError(f"No image files under '{root}' (looked for {', '.join(IMAGE_SUFFIXES)} at any depth).")
    return files


def _images(root: Path, size: int, aug: Any) -> DataBundle:
    files = image_files(root)
    val = files[::10] if len(files) >= 2 else files
    train = [f for i, f in enumerate(files) if i % 10] if len(files) >= 2 else files
    return DataBundle(
        ImageFiles(train, build_transforms(aug, size, IMAGENET_STATS, train=True)),
        ImageFiles(val, build_transforms(aug, size, IMAGENET_STATS, train=False)),
        None,
        f"images {root} (unlabelled): {len(train)} train / {len(val)} val (every tenth file held out)",
    )


def _imagefolder(root: Path, size: int, aug: Any) -> DataBundle:
    split_dirs = [root / "train", root / "val"]
    missing = [str(d) for d in split_dirs if not d.is_dir()]
    if missing:
        raise SurgeryError(
            f"imagefolder:{root} needs train/ and val/ folders with one sub-folder per class; missing: {', '.join(missing)}."
        )
    train, val = (image_folder(split, size, aug, train=is_train) for split, is_train in zip(split_dirs, (True, False)))
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))
        raise SurgeryError(f"train/ and val/ under '{root}' have different class folders (e.g. {', '.join(only[:5])}).")
    return DataBundle(train, val, len(train.classes), f"imagefolder {root}: {len(train)} train / {len(val)} val, "
                      f"{len(train.classes)} classes")


def build_datasets(name: Optional[str], image_size: int, augment: Any = None, *, root: Optional[str] = None,
                   download: bool = False) -> DataBundle:
    """The train and validation sets named by ``name`` (see ``parse_data_name``), at ``image_size``."""
    if not name:
        raise SurgeryError(f"No dataset: pass --data NAME (data.name in the recipe). Valid datasets: {', '.join(DATASET_NAMES)}.")
    kind, path = parse_data_name(name)
    if kind == "digits":
        return _digits(image_size, augment)
    if kind in CIFAR_STATS:
        return _cifar(kind, image_size, augment, root, download)
    if kind == "images":
        return _images(path, image_size, augment)
    return _imagefolder(path, image_size, augment)

