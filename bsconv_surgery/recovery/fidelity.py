"""How close a converted model is to its original: ``convert --calib SET``, sensitivity and budgets.

Both models run in eval mode on the same calibration batches; the result holds

- ``relative_logit_error``: ``||Y_conv - Y_orig||_F / ||Y_orig||_F`` over all calibration samples,
  where ``Y`` is *every* floating output tensor of the model, flattened per sample and put side by
  side (for a classifier: the logits; for MTCNN's ``(bbox, prob)``: both heads);
  ``relative_error_per_output`` gives the same ratio for each output tensor when there are several;
- ``max_sample_relative_error``: the same ratio for the worst single sample;
- ``top1_agreement``: the share of arg-max decisions that are the same in both, on the *decision
  output*; ``kl_divergence``: the mean ``KL(original || converted)`` of its class distributions;
- ``top1_accuracy_original`` / ``top1_accuracy_converted``: on labelled sets (``digits``,
  ``imagefolder``, ``Labelled(...)``), the share of samples each model classifies correctly.

**The decision output** (``output=``: an index into the output tensors in order, or a key such as
``"logits"`` / ``"1"`` / ``"out.aux"`` for nested dicts and tuples): by default the only output;
else the one under the key ``logits``; else the *last* output of two or more dimensions whose
values along dimension 1 are non-negative and sum to 1 (a softmax inside the model, as MTCNN's
face probability); else the first output of two or more dimensions. The arg-max runs over
dimension 1 and agreement is counted at every remaining position (a dense map is scored per
location). Probabilities enter the KL as they are, anything else through a softmax over dim 1.

**The head** (``head``, ``head_of``) says what kind of decision output it is, from the original's
outputs on the first batch: ``softmax`` (non-negative, sums to 1 along dim 1), ``sigmoid`` (values
in [0, 1] that do not sum to 1: independent per-bin probabilities; ``bernoulli_kl`` is then the
mean per-bin ``KL(Bernoulli(p_orig) || Bernoulli(p_conv))``), ``logits`` (any other output with
two or more entries along dim 1), ``regression`` (no class dim, or an optical flow model) or
``detection``. ``loss`` is the one number sensitivity and budgets rank by, and ``loss_name`` says
how it was made (``losses.py``: by default decision disagreement plus a divergence suited to the
head; ``metric=`` picks another or a callable of yours).

Calibration data: ``data/dataset.py`` (named sets, or any iterable of batches: ``Dataset``).

Models of every family (``models/inputs.py``) are fed their own way: a detection model gets each
batch as a list of images, an optical flow model each image with the next one of the batch, a
video or 1-D model standard-normal clips (``random`` only: digits and image folders are images).
"The output" is the family's where it picks one: ``out["out"]`` of a segmentation model, the last
flow prediction, the detections; every output tensor otherwise. A detection model returns a data-dependent number of detections per image: its
``relative_logit_error`` compares the boxes and scores of the first ``min(n_original,
n_converted)`` detections of each image (both are sorted by score), ``top1_agreement`` the label
of each image's best detection (images where both models detect something), and the report
gives the detection counts of both models.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..data.calibration import Batch, move_args, placement
from ..data.dataset import CalibSource, Dataset, as_dataset
from ..core.errors import SurgeryError
from ..fx.modules import temporary_mode
from ..models.inputs import ExampleInputs, InputFamily, Inputs, as_example_inputs, input_family
from .losses import Metric, as_metric

__all__ = ["measure_fidelity", "ReferenceOutputs", "output_tensors", "decision_index", "comparable", "head_of"]

# -- outputs ------------------------------------------------------------------------------------

def _named_tensors(out: Any, path: str = "") -> List[Tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return [(path, out)] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [pair for k, v in out.items() for pair in _named_tensors(v, f"{path}.{k}" if path else str(k))]
    if isinstance(out, (list, tuple)):
        return [pair for i, v in enumerate(out) for pair in _named_tensors(v, f"{path}.{i}" if path else str(i))]
    return []


def output_tensors(out: Any) -> List[torch.Tensor]:
    """Every floating tensor of a (nested) model output, in order."""
    return [t for _, t in _named_tensors(out)]


def _is_distribution(t: torch.Tensor) -> bool:
    if t.dim() < 2 or t.shape[1] < 2 or not bool((t >= 0).all()):
        return False
    return bool(torch.allclose(t.sum(1), torch.ones((), dtype=t.dtype, device=t.device), atol=1e-4))


def _is_probability(t: torch.Tensor) -> bool:
    return bool(((t >= 0) & (t <= 1)).all())


def head_of(t: torch.Tensor, family: str = "image") -> str:
    """The kind of decision output ``t`` is (see the module docstring): ``softmax``, ``sigmoid``,
    ``logits``, ``regression`` or ``detection``."""
    if family == "detection":
        return "detection"
    if family == "optical_flow" or t.dim() < 2 or t.shape[1] < 2:
        return "regression"
    if _is_distribution(t):
        return "softmax"
    return "sigmoid" if _is_probability(t) else "logits"


def _bernoulli_kl(a: torch.Tensor, b: torch.Tensor, probabilities: bool) -> torch.Tensor:
    """Per-bin ``KL(Bernoulli(p_a) || Bernoulli(p_b))``: ``BCE(p_a, p_b) - H(p_a)``; outputs that are
    not probabilities go through a sigmoid."""
    eps = 1e-12
    pa, pb = (a, b) if probabilities else (torch.sigmoid(a), torch.sigmoid(b))
    pa, pb = pa.clamp(0, 1), pb.clamp(eps, 1 - eps)
    return torch.xlogy(pa, pa) - pa * pb.log() + torch.xlogy(1 - pa, 1 - pa) - (1 - pa) * (1 - pb).log()


def decision_index(out: Any, output: Union[int, str, None] = None) -> int:
    """Which output tensor the agreement, KL and accuracy use (see the module docstring)."""
    named = _named_tensors(out)
    if not named:
        raise SurgeryError("The model returns no floating-point tensor; fidelity needs an output to compare.")
    paths = [p for p, _ in named]
    if isinstance(output, int) and not isinstance(output, bool):
        if not -len(named) <= output < len(named):
            raise SurgeryError(f"output={output}: the model returns {len(named)} output tensor(s).")
        return output % len(named)
    if output is not None:
        if str(output) not in paths:
            raise SurgeryError(f"output='{output}' is not one of the model's outputs: {', '.join(paths)}.")
        return paths.index(str(output))
    if len(named) == 1:
        return 0
    if "logits" in paths:
        return paths.index("logits")
    dists = [i for i, (_, t) in enumerate(named) if _is_distribution(t)]
    if dists:
        return dists[-1]
    return next((i for i, (_, t) in enumerate(named) if t.dim() >= 2), 0)


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


#: Families whose "output" is one part of what the model returns (``InputFamily.output``); every
#: other model is compared on all of its output tensors.
_FAMILY_OUTPUT = ("segmentation", "optical_flow", "detection")


def _family(family: Union[ExampleInputs, InputFamily, str, None]) -> InputFamily:
    if isinstance(family, ExampleInputs):
        return family.family
    return family if isinstance(family, InputFamily) else input_family(family)


def comparable(out: Any, family: Union[ExampleInputs, InputFamily, str, None] = None) -> Any:
    """What fidelity compares of a forward's result (see the module docstring)."""
    inputs = _family(family)
    return inputs.output(out) if inputs.name in _FAMILY_OUTPUT else out


