"""``run_training``: a recipe in, a run folder out.

The run folder holds ``recipe.yaml`` (the resolved recipe), ``metrics.jsonl`` (one line per
epoch), ``last.pt`` (after every epoch, and on Ctrl-C mid-epoch) and ``best.pt`` (best
validation accuracy). Only rank 0 writes. A resumed run restores model, optimizer, scheduler,
position and RNG states, so it ends with the same weights as an uninterrupted one.

Nothing is deleted before its replacement exists: with ``force`` a new run is built in a
temporary sibling folder that replaces the old run folder only when its first checkpoint is
saved (a run that fails before that leaves the old folder as it was). ``last.pt`` and ``best.pt``
are written beside their names and renamed into place; ``best.pt`` is copied from ``last.pt``
right after it, so a kill between the two leaves a ``best.pt`` of an earlier epoch: resuming
finds that (the best epoch of the metric history against the epoch ``best.pt`` holds), rewrites
``best.pt`` from ``last.pt``, and removes the temporary files killed saves left.

What the run says goes to a ``log`` callable (plain text, one message per call; the default is
this module's ``logging`` logger) and, step by step, to an optional ``EpochProgress`` (the CLI
draws a progress bar with it); only rank 0 logs and shows progress.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..core.errors import SurgeryError
from ..fx.modules import param_count
from ..io.files import check_new_dir, check_writable, child_path, follow_umask, recover_swap, swap_in, writing
from ..models.checkpoints import file_sha256, state_dict_problems
from ..recovery.recalibration import recalibrate_batchnorm, stale_batchnorms
from ..layers.regularization import regularization_loss, regularization_sites
from . import distributed as distrib
from .checkpoint import (checkpoint_epoch, clean_temp_files, copy_checkpoint, read_checkpoint, rng_state, set_rng_state,
                         write_checkpoint)
from .data import build_datasets, data_classes, resolve_data
from ..recovery.distill import shared_view, site_outputs
from .engine import Objective, Precision, evaluate, train_one_epoch
from .recipe import AUTO, Recipe, recipe_from_dict, recipe_to_yaml
from .student import build_model, build_teacher, student_classes, teacher_weights

__all__ = ["run_training", "lr_factor", "RunResult", "EpochProgress"]

LAST, BEST, METRICS, RECIPE_FILE = "last.pt", "best.pt", "metrics.jsonl", "recipe.yaml"

_logger = logging.getLogger(__name__)


class EpochProgress(Protocol):
    """Progress within one epoch: ``start`` when (the rest of) an epoch begins, ``step`` after
    every optimizer step with the running loss, accuracy, lr and speed as text, ``stop`` when the
    epoch ends or is interrupted."""

    def start(self, description: str, total: int, completed: int) -> None: ...

    def step(self, stats: str) -> None: ...

    def stop(self) -> None: ...


@dataclass
class RunResult:
    out: Path
    summary: Dict[str, Any]
    history: List[Dict[str, Any]] = field(default_factory=list)
    stopped: bool = False
    main: bool = True  # rank 0 (the process that reports) under torchrun


# -- optimisation ---------------------------------------------------------------------------------

def lr_factor(schedule, epochs: int, steps_per_epoch: int, peak_lr: float):
    """Multiplier of the peak lr after ``step`` optimizer steps (``LambdaLR``, stepped every step)."""
    total = epochs * steps_per_epoch
    warmup = round(schedule.warmup_epochs * steps_per_epoch)
    floor = schedule.min_lr / peak_lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        epoch = step // steps_per_epoch
        if schedule.name == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if schedule.name == "multistep":
            return schedule.gamma ** sum(1 for m in schedule.milestones if epoch >= m)
        if schedule.name == "linear":  # the paper's fine-grained protocol: to zero, per epoch
            return max(0.0, 1 - epoch / epochs)
        return 1.0

    return factor


def make_optimizer(cfg, params) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def make_scheduler(recipe: Recipe, optimizer, steps_per_epoch: int):
    factor = lr_factor(recipe.schedule, recipe.epochs, steps_per_epoch, recipe.optimizer.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- stop requests --------------------------------------------------------------------------------

class StopRequest:
    """First Ctrl-C (or SIGTERM) asks to stop after the current step; a second one aborts."""

    def __init__(self, log):
        self.requested = False
        self.log = log
        self.previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("Stopping after this step and saving last.pt (Ctrl-C again aborts without saving).")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# -- run folder -----------------------------------------------------------------------------------

def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _derived(key: str, given: Dict[str, Any]) -> bool:
    """Whether ``key`` of a flat recipe is one the run derived: ``auto`` in ``given`` (the key or a
    section above it), or where the derived values came from."""
    parts = key.split(".")
    return key.startswith("data.derived_from") or any(
        given.get(".".join(parts[:i])) == AUTO for i in range(1, len(parts) + 1))


def _check_same_recipe(given: Recipe, saved: Recipe, out: Path) -> None:
    a, b = _flat(saved.dump()), _flat(given.dump())
    diff = [f"{k} (run: {a.get(k)!r}, now: {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not _derived(k, b)]
    if diff:
        raise SurgeryError(
            f"The recipe differs from the one '{out}' was started with: {'; '.join(diff[:6])}. "
            f"Resume with the saved recipe (bsconv-surgery train --resume --out {out}), or start a new run."
        )


def _check_out(out: Path, force: bool, resume: bool, env) -> None:
    """Before any work (rank 0 checks, every rank stops): a new run's folder must not exist unless
    ``force`` and must go where files can be created; a resumed run's folder must be writable
    (``last.pt``, ``best.pt`` and ``metrics.jsonl`` are rewritten)."""
    problem = None
    if env.is_main:
        try:
            recover_swap(out)  # first: what exists is what a kill in a replacement left
            if resume:
                check_writable(out / LAST)
            elif out.exists() and not force:
                raise SurgeryError(f"Run folder '{out}' already exists; pass --resume to continue it or --force to "
                                   "replace it.")
            else:
                check_new_dir(out, force=True)
        except SurgeryError as exc:
            problem = str(exc)
    problem = distrib.broadcast(problem, env)
    if problem:
        raise SurgeryError(problem)


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _val_acc(history: List[Dict[str, Any]], epoch: int) -> float:
    return next((r["val_acc"] for r in history if r["epoch"] == epoch), -1.0)


def _best_of(history: List[Dict[str, Any]]) -> Optional[int]:
    """The best epoch of a metric history: the first with the highest validation accuracy."""
    best, epoch = -1.0, None
    for record in history:
        if record["val_acc"] > best:
            best, epoch = record["val_acc"], record["epoch"]
    return epoch


def _epoch_record(epoch: int, train: Dict[str, float], val: Dict[str, float], lr: float, seconds: float,
                  samples_per_s: float, scored: bool = True) -> Dict[str, Any]:
    """One line of ``metrics.jsonl``. Label-free runs (``train_agree`` in the sums) log the agreement
    with the teacher; on unlabelled data (``scored`` False) ``val_acc`` *is* that agreement."""
    n = max(train["samples"], 1)
    record = {"epoch": epoch, "lr": lr, "train_loss": train["loss"] / n}
    for part in ("ce", "reg", "kd", "feat"):
        if part in train:
            record[f"train_{part}"] = train[part] / n
    m = max(val["samples"], 1)
    if "agree" in train:
        record["train_agree"] = train["agree"] / n
    if "agree" in val:
        record["val_agree"] = val["agree"] / m
    record.update({
        "train_acc": train["correct"] / n if "correct" in train else train.get("agree", 0.0) / n,
        "val_loss": val["loss"] / m if scored else None,
        "val_acc": val["correct"] / m if scored else val.get("agree", 0.0) / m,
        "val_top5": val["correct5"] / m if scored else None,
        "train_samples": int(train["samples"]),
        "val_samples": int(val["samples"]),
        "epoch_seconds": seconds,
        "samples_per_s": samples_per_s,
    })
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}


# -- the run --------------------------------------------------------------------------------------

def run_training(recipe: Optional[Recipe], out: Optional[Path] = None, *, resume: bool = False,
                 force: bool = False, log: Optional[Callable[[str], None]] = None,
                 progress: Optional[EpochProgress] = None) -> RunResult:
    """Train as ``recipe`` says into ``out``; ``resume`` continues ``out/last.pt`` (``recipe`` may be None).

    ``log`` receives each message as plain text (default: ``logging`` at INFO level);
    ``progress``, when given, follows the steps of every epoch.
    """
    started = time.perf_counter()
    log = log if log is not None else _logger.info
    ckpt = None
    if resume:
        if out is None:
            raise SurgeryError("--resume needs --out DIR: the run folder to continue.")
        recovered = recover_swap(out)
        if recovered:
            log(recovered)
        if not (out / LAST).is_file():
            raise SurgeryError(f"Cannot resume: '{out / LAST}' does not exist.")
        ckpt = read_checkpoint(out / LAST)
        saved = recipe_from_dict(ckpt["recipe"], f"recipe saved in {out / LAST}")
        if recipe is not None:
            _check_same_recipe(recipe, saved, out)
        recipe = saved
    if recipe is None:
        raise SurgeryError("No recipe: pass RECIPE (a YAML file or a bundled name such as digits-demo).")
    env = distrib.setup(recipe.device)
    try:
        if out is None:
            stamp = distrib.broadcast(time.strftime("%Y%m%d-%H%M%S"), env)
            out = child_path("runs", f"{recipe.name or 'run'}-{stamp}", "The recipe name")
        return _train(recipe, Path(out), ckpt, force, env, log, progress, started)
    finally:
        distrib.teardown(env)


class _Trainer:
    """One run: everything built from the recipe, the position in it, and the files it writes."""

    def __init__(self, recipe: Recipe, out: Path, env, log: Callable[[str], None]):
        self.recipe, self.out, self.env = recipe, out, env
        self.dir = out  # where the files are written: a temporary sibling until a replaced run's first save
        self.created = False  # this run made the folder and has saved nothing in it yet
        self.log = log if env.is_main else (lambda msg: None)
        _seed(recipe.seed + env.rank)
        # the model first (its input size and data config settle the data's auto keys), sized for
        # the data's classes, which are known without reading the data
        self.num_classes = student_classes(recipe, data_classes(recipe.data))
        self.built = build_model(recipe, self.num_classes)
        self.recipe = recipe = recipe.model_copy(update={"data": resolve_data(recipe.data, self.built.settings)})
        self.data = build_datasets(recipe.data)
        self.label_free = recipe.distill.label_free or not self.data.labelled
        self.model = model = self.built.model
        self.precision = Precision(env.device, recipe.amp, recipe.channels_last)
        model.to(env.device, memory_format=torch.channels_last if self.precision.cuda and recipe.channels_last
                 else torch.preserve_format)
        self.sites = sum(1 for _ in regularization_sites(model))
        self.stale = stale_batchnorms(model) if recipe.stale_bn_momentum is not None else []
        for name in self.stale:  # their own momentum is not in the state dict: nothing to restore
            model.get_submodule(name).momentum = recipe.stale_bn_momentum
        teacher, self.teacher_sha256 = None, None
        if recipe.distill.enabled or self.label_free:
            classes = self.built.classes if self.label_free else self.data.num_classes
            teacher = build_teacher(self.built, recipe.distill, classes).to(env.device)
            weights = recipe.distill.teacher_checkpoint or self.built.source.checkpoint
            self.teacher_sha256 = file_sha256(weights) if weights else None  # checked again on resume
        # accuracy is scored on labelled data whose classes are the model's own
        self.scored = self.data.labelled and (not self.label_free or self.data.num_classes == self.built.classes)
        features = None
        if recipe.distill.features:
            if not self.label_free:
                raise SurgeryError("distill.features (site-level feature distillation) runs with label-free "
                                   "distillation: set distill.label_free=true, or train on images:PATH.")
            if self.built.report is None:
                raise SurgeryError("distill.features needs a converted model (a 'convert --out' folder or a recipe "
                                   "with surgery:) to know where its converted sites are.")
            features = site_outputs(self.built.report)
        self.objective = Objective(recipe.label_smoothing, recipe.ortho_alpha, self.sites > 0 and recipe.ortho_alpha > 0,
                                   teacher, recipe.distill.alpha, recipe.distill.temperature, self.label_free,
                                   features, recipe.distill.feature_weight, self._shared_view())
        self.objective.attach(model)
        self._loaders()
        self.optimizer = make_optimizer(recipe.optimizer, model.parameters())
        self.scheduler = make_scheduler(recipe, self.optimizer, self.steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.cuda and recipe.amp == "fp16" else None
        self.train_model = model
        if env.distributed:
            self.train_model = DistributedDataParallel(model, device_ids=[env.device.index] if self.precision.cuda else None)
        self.epoch, self.step, self.partial = 0, 0, None  # position: epochs done, steps done in the next one
        self.history: List[Dict[str, Any]] = []
        self.best = {"epoch": None, "val_acc": -1.0}
        self.train_seconds = 0.0

    def _shared_view(self):
        """Function matching's shared view of each batch (label-free only; flips as data.augment.hflip)."""
        d = self.recipe.distill
        view = shared_view(d.method, d.augment, d.mixup, flip=self.recipe.data.augment.hflip)
        if view is not None and not self.label_free:
            raise SurgeryError(f"distill.method {d.method} (with its augment / mixup) runs with label-free "
                               "distillation: set distill.label_free=true, or train on images:PATH.")
        return view

    def _loaders(self) -> None:
        recipe, data, env, bs = self.recipe, self.data, self.env, self.recipe.data.batch_size
        self.sampler = distrib.ResumableSampler(data.train, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                                seed=recipe.seed)
        self.loader_seed = torch.Generator()  # seeds the workers, reseeded every epoch; not the global RNG
        self.train_loader = DataLoader(data.train, batch_size=bs, sampler=self.sampler, drop_last=True,
                                       num_workers=recipe.data.workers, pin_memory=self.precision.cuda,
                                       generator=self.loader_seed)
        self.val_loader = DataLoader(data.val, batch_size=recipe.data.eval_batch_size or bs,
                                     sampler=distrib.ShardSampler(len(data.val), env), num_workers=recipe.data.workers,
                                     pin_memory=self.precision.cuda, generator=torch.Generator().manual_seed(0))
        self.steps = self.sampler.num_samples // bs
        if recipe.max_steps_per_epoch:
            self.steps = min(self.steps, recipe.max_steps_per_epoch)
        if self.steps == 0:
            raise SurgeryError(f"data.batch_size {bs} is larger than the {self.sampler.num_samples} training samples "
                               "each process sees; lower it.")
        if bs < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            raise SurgeryError("data.batch_size 1: the model has BatchNorm layers, which need at least 2 samples per "
                               "batch in training; raise it.")

    # -- checkpoints ----------------------------------------------------------------------------

    def state(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "step": self.step, "partial": self.partial, "history": self.history,
            "best": self.best, "train_seconds": self.train_seconds, "recipe": self.recipe.dump(),
            "world_size": self.env.world_size, "steps_per_epoch": self.steps,
            "rng": distrib.gather(rng_state(), self.env), "teacher_sha256": self.teacher_sha256,
            "num_classes": self.num_classes,  # build_model's argument: load_trained rebuilds the model without the data
        }

    def save(self, best: bool = False) -> None:
        state = self.state()  # every rank: the RNG states are gathered
        if self.env.is_main:
            write_checkpoint(self.dir / LAST, state, name=self.out / LAST)
            if best:
                copy_checkpoint(self.dir / LAST, self.dir / BEST, name=self.out / BEST)
            self.created = False
            if self.dir != self.out:  # the new run has its first checkpoint: it replaces the old folder now
                with writing(self.out, "replacing the old run folder"):
                    swap_in(self.dir, self.out)
                self.dir = self.out

    def discard(self) -> None:
        """A new run that failed before its first save: remove the folder it made (the temporary
        one beside a run it was to replace, which stays as it was)."""
        if self.env.is_main and (self.dir != self.out or self.created):
            shutil.rmtree(self.dir, ignore_errors=True)

    def restore(self, ckpt: Dict[str, Any]) -> None:
        recorded = ckpt.get("teacher_sha256")
        if recorded and self.teacher_sha256 and recorded != self.teacher_sha256:
            weights = self.recipe.distill.teacher_checkpoint or self.built.source.checkpoint
            raise SurgeryError(f"The teacher's weights '{weights}' changed since the run started: their SHA-256 is "
                               f"{self.teacher_sha256}, '{self.out / LAST}' recorded {recorded}. Restore that file to "
                               "resume, or start a new run.")
        problems = state_dict_problems(self.model, ckpt["model"])
        if problems:
            raise SurgeryError(f"The model weights in '{self.out / LAST}' do not fit the model the recipe builds: "
                               + "; ".join(problems) + ".")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt["scaler"]:
                self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise SurgeryError(f"The optimizer or scheduler state in '{self.out / LAST}' does not fit this run "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).") from None
        self.model.load_state_dict(ckpt["model"])
        self.epoch, self.step, self.partial = ckpt["epoch"], ckpt["step"], ckpt["partial"]
        self.history, self.best, self.train_seconds = ckpt["history"], ckpt["best"], ckpt["train_seconds"]
        if self.env.is_main:
            self.repair_files(ckpt)
        if ckpt["world_size"] == self.env.world_size and ckpt["steps_per_epoch"] == self.steps:
            set_rng_state(ckpt["rng"][self.env.rank])
        else:
            self.log(f"Warning: the run was saved with {ckpt['world_size']} process(es) and "
                     f"{ckpt['steps_per_epoch']} steps per epoch, now {self.env.world_size} and {self.steps}: "
                     "it continues, but not bit for bit.")
        where = f"step {self.step + 1}/{self.steps} of " if self.step else ""
        self.log(f"Resuming {self.out} at {where}epoch {self.epoch + 1}/{self.recipe.epochs}.")

    def repair_files(self, ckpt: Dict[str, Any]) -> None:
        """After a kill: remove the temporary files of interrupted saves, and make ``best.pt`` hold
        the best epoch of the metric history (a kill between writing ``last.pt`` and copying it to
        ``best.pt`` leaves an older ``best.pt``)."""
        removed = clean_temp_files(self.out)
        if removed:
            self.log(f"Removed {len(removed)} temporary file(s) of interrupted saves: {', '.join(removed)}.")
        best = _best_of(self.history)
        if best is None:
            return
        held = checkpoint_epoch(self.out / BEST)
        if held == best:
            return
        was = f"holds epoch {held}" if held is not None else "is missing or unreadable"
        if ckpt["epoch"] == best and ckpt["step"] == 0:  # last.pt is the end of the best epoch
            copy_checkpoint(self.out / LAST, self.out / BEST)
            self.best = {"epoch": best, "val_acc": _val_acc(self.history, best)}
            self.log(f"Repaired {self.out / BEST}: it {was}, the best epoch is {best}; rewritten from last.pt.")
        elif held is not None:  # the weights of the best epoch are gone: report what best.pt holds
            self.best = {"epoch": held, "val_acc": _val_acc(self.history, held)}
            self.log(f"Warning: {self.out / BEST} holds epoch {held}, not the best epoch {best}, whose weights were "
                     f"not saved; the summary names epoch {held}.")
        else:
            self.best = {"epoch": None, "val_acc": -1.0}
            self.log(f"Warning: {self.out / BEST} {was} and epoch {best}'s weights were not saved; best.pt will "
                     "hold the best epoch from here on.")

    def start_files(self, fresh: bool) -> None:
        if fresh and self.env.is_main:
            with writing(self.out, "creating the run folder"):
                if self.out.exists():  # --force: build the new run beside the old one (see save())
                    self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
                    follow_umask(self.dir)
                else:
                    self.out.mkdir(parents=True)
                    self.created = True
        distrib.barrier(self.env)
        if self.env.is_main:
            with writing(self.out / RECIPE_FILE if fresh else self.out / METRICS):
                if fresh:
                    (self.dir / RECIPE_FILE).write_text(recipe_to_yaml(self.recipe))
                # the history up to last.pt (drops an epoch logged after it, if any)
                (self.dir / METRICS).write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def recalibrate(self) -> None:
        """``recalibrate_bn``: BatchNorm statistics from 8 training batches, before a fresh run (its
        own loader and RNG, so the run's random streams are the same with or without it)."""
        if not self.recipe.recalibrate_bn:
            return
        loader = DataLoader(self.data.train, batch_size=self.recipe.data.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(self.recipe.seed))
        with torch.random.fork_rng(devices=[]):
            done = recalibrate_batchnorm(self.model, (x for x, _ in itertools.islice(loader, 8)))
        self.log(f"Recalibrated {done.batchnorms} BatchNorm(s) on {done.samples} training samples "
                 f"({done.seconds:.2f}s).")

    def describe(self) -> None:
        env, recipe = self.env, self.recipe
        self.log(f"Model: {self.built.description}; {param_count(self.model):,} parameters.")
        for note in self.built.notes:
            self.log(f"Note: {note}.")
        self.log(f"Data: {self.data.description}; {self.steps} steps of {recipe.data.batch_size} x {env.world_size} "
                 f"process(es) per epoch, device {env.device}.")
        derived = recipe.data.derived_from
        if derived:
            self.log("Derived data settings (recipe.yaml: data.derived_from): "
                     + "; ".join(f"augment: {where}" if key == "augment" else
                                 f"{key} {_shown(getattr(recipe.data, key))} from {where}"
                                 for key, where in derived.items() if key != "std") + ".")
        if env.device.type != "cuda" and (recipe.amp != "none" or recipe.channels_last):
            self.log("amp and channels_last apply on CUDA only: training in float32 on the CPU.")
        if self.objective.regularize:
            self.log(f"Orthonormal regulariser on {self.sites} BSConv-S site(s), alpha {recipe.ortho_alpha}.")
        if self.stale:
            self.log(f"Warning: {len(self.stale)} BatchNorm(s) have momentum 0 or a cumulative average continuing a "
                     f"pretrained count ({', '.join(self.stale[:3])}{', ...' if len(self.stale) > 3 else ''}): their "
                     f"running statistics would not follow training. Training them with momentum "
                     f"{recipe.stale_bn_momentum} (stale_bn_momentum; null keeps them).")
        if self.objective.teacher is not None and self.label_free:
            why = "distill.label_free" if recipe.distill.label_free else "the data has no labels"
            feats = (f" plus site-level feature loss on {len(self.objective.features)} site(s) (weight "
                     f"{recipe.distill.feature_weight})" if self.objective.features else "")
            scored = ("validation: accuracy and agreement with the teacher" if self.scored else
                      "validation: val_acc is the agreement with the teacher (no labels to score)")
            view = self.objective.view
            matching = (f"; function matching: teacher and student see the same view of each batch (augment "
                        f"{'suited to the input size' if view.augment else 'off'}, mixup "
                        f"{view.mixup_alpha or 'off'})" if view is not None else "")
            self.log(f"Label-free distillation from {self.built.source.spec} with "
                     f"{teacher_weights(self.built.source, recipe.distill)} ({why}): temperature "
                     f"{recipe.distill.temperature}{feats}{matching}; {scored}.")
        elif self.objective.teacher is not None:
            self.log(f"Distilling from {self.built.source.spec} with {teacher_weights(self.built.source, recipe.distill)} "
                     f"(alpha {recipe.distill.alpha}, temperature {recipe.distill.temperature}).")

    # -- the loop -------------------------------------------------------------------------------

    def train_epoch(self, stop: StopRequest, progress: Optional[EpochProgress]) -> bool:
        """Train (the rest of) epoch ``self.epoch``; evaluate, log and save when it is whole.
        Returns True when a stop was requested."""
        recipe, env, epoch = self.recipe, self.env, self.epoch
        self.sampler.set_epoch(epoch)
        self.sampler.skip = self.step * recipe.data.batch_size
        self.loader_seed.manual_seed(recipe.seed * 1_000_003 + epoch * 1_009 + env.rank)
        sums = dict(self.partial["sums"]) if self.partial else {}
        seconds_before = self.partial["seconds"] if self.partial else 0.0
        t0, seen0 = time.perf_counter(), float(sums.get("samples", 0))

        def on_step(s):  # reading the running sums syncs the device: only when progress is shown
            n = float(s["samples"])
            rate = (n - seen0) * env.world_size / max(time.perf_counter() - t0, 1e-9)
            hits, what = (s["agree"], "agree") if "agree" in s else (s["correct"], "acc")
            progress.step(f"loss {float(s['loss']) / n:.4f}  {what} {100 * float(hits) / n:.1f}%  "
                          f"lr {self.optimizer.param_groups[0]['lr']:.3g}  {rate:.0f} samples/s")

        if progress is not None:
            progress.start(f"epoch {epoch + 1}/{recipe.epochs}", self.steps, self.step)
        try:
            done, stopped = train_one_epoch(
                self.train_model, self.objective, self.optimizer, self.scheduler,
                itertools.islice(self.train_loader, self.steps - self.step), self.precision, sums, self.scaler,
                on_step if progress is not None else None, lambda: distrib.any_rank(stop.requested, env))
        finally:
            if progress is not None:
                progress.stop()
        train_time = time.perf_counter() - t0
        self.step += done
        if self.step < self.steps:  # stopped mid-epoch: save the position and the running sums
            self.partial = {"sums": {k: float(v) for k, v in sums.items()}, "seconds": seconds_before + train_time}
            self.train_seconds += train_time
            self.save()
            self.log(f"Interrupted at epoch {epoch + 1}, step {self.step}/{self.steps}: saved {self.out / LAST}. "
                     f"Continue with: bsconv-surgery train --resume --out {self.out}")
            return True
        train = distrib.all_reduce_sums({k: float(v) for k, v in sums.items()}, env)
        teacher = self.objective.teacher if self.label_free else None
        val = distrib.all_reduce_sums(evaluate(self.model, self.val_loader, self.precision, teacher, self.scored), env)
        elapsed = time.perf_counter() - t0
        self.train_seconds += elapsed
        rate = (train["samples"] - seen0 * env.world_size) / max(train_time, 1e-9)
        record = _epoch_record(epoch + 1, train, val, self.optimizer.param_groups[0]["lr"], seconds_before + elapsed, rate,
                               self.scored)
        if not math.isfinite(record["train_loss"]):
            saved = f"{self.out / LAST} holds epoch {epoch}" if epoch else "nothing was saved"
            raise SurgeryError(f"Training diverged in epoch {epoch + 1}: the training loss is {record['train_loss']} "
                               f"(optimizer.lr {recipe.optimizer.lr}). Not saved ({saved}); lower optimizer.lr or "
                               "check the data.")
        improved = record["val_acc"] > self.best["val_acc"]
        if improved:
            self.best = {"epoch": epoch + 1, "val_acc": record["val_acc"]}
        self.history.append(record)
        self.epoch, self.step, self.partial = epoch + 1, 0, None
        self.save(best=improved)
        if env.is_main:
            with writing(self.out / METRICS), open(self.dir / METRICS, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        reg = f"  reg {record['train_reg']:.4f}" if "train_reg" in record else ""
        agree = f"  agree {100 * record['val_agree']:.2f}%" if "val_agree" in record and self.scored else ""
        self.log(f"epoch {epoch + 1}/{recipe.epochs}  loss {record['train_loss']:.4f}{reg}  "
                 f"train {100 * record['train_acc']:.1f}%  val {100 * record['val_acc']:.2f}%{agree}  "
                 f"lr {record['lr']:.3g}  {record['samples_per_s']:.0f} samples/s  {record['epoch_seconds']:.1f}s")
        if stopped:
            self.log(f"Interrupted after epoch {epoch + 1}: saved {self.out / LAST}. "
                     f"Continue with: bsconv-surgery train --resume --out {self.out}")
        return stopped

    def summary(self, stopped: bool, started: float) -> Dict[str, Any]:
        return {
            "run": str(self.out),
            "model": self.built.description,
            "params": param_count(self.model),
            "bsconv_s_sites": self.sites,
            "ortho_error": float(regularization_loss(self.model).detach()) if self.sites else None,
            "data": self.data.description,
            "processes": self.env.world_size,
            "device": str(self.env.device),
            "epochs_done": len(self.history),
            "epochs": self.recipe.epochs,
            "best_val_acc": self.best["val_acc"] if self.best["epoch"] else None,
            "best_epoch": self.best["epoch"],
            "final": self.history[-1] if self.history else None,
            "train_seconds": round(self.train_seconds, 2),
            "wall_seconds": round(time.perf_counter() - started, 2),
            "stopped": stopped,
            "files": [str(self.out / f) for f in (RECIPE_FILE, METRICS, LAST, BEST) if (self.dir / f).exists()],
        }


def _train(recipe: Recipe, out: Path, ckpt, force: bool, env, log: Callable[[str], None],
           progress: Optional[EpochProgress], started: float) -> RunResult:
    _check_out(out, force, ckpt is not None, env)
    trainer = _Trainer(recipe, out, env, log)
    if ckpt is not None:
        trainer.restore(ckpt)
    try:
        trainer.start_files(fresh=ckpt is None)
        trainer.describe()
        if ckpt is None:
            trainer.recalibrate()
        progress = progress if env.is_main else None
        stopped = False
        with StopRequest(trainer.log) as stop:
            while trainer.epoch < recipe.epochs and not stopped:
                stopped = trainer.train_epoch(stop, progress)
    except BaseException:
        trainer.discard()
        raise
    if not stopped and ckpt is not None and ckpt["epoch"] >= recipe.epochs:
        trainer.log(f"'{out}' had already finished all {recipe.epochs} epochs.")
    return RunResult(out, trainer.summary(stopped, started), trainer.history, stopped, env.is_main)
