"""Label-free distillation: ``bsconv_surgery.distill(student, teacher, batches, steps=...)``.

The converted model (student) learns to compute what its unconverted source (teacher) computes,
on inputs alone: any model, any iterable of batches (``calibration.py``: tensors, tuples of
inputs for multi-input models, ``Labelled(...)`` pairs whose labels are ignored). The iterable is
read again from the start when it runs out (a list or a ``DataLoader``; a one-shot generator must
hold ``steps`` batches).

**The loss** (``loss=None``, automatic), summed over the output tensors of the two models:

- a teacher output whose values along dim 1 are non-negative and sum to 1 (a softmax inside the
  model, as MTCNN's face probability): ``T^2 KL(teacher || student)`` of the distributions
  re-tempered by ``T`` (``log p / T``, renormalised);
- the model's only output, of two or more dimensions with at least two channels (classifier
  logits, dense class maps): the soft-target ``T^2 KL`` of the tempered softmax over dim 1
  (averaged over samples and positions);
- anything else (box regression, landmarks, features): the mean squared error divided by the
  teacher output's mean square, so heads of different scales weigh alike.

``loss="kl"`` or ``"mse"`` forces one kind for every output; a callable ``loss(student_out,
teacher_out) -> scalar`` replaces it. ``features`` adds **site-level feature distillation**: each
converted site's output is matched to the original's output at the same place, both models
running on the same input (normalised MSE, averaged over sites, times ``feature_weight``), jointly
with the output loss. ``True`` finds the sites by class (``BSConvU``/``BSConvS``); a list names
them (a reordered depthwise-separable pair: its pointwise name, where the site's output is;
``site_outputs(report)`` lists them for a conversion).

**Optimisation**: AdamW (``lr`` 3e-3 peak, ``weight_decay`` 0.05) with torch's one-cycle schedule
(10% warm-up, cosine; ``schedule="cosine"`` or ``"constant"`` instead). The student trains with its
BatchNorms in training mode (batch statistics, running statistics updated), the teacher in eval
mode; modes are restored at the end. BatchNorms whose running statistics training would not move
(``momentum`` 0, or ``None`` continuing a pretrained count: ``recalibration.stale_batchnorms``) get
momentum ``stale_bn_momentum`` for the run, with a warning, else evaluation would use stale
statistics. Why these defaults: see the README section "Keeping a trained model's accuracy".

**Function matching** (``method="function_matching"``; Beyer et al., CVPR 2022): teacher and
student see the *same* view of every batch, augmented for its input size and mixed image with image
(``augment.py``; the teacher labels the mixed image, no labels needed), and the student is left with
the moving average of its weights (``ema.py``; 0.999 with a warm-up, BatchNorm statistics
included). ``augment=`` / ``mixup=`` / ``ema=`` override the method's presets (``METHODS``).
Not the default: on a budgeted conversion (MACs <= 0.75) of every trained net here it was no better
than plain distillation at equal steps (held-out agreement: P-Net 96.7 against 96.5% after 4,800
steps but 93.0 against 94.9% after 150; R-Net 94.5 against 95.2% after 600; O-Net 94.3 against
94.5%; digits 99.8 against 99.9% on shifted images), its KL lower only in the longer MTCNN runs
(``benchmarks/recovery.py --parts budget-distill``; docs/guide/accuracy.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..data.calibration import Batch, iter_batches, move_args, placement
from ..data.dataset import Dataset
from ..models.zoo import example_inputs_for
from ..core.bounds import bounded_number
from ..core.errors import SurgeryError
from .fidelity import output_tensors
from ..fx.modules import temporary_mode
from ..layers import BSConvS, BSConvU
from .augment import AugmentArgument, SharedView
from .ema import WeightAverage
from .recalibration import DEFAULT_MOMENTUM, fresh_momentum, stale_batchnorms
from ..core.records import ConversionReport
from ..core.settings import DistillArguments, validated_arguments

__all__ = ["distill", "DistillResult", "distill_state", "load_distill_state", "distillation_loss", "feature_loss",
           "shared_view", "site_outputs", "FeatureTaps", "DEFAULTS", "METHODS"]

#: The defaults of ``distill`` (and of the label-free ``train``), chosen by measurement (README).
DEFAULTS = {"lr": 3e-3, "weight_decay": 0.05, "temperature": 4.0, "schedule": "onecycle", "features": False,
            "method": "plain"}

#: What each method sets for the knobs not given: ``augment`` (``True``: ``augmentation_for`` the
#: input size), ``mixup`` (Beta parameter), ``ema`` (decay of the student's weight average).
METHODS: Dict[str, Dict[str, Any]] = {
    "plain": {"augment": False, "mixup": 0.0, "ema": 0.0},
    "function_matching": {"augment": True, "mixup": 1.0, "ema": 0.999},
}

LossFn = Callable[[Any, Any], torch.Tensor]


def _is_distribution(t: torch.Tensor) -> bool:
    if t.dim() < 2 or t.shape[1] < 2 or not bool((t >= 0).all()):
        return False
    return bool(torch.allclose(t.sum(1), torch.ones((), dtype=t.dtype, device=t.device), atol=1e-4))


def _kl(student_log: torch.Tensor, teacher_log: torch.Tensor) -> torch.Tensor:
    """Mean over samples and positions of ``KL(teacher || student)`` along dim 1 (log inputs)."""
    per = (teacher_log.exp() * (teacher_log - student_log)).sum(1)
    return per.mean()


def _tempered(t: torch.Tensor, temperature: float, probabilities: bool) -> torch.Tensor:
    logits = t.clamp_min(1e-8).log() if probabilities else t
    return F.log_softmax(logits.float() / temperature, dim=1)


def distillation_loss(student_out: Any, teacher_out: Any, temperature: float = DEFAULTS["temperature"],
                      loss: Union[None, str, LossFn] = None) -> torch.Tensor:
    """The output loss of ``distill`` (see the module docstring)."""
    if callable(loss):
        return loss(student_out, teacher_out)
    s_out, t_out = output_tensors(student_out), output_tensors(teacher_out)
    if len(s_out) != len(t_out) or not t_out:
        raise SurgeryError(f"The student returns {len(s_out)} output tensor(s) and the teacher {len(t_out)}: "
                           "they must match for distillation.")
    total = torch.zeros((), device=s_out[0].device)
    t2 = temperature * temperature
    for s, t in zip(s_out, t_out):
        t = t.detach().to(s.device)
        if s.shape != t.shape:
            raise SurgeryError(f"Student output {tuple(s.shape)} and teacher output {tuple(t.shape)} differ in shape.")
        probabilities = _is_distribution(t)
        logits = (loss == "kl" or (loss is None and len(t_out) == 1)) and t.dim() >= 2 and t.shape[1] >= 2
        if loss != "mse" and (probabilities or logits):
            term = _kl(_tempered(s, temperature, probabilities), _tempered(t, temperature, probabilities)) * t2
        elif loss in (None, "mse", "kl"):
            term = F.mse_loss(s.float(), t.float()) / t.float().square().mean().clamp_min(1e-8)
        else:
            raise SurgeryError(f"Unknown distillation loss '{loss}': use None (automatic), 'kl', 'mse' or a callable.")
        total = total + term
    return total


class FeatureTaps:
    """Forward hooks that keep the output of each named module of a model (the last call)."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.outputs: Dict[str, torch.Tensor] = {}
        self.hooks = []
        for name in names:
            def hook(module, inputs, output, name=name):
                self.outputs[name] = output
            self.hooks.append(model.get_submodule(name).register_forward_hook(hook))

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def site_outputs(report: ConversionReport) -> List[str]:
    """Where each converted site's output is (the names feature distillation matches): a converted
    conv's own name, a reordered pair's pointwise name; sites that preserve the computation are left
    out."""
    out = []
    for record in report.replaced:
        if record.kind.startswith("dsc->"):
            out.append(record.details.get("pointwise", record.name))
        elif record.kind.startswith("conv->"):
            out.append(record.name)
    return out