class _Comparison:
    """Running sums of the fidelity of one model against the reference, batch by batch."""

    def __init__(self, outputs: int, decision: int, probabilities: bool, detection: bool = False,
                 head: str = "logits", bernoulli: bool = False):
        self.decision, self.probabilities, self.detection = decision, probabilities, detection
        self.head, self.bernoulli = head, bernoulli or head == "sigmoid"
        self.bce = 0.0
        self.bins = 0
        self.detections = [0, 0]  # of the original and the converted model
        self.diff2 = [0.0] * outputs
        self.ref2 = [0.0] * outputs
        self.worst = 0.0
        self.agree = self.positions = self.samples = self.batches = 0
        self.kl = 0.0
        self.correct = [0, 0]
        self.labelled = True

    def add(self, ref: List[torch.Tensor], new: List[torch.Tensor], labels: Optional[torch.Tensor], samples: int) -> None:
        if len(new) != len(ref) or any(a.shape != b.shape for a, b in zip(ref, new)):
            raise SurgeryError(f"The converted model's outputs {[tuple(t.shape) for t in new]} differ in shape from "
                               f"the original's {[tuple(t.shape) for t in ref]}.")
        rows_d = torch.zeros(samples, dtype=torch.float64)
        rows_r = torch.zeros(samples, dtype=torch.float64)
        for i, (a, b) in enumerate(zip(ref, new)):
            a, b = a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu()
            d2, r2 = (b - a).square(), a.square()
            self.diff2[i] += float(d2.sum())
            self.ref2[i] += float(r2.sum())
            if a.dim() >= 1 and a.shape[0] == samples:
                rows_d += d2.reshape(samples, -1).sum(1)
                rows_r += r2.reshape(samples, -1).sum(1)
        ok = rows_r > 0
        if bool(ok.any()):
            self.worst = max(self.worst, float((rows_d[ok] / rows_r[ok]).sqrt().max()))
        a, b = ref[self.decision].detach().to(torch.float64).cpu(), new[self.decision].detach().to(torch.float64).cpu()
        if a.dim() >= 2:
            pa, pb = a.argmax(1), b.argmax(1)
            self.agree += int((pa == pb).sum())
            self.positions += pa.numel()
            if self.probabilities:
                la, lb = a.clamp_min(1e-12).log(), b.clamp_min(1e-12).log()
            else:
                la, lb = F.log_softmax(a, 1), F.log_softmax(b, 1)
            self.kl += float((la.exp() * (la - lb)).sum(1).sum())
            if self.bernoulli:
                self.bce += float(_bernoulli_kl(a, b, _is_probability(a)).sum())
                self.bins += a.numel()
            self.labelled = self.labelled and labels is not None and a.dim() == 2
            if self.labelled:
                y = labels.reshape(-1).cpu()
                self.correct[0] += int((pa == y).sum())
                self.correct[1] += int((pb == y).sum())
        else:
            self.labelled = False
        self.samples += samples
        self.batches += 1

    def add_detections(self, ref: List[dict], new: List[dict], samples: int) -> None:
        """Detections compared by rank: the boxes and scores of the first ``min(n_a, n_b)`` of each
        image, and the label of each image's best detection (where both models detect something)."""
        rows_a, rows_b, labels = _detection_rows(ref, new)
        self.detections[0] += sum(len(d["scores"]) for d in ref)
        self.detections[1] += sum(len(d["scores"]) for d in new)
        self.agree += sum(la == lb for la, lb in labels)
        self.positions += len(labels)
        for ra, rb in zip(rows_a, rows_b):
            d2, r2 = float((rb - ra).square().sum()), float(ra.square().sum())
            self.diff2[0] += d2
            self.ref2[0] += r2
            if r2 > 0:
                self.worst = max(self.worst, math.sqrt(d2 / r2))
        self.labelled = False
        self.samples += samples
        self.batches += 1

    def result(self, label: str) -> Dict[str, Any]:
        diff2, ref2 = sum(self.diff2), sum(self.ref2)
        out: Dict[str, Any] = {
            "calib": label,
            "batches": self.batches,
            "samples": self.samples,
            "relative_logit_error": math.sqrt(diff2 / ref2) if ref2 > 0 else math.sqrt(diff2),
            "max_sample_relative_error": self.worst,
            "top1_agreement": self.agree / self.positions if self.positions else None,
            # a divergence is >= 0; rounding of near-equal outputs can leave -1e-89
            "kl_divergence": max(self.kl, 0.0) / self.positions if self.positions else None,
            "head": self.head,
        }
        if self.bernoulli:
            out["bernoulli_kl"] = max(self.bce, 0.0) / self.bins if self.bins else None
        if self.detection:
            out["relative_logit_error"] = out["relative_logit_error"] if self.positions else None
            out.pop("kl_divergence")
            out["detections_original"], out["detections_converted"] = self.detections
            out["images_compared"] = self.positions
        if len(self.diff2) > 1:
            out["outputs"] = len(self.diff2)
            out["decision_output"] = self.decision
            out["relative_error_per_output"] = [math.sqrt(d / r) if r > 0 else math.sqrt(d)
                                                for d, r in zip(self.diff2, self.ref2)]
        if self.labelled and self.positions:
            out["top1_accuracy_original"] = self.correct[0] / self.samples
            out["top1_accuracy_converted"] = self.correct[1] / self.samples
        return out


