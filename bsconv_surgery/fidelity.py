"""How close a converted model is to its original: ``convert --calib NAME --calib-batches N``.

Both models run in eval mode on the same calibration batches; the report gets

- ``relative_logit_error``: ``||Y_conv - Y_orig||_F / ||Y_orig||_F`` over all calibration samples
  (outputs flattened per sample; for a classifier these are the logits);
- ``max_sample_relative_error``: the same ratio for the worst single sample;
- ``top1_agreement``: the share of samples whose arg-max class is the same in both;
- ``top1_accuracy_original`` / ``top1_accuracy_converted``: on labelled sets (``digits``,
  ``imagefolder``), the share of samples each model classifies correctly: for ``digits`` and a
  model trained on it, the zero-shot accuracy of the conversion.

Calibration sets (``parse_calib``):

- ``digits``: the held-out split of scikit-learn's digits exactly as ``train`` builds it
  (``datasets.py``: 8x8 scaled to the input size, 3 channels, the training normalisation);
  the one real image set available offline, and what the worked example's model was trained on.
- ``random``: standard-normal inputs from a fixed seed (about the statistics of normalised images).
- ``imagefolder:PATH``: images under ``PATH/val`` (or ``PATH``), one sub-folder per class, resized
  and centre-cropped to the input size with ImageNet normalisation, as ``train`` evaluates them.

Models of every family (``models/inputs.py``) are fed their own way: a detection model gets each
batch as a list of images, an optical flow model each image with the next one of the batch, a
video or 1-D model standard-normal clips (``random`` only: digits and image folders are images).
"The output" is the family's: logits, ``out["out"]`` of a segmentation model, the last flow
prediction. A detection model returns a data-dependent number of detections per image: its
``relative_logit_error`` compares the boxes and scores of the first ``min(n_original,
n_converted)`` detections of each image (both are sorted by score), ``top1_agreement`` the label
of each image's best detection (images where both models detect something), and the report
gives the detection counts of both models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .datasets import build_datasets, image_folder
from .errors import SurgeryError
from .fx.modules import temporary_mode
from .models.inputs import InputFamily, input_family

__all__ = ["CALIB_NAMES", "Calibration", "parse_calib", "check_calib", "calibration_batches", "measure_fidelity"]

CALIB_NAMES = ("digits", "random", "imagefolder:PATH")
DEFAULT_BATCH_SIZE = 16
RANDOM_SEED = 0


@dataclass(frozen=True)
class Calibration:
    kind: str
    path: Optional[Path] = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" if self.path is not None else self.kind


def parse_calib(text: str) -> Calibration:
    """``digits``, ``random`` or ``imagefolder:PATH`` (the folder must exist)."""
    kind, sep, rest = str(text).partition(":")
    kind = kind.strip().lower()
    if kind in ("digits", "random") and not sep:
        return Calibration(kind)
    if kind == "imagefolder" and rest.strip():
        path = Path(rest.strip()).expanduser()
        if not path.is_dir():
            raise SurgeryError(f"Calibration folder '{path}' does not exist or is not a directory.")
        return Calibration(kind, path)
    raise SurgeryError(f"Unknown calibration set '{text}'. Valid sets: {', '.join(CALIB_NAMES)}.")


def check_calib(calib: Calibration, family: InputFamily, size: Sequence[int]) -> None:
    """Digits and image folders are images: they need a ``C,H,W`` input of an image model."""
    if calib.kind == "random":
        return
    if not (family.images or (family.name == "tensor" and len(size) == 3)) or len(size) != 3:
        raise SurgeryError(f"--calib {calib.kind} holds images; a {family.name} model at input size "
                           f"{','.join(map(str, size))} can only be calibrated with --calib random.")


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


def _imagefolder(path: Path, size: Sequence[int]):
    root = path / "val" if (path / "val").is_dir() else path
    return image_folder(root, size[1], what="calibration images")


def calibration_batches(calib: Calibration, size: Sequence[int], batches: int,
                        batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Up to ``batches`` pairs ``(inputs (B, *size), labels (B) or None)`` (fewer when the set
    is smaller); ``random`` has no labels and takes any ``size``, the others ``C,H,W``."""
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
    folder = _imagefolder(calib.path, size)
    loader = torch.utils.data.DataLoader(folder, batch_size=batch_size, shuffle=False)
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            return
        if x.shape[1] != c:
            x = x.mean(1, keepdim=True).expand(-1, c, -1, -1)
        if tuple(x.shape[2:]) != (h, w):
            x = nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        yield x, y


