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
``data.augment`` section (``None``: no augmentation, the evaluation transforms); ``settings`` is
the model's ``DataSettings`` (``models/data_config.py``: channels, mean/std, interpolation, crop
fraction). ``normalization`` is the one place that decides the mean and std a set is normalised
with; ``augmentation_for`` the augmentation an input size gets when a recipe names none, and
``default_workers`` the data loader processes of this machine.
"""

from __future__ import annotations

import dataclasses
import functools
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
from ..models.data_config import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, DataSettings

__all__ = ["DATASET_NAMES", "IMAGENET_STATS", "CIFAR_STATS", "DataBundle", "parse_data_name", "build_datasets",
           "build_transforms", "image_folder", "load_image", "ImageFiles", "image_files", "walk_files", "UNLABELLED",
           "Normalization", "normalization", "augmentation_for", "default_workers", "default_image_size",
           "dataset_classes"]

DATASET_NAMES = ("digits", "cifar10", "cifar100", "imagefolder:PATH", "images:PATH")
#: The label of a sample from an unlabelled set (``images:PATH``).
UNLABELLED = -1
#: File name endings read as images by ``images:PATH``.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

IMAGENET_STATS = (IMAGENET_MEAN, IMAGENET_STD)
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2
#: The classes of the labelled sets whose classes are fixed.
FIXED_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}
#: The image side a set is made at when no model says otherwise.
NATIVE_SIDE = {"digits": 16, "cifar10": 32, "cifar100": 32}
DEFAULT_SIDE = 224
#: Augmentation by input size (``augmentation_for``): up to SMALL_SIDE px shifts, from LARGE_SIDE px crops.
SMALL_SIDE, LARGE_SIDE = 32, 96
#: The area range of the random resized crop ``augmentation_for`` picks (measured for label-free
#: distillation, docs/results.md; ImageNet training from scratch sets its own 0.08).
CROP_SCALE = (0.35, 1.0)
#: The most data loader worker processes ``default_workers`` starts.
MAX_WORKERS = 8


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: Optional[int]  # None: unlabelled (images:PATH)
    description: str

    @property
    def labelled(self) -> bool:
        return self.num_classes is not None


def _named(name: Optional[str]) -> Tuple[str, Optional[Path]]:
    if not name:
        raise SurgeryError(f"No dataset: pass --data NAME (data.name in the recipe). Valid datasets: {', '.join(DATASET_NAMES)}.")
    return parse_data_name(name)


def _kind(name: str) -> str:
    return str(name).partition(":")[0].strip().lower()


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


def build_transforms(aug: Any, size: int, stats, *, train: bool, native_size: Optional[int] = None,
                     settings: Optional[DataSettings] = None):
    """The per-sample pipeline; ``native_size`` set means the images already have that square size.
    ``aug=None``: no augmentation and the default resize (evaluation). ``settings`` (the model's):
    the interpolation, the crop fraction of the resize (``size / crop_pct``) and 1-channel images."""
    train = train and aug is not None
    resize = getattr(aug, "resize", None)
    interpolation = v2.InterpolationMode((settings.interpolation if settings else None) or "bilinear")
    crop_pct = (settings.crop_pct if settings else None) or DEFAULT_CROP_PCT
    steps = [v2.ToImage()]
    if settings is not None and settings.channels == 1 and native_size is None:  # photos -> gray
        steps.append(v2.Grayscale(1))
    if train and aug.random_resized_crop:
        steps.append(v2.RandomResizedCrop(size, scale=tuple(aug.scale), interpolation=interpolation, antialias=True))
    elif native_size != size:  # resize the short side, then crop: at random to train, centred to evaluate
        steps += [v2.Resize(resize or round(size / crop_pct), interpolation=interpolation, antialias=True),
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


@functools.lru_cache(maxsize=4)
def _digits_split(size: int) -> Tuple[torch.Tensor, torch.Tensor, List[int], List[int]]:
    """The digits as one-channel images at ``size`` in [0, 1], their labels, and the fixed split."""
    # scikit-learn takes about a second to import; only the digits set needs it
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(size,) * 2, mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, val_idx = train_test_split(
        list(range(len(labels))), test_size=DIGITS_VAL_FRACTION, random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    return images.clamp(0, 1), labels, train_idx, val_idx


def _digits(size: int, aug: Any, channels: int, stats) -> DataBundle:
    images, labels, train_idx, val_idx = _digits_split(size)
    images = images.expand(-1, channels, -1, -1).contiguous()
    return DataBundle(
        _TensorImages(images[train_idx], labels[train_idx], build_transforms(aug, size, stats, train=True, native_size=size)),
        _TensorImages(images[val_idx], labels[val_idx], build_transforms(aug, size, stats, train=False, native_size=size)),
        10,
        f"digits (scikit-learn, 8x8 -> {size}x{size}, {channels} channel(s)): {len(train_idx)} train / "
        f"{len(val_idx)} val",
    )


def _check_root(kind: str, root: Optional[str]) -> None:
    if not root:
        raise SurgeryError(f"{kind} needs --data-dir DIR (data.root): the folder that holds (or will hold) the dataset.")


def _cifar(kind: str, size: int, aug: Any, root: Optional[str], download: bool, stats,
           settings: DataSettings) -> DataBundle:
    _check_root(kind, root)
    if settings.channels != 3:
        raise SurgeryError(f"{kind} holds colour images; the model takes {settings.channels} channel(s).")
    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = cls(root, train=True, download=download,
                    transform=build_transforms(aug, size, stats, train=True, native_size=32, settings=settings))
        val = cls(root, train=False, download=download,
                  transform=build_transforms(aug, size, stats, train=False, native_size=32, settings=settings))
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


def class_folders(directory) -> List[str]:
    """The class folders of an image folder: its visible sub-folders, sorted."""
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


class _ImageFolder(torchvision.datasets.ImageFolder):
    """``ImageFolder`` whose classes are the visible sub-folders and whose files are found by
    ``walk_files`` (torchvision's ``os.walk(followlinks=True)`` never ends on a link loop)."""

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        classes = class_folders(directory)
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


def image_folder(path: Path, size: int, aug: Any = None, *, train: bool = False, what: str = "images",
                 settings: Optional[DataSettings] = None, stats=None) -> Dataset:
    """One folder of images, one sub-folder per class, normalised with ``stats`` (default: as
    ``normalization`` decides for the model's ``settings``); an unreadable image fails with its
    file name when it is loaded."""
    settings = _at(settings, size)
    stats = stats or normalization("imagefolder", settings).stats
    try:
        return _ImageFolder(str(path), transform=build_transforms(aug, size, stats, train=train, settings=settings),
                            loader=load_image)
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


def _images(root: Path, size: int, aug: Any, stats, settings: DataSettings) -> DataBundle:
    files = image_files(root)
    val = files[::10] if len(files) >= 2 else files
    train = [f for i, f in enumerate(files) if i % 10] if len(files) >= 2 else files
    return DataBundle(
        ImageFiles(train, build_transforms(aug, size, stats, train=True, settings=settings)),
        ImageFiles(val, build_transforms(aug, size, stats, train=False, settings=settings)),
        None,
        f"images {root} (unlabelled): {len(train)} train / {len(val)} val (every tenth file held out)",
    )


def _split_dirs(root: Path) -> List[Path]:
    split_dirs = [root / "train", root / "val"]
    missing = [str(d) for d in split_dirs if not d.is_dir()]
    if missing:
        raise SurgeryError(
            f"imagefolder:{root} needs train/ and val/ folders with one sub-folder per class; missing: {', '.join(missing)}."
        )
    return split_dirs


def _imagefolder(root: Path, size: int, aug: Any, stats, settings: DataSettings) -> DataBundle:
    split_dirs = _split_dirs(root)
    train, val = (image_folder(split, size, aug, train=is_train, settings=settings, stats=stats)
                  for split, is_train in zip(split_dirs, (True, False)))
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))
        raise SurgeryError(f"train/ and val/ under '{root}' have different class folders (e.g. {', '.join(only[:5])}).")
    return DataBundle(train, val, len(train.classes), f"imagefolder {root}: {len(train)} train / {len(val)} val, "
                      f"{len(train.classes)} classes")


