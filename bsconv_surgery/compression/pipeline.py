"""``compress``: a trained model brought under a budget and back to its original's answers, in one call.

The stages, each a short function returning its own record:

``resolve`` (arguments, model, targets, run folder: a ``Job``) -> ``split`` (held-out and
training splits, ``data.py``) -> ``sensitivity`` (each site converted alone, measured on the
calibration batches of the training split; the budget's sites chosen: ``select_for_targets``) ->
``conversion`` (``convert`` of a copy of the original with those sites; held-out fidelity
*zero-shot*) -> ``recalibration`` (where the model has BatchNorms: statistics re-estimated on the
training split, kept only where the fidelity does not drop) -> ``distillation``
(label-free, teacher = the original, on the training split; in ``progressive`` stages) ->
``evaluation`` (held-out fidelity after distillation; the best of the three weights is kept:
distillation never makes the result worse) -> ``save`` (what ``convert --out`` writes, plus
``compress.json``), ``export`` and ``speed``.

The held-out split is never trained, calibrated or recalibrated on, and it decides nothing: which
weights are kept (recalibrated or not, distilled or not) is judged on the calibration batches of
the training split, and the held-out numbers only report, so they are an unbiased estimate. With ``out`` every finished stage is recorded in the run folder
(``state.py``) and the distillation checkpoints every ``checkpoint_every`` steps, so ``resume=True``
continues an interrupted run and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from ..analysis.counting import check_runs
from ..conversion.result import ConversionResult
from ..core.bounds import bounded_number, flag
from ..core.errors import SurgeryError, arg
from ..core.options import SurgeryOptions, Target, make_options
from ..data.dataset import Dataset, as_dataset
from ..inference.benchmark import benchmark
from ..inference.export import export_converted, export_unavailable
from ..models.checkpoints import check_model_finite
from ..models.inputs import ExampleInputs, Inputs
from ..models.zoo import example_inputs_for, load_model, model_source
from ..recovery.distill import distill
from ..recovery.fidelity import ReferenceOutputs
from ..recovery.recalibration import batchnorms, recalibrate_batchnorm
from ..recovery.selection import parse_target
from ..recovery.sensitivity import kept_batchnorm_state, select_for_targets
from ..surgery import convert, load_converted
from .data import DataSplit, TrainStream, split_data
from .progressive import check_stages, split_steps, stage_groups
from .result import TARGET_AGREEMENT, CompressResult
from .state import RunFolder

__all__ = ["compress", "Job", "DEFAULT_STEPS", "DEFAULT_DATA_BATCHES"]

DEFAULT_STEPS = 600
#: Batches of 16 read from a named set (``--data``) for both splits.
DEFAULT_DATA_BATCHES = 64
DEFAULT_BATCH_SIZE = 64
#: ``format`` of ``export=`` (``export_converted``).
EXPORT_FORMATS = ("onnx", "pt2")

Log = Callable[[Dict[str, Any]], None]


@dataclass
class Job:
    """One ``compress`` run, its arguments checked: the original (eval mode, never changed), how
    it is fed, the options (``init`` resolved), the targets, the distillation settings and the
    run folder (``None`` without ``out``)."""

    original: nn.Module
    inputs: ExampleInputs
    options: SurgeryOptions
    targets: list
    target: Target
    steps: int
    stages: int
    seed: int
    holdout: Union[float, int]
    batch_size: int
    distill_options: Dict[str, Any]
    checkpoint_every: int
    output: Union[int, str, None]
    export: Optional[str]
    speed: bool
    folder: Optional[RunFolder]
    log: Log
    resumed: bool = False
    notes: List[str] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)

    def event(self, stage: str, what: str, **details: Any) -> None:
        self.log({"stage": stage, "event": what, **details})

    def done(self) -> Dict[str, Any]:
        return self.folder.done() if self.folder is not None else {}

    def record(self, stage: str, value: Any) -> None:
        if self.folder is not None:
            self.folder.mark_done(stage, value)

    def save_checkpoint(self, name: str, obj: Any) -> None:
        if self.folder is not None:
            self.folder.save_checkpoint(name, obj)

    def load_checkpoint(self, name: str) -> Optional[Any]:
        return self.folder.load_checkpoint(name) if self.folder is not None else None


@contextmanager
def _timed(job: Job, name: str, **details: Any) -> Iterator[None]:
    job.event(name, "start", **details)
    started = time.perf_counter()
    yield
    job.seconds[name] = job.seconds.get(name, 0.0) + time.perf_counter() - started
    job.event(name, "done", seconds=round(time.perf_counter() - started, 3), **details)


# -- resolve ---------------------------------------------------------------------------------------

def _targets(target: Any, target_macs: Any, target_params: Any) -> Tuple[Target, list]:
    if target is not None and (target_macs is not None or target_params is not None):
        raise SurgeryError(f"Give the budget once: {arg('target')} or {arg('target_macs')}/{arg('target_params')}.")
    if target is None and target_macs is None and target_params is None:
        raise SurgeryError(f"compress needs a budget: {arg('target_macs')} (such as 0.75) or {arg('target_params')}.")
    budget = Target.of(target) if target is not None else Target(macs=target_macs, params=target_params)
    return budget, [parse_target(value, metric) for metric, value in budget.metrics()]


def _weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes() if tensor.dtype != torch.bfloat16
                      else tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _settings(job: Job, data_label: str) -> Dict[str, Any]:
    """What a resumed run must have been started with."""
    source = model_source(job.original)
    return {"model": source.spec if source is not None and source.spec else type(job.original).__name__,
            "weights": _weights_digest(job.original), "input_size": list(job.inputs.size),
            "options": job.options.to_json(), "target": dict(job.target.metrics()), "steps": job.steps,
            "progressive": job.stages, "seed": job.seed, "holdout": job.holdout, "batch_size": job.batch_size,
            "distill_options": {k: repr(v) for k, v in sorted(job.distill_options.items())}, "data": data_label,
            "checkpoint_every": job.checkpoint_every}


def _check_export(export: Optional[str], out: Any) -> Optional[str]:
    if export is None:
        return None
    if export not in EXPORT_FORMATS:
        raise SurgeryError(f"Unknown {arg('export')} format '{export}': use {' or '.join(EXPORT_FORMATS)}.")
    if out is None:
        raise SurgeryError(f"{arg('export')} writes into the run folder: give {arg('out')} too.")
    missing = export_unavailable(export)
    if missing:
        raise SurgeryError(missing)
    return export


def resolve(model: Union[nn.Module, str], data: Any, *, options: Union[str, SurgeryOptions], option_keywords: Dict[str, Any],
            target: Any, target_macs: Any, target_params: Any, steps: int, progressive: int, example_inputs: Inputs,
            holdout: Union[float, int], seed: int, batch_size: int, distill_options: Optional[Dict[str, Any]],
            checkpoint_every: int, output: Union[int, str, None], out: Any, export: Optional[str], resume: bool,
            force: bool, speed: bool, log: Optional[Log]) -> Tuple[Job, Dataset]:
    """Check every argument (and the run folder) before any work."""
    for name, value in (("resume", resume), ("force", force), ("speed", speed)):
        flag(value, name)
    if resume and force:
        raise SurgeryError(f"Give {arg('resume=True')} or {arg('force=True')}, not both.")
    if resume and out is None:
        raise SurgeryError(f"{arg('resume=True')} continues the run in {arg('out')}: give it.")
    budget, targets = _targets(target, target_macs, target_params)
    steps = int(bounded_number(steps, "steps", integer=True, low=0, high=10**7))
    stages = check_stages(progressive)
    if stages > 1 and steps < stages:
        raise SurgeryError(f"{arg('progressive')} {stages} stages need at least one distillation step each "
                           f"({arg('steps')} is {steps}).")
    seed = int(bounded_number(seed, "seed", integer=True, low=0, high=2**31 - 1))
    batch_size = int(bounded_number(batch_size, "batch_size", integer=True, low=1, high=2**16))
    checkpoint_every = int(bounded_number(checkpoint_every, "checkpoint_every", integer=True, low=1, high=10**7))
    distill_options = dict(distill_options or {})
    reserved = sorted(set(distill_options) & {"student", "teacher", "batches", "steps", "log", "log_every", "checkpoint",
                                               "checkpoint_every", "resume"})
    if reserved:
        raise SurgeryError(f"distill_options may not set {', '.join(reserved)}: compress sets them.")
    export = _check_export(export, out)
    opts = make_options(options, option_keywords)
    if opts.init == "auto":  # compress works on a trained model: start the sites from its filters
        opts = dataclasses.replace(opts, init="svd")
    dataset = as_dataset(data, limit=DEFAULT_DATA_BATCHES) if not isinstance(data, Dataset) else data
    if isinstance(model, str):
        model = load_model(model)
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"compress() takes an nn.Module (or a spec such as 'timm:resnet18'), not {type(model).__name__}.")
    inputs = example_inputs_for(model, example_inputs)
    model.eval()
    job = Job(model, inputs, opts, targets, budget, steps, stages, seed, holdout, batch_size, distill_options,
              checkpoint_every, output, export, speed, None, log or (lambda event: None))
    if out is not None:
        job.folder = RunFolder.open(out, _settings(job, dataset.label), force=force, resume=resume)
        job.resumed = bool(resume and job.folder.done())
    return job, dataset


# -- stages ----------------------------------------------------------------------------------------

def split(job: Job, dataset: Dataset) -> DataSplit:
    """The held-out and training splits (``data.py``); a resumed run checks they are the same."""
    with _timed(job, "split"):
        batches = dataset.batches_for(job.original, job.inputs)  # photos: the model's normalisation
        result = split_data(batches, dataset.label, job.holdout, job.seed)
        saved = job.done().get("split")
        if saved is not None and saved.get("fingerprint") != result.fingerprint:
            raise SurgeryError(f"Cannot resume '{job.folder.path}': the data ({dataset.label}) is not what the run "
                               f"started with (its split differs). Resume with the same data, or pass "
                               f"{arg('force=True')} to start again.")
        job.record("split", result.to_json())
    return result


@dataclass
class Chosen:
    """The sensitivity stage's choice: the sites (network order) and the selection report."""

    sites: List[str]
    report: Dict[str, Any]