def _run(model: nn.Module, batch: Batch) -> Any:
    device, dtype = placement(model)
    return model(*move_args(batch.args, device, dtype))


class _Scorer:
    """How one model family's outputs are compared (set from the original's first output), and
    the loss made of the comparison (``metric``, checked against the head here)."""

    def __init__(self, first: Any, family: InputFamily, output: Union[int, str, None], metric: Metric):
        self.family, self.metric = family, metric
        self.detection = family.name == "detection"
        out = comparable(first, family)
        if self.detection:
            self.outputs, self.decision, self.probabilities, self.head = 1, 0, False, "detection"
            where = "the detections"
        else:
            self.decision = decision_index(out, output)
            named = _named_tensors(out)
            tensor = named[self.decision][1]
            self.outputs, self.probabilities = len(named), _is_distribution(tensor)
            self.head = head_of(tensor, family.name)
            where = f"output '{named[self.decision][0]}'" if len(named) > 1 else "the output"
        metric.check(self.head, where)
        self.loss_name = metric.describe(self.head, where)

    def prepare(self, out: Any) -> Any:
        out = comparable(out, self.family)
        return out if self.detection else output_tensors(out)

    def comparison(self) -> _Comparison:
        return _Comparison(self.outputs, self.decision, self.probabilities, self.detection, self.head,
                           self.metric.bernoulli)

    @staticmethod
    def add(acc: _Comparison, ref: Any, new: Any, batch: Batch) -> None:
        if acc.detection:
            acc.add_detections(ref, new, batch.samples)
        else:
            acc.add(ref, new, batch.labels, batch.samples)

    def result(self, acc: _Comparison, label: str, collected: Optional["_Collected"] = None) -> Dict[str, Any]:
        """The comparison's numbers with the ``loss`` (the named metric, or the callable on the
        outputs ``collected``) and its ``loss_name``."""
        out = acc.result(label)
        out["loss"] = collected.loss(self.metric) if collected is not None else self.metric.of(out)
        out["loss_name"] = self.loss_name
        return out


