"""``bsconv-surgery train``: train or fine-tune a model as a recipe says (also under torchrun)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import click
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..core.errors import SurgeryError
from .console import console
from .format import name_column
from .lazy import lazy_module
from .options import TEXT, json_option, model_args_option, parse_model_args, path, trust_code_option

training = lazy_module("bsconv_surgery.training")


def _log(message: str) -> None:
    """A training message on stderr, as plain text; a leading ``Warning:`` in yellow."""
    text = Text(message)
    if message.startswith("Warning:"):
        text.stylize("yellow", 0, len("Warning:"))
    console.err.print(text, soft_wrap=True, highlight=False)


class _EpochBar:
    """The progress bar of one epoch (loss, accuracy, lr, samples/s) on stderr; it disappears when
    the epoch ends, leaving the epoch's log line."""

    def __init__(self) -> None:
        self.bar: Optional[Progress] = None

    def start(self, description: str, total: int, completed: int) -> None:
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[stats]}"), console=console.err,
                            transient=True)
        self.bar.start()
        self.task = self.bar.add_task(description, total=total, completed=completed, stats="")

    def step(self, stats: str) -> None:
        self.bar.update(self.task, advance=1, stats=stats)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _summary_table(summary) -> Table:
    final = summary["final"] or {}
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    table = Table(title="Training summary", box=box.SIMPLE_HEAVY, show_header=False)
    name_column(table, style="bold")
    name_column(table)  # a long run folder or model path folds, never cut
    rows = [
        ("run folder", summary["run"]),
        ("model", summary["model"]),
        ("parameters", f"{summary['params']:,}"),
        ("data", summary["data"]),
        ("epochs", f"{summary['epochs_done']} of {summary['epochs']}" + (" (interrupted)" if summary["stopped"] else "")),
        ("best val accuracy", f"{pct(summary['best_val_acc'])} (epoch {summary['best_epoch']})" if summary["best_epoch"] else "n/a"),
        ("final val accuracy", pct(final.get("val_acc"))),
        ("final train loss", f"{final['train_loss']:.4f}" if final else "n/a"),
    ]
    if "train_reg" in final:
        rows.append(("orthonormal regulariser", f"{final['train_reg']:.4f} (now {summary['ortho_error']:.4f})"))
    if "train_kd" in final:
        rows.append(("distillation loss", f"{final['train_kd']:.4f}"))
    rows += [
        ("processes / device", f"{summary['processes']} / {summary['device']}"),
        ("train time", f"{summary['train_seconds']:.1f}s (this command: {summary['wall_seconds']:.1f}s)"),
        ("throughput", f"{final['samples_per_s']:.0f} samples/s" if final else "n/a"),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    return table


@click.command()
@click.argument("recipe", type=TEXT, required=False, metavar="RECIPE")
@click.option("--model", type=TEXT, default=None, metavar="SPEC_OR_DIR",
              help="timm:NAME, tv:NAME, NAME (converted on the fly if the recipe has surgery:), or a 'convert --out' folder.")
@click.option("--checkpoint", type=path(dir_okay=False), default=None, metavar="FILE", help="Weights for a model spec, loaded before surgery.")
@click.option("--pretrained", is_flag=True,
              help="Build a model spec with its published weights (pretrained: true), from the libraries' caches.")
@click.option("--weights", type=TEXT, default=None, metavar="NAME",
              help="A torchvision model's weights enum entry, e.g. IMAGENET1K_V2 (weights: NAME; implies --pretrained).")
@model_args_option
@trust_code_option
@click.option("--data", type=TEXT, default=None, metavar="NAME",
              help="digits, cifar10, cifar100, imagefolder:PATH (a folder per class) or images:PATH (unlabelled "
              "images, any nesting: distillation from the source model alone) (data.name).")
@click.option("--data-dir", type=path(file_okay=False), default=None, metavar="DIR", help="Where cifar10/cifar100 live (data.root).")
@click.option("--download", is_flag=True, help="Download cifar10/cifar100 into --data-dir (needs internet).")
@click.option("--teacher-checkpoint", type=path(dir_okay=False), default=None, metavar="FILE",
              help="Distil from the unconverted source model with these weights (turns distillation on).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Where to train (device).")
@click.option("--set", "overrides", type=TEXT, multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set optimizer.lr=0.05 --set epochs=3 (repeatable; value read as YAML).")
@click.option("--out", type=path(file_okay=False, path_type=Path), default=None,
              help="Run folder (default runs/RECIPE-TIMESTAMP); an existing one needs --resume or --force.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
@json_option
def train(recipe, model, checkpoint, pretrained, weights, model_args, trust_code, data, data_dir, download, teacher_checkpoint,
          device, overrides, out, resume, force, as_json):
    """Train as RECIPE says (a YAML file, or a bundled name: digits-demo, finetune-short, paper-cifar, ...).

    Writes OUT/recipe.yaml, OUT/metrics.jsonl, OUT/last.pt and OUT/best.pt. Ctrl-C saves last.pt;
    --resume continues it. Under 'torchrun --nproc-per-node N -m bsconv_surgery train ...' it
    trains with DistributedDataParallel.
    """
    if resume and force:
        raise SurgeryError("--resume and --force contradict each other: --force starts the run over.")
    values = {key: value for key, value in (
        ("model", model), ("checkpoint", checkpoint), ("pretrained", True if pretrained or weights else None),
        ("weights", weights), ("model_args", parse_model_args(model_args) or None),
        ("trust_code", True if trust_code else None), ("data.name", data), ("data.root", data_dir),
        ("data.download", True if download else None), ("distill.teacher_checkpoint", teacher_checkpoint),
        ("distill.enabled", True if teacher_checkpoint else None), ("device", device),
    ) if value is not None}
    if recipe is None and not resume:
        raise SurgeryError("Missing RECIPE: a recipe file or a bundled name such as digits-demo.")
    if recipe is None and (overrides or values):
        raise SurgeryError("--resume without RECIPE continues with the saved recipe, unchanged; drop the "
                           "other options, or give the RECIPE and options the run was started with.")
    resolved = training.load_recipe(recipe, overrides, values) if recipe is not None else None
    try:
        show = console.err.is_terminal and not os.environ.get("PYTEST_CURRENT_TEST")
        result = training.run_training(resolved, out, resume=resume, force=force, log=_log, progress=_EpochBar() if show else None)
    except KeyboardInterrupt:
        console.abort("Interrupted before training started, or a second time: stopped without saving "
                      "(last.pt, if there is one, holds the last saved state).", code=130)
    if result.main and as_json:
        console.print_json(result.summary)
    elif result.main:
        console.print(_summary_table(result.summary))
    if result.stopped:
        sys.exit(130)