def sensitivity(job: Job, data: DataSplit) -> Chosen:
    """Each candidate site converted alone and measured on the calibration batches (after
    BatchNorm recalibration where the model has BatchNorms); the sites that reach the budget
    with the least summed loss."""
    saved = job.done().get("sensitivity")
    if saved is not None:
        return Chosen(list(saved["sites"]), saved["report"])
    with _timed(job, "sensitivity"):
        check_runs(job.original, job.inputs)
        check_model_finite(job.original, model_source(job.original))
        reference = ReferenceOutputs(job.original, data.calibration, "calibration batches of the training split",
                                     job.output, job.inputs)
        chosen = select_for_targets(job.original, job.options, job.inputs, job.targets, reference,
                                    bool(batchnorms(job.original)))
    result = Chosen(list(chosen.sites), chosen.report)
    job.record("sensitivity", {"sites": result.sites, "report": result.report})
    return result


def converted(job: Job, sites: List[str], calibration: Optional[list] = None) -> ConversionResult:
    """A copy of the original with ``sites`` converted (the one structure every stage's weights load into)."""
    model = copy.deepcopy(job.original)
    return convert(model, dataclasses.replace(job.options, sites=tuple(sites)), example_inputs=job.inputs,
                   calibration=calibration, output=job.output, memory_check=False)


