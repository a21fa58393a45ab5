"""``bsconv-surgery compress``: a trained model under a budget and back to its original's answers, in one command."""

from __future__ import annotations

from typing import Any, Dict, Optional

import click
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..core.bounds import bounded_number
from ..core.options import Target
from .console import console
from .format import human, name_column, number_columns, percent, ratio
from .lazy import lazy_module
from .options import (TEXT, json_option, load_source, model_argument, model_source_options, options_from, path,
                      surgery_options)

dataset = lazy_module("bsconv_surgery.data.dataset")
pipeline = lazy_module("bsconv_surgery.compression.pipeline")
selection = lazy_module("bsconv_surgery.recovery.selection")
state = lazy_module("bsconv_surgery.compression.state")

#: What each stage is called on the progress line.
STAGES = {"split": "Splitting the data", "sensitivity": "Measuring each site's sensitivity",
          "conversion": "Converting the chosen sites", "recalibration": "Recalibrating BatchNorm statistics",
          "distillation": "Distilling from the original", "evaluation": "Evaluating on the held-out split",
          "save": "Saving", "export": "Exporting", "speed": "Timing both models"}
POINT_NAMES = {"zero_shot": "zero-shot", "recalibrated": "after recalibration", "distilled": "after distillation"}


class StageProgress:
    """One progress display across the stages (stderr): a line per finished stage, a bar for the
    distillation steps."""

    def __init__(self) -> None:
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20),
                            MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[stats]}"),
                            console=console.err, transient=True)
        self.task = None

    def __enter__(self) -> "StageProgress":
        self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

    def __call__(self, event: Dict[str, Any]) -> None:
        stage, what = event["stage"], event["event"]
        label = STAGES.get(stage, stage)
        if "parts" in event and event["parts"] > 1:
            label += f" (stage {event['part']} of {event['parts']})"
        if what == "start":
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(label, total=event.get("steps"), stats="")
        elif what == "step" and self.task is not None:
            loss = event.get("loss")
            self.bar.update(self.task, completed=event["step"], total=event["total"],
                            stats="" if loss is None else f"loss {loss:.4g}")
        elif what == "done":
            self.bar.console.print(Text.assemble(("✓ ", "green"), f"{label}: {event.get('seconds', 0):.1f}s"),
                                   highlight=False)
        elif what == "warning":
            console.warn(event["message"])


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def summary_table(data: Dict[str, Any]) -> Table:
    table = Table(title=f"{data['model']}: compressed", box=box.SIMPLE_HEAD, pad_edge=False)
    name_column(table)
    number_columns(table, "before", "after", "after / before")
    params, macs = data["params"], data["macs"]
    table.add_row("params", f"{params['before']:,}", f"{params['after']:,}", ratio(params["after"], params["before"]))
    table.add_row("MACs", human(macs["before"]), human(macs["after"]), ratio(macs["after"], macs["before"]))
    speed = data.get("speed")
    if speed:
        table.add_row("ms per image (batch 1, 1 thread)", f"{speed['original_ms']:.3f}", f"{speed['converted_ms']:.3f}",
                      ratio(speed["converted_ms"], speed["original_ms"]))
    table.add_row("sites converted", "", str(len(data["sites"])), "")
    return table


def fidelity_table(data: Dict[str, Any]) -> Table:
    split = data["split"]
    table = Table(title=f"Fidelity to the original on the held-out split ({split['holdout']} {split['unit']}, never "
                        "trained on)", box=box.SIMPLE_HEAD, pad_edge=False)
    name_column(table, "weights")
    number_columns(table, "agreement", "KL", "rel. error")
    labelled = any(f and "top1_accuracy_converted" in f for f in data["fidelity"].values())
    if labelled:
        number_columns(table, "accuracy")
    for point, fid in data["fidelity"].items():
        if fid is None:
            continue
        name = POINT_NAMES[point] + (" (kept)" if point == data["kept"] else "")
        cells = [name, percent(fid.get("top1_agreement")), _fmt(fid.get("kl_divergence")),
                 _fmt(fid.get("relative_logit_error"))]
        if labelled:
            cells.append(percent(fid.get("top1_accuracy_converted")))
        table.add_row(*cells)
    if labelled:
        original = next(f for f in data["fidelity"].values() if f)
        table.add_row("the original", "", "", "", percent(original.get("top1_accuracy_original")))
    return table