def _feature_names(student: nn.Module, teacher: nn.Module, features: Union[bool, Sequence[str]]) -> List[str]:
    if features is False or features is None:
        return []
    if features is True:
        names = [n for n, m in student.named_modules() if isinstance(m, (BSConvU, BSConvS))]
        if not names:
            raise SurgeryError("features=True found no BSConvU/BSConvS module in the student; name the sites "
                               "(features=[...], e.g. site_outputs(result.report)).")
    else:
        names = list(features)
    teacher_names = dict(teacher.named_modules())
    missing = [n for n in names if n not in teacher_names]
    if missing:
        raise SurgeryError(f"Feature site(s) {', '.join(missing[:5])} have no module of that name in the teacher.")
    return names


def _cycle(batches: Iterable, steps: int) -> Iterator[Batch]:
    done = 0
    while True:
        fresh = 0
        for batch in iter_batches(batches):
            fresh += 1
            done += 1
            yield batch
        if fresh == 0:
            raise SurgeryError(f"The distillation batches ran out after {done} of {steps} steps: pass a re-iterable "
                               "(a list, a DataLoader) or enough batches." if done else "The distillation batches are empty.")


def _schedule(optimizer, name: str, steps: int, lr: float):
    if name == "onecycle" and steps >= 3:
        # torch's phases need a warm-up step and a decay step: at least 2 of ``steps`` warm up
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=max(0.1, 2 / steps),
                                                   anneal_strategy="cos", div_factor=25, final_div_factor=1e3)
    if name in ("cosine", "onecycle"):  # onecycle: 1 or 2 steps, too short for torch's phases
        warm = max(1, int(0.1 * steps))
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    raise SurgeryError(f"Unknown schedule '{name}': use onecycle, cosine or constant.")