def _better(a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]]) -> bool:
    """Whether fidelity ``a`` beats ``b``: higher decision agreement, then lower KL, then lower error."""
    if b is None:
        return a is not None
    def key(f):
        agree = f.get("top1_agreement")
        kl = f.get("kl_divergence")
        return (agree if agree is not None else -1.0, -(kl if kl is not None else 0.0), -f["relative_logit_error"])
    return key(a) > key(b)


@dataclass
class Baseline:
    """The conversion of every chosen site at once, with its held-out fidelity zero-shot and
    after BatchNorm recalibration (``None`` without BatchNorms), and whether recalibration was kept."""

    conversion: ConversionResult
    zero_shot: Dict[str, Any]
    recalibrated: Optional[Dict[str, Any]]
    recalibration_kept: bool
    judged: Dict[str, Any] = field(default_factory=dict)  # the same points on the judging batches

    @property
    def kept(self) -> str:
        return "recalibrated" if self.recalibrated is not None and self.recalibration_kept else "zero_shot"


@dataclass
class References:
    """The original's outputs on the held-out split (reported) and on the judging batches (the
    calibration batches of the training split: what decides which weights are kept)."""

    holdout: ReferenceOutputs
    judge: ReferenceOutputs

    def measure(self, model: nn.Module) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        return self.holdout.compare(model), self.judge.compare(model)


