"""The recipe's ``data:`` section as datasets (the datasets themselves live in ``datasets.py``,
shared with calibration)."""

from __future__ import annotations

from ..data.datasets import DATASET_NAMES, DataBundle, build_transforms, parse_data_name
from ..data.datasets import build_datasets as _build

__all__ = ["DATASET_NAMES", "DataBundle", "parse_data_name", "build_datasets", "build_transforms"]


def build_datasets(cfg) -> DataBundle:
    """The train and validation sets a ``DataConfig`` names."""
    return _build(cfg.name, cfg.image_size, cfg.augment, root=cfg.root, download=cfg.download)