@dataclass
class DistillResult:
    """What a distillation run did: ``losses`` has one total loss per step; ``settings``: the method
    and the knobs it resolved to (augmentation, mixup, weight average)."""

    steps: int
    seconds: float
    losses: List[float]
    features: List[str] = field(default_factory=list)
    stale_batchnorms: List[str] = field(default_factory=list)
    history: List[Dict[str, Any]] = field(default_factory=list)
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def first_loss(self) -> float:
        head = self.losses[:10]
        return sum(head) / len(head) if head else math.nan

    @property
    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else math.nan

    def to_json(self) -> Dict[str, Any]:
        return {"steps": self.steps, "seconds": round(self.seconds, 3), "first_loss": self.first_loss,
                "final_loss": self.final_loss, "features": list(self.features),
                "stale_batchnorms": list(self.stale_batchnorms), "settings": dict(self.settings),
                "history": list(self.history)}


def feature_loss(student_taps: FeatureTaps, teacher_taps: FeatureTaps, names: Sequence[str]) -> torch.Tensor:
    """Site-level feature loss: the normalised MSE of each named site's output, averaged over sites."""
    total = 0
    for n in names:
        s = student_taps.outputs[n].float()
        t = teacher_taps.outputs[n].detach().to(s.device).float()
        total = total + F.mse_loss(s, t) / t.square().mean().clamp_min(1e-8)
    return total / len(names)


def shared_view(method: str, augment: AugmentArgument = None, mixup: Optional[float] = None,
                flip: bool = True) -> Optional[SharedView]:
    """The view both models see in a step (``None``: the batch as it is), from ``method``'s presets
    (``METHODS``) and the knobs given (``None``: the method's; ``False`` / 0: off). ``augment=True``
    picks ``augmentation_for`` the first batch's inputs (with ``flip``)."""
    preset = METHODS[method]
    augment = preset["augment"] if augment is None else augment
    alpha = preset["mixup"] if mixup is None else mixup
    if augment is False and not alpha:
        return None
    return SharedView(augment if augment is not False else None, alpha or None, flip)


@dataclass
class _Run:
    """The state of one distillation run, shared by its steps."""

    student: nn.Module
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    temperature: float
    loss: Union[None, str, LossFn]
    names: List[str]
    feature_weight: float
    view: Optional[SharedView]
    average: Optional[WeightAverage]
    taps: Optional[tuple] = None

    def __post_init__(self):
        self.s_place, self.t_place = placement(self.student), placement(self.teacher)

    @property
    def evaluated(self) -> nn.Module:
        """The model the run returns: the weight average when there is one."""
        return self.average.model if self.average is not None else self.student


def _losses(run: _Run, s_out: Any, t_out: Any) -> tuple:
    """The total loss of a step and its parts (output loss, feature loss)."""
    out_loss = distillation_loss(s_out, t_out, run.temperature, run.loss)
    parts = {"loss": 0.0, "output_loss": float(out_loss.detach())}
    total = out_loss
    if run.names:
        feat = feature_loss(*run.taps, run.names)
        total = total + run.feature_weight * feat
        parts["feature_loss"] = float(feat.detach())
    return total, parts