def conversion(job: Job, data: DataSplit, chosen: Chosen, refs: References) -> Baseline:
    """The chosen sites converted at once; its fidelity zero-shot."""
    with _timed(job, "conversion", sites=len(chosen.sites)):
        result = converted(job, chosen.sites, data.calibration)
        zero_shot, judged = refs.measure(result.model)
    return Baseline(result, zero_shot, None, False, {"zero_shot": judged})


def recalibration(job: Job, base: Baseline, data: DataSplit, refs: References) -> Baseline:
    """Where the model has BatchNorms: statistics re-estimated on the training split, kept only
    where the fidelity on the judging batches does not get worse."""
    result = base.conversion
    if not batchnorms(result.model):
        return base
    with _timed(job, "recalibration"), kept_batchnorm_state(result.model) as restore:
        done = recalibrate_batchnorm(result.model, data.train)
        after, judged = refs.measure(result.model)
        kept = not _better(base.judged["zero_shot"], judged)
        if kept:
            restore.cancel()
        else:
            job.notes.append(f"BatchNorm recalibration on the training split lowered the agreement on the judging "
                             f"batches ({_pct(base.judged['zero_shot'])} -> {_pct(judged)}); it was reverted.")
        result.report.recalibration = dict(done.to_json(), kept=kept)
    return dataclasses.replace(base, recalibrated=after, recalibration_kept=kept,
                               judged=dict(base.judged, recalibrated=judged))


def baseline(job: Job, data: DataSplit, chosen: Chosen, refs: References) -> Baseline:
    """``conversion`` then ``recalibration``, or, when a resumed run has them, their record and weights."""
    saved, weights = job.done().get("baseline"), job.load_checkpoint("baseline")
    if saved is not None and weights is not None:
        result = converted(job, chosen.sites, data.calibration)
        result.model.load_state_dict(weights)
        result.report.recalibration = saved.get("recalibration")
        job.notes.extend(saved.get("notes", []))
        return Baseline(result, saved["zero_shot"], saved["recalibrated"], saved["recalibration_kept"],
                        saved["judged"])
    notes = len(job.notes)
    base = recalibration(job, conversion(job, data, chosen, refs), data, refs)
    result = base.conversion
    job.save_checkpoint("baseline", result.model.state_dict())
    job.record("baseline", {"zero_shot": base.zero_shot, "recalibrated": base.recalibrated,
                            "recalibration_kept": base.recalibration_kept, "recalibration": result.report.recalibration,
                            "judged": base.judged, "notes": job.notes[notes:]})
    return base


def _pct(fid: Optional[Dict[str, Any]]) -> str:
    agree = (fid or {}).get("top1_agreement")
    return "n/a" if agree is None else f"{100 * agree:.1f}%"


