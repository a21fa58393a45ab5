"""The recipe's ``data:`` section as datasets (the datasets themselves live in ``datasets.py``,
shared with calibration), and ``resolve_data``: its ``auto`` keys filled from the model's
``DataSettings`` and the machine, with where each value came from."""

from __future__ import annotations

from typing import Optional

from ..data.datasets import (DATASET_NAMES, DataBundle, augmentation_for, available_cores, build_transforms,
                             dataset_classes, default_image_size, default_workers, normalization, parse_data_name)
from ..data.datasets import build_datasets as _build
from ..models.data_config import DEFAULT_CROP_PCT, DataSettings
from .recipe import AugmentConfig, DataConfig

__all__ = ["DATASET_NAMES", "DataBundle", "parse_data_name", "build_datasets", "build_transforms", "resolve_data",
           "data_classes", "settings_of"]


def _side(cfg: DataConfig, settings: Optional[DataSettings], derived: dict) -> int:
    if cfg.image_size is not None:
        return cfg.image_size
    if settings is not None and settings.images:
        derived["image_size"] = settings.sources.get("input_size", "the model")
        return settings.side
    derived["image_size"] = f"{cfg.name or 'the data'}'s usual size (no model input size known)"
    return default_image_size(cfg.name)


def _channels(cfg: DataConfig, settings: Optional[DataSettings], derived: dict) -> int:
    if cfg.channels is not None:
        return cfg.channels
    if settings is not None and settings.images:
        derived["channels"] = settings.sources.get("input_size", "the model")
        return settings.channels
    derived["channels"] = "3 (no model input size known)"
    return 3


def resolve_data(cfg: DataConfig, settings: Optional[DataSettings] = None) -> DataConfig:
    """``cfg`` with every ``auto`` key filled for a model with ``settings`` (``data_settings_for``;
    ``None``: a model that says nothing) and this machine; ``derived_from`` says where each came
    from. Keys the recipe gives are kept; a resolved section comes back as it is."""
    if not cfg.auto_keys():
        return cfg
    derived = dict(cfg.derived_from)
    side, channels = _side(cfg, settings, derived), _channels(cfg, settings, derived)
    model = settings or DataSettings()
    values = {"image_size": side, "channels": channels}
    at_size = DataSettings((channels, side, side), model.mean, model.std, model.interpolation, model.crop_pct,
                           model.sources)
    if cfg.mean is None:
        norm = normalization(cfg.name or "images", at_size)
        values.update(mean=list(norm.mean), std=list(norm.std))
        derived["mean"] = derived["std"] = norm.source
    if cfg.interpolation is None:
        values["interpolation"] = model.interpolation
        derived["interpolation"] = model.sources.get("interpolation", "default (the model names none)")
    if cfg.crop_pct is None:
        values["crop_pct"] = model.crop_pct or DEFAULT_CROP_PCT
        derived["crop_pct"] = model.sources.get("crop_pct") if model.crop_pct else "default 0.875 (the model names none)"
    if cfg.workers is None:
        values["workers"] = default_workers()
        derived["workers"] = f"this machine: {available_cores()} core(s)"
    if cfg.augment is None:
        augment, why = augmentation_for(cfg.name or "images", side)
        values["augment"] = AugmentConfig(**augment)
        derived["augment"] = why
    values["derived_from"] = derived
    return cfg.model_copy(update=values)


def settings_of(cfg: DataConfig) -> DataSettings:
    """The ``DataSettings`` a resolved ``data:`` section makes its images with."""
    return DataSettings((cfg.channels, cfg.image_size, cfg.image_size), tuple(cfg.mean), tuple(cfg.std),
                        cfg.interpolation, cfg.crop_pct)


def data_classes(cfg: DataConfig) -> Optional[int]:
    """The classes of the set ``cfg`` names, without reading it (``None``: unlabelled); a missing
    name or folder fails here, before the model is built."""
    return dataset_classes(cfg.name, cfg.root)


def build_datasets(cfg: DataConfig, settings: Optional[DataSettings] = None) -> DataBundle:
    """The train and validation sets a ``DataConfig`` names, its ``auto`` keys resolved for a model
    with ``settings`` (already resolved: as they say)."""
    cfg = resolve_data(cfg, settings)
    return _build(cfg.name, cfg.image_size, cfg.augment, root=cfg.root, download=cfg.download,
                  settings=settings_of(cfg), stats=(tuple(cfg.mean), tuple(cfg.std)))