class _Collected:
    """Every batch's outputs of both models and the labels, for a user's metric callable."""

    def __init__(self) -> None:
        self.reference: List[Any] = []
        self.converted: List[Any] = []
        self.labels: List[Optional[torch.Tensor]] = []

    def add(self, ref: Any, new: Any, batch: Batch) -> None:
        self.reference.append(ref)
        self.converted.append(new)
        self.labels.append(batch.labels)

    @staticmethod
    def _joined(outs: List[Any]) -> Any:
        if outs and isinstance(outs[0], list) and outs[0] and isinstance(outs[0][0], dict):  # detections
            return [d for out in outs for d in out]
        return [torch.cat([out[i].detach() for out in outs]) for i in range(len(outs[0]))] if outs else []

    def loss(self, metric: Metric) -> float:
        labels = None if any(y is None for y in self.labels) else torch.cat([y.reshape(-1) for y in self.labels])
        return metric.call(self._joined(self.reference), self._joined(self.converted), labels)


class ReferenceOutputs:
    """The original's outputs on a list of calibration batches, computed once: every candidate
    (each site of a sensitivity scan, each budget's chosen set) is compared with them."""

    def __init__(self, original: nn.Module, batches: List[Batch], label: str = "calibration data",
                 output: Union[int, str, None] = None, inputs: Inputs = None,
                 metric: Union[str, Callable, Metric, None] = None):
        """``inputs``: how the models are fed (their family says what of the output is compared);
        ``metric``: what ``loss`` is (``losses.py``; default ``auto``)."""
        self.batches, self.label = batches, label
        with temporary_mode(original, training=False), torch.no_grad():
            raw = [_run(original, batch) for batch in batches]
        self.scorer = _Scorer(raw[0], _family(inputs), output, as_metric(metric))
        self.outputs = [self.scorer.prepare(out) for out in raw]

    @property
    def decision(self) -> int:
        return self.scorer.decision

    @property
    def metric(self) -> Metric:
        return self.scorer.metric

    @property
    def loss_name(self) -> str:
        """What ``loss`` is for this model and metric (``losses.py``)."""
        return self.scorer.loss_name

    def compare(self, model: nn.Module) -> Dict[str, Any]:
        """The fidelity of ``model`` against the reference (eval mode; modes restored)."""
        acc = self.scorer.comparison()
        collected = _Collected() if self.metric.collects_outputs else None
        with temporary_mode(model, training=False), torch.no_grad():
            for batch, ref in zip(self.batches, self.outputs):
                new = self.scorer.prepare(_run(model, batch))
                self.scorer.add(acc, ref, new, batch)
                if collected is not None:
                    collected.add(ref, new, batch)
        return self.scorer.result(acc, self.label, collected)