def render(data: Dict[str, Any]) -> None:
    out = console.out
    out.print(summary_table(data))
    out.print(fidelity_table(data))
    stages = data["stages"]
    if data["progressive"] > 1 and stages:
        out.print(f"Progressive: {len(stages)} stages of " + ", ".join(f"{len(s['sites'])} site(s) / {s['steps']} steps"
                                                                    for s in stages) + ".", highlight=False)
    for note in data["notes"]:
        out.print(Text(note), highlight=False)
    if data.get("export"):
        out.print(f"Exported {data['export']['file']} (largest relative error "
                  f"{_fmt(data['export']['parity']['max_relative_error'])}).", highlight=False)


def _holdout(text: str):
    """``0.2`` -> a fraction; ``300`` -> a count of samples."""
    if any(c in text for c in ".eE"):
        return float(bounded_number(text, "holdout", low=0, high=1, low_open=True, high_open=True))
    return int(bounded_number(text, "holdout", integer=True, low=1))


@click.command()
@model_argument
@click.option("--target-macs", type=TEXT, default=None, metavar="R",
              help="The MAC budget: a fraction of the original (0.75) or a count (300M).")
@click.option("--target-params", type=TEXT, default=None, metavar="R",
              help="The parameter budget: a fraction (0.5) or a count (2.5M).")
@click.option("--data", type=TEXT, required=True, metavar="SET",
              help="Unlabelled (or labelled) data: digits, random, imagefolder:PATH or images:PATH.")
@click.option("--data-batches", type=click.IntRange(min=1, max=10_000), default=64, show_default=True,
              help="Batches of 16 read from --data, for both splits.")
@click.option("--holdout", type=TEXT, default="0.2", show_default=True, metavar="F|N",
              help="Set aside this share (0.2) or count (300) of the samples, with --seed: evaluated on, never trained on.")
@click.option("--steps", type=click.IntRange(min=0), default=600, show_default=True,
              help="Label-free distillation steps in all (0: none).")
@click.option("--stages", "progressive", type=click.IntRange(min=1, max=16), default=1, show_default=True,
              help="Convert the sites in K stages, cheapest first, distilling between them (1: one-shot).")
@click.option("--batch-size", type=click.IntRange(min=1, max=65536), default=64, show_default=True,
              help="Samples per distillation step.")
@click.option("--method", type=click.Choice(["plain", "function_matching"]), default="plain", show_default=True,
              help="Distillation: plain (the measured default) or function_matching (shared augmented views, "
              "mixup, a moving average of the weights).")
@click.option("--seed", type=click.IntRange(min=0, max=2**31 - 1), default=0, show_default=True,
              help="Seed of the held-out split and the distillation's order.")
@surgery_options()
@model_source_options
@click.option("--out", type=path(file_okay=False), required=True,
              help="The run folder: the compressed model (as convert --out writes it), compress.json, checkpoints.")
@click.option("--export", type=click.Choice(["onnx", "pt2"]), default=None, help="Also write model.onnx (or .pt2) there.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out.")
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
@click.option("--no-speed", "no_speed", is_flag=True, help="Skip the short timing of both models.")
@json_option
def compress(model, target_macs, target_params, data, data_batches, holdout, steps, progressive, batch_size, method,
             seed, num_classes, input_size, checkpoint, pretrained, weights, model_args, out, export, resume, force, no_speed,
             as_json, **option_values):
    """Compress MODEL (a spec as convert takes it, or your own model) to a budget and back to its own
    answers without labels: sensitivity -> budgeted conversion -> BatchNorm recalibration -> label-free
    distillation from the original -> evaluation on a held-out split of --data -> save (and export).

    The held-out split is set aside with --seed and never trained on; the final table shows params,
    MACs, speed and the fidelity zero-shot, after recalibration and after distillation. Ctrl-C, then
    the same command with --resume, continues where it stopped."""
    if not (target_macs or target_params):
        raise click.UsageError("Give a budget: --target-macs R or --target-params R.")
    if resume and force:
        raise click.UsageError("Give --resume or --force, not both.")
    target = selection.check_target(Target(macs=target_macs, params=target_params))  # before any work
    state.check_run_folder(out, force, resume)
    options = options_from(**option_values)
    data_set = dataset.Dataset(data, limit=data_batches)
    module, inputs = load_source(model, num_classes, checkpoint, input_size, pretrained, weights, model_args)
    with StageProgress() as progress:
        result = pipeline.compress(module, data_set, target=target, steps=steps, progressive=progressive, out=out,
                                   export=export, resume=resume, force=force, options=options, example_inputs=inputs,
                                   holdout=_holdout(holdout), seed=seed, batch_size=batch_size,
                                   distill_options={"method": method}, speed_check=not no_speed, log=progress)
    data_json = result.to_json()
    if as_json:
        console.print_json(data_json)
        return
    render(data_json)
    console.info(f"Saved to {out}/ (model.safetensors, surgery.json, compress.json): load_converted, benchmark and "
                 "export read it.")
