"""The one number a converted model is ranked by: the loss of ``sensitivity`` and budget targets.

A budget converts the set of sites with the least summed loss, so the loss must say what the task
cares about. The relative output error does not: on a sigmoid multi-label head (pitch or tagging
nets: independent per-bin probabilities) a site that shifts every bin's logit by the same amount
has a large relative error and keeps every decision, while a site with a small error can move the
top two bins past each other and change the decision. **The default loss (``auto``) follows the
decision output** (``fidelity.decision_index``) and the kind of head it is, detected from the
original's outputs on the first calibration batch (``fidelity.head_of``):

============ =================================================== ==========================================
head         recognised by                                       loss
============ =================================================== ==========================================
softmax      values >= 0 that sum to 1 along dim 1               ``(1 - agreement) + KL(original || converted)``
logits       any other output with a class dim (dim 1, >= 2)     the same, the KL of the softmaxes
sigmoid      values in [0, 1] along dim 1 that do not sum to 1   ``(1 - agreement) + mean per-bin Bernoulli KL``
detection    the detection family                                ``(1 - agreement) + box/score error + unmatched``
regression   no class dim (or an optical-flow model)             the relative output error, every output
============ =================================================== ==========================================

``agreement`` is the share of arg-max decisions the converted model keeps (per sample, or per
position of a dense map; for detection: the label of each image's best detection). The Bernoulli
KL is the binary cross-entropy between the original's and the converted's probability of each bin
minus the original's own entropy, averaged over the bins; for detection, the relative error of the
matched boxes and scores plus the share of detections that have no counterpart.

**Why the sum.** Both parts are zero exactly when the converted model answers as the original does
and never negative, so summing them over sites (the knapsack) is meaningful. Disagreement is what
the task measures, but it is a step: on a few hundred calibration samples most single sites change
no decision, and it cannot rank them. The divergence (in nats per decision) is continuous and ranks
those. Each changed decision adds ``1 / positions``, so a site that changes decisions ranks behind
one that changes none unless the latter's divergence is larger by as much: agreement first, the
divergence as a graded tie-break, without a strict order that would make a site with a huge
divergence and no flip on this sample look free. Measured (docs/results.md): on a softmax digits
classifier the sets it chose were better than the relative error's at two budgets of three, zero-shot
and after recalibration, but a few flips among 512 calibration samples can outweigh the KL of
well-recalibrated sites (``kl`` then ranks better); on a sigmoid head it keeps the decisions where
the relative error does not (``tests/recovery/test_losses.py``).

**Other metrics** (``metric=`` in ``measure_sensitivity`` / ``convert``, ``--metric NAME``):
``relative-error`` (the earlier loss), ``kl`` (softmax KL of the decision output),
``bce`` (the per-bin Bernoulli KL; an output outside [0, 1] is taken as logits and goes through a
sigmoid: so ``bce`` marks a multi-label head that returns logits), ``disagreement`` (``1 -
agreement``). Or a callable ``metric(reference, converted) -> float`` (lower is better, finite,
``>= 0``): both arguments are the lists of output tensors fidelity compares (``fidelity.comparable``
then ``output_tensors``), each concatenated over the calibration batches; for a detection model,
lists of per-image detection dicts. A callable with a third parameter named ``labels`` also gets
the calibration labels (one tensor, or ``None`` for unlabelled data).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Union

from ..core.errors import SurgeryError
from ..core.registry import METRICS

__all__ = ["Metric", "as_metric", "HEADS", "CLASS_HEADS"]

#: Every head ``fidelity.head_of`` tells apart.
HEADS = ("softmax", "logits", "sigmoid", "detection", "regression")
#: Heads with a class dimension (dim 1): KL, Bernoulli KL and arg-max agreement apply.
CLASS_HEADS = ("softmax", "logits", "sigmoid")


def _disagreement(fid: Dict[str, Any]) -> float:
    agree = fid.get("top1_agreement")
    return 1.0 - agree if agree is not None else 0.0


def _auto(fid: Dict[str, Any]) -> float:
    head = fid["head"]
    if head in ("softmax", "logits"):
        return _disagreement(fid) + fid["kl_divergence"]
    if head == "sigmoid":
        return _disagreement(fid) + fid["bernoulli_kl"]
    if head == "detection":
        n = (fid["detections_original"], fid["detections_converted"])
        unmatched = abs(n[0] - n[1]) / max(n[0], n[1], 1)
        return _disagreement(fid) + (fid["relative_logit_error"] or 0.0) + unmatched
    return fid["relative_logit_error"]


def _auto_name(head: str, where: str) -> str:
    return {
        "softmax": f"decision: softmax KL + disagreement on {where} (probabilities)",
        "logits": f"decision: softmax KL + disagreement on {where} (logits)",
        "sigmoid": f"decision: per-bin binary cross-entropy (Bernoulli KL) + arg-max disagreement on {where} (sigmoid)",
        "detection": "decision: best-detection label disagreement + box/score error + unmatched detections",
        "regression": "relative output error (no class dim: regression)",
    }[head]


#: name -> (loss from a fidelity result, its description given the head and the output's name,
#: the heads it applies to)
_NAMED = {
    "auto": (_auto, _auto_name, HEADS),
    "relative-error": (lambda fid: fid["relative_logit_error"], lambda h, w: "relative output error", HEADS),
    "kl": (lambda fid: fid["kl_divergence"], lambda h, w: f"softmax KL on {w}", CLASS_HEADS),
    "bce": (lambda fid: fid["bernoulli_kl"], lambda h, w: f"per-bin binary cross-entropy (Bernoulli KL) on {w}",
            CLASS_HEADS),
    "disagreement": (_disagreement, lambda h, w: f"decision disagreement on {w}", HEADS),
}
for _name, _entry in _NAMED.items():
    METRICS.register(_name, _entry)


@dataclass(frozen=True)
class Metric:
    """A named metric (``METRICS``) or a user's callable, resolved once."""

    name: str
    function: Optional[Callable[..., float]] = None
    takes_labels: bool = False

    @property
    def collects_outputs(self) -> bool:
        """Whether the converted model's outputs must be kept for the callable."""
        return self.function is not None

    @property
    def bernoulli(self) -> bool:
        """Whether the per-bin Bernoulli KL is wanted whatever the head."""
        return self.name == "bce"

    def check(self, head: str, where: str) -> None:
        """Refuse a named metric the decision output's head cannot give (``kl`` of a regression)."""
        if self.function is None and head not in METRICS.get(self.name)[2]:
            raise SurgeryError(f"metric '{self.name}' needs a decision output with classes along dim 1; {where} of "
                               f"this model is a {head} output. Use metric 'auto' or 'relative-error', or pass output= "
                               "to pick another output.", argument="metric")

    def describe(self, head: str, where: str) -> str:
        if self.function is not None:
            return f"metric {getattr(self.function, '__name__', type(self.function).__name__)} (user's callable)"
        return METRICS.get(self.name)[1](head, where)

    def of(self, fid: Dict[str, Any]) -> float:
        """The loss of a fidelity result (named metrics only)."""
        return float(METRICS.get(self.name)[0](fid))

    def call(self, reference: Any, converted: Any, labels: Any) -> float:
        """The user's callable on the collected outputs, checked to be a finite number >= 0."""
        args = (reference, converted, labels) if self.takes_labels else (reference, converted)
        value = self.function(*args)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or number < 0:
            raise SurgeryError(f"metric {self.name} returned {value!r}: a metric must return a finite number >= 0 "
                               "(lower is better).", argument="metric")
        return number


def _takes_labels(function: Callable) -> bool:
    try:
        return "labels" in inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def as_metric(metric: Union[str, Callable, Metric, None]) -> Metric:
    """``None`` or a name of ``METRICS`` (an unknown one: an error listing the valid names), or a
    callable (see the module docstring)."""
    if metric is None:
        return Metric("auto")
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        return Metric(METRICS.check(metric.strip().lower(), "metric"))
    if callable(metric):
        return Metric(getattr(metric, "__name__", type(metric).__name__), metric, _takes_labels(metric))
    raise SurgeryError(f"metric must be a name ({', '.join(METRICS.names())}) or a callable "
                       f"metric(reference, converted) -> float, not {type(metric).__name__}.", argument="metric")