def measure_fidelity(original: nn.Module, converted: nn.Module, data: Union[Dataset, CalibSource],
                     example_inputs: Inputs = None, output: Union[int, str, None] = None,
                     metric: Union[str, Callable, Metric, None] = None) -> Dict[str, Any]:
    """Compare ``converted`` with ``original`` in eval mode on ``data`` (a ``Dataset``, a named set
    such as ``"digits"``, or any iterable of batches; see the module docstring).
    ``example_inputs`` says how the models are fed a named set and what of their output is
    compared (default: one tensor of ``3,224,224``); ``metric`` what ``loss`` is (``losses.py``).

    >>> import torch, bsconv_surgery as bs
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    >>> _ = net(torch.randn(1, 3, 16, 16))
    >>> bs.measure_fidelity(net, net, bs.Dataset("random", limit=1), torch.randn(1, 3, 16, 16))["top1_agreement"]
    1.0
    """
    dataset = as_dataset(data)
    inputs = as_example_inputs(example_inputs) if example_inputs is not None else None
    batches = dataset.batches_for(original, inputs)
    family = inputs.family if inputs is not None else input_family(None)
    chosen = as_metric(metric)
    scorer = acc = None
    collected = _Collected() if chosen.collects_outputs else None
    with temporary_mode(original, converted, training=False), torch.no_grad():
        for batch in batches:  # one batch at a time: the outputs of a dense model are large
            ref = _run(original, batch)
            if scorer is None:
                scorer = _Scorer(ref, family, output, chosen)
                acc = scorer.comparison()
            ref, new = scorer.prepare(ref), scorer.prepare(_run(converted, batch))
            scorer.add(acc, ref, new, batch)
            if collected is not None:
                collected.add(ref, new, batch)
    return scorer.result(acc, dataset.label, collected)