def _step(run: _Run, batch: Batch, step: int) -> Dict[str, float]:
    """One optimizer step on ``batch``: both models see the same view of it."""
    args = batch.args
    if run.view is not None:
        args = run.view(args)
    with torch.no_grad():
        t_out = run.teacher(*move_args(args, *run.t_place))
    s_out = run.student(*move_args(args, *run.s_place))
    total, parts = _losses(run, s_out, t_out)
    value = float(total.detach())
    if not math.isfinite(value):
        lr = run.optimizer.param_groups[0].get("initial_lr", run.optimizer.param_groups[0]["lr"])
        raise SurgeryError(f"Distillation diverged at step {step} (loss {value}); lower lr (peak now {lr:.3g}).")
    run.optimizer.zero_grad(set_to_none=True)
    total.backward()
    run.optimizer.step()
    run.scheduler.step()
    if run.average is not None:
        run.average.update(run.student)
    parts["loss"] = value
    return parts


def distill_state(step: int, run: "_Run", losses: List[float], history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What ``distill`` needs to continue after ``step`` (tensors, numbers and lists only: it
    loads with ``torch.load(weights_only=True)``): the student, the optimizer, the schedule, the
    weight average, the losses and history so far, and torch's RNG state (the shared views draw
    from it)."""
    average = run.average
    return {"step": step, "student": {k: v.detach().clone() for k, v in run.student.state_dict().items()},
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "losses": list(losses),
            "history": [dict(h) for h in history], "rng": torch.get_rng_state(),
            "average": None if average is None else {"updates": average.updates, "weights": {
                k: v.detach().clone() for k, v in average.model.state_dict().items()}}}


def load_distill_state(state: Dict[str, Any], run: "_Run", losses: List[float], history: List[Dict[str, Any]]) -> int:
    """Put a ``distill_state`` back into ``run``; returns the step it was taken after."""
    run.student.load_state_dict(state["student"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if (state.get("average") is None) != (run.average is None):
        raise SurgeryError("The distillation state to resume was saved with a different ema setting.")
    if run.average is not None:
        run.average.model.load_state_dict(state["average"]["weights"])
        run.average.updates = int(state["average"]["updates"])
    losses[:] = list(state["losses"])
    history[:] = [dict(h) for h in state["history"]]
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def _validated(student, steps, lr, weight_decay, temperature, feature_weight, log_every, schedule, stale_bn_momentum,
               method, augment, mixup, ema) -> List[nn.Parameter]:
    if augment is not None and not isinstance(augment, bool) and not callable(augment):
        raise SurgeryError(f"Bad argument(s) of distill(): augment={augment!r:.60}: use True, False, None (the "
                           "method's) or a callable on a batch tensor.", argument="augment")
    validated_arguments(DistillArguments, dict(
        steps=steps, lr=lr, weight_decay=weight_decay, temperature=temperature, feature_weight=feature_weight,
        log_every=log_every, schedule=schedule, stale_bn_momentum=stale_bn_momentum, method=method,
        augment=None if callable(augment) else augment, mixup=mixup, ema=ema), "distill")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise SurgeryError("The student has no parameter that requires a gradient.")
    return params


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable,
    steps: int,
    *,
    method: str = DEFAULTS["method"],
    augment: AugmentArgument = None,
    mixup: Optional[float] = None,
    ema: Optional[float] = None,
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    temperature: float = DEFAULTS["temperature"],
    loss: Union[None, str, LossFn] = None,
    features: Union[bool, Sequence[str]] = DEFAULTS["features"],
    feature_weight: float = 1.0,
    schedule: str = DEFAULTS["schedule"],
    stale_bn_momentum: Optional[float] = DEFAULT_MOMENTUM,
    log: Optional[Callable[[Dict[str, Any]], None]] = None,
    log_every: int = 50,
    evaluate: Optional[Callable[[nn.Module], Dict[str, Any]]] = None,
    checkpoint: Optional[Callable[[Dict[str, Any]], None]] = None,
    checkpoint_every: int = 100,
    resume: Optional[Dict[str, Any]] = None,
) -> DistillResult:
    """Train ``student`` to match ``teacher`` on ``batches`` (any iterable of batches, or a
    ``Dataset``: a named set is fed as ``teacher`` is) for ``steps`` optimizer steps, without
    labels (see the module docstring). ``method``: ``"plain"`` or ``"function_matching"``, whose
    presets (``METHODS``) ``augment`` (``True``: ``augmentation_for`` the inputs' size; a callable
    on a batch tensor; ``False``), ``mixup`` (the Beta parameter; 0: none) and ``ema`` (decay of the
    weight average; 0: none) override. With ``ema`` the student is left holding the averaged weights
    (BatchNorm statistics included) and ``evaluate`` scores the average. ``log`` receives a dict every
    ``log_every`` steps (step, loss, output and feature parts, lr, seconds, and ``evaluate(model)``'s
    numbers when given; ``evaluate`` runs with the model in eval mode). Returns a ``DistillResult``.

    **Checkpoints** (``compress --resume``): ``checkpoint(state)`` is called every
    ``checkpoint_every`` steps (not after the last) with ``distill_state``'s dict: the step, the
    student's state dict, the optimizer's, the scheduler's and the weight average's, the losses and
    history so far and torch's RNG state. ``resume=state`` continues from such a state (the
    student's weights are loaded from it) at the next step, so that the run ends with the same
    weights as one never interrupted, provided ``batches`` continues where it was (``compress``'s
    stream starts at the step it is given) and the other arguments are the same.

    >>> import copy, torch, bsconv_surgery as bs
    >>> teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
    ...                               torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
    >>> student = bs.convert(copy.deepcopy(teacher), "u", example_inputs=torch.randn(1, 3, 8, 8)).model
    >>> result = bs.distill(student, teacher, [torch.randn(8, 3, 8, 8) for _ in range(4)], steps=20)
    >>> result.steps, result.final_loss < result.first_loss
    (20, True)
    """
    params = _validated(student, steps, lr, weight_decay, temperature, feature_weight, log_every, schedule,
                        stale_bn_momentum, method, augment, mixup, ema)
    checkpoint_every = bounded_number(checkpoint_every, "checkpoint_every", integer=True, low=1, high=2**31)
    if isinstance(batches, Dataset) and batches.named is not None:  # a named set: fed as the teacher is
        batches = batches.batches_for(teacher, example_inputs_for(teacher))
    names = _feature_names(student, teacher, features)
    stale = stale_batchnorms(student) if stale_bn_momentum is not None else []
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    decay = METHODS[method]["ema"] if ema is None else ema
    run = _Run(student, teacher, optimizer, _schedule(optimizer, schedule, steps, lr), temperature, loss, names,
               feature_weight, shared_view(method, augment, mixup), None)
    settings = {"method": method, "augment": repr(run.view.augment) if run.view else None,
                "mixup": run.view.mixup_alpha if run.view else None, "ema": decay or None}
    losses: List[float] = []
    history: List[Dict[str, Any]] = []
    started = time.perf_counter()
    if stale and log is not None:
        log({"warning": f"{len(stale)} BatchNorm(s) with momentum 0 or a cumulative average would keep stale "
                        f"statistics in training ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}); "
                        f"momentum {stale_bn_momentum} is used for this run."})

    def report(step: int, parts: Dict[str, float]) -> None:
        record = {"step": step, **parts, "lr": optimizer.param_groups[0]["lr"],
                  "seconds": round(time.perf_counter() - started, 3)}
        if evaluate is not None:
            with temporary_mode(run.evaluated, training=False):
                record.update(evaluate(run.evaluated))
        history.append(record)
        if log is not None:
            log(record)

    try:
        with fresh_momentum(student, stale, stale_bn_momentum or DEFAULT_MOMENTUM), \
                temporary_mode(student, training=True), temporary_mode(teacher, training=False):
            run.average = WeightAverage(student, decay) if decay else None
            run.taps = (FeatureTaps(student, names), FeatureTaps(teacher, names)) if names else None
            first = 1 if resume is None else load_distill_state(resume, run, losses, history) + 1
            if evaluate is not None and first == 1:
                report(0, {})
            for step, batch in zip(range(first, steps + 1), _cycle(batches, steps)):
                parts = _step(run, batch, step)
                losses.append(parts["loss"])
                if step % log_every == 0 or step == steps:
                    report(step, parts)
                if checkpoint is not None and step % checkpoint_every == 0 and step < steps:
                    checkpoint(distill_state(step, run, losses, history))
            if run.average is not None:
                run.average.copy_to(student)
    finally:
        for taps in run.taps or ():
            taps.remove()
    if run.view is not None:
        settings["augment"] = repr(run.view.augment)
    return DistillResult(len(losses), time.perf_counter() - started, losses, names, stale, history, settings)