def _distill_stage(job: Job, student: nn.Module, data: DataSplit, stage: int, stages: int, steps: int) -> Dict[str, Any]:
    """Distil ``student`` from the original for ``steps`` steps (stage ``stage`` of ``stages``),
    checkpointing into the run folder and continuing from its last checkpoint."""
    name = f"distill-{stage}"
    state = job.load_checkpoint(name)
    start = int(state["step"]) if state is not None else 0
    stream = TrainStream(data, job.batch_size, job.seed * 1000 + stage, start=start)
    log_every = max(1, min(25, steps // 20))

    def log(record: Dict[str, Any]) -> None:
        if "step" in record:
            job.event("distillation", "step", part=stage, parts=stages, step=record["step"], total=steps,
                      loss=record.get("loss"))
        elif "warning" in record:
            job.event("distillation", "warning", message=record["warning"])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed * 1000 + stage)
        result = distill(student, job.original, stream, steps, **job.distill_options, log=log, log_every=log_every,
                         checkpoint=lambda s: job.save_checkpoint(name, s), checkpoint_every=job.checkpoint_every,
                         resume=state)
    record = result.to_json()
    record.pop("history", None)
    return dict(record, resumed_from=start or None)


def distillation(job: Job, data: DataSplit, chosen: Chosen, base: Baseline) -> Tuple[nn.Module, List[Dict[str, Any]]]:
    """One-shot (``stages == 1``): the baseline's model distilled. Progressive: the sites in
    groups (``progressive.py``), each group converted on the student, its BatchNorms
    recalibrated and the student distilled for its share of the steps. Returns the student (the
    baseline's structure) and one record per stage."""
    groups = stage_groups(chosen.report, chosen.sites, job.stages) if job.stages > 1 else [list(chosen.sites)]
    shares = split_steps(job.steps, len(groups))
    done = job.done()
    records: List[Dict[str, Any]] = []
    student: Optional[nn.Module] = None
    cumulative: List[str] = []
    for j, (group, steps) in enumerate(zip(groups, shares), start=1):
        cumulative = cumulative + group
        key = f"stage-{j}"
        if key in done and job.load_checkpoint(key) is not None:
            records.append(done[key])
            student = None  # rebuilt below from the checkpoint when a later stage needs it
            continue
        with _timed(job, "distillation", part=j, parts=len(groups), sites=len(group), steps=steps):
            student = _stage_student(job, data, base, cumulative, group, student, j, len(groups))
            record = {"stage": j, "sites": list(group), "steps": steps}
            if steps:
                record["distill"] = _distill_stage(job, student, data, j, len(groups), steps)
        job.save_checkpoint(key, student.state_dict())
        job.record(key, record)
        records.append(record)
    if student is None:  # every stage was done before a resume
        student = _rebuilt(job, data, cumulative, f"stage-{len(groups)}")
    return student, records


def _rebuilt(job: Job, data: DataSplit, sites: List[str], checkpoint: str) -> nn.Module:
    model = converted(job, sites).model
    model.load_state_dict(job.load_checkpoint(checkpoint))
    return model


def _stage_student(job: Job, data: DataSplit, base: Baseline, cumulative: List[str], group: List[str],
                   student: Optional[nn.Module], stage: int, stages: int) -> nn.Module:
    """The student stage ``stage`` distils: a resumed stage's structure (its checkpoint loads in
    ``distill``); one-shot: a copy of the baseline's model; else the previous stage's student (or
    its checkpoint) with this stage's group converted and its BatchNorms recalibrated."""
    if job.load_checkpoint(f"distill-{stage}") is not None:
        return converted(job, cumulative).model
    if stages == 1:
        return copy.deepcopy(base.conversion.model)
    if student is None:
        previous = cumulative[:len(cumulative) - len(group)]
        student = _rebuilt(job, data, previous, f"stage-{stage - 1}") if stage > 1 else copy.deepcopy(job.original)
    convert(student, dataclasses.replace(job.options, sites=tuple(group)), example_inputs=job.inputs, count=False,
            memory_check=False)
    if batchnorms(student):
        recalibrate_batchnorm(student, data.train)
    return student


def evaluation(job: Job, base: Baseline, student: nn.Module, refs: References) -> Tuple[Dict[str, Any], str]:
    """The distilled student's held-out fidelity; the weights kept are the better of the baseline's
    and the distilled ones on the judging batches (distillation that ends worse is not kept)."""
    with _timed(job, "evaluation"):
        distilled, judged = refs.measure(student)
        before = base.kept
        best = base.judged[before]
        if job.steps and not _better(best, judged):
            base.conversion.model.load_state_dict(student.state_dict())
            return distilled, "distilled"
        if job.steps:
            job.notes.append(f"Distillation ended below the {before.replace('_', '-')} fidelity on the judging batches "
                             f"({_pct(judged)} against {_pct(best)} agreement); the {before.replace('_', '-')} "
                             "weights were kept.")
        return distilled, before


def save(job: Job, result: ConversionResult, final: Dict[str, Any], chosen: Chosen) -> None:
    """``model.safetensors`` + ``surgery.json`` into the run folder (what ``convert --out`` writes)."""
    report = result.report
    report.fidelity = dict(final, calib="held-out split")
    report.selection = dict(chosen.report, targets=[_reached(t, report) for t in chosen.report["targets"]])
    if job.folder is None:
        return
    with _timed(job, "save"):
        staging = job.folder.state_dir / "converted"
        result.save(staging, force=True)
        for name in ("model.safetensors", "surgery.json"):  # the weights first: surgery.json names their hash
            os.replace(staging / name, job.folder.path / name)
        staging.rmdir()
        report.saved_to = str(job.folder.path)


def _reached(target: Dict[str, Any], report: Any) -> Dict[str, Any]:
    reached = report.params_after if target["metric"] == "params" else report.macs_after
    fraction = reached / target["original"] if reached is not None and target["original"] else None
    return dict(target, reached=reached, reached_fraction=fraction, met=reached is not None and reached <= target["limit"])


def write_export(job: Job, result: ConversionResult) -> Optional[Dict[str, Any]]:
    if job.export is None:
        return None
    with _timed(job, "export", format=job.export):
        path = job.folder.path / f"model.{job.export}"
        return export_converted(result, path, job.export, force=True).to_json()


def measure_speed(job: Job, result: ConversionResult) -> Optional[Dict[str, Any]]:
    """A short timing of both models (batch 1, one thread, eager): a few rounds, not a benchmark."""
    if not job.speed:
        return None
    threads = torch.get_num_threads()
    with _timed(job, "speed"):
        torch.set_num_threads(1)
        try:
            timed = benchmark(job.original, result.model, job.inputs, prep="eager", warmup=2, runs=15, max_seconds=5)
        finally:
            torch.set_num_threads(threads)
    return {"original_ms": timed["original"]["median_ms"], "converted_ms": timed["converted"]["median_ms"],
            "speedup": timed["speedup_median"], "batch_size": 1, "threads": 1, "prep": "eager"}


def finished(job: Job) -> CompressResult:
    """A finished run, resumed: its saved model and ``compress.json``, nothing run again."""
    saved = job.folder.read_result()
    if saved is None:
        raise SurgeryError(f"'{job.folder.path}' is marked finished but has no compress.json; pass "
                           f"{arg('force=True')} to run it again.")
    result = load_converted(job.folder.path, model=copy.deepcopy(job.original))
    return CompressResult(result, saved["fidelity"], saved["kept"], saved["split"], saved["selection"], saved["stages"],
                          saved["progressive"], saved["steps"], saved.get("speed"), saved.get("export"),
                          list(saved.get("notes", [])), dict(saved.get("seconds", {})), str(job.folder.path), True)


# -- the entry point -------------------------------------------------------------------------------

def compress(
    model: Union[nn.Module, str],
    data: Any,
    *,
    target_macs: Union[float, int, str, None] = None,
    target_params: Union[float, int, str, None] = None,
    target: Union[Target, dict, None] = None,
    steps: int = DEFAULT_STEPS,
    progressive: int = 1,
    out: Union[str, Path, None] = None,
    export: Optional[str] = None,
    resume: bool = False,
    force: bool = False,
    options: Union[str, SurgeryOptions] = "u",
    example_inputs: Inputs = None,
    holdout: Union[float, int] = 0.2,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    distill_options: Optional[Dict[str, Any]] = None,
    checkpoint_every: int = 100,
    output: Union[int, str, None] = None,
    speed_check: bool = True,
    log: Optional[Log] = None,
    **option_keywords: Any,
) -> CompressResult:
    """Bring the trained ``model`` under a budget and back to its own answers, without labels:
    sensitivity -> budgeted conversion -> BatchNorm recalibration -> label-free distillation from
    the original -> held-out evaluation -> save and export (see the module docstring).

    ``data``: a named set (``"digits"``, ``"images:PATH"``, ...; 64 batches of 16 read), a
    ``Dataset`` or any iterable of batches; ``holdout`` of its samples (a fraction, or a count) are
    set aside with ``seed`` and only evaluated on. The budget: ``target_macs`` / ``target_params``
    (a fraction such as 0.75, or a count such as ``"300M"``) or ``target=Target(...)``. ``steps``
    distillation steps of ``batch_size`` samples, in ``progressive`` stages (1: one-shot);
    ``distill_options`` go to ``distill`` as they are (``lr``, ``temperature``, ``features``, ...).
    ``options`` / ``option_keywords``: the conversion's (``init`` defaults to ``svd``). ``out``: the
    run folder (``state.py``; an existing one needs ``force`` or ``resume``); ``export``:
    ``"onnx"`` or ``"pt2"``, written there. ``log`` receives one dict per event (``stage``,
    ``event``: start, done, step, warning). The original ``model`` is not changed.

    >>> import torch, bsconv_surgery as bs
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
    ...                           torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
    ...                           torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
    >>> data = [torch.randn(16, 3, 8, 8) for _ in range(8)]
    >>> result = bs.compress(net, data, target_macs=0.6, steps=40, example_inputs=(3, 8, 8), speed_check=False)
    >>> result.report.macs_after <= 0.6 * result.report.macs_before, sorted(result.fidelity)
    (True, ['distilled', 'recalibrated', 'zero_shot'])
    """
    started = time.perf_counter()
    job, dataset = resolve(model, data, options=options, option_keywords=option_keywords, target=target,
                           target_macs=target_macs, target_params=target_params, steps=steps, progressive=progressive,
                           example_inputs=example_inputs, holdout=holdout, seed=seed, batch_size=batch_size,
                           distill_options=distill_options, checkpoint_every=checkpoint_every, output=output, out=out,
                           export=export, resume=resume, force=force, speed=speed_check, log=log)
    if job.folder is not None and job.done().get("finished"):
        return finished(job)
    data_split = split(job, dataset)
    refs = References(ReferenceOutputs(job.original, data_split.holdout, "held-out split", job.output, job.inputs),
                      ReferenceOutputs(job.original, data_split.calibration, "calibration batches of the training split",
                                       job.output, job.inputs))
    chosen = sensitivity(job, data_split)
    base = baseline(job, data_split, chosen, refs)
    if job.steps:
        student, stages = distillation(job, data_split, chosen, base)
        distilled, kept = evaluation(job, base, student, refs)
    else:
        stages, distilled, kept = [], None, base.kept
    fidelity = {"zero_shot": base.zero_shot, "recalibrated": base.recalibrated, "distilled": distilled}
    save(job, base.conversion, fidelity[kept], chosen)
    exported = write_export(job, base.conversion)
    timing = measure_speed(job, base.conversion)
    job.seconds["total"] = time.perf_counter() - started
    result = CompressResult(base.conversion, fidelity, kept, data_split.to_json(), chosen.report, stages, job.stages,
                            job.steps, timing, exported, job.notes, job.seconds,
                            str(job.folder.path) if job.folder is not None else None, job.resumed)
    if not result.target_met:
        result.notes.append(f"The held-out agreement with the original is {_pct(result.final)}, below the "
                            f"{100 * TARGET_AGREEMENT:.0f}% aimed for: more steps, a looser budget or more data may "
                            "close the gap.")
    if job.folder is not None:
        job.folder.write_result(result.to_json())
        job.folder.remove_state()
        job.record("finished", True)
    return result
