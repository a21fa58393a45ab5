"""One training epoch and one evaluation pass, in the style of torchvision's classification reference.

The loss is ``CE (label smoothing) + alpha * regularization_loss(model)``, with the cross-entropy
share ``1 - a`` and a temperature-``T`` KL term of weight ``a`` when a teacher distils. Label-free
(``label_free``): the distillation loss alone (``recovery/distill.py``), with the site-level feature
term when ``features`` names sites, both models fed the shared function-matching ``view`` of the
batch when there is one; the labels are never read, and the "accuracy" summed is the agreement
with the teacher. Running sums stay on the device (no sync per step) unless a progress
bar asks for them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.regularization import regularization_loss
from ..recovery.augment import SharedView
from ..recovery.distill import FeatureTaps, distillation_loss, feature_loss
from ..recovery.fidelity import decision_index, output_tensors

__all__ = ["Precision", "Objective", "train_one_epoch", "evaluate"]


@dataclass
class Precision:
    """Where tensors go and how they are computed: autocast and channels_last apply on CUDA only."""

    device: torch.device
    amp: str = "none"
    channels_last: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.cuda and self.amp != "none":
            return torch.autocast("cuda", dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)
        return contextlib.nullcontext()

    def inputs(self, images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        fmt = torch.channels_last if self.cuda and self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=fmt)
        return images, targets.to(self.device, non_blocking=True)


@dataclass
class Objective:
    """The training loss and its parts (for logging), given the model and a batch."""

    label_smoothing: float = 0.0
    ortho_alpha: float = 0.0
    regularize: bool = False
    teacher: Optional[nn.Module] = None
    kd_alpha: float = 0.5
    temperature: float = 4.0
    label_free: bool = False
    features: Optional[List[str]] = None  # site outputs matched to the teacher's (label-free only)
    feature_weight: float = 1.0
    view: Optional[SharedView] = None  # function matching (label-free only): what both models see

    def attach(self, model: nn.Module) -> None:
        """Hook the feature sites of ``model`` (the bare student) and of the teacher."""
        self.taps = (FeatureTaps(model, self.features), FeatureTaps(self.teacher, self.features)) if self.features else None

    def __call__(self, model: nn.Module, images, targets, precision: Precision):
        if self.label_free and self.view is not None:
            images = self.view((images,))[0]
        with precision.autocast():
            logits = model(images)
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(images)
        logits = _as_float(logits)
        if self.label_free:  # any outputs: distillation_loss compares each of them
            return self._label_free(logits, _as_float(teacher_logits))
        ce = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        parts = {"ce": ce.detach()}
        loss = ce
        if self.teacher is not None:
            t = self.temperature
            kd = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                          reduction="batchmean", log_target=True) * (t * t)
            loss = (1 - self.kd_alpha) * ce + self.kd_alpha * kd
            parts["kd"] = kd.detach()
        if self.regularize:  # outside autocast: the Gram matrices stay in float32
            reg = regularization_loss(model)
            loss = loss + self.ortho_alpha * reg
            parts["reg"] = reg.detach()
        parts["loss"] = loss.detach()
        return loss, logits, parts

    def _label_free(self, logits: torch.Tensor, teacher_logits: torch.Tensor):
        kd = distillation_loss(logits, teacher_logits, self.temperature)
        loss = kd
        parts = {"kd": kd.detach(), "agree": (_decisions(logits) == _decisions(teacher_logits)).float().mean().detach()}
        taps = getattr(self, "taps", None)
        if taps is not None:
            feat = feature_loss(*taps, self.features)
            loss = loss + self.feature_weight * feat
            parts["feat"] = feat.detach()
        parts["loss"] = loss.detach()
        return loss, logits, parts


def _decisions(out) -> torch.Tensor:
    """The arg-max over dimension 1 of a forward's decision output: the logits of a classifier, or
    of a multi-output model the output fidelity decides on (``fidelity.decision_index``: a face
    probability, ``logits``, ...)."""
    if isinstance(out, torch.Tensor):
        return out.argmax(1)
    return output_tensors(out)[decision_index(out)].float().argmax(1)


def _as_float(out):
    return out.float() if isinstance(out, torch.Tensor) else out


def _accumulate(sums: Dict[str, torch.Tensor], parts: Dict[str, torch.Tensor], logits, targets) -> None:
    n = targets.shape[0]
    for key, value in parts.items():
        sums[key] = sums.get(key, 0) + value * n
    if "agree" not in parts:  # label-free: the agreement with the teacher is summed above instead
        sums["correct"] = sums.get("correct", 0) + (logits.argmax(1) == targets).sum()
    sums["samples"] = sums.get("samples", 0) + n


def train_one_epoch(
    model: nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scheduler,
    batches: Iterable,
    precision: Precision,
    sums: Dict[str, torch.Tensor],
    scaler=None,
    on_step: Optional[Callable[[Dict[str, torch.Tensor]], None]] = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Tuple[int, bool]:
    """Train on ``batches``, stepping the scheduler every step; adds to ``sums``.

    Returns ``(steps done, stopped)``; ``should_stop`` is asked after every whole step, so a stop
    leaves model, optimizer and scheduler consistent.
    """
    model.train()
    steps = 0
    for images, targets in batches:
        images, targets = precision.inputs(images, targets)
        loss, logits, parts = objective(model, images, targets, precision)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        _accumulate(sums, parts, logits.detach() if isinstance(logits, torch.Tensor) else None, targets)
        steps += 1
        if on_step is not None:
            on_step(sums)
        if should_stop():
            return steps, True
    return steps, False


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, precision: Precision, teacher: Optional[nn.Module] = None,
             labelled: bool = True) -> Dict[str, float]:
    """Sums of cross-entropy, top-1 and top-5 hits and samples (reduce across ranks, then divide);
    with a ``teacher``, also ``agree``: top-1 agreement with it. ``labelled=False``: the labels are
    not read (cross-entropy and hits stay 0)."""
    model.eval()
    sums = {"loss": 0.0, "correct": 0.0, "correct5": 0.0, "samples": 0.0}
    if teacher is not None:
        sums["agree"] = 0.0
    for images, targets in loader:
        images, targets = precision.inputs(images, targets)
        with precision.autocast():
            logits = model(images)
            teacher_logits = teacher(images) if teacher is not None else None
        logits = _as_float(logits)
        if labelled:
            sums["loss"] += F.cross_entropy(logits, targets, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            sums["correct"] += (top[:, 0] == targets).sum().item()
            sums["correct5"] += (top == targets[:, None]).any(dim=1).sum().item()
        if teacher_logits is not None:
            sums["agree"] += (_decisions(logits) == _decisions(_as_float(teacher_logits))).sum().item()
        sums["samples"] += targets.shape[0]
    return sums