def build_datasets(name: Optional[str], image_size: int, augment: Any = None, *, root: Optional[str] = None,
                   download: bool = False, settings: Optional[DataSettings] = None, stats=None) -> DataBundle:
    """The train and validation sets named by ``name`` (see ``parse_data_name``), at ``image_size``,
    made for a model with ``settings`` (its channels, interpolation, crop fraction; default: 3
    channels) and normalised with ``stats`` (``(mean, std)``; default: as ``normalization``
    decides)."""
    kind, path = _named(name)
    settings = _at(settings, image_size)
    stats = stats or normalization(name, settings).stats
    if kind == "digits":
        return _digits(image_size, augment, settings.channels, stats)
    if kind in CIFAR_STATS:
        return _cifar(kind, image_size, augment, root, download, stats, settings)
    if kind == "images":
        return _images(path, image_size, augment, stats, settings)
    return _imagefolder(path, image_size, augment, stats, settings)


# -- settings that follow the model and the data -----------------------------------------------------

def _at(settings: Optional[DataSettings], side: int) -> DataSettings:
    """``settings`` (default: a 3-channel model that declares nothing) for square images of ``side``."""
    settings = settings or DataSettings((3, side, side))
    return dataclasses.replace(settings, input_size=(settings.channels, side, side))


@dataclass(frozen=True)
class Normalization:
    """The mean and std a set is normalised with, per channel, and why."""

    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    source: str

    @property
    def stats(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        return self.mean, self.std


def _per_channel(values: Sequence[float], channels: int, what: str) -> Tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:  # colour statistics for a gray model: the images are made gray the same way
        return (sum(values) / len(values),)
    raise SurgeryError(f"The {what} has {len(values)} values and the model takes {channels} channel(s).")


def normalization(name: str, settings: Optional[DataSettings] = None) -> Normalization:
    """The one place that decides how the set ``name`` is normalised for a model with ``settings``
    (``DataSettings``: its channels and image side, and the mean/std it declares):

    - ``digits``, ``cifar10``, ``cifar100``: the set's own statistics (its training split's), which
      models trained on it use; a model's ImageNet-style statistics do not change them;
    - photos (``images:PATH``, ``imagefolder:PATH``): the model's mean/std (timm's config,
      torchvision's weights), else ImageNet's, with the source saying the model declares none.

    >>> normalization("images:photos", DataSettings((3, 16, 16), (0.5,) * 3, (0.5,) * 3)).mean
    (0.5, 0.5, 0.5)
    >>> normalization("images:photos").source
    'ImageNet statistics (the model declares none)'
    """
    kind = _kind(name)
    settings = settings or DataSettings((3, DEFAULT_SIDE, DEFAULT_SIDE))
    channels = settings.channels
    if kind == "digits":
        images, _, train_idx, _ = _digits_split(settings.side or NATIVE_SIDE["digits"])
        mean, std = images[train_idx].mean().item(), images[train_idx].std().item()
        return Normalization((mean,) * channels, (std,) * channels, "digits: its training split's statistics")
    if kind in CIFAR_STATS:
        mean, std = CIFAR_STATS[kind]
        return Normalization(_per_channel(mean, channels, f"{kind} mean"), _per_channel(std, channels, f"{kind} std"),
                             f"{kind}: its training set's statistics")
    if settings.mean is not None and settings.std is not None:
        return Normalization(_per_channel(settings.mean, channels, "model's mean"),
                             _per_channel(settings.std, channels, "model's std"),
                             settings.sources.get("mean", "the model's data config"))
    return Normalization(_per_channel(IMAGENET_MEAN, channels, "ImageNet mean"),
                         _per_channel(IMAGENET_STD, channels, "ImageNet std"),
                         "ImageNet statistics (the model declares none)")


def augmentation_for(name: str, side: int) -> Tuple[Dict[str, Any], str]:
    """The training augmentation for images of ``side`` px of the set ``name`` when a recipe names
    none, and why: up to 32 px random shifts of 1/8 of the side (pad and crop); from 96 px random
    resized crops; between, shifts; horizontal flips except for digits (not mirror-symmetric)."""
    flips = _kind(name) != "digits"
    flip_note = "horizontal flips" if flips else "no flips (digits are not mirror-symmetric)"
    if side >= LARGE_SIDE:
        return ({"random_resized_crop": True, "scale": CROP_SCALE, "hflip": flips},
                f"{side} px: random resized crops of {CROP_SCALE[0]:g}-{CROP_SCALE[1]:g} of the area, {flip_note}")
    shift = max(1, round(side / 8))
    return {"crop_padding": shift, "hflip": flips}, f"{side} px: random shifts up to {shift} px (1/8), {flip_note}"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def default_workers(cores: Optional[int] = None) -> int:
    """Data loader worker processes for a machine with ``cores`` CPU cores (default: the cores this
    process may run on): one per core but the main process's, at most 8; none on 1-2 cores, where
    workers only compete with the training step (measured on 2 cores: digits at 16 px 217-230
    samples/s with 0 workers, 191-201 with 1; JPEG photos at 64 px 33-42 vs 25-36)."""
    cores = available_cores() if cores is None else cores
    return 0 if cores <= 2 else min(cores, MAX_WORKERS) - 1


def default_image_size(name: Optional[str]) -> int:
    """The image side of the set ``name`` when no model gives one: digits 16, CIFAR 32, else 224."""
    return NATIVE_SIDE.get(_kind(name or ""), DEFAULT_SIDE)


def dataset_classes(name: Optional[str], root: Optional[str] = None) -> Optional[int]:
    """The classes of the set ``name`` without reading it (``None``: unlabelled, ``images:PATH``);
    an image folder's are its class folders under ``train/``. What ``build_datasets`` would refuse
    early (no name, CIFAR without ``root``, an image folder without ``train/`` and ``val/``) is
    refused here with the same message."""
    kind, path = _named(name)
    if kind in CIFAR_STATS:
        _check_root(kind, root)
    if kind in FIXED_CLASSES:
        return FIXED_CLASSES[kind]
    if kind == "images":
        return None
    try:
        return len(class_folders(_split_dirs(path)[0])) or None
    except OSError as exc:
        raise SurgeryError(f"Could not read the folder '{path / 'train'}' ({exc.strerror or exc}).") from None