def _flat_output(out: Any) -> torch.Tensor:
    """"The output" as ``(B, -1)``: logits for a classifier."""
    if not isinstance(out, torch.Tensor):
        raise SurgeryError("The model returns no tensor; fidelity needs an output to compare.")
    return out.reshape(out.shape[0], -1).to(torch.float64)


def _detection_rows(a: List[dict], b: List[dict]) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[Tuple[int, int]]]:
    """Per image: ``[boxes | score]`` of the first ``min(n_a, n_b)`` detections of each model, and
    the labels of each model's best detection (where both have one)."""
    rows_a, rows_b, labels = [], [], []
    for da, db in zip(a, b):
        k = min(len(da["scores"]), len(db["scores"]))
        rows_a.append(torch.cat([da["boxes"][:k], da["scores"][:k, None]], 1).reshape(1, -1).to(torch.float64))
        rows_b.append(torch.cat([db["boxes"][:k], db["scores"][:k, None]], 1).reshape(1, -1).to(torch.float64))
        if k:
            labels.append((int(da["labels"][0]), int(db["labels"][0])))
    return rows_a, rows_b, labels


def _place(model: nn.Module):
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)


def measure_fidelity(original: nn.Module, converted: nn.Module, calib: str, input_size: Sequence[int],
                     batches: int = 4, batch_size: int = DEFAULT_BATCH_SIZE,
                     family: Optional[Any] = None) -> Dict[str, Any]:
    """Compare ``converted`` with ``original`` in eval mode on a calibration set (see above);
    ``family`` (an ``InputFamily`` or its name; default ``tensor``) says how the models are fed."""
    spec = parse_calib(calib) if isinstance(calib, str) else calib
    inputs = family if isinstance(family, InputFamily) else input_family(family)
    check_calib(spec, inputs, input_size)
    if batches < 1:
        raise SurgeryError("--calib-batches must be at least 1.")
    detection = inputs.name == "detection"
    device, dtype = _place(converted)
    diff2 = ref2 = 0.0
    worst = 0.0
    agree = samples = used = compared = 0
    counts = [0, 0]  # detections of the original and the converted model
    correct = [0, 0]  # original, converted
    labelled = not detection
    with temporary_mode(original, converted, training=False), torch.no_grad():
        for x, y in calibration_batches(spec, input_size, batches, batch_size):
            args = inputs.from_batch(x.to(device=device, dtype=dtype))
            out_a, out_b = inputs.output(original(*args)), inputs.output(converted(*args))
            if detection:
                rows_a, rows_b, labels = _detection_rows(out_a, out_b)
                counts[0] += sum(len(d["scores"]) for d in out_a)
                counts[1] += sum(len(d["scores"]) for d in out_b)
                agree += sum(la == lb for la, lb in labels)
                compared += len(labels)
            else:
                a, b = _flat_output(out_a), _flat_output(out_b)
                rows_a, rows_b = list(a), list(b)
                agree += int((a.argmax(1) == b.argmax(1)).sum())
                compared += a.shape[0]
                labelled = labelled and y is not None
                if labelled:
                    y = y.to(a.device)
                    correct[0] += int((a.argmax(1) == y).sum())
                    correct[1] += int((b.argmax(1) == y).sum())
            for ra, rb in zip(rows_a, rows_b):
                d2, r2 = float((rb - ra).square().sum()), float(ra.square().sum())
                diff2 += d2
                ref2 += r2
                if r2 > 0:
                    worst = max(worst, math.sqrt(d2 / r2))
            samples += x.shape[0]
            used += 1
    if samples == 0:
        raise SurgeryError(f"The calibration set '{spec}' has no images.")
    out = {
        "calib": str(spec),
        "batches": used,
        "samples": samples,
        "relative_logit_error": (math.sqrt(diff2 / ref2) if ref2 > 0 else math.sqrt(diff2)) if compared or not detection else None,
        "max_sample_relative_error": worst,
        "top1_agreement": agree / compared if compared else None,
    }
    if detection:
        out["detections_original"], out["detections_converted"] = counts
        out["images_compared"] = compared
    if labelled:
        out["top1_accuracy_original"] = correct[0] / samples
        out["top1_accuracy_converted"] = correct[1] / samples
    return out
