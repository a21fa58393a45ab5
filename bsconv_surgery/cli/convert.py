"""``bsconv-surgery convert``: convert one model, report the change, optionally save it."""

from __future__ import annotations

import shlex

import click

from ..core.options import Target
from .console import console
from .format import cannot_keep_line, render_conversion
from .lazy import lazy_module
from .options import (TEXT, json_option, load_source, memory_check_option, metric_option, model_argument,
                      model_source_options, options_from, path, surgery_options)

dataset = lazy_module("bsconv_surgery.data.dataset")
files = lazy_module("bsconv_surgery.io.files")
selection = lazy_module("bsconv_surgery.recovery.selection")
surgery = lazy_module("bsconv_surgery.surgery")


@click.command()
@model_argument
@surgery_options()
@click.option("--calib", type=TEXT, default=None, metavar="SET",
              help="Measure fidelity (converted vs original outputs) on digits, random, imagefolder:PATH or "
              "images:PATH (unlabelled, any nesting); with a target, rank sites by their measured loss.")
@click.option("--calib-batches", type=click.IntRange(min=1), default=4, show_default=True,
              help="Calibration batches (16 images each) for --calib.")
@click.option("--target-macs", type=TEXT, default=None, metavar="R",
              help="Convert the sites that reach this MAC budget with the least measured loss: a fraction of the "
              "original (0.5) or a count (300M).")
@click.option("--target-params", type=TEXT, default=None, metavar="R",
              help="The same for parameters: a fraction (0.5) or a count (2.5M).")
@click.option("--recalibrate-bn", is_flag=True,
              help="After surgery, re-estimate every BatchNorm's running statistics on the --calib data; kept only "
              "if that lowers the measured loss, else restored (the report says why).")
@metric_option
@model_source_options
@click.option("--out", type=path(file_okay=False), default=None, help="Write model.safetensors and surgery.json here.")
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
@memory_check_option
@json_option
def convert(model, calib, calib_batches, target_macs, target_params, recalibrate_bn, metric, num_classes, input_size,
            checkpoint, pretrained, weights, model_args, out, force, no_memory_check, as_json, **option_values):
    """Convert MODEL (timm:NAME, torchvision:NAME / tv:NAME, a bare NAME, or your own model:
    py:package.module:callable, file:path/net.py:callable with --model-arg) and report the change.

    With --target-macs / --target-params only the set of sites that reaches the budget with the least
    summed single-site loss is converted (measured on --calib, else ranked by filter energy kept), and
    the fidelity of the whole chosen set is measured afterwards."""
    if out:  # refuse before the work, write after it
        files.check_new_dir(out, force)
    options = options_from(**option_values)
    init = options.init
    target = selection.check_target(Target(macs=target_macs, params=target_params)) if target_macs or target_params \
        else None
    if recalibrate_bn and not calib:
        raise click.UsageError("--recalibrate-bn needs --calib SET.")
    if metric and not calib:
        raise click.UsageError("--metric needs --calib SET: without calibration data nothing is measured.")
    calibration = dataset.Dataset(calib, limit=calib_batches) if calib else None  # bad names fail before any work
    module, inputs = load_source(model, num_classes, checkpoint, input_size, pretrained, weights, model_args)
    result = surgery.convert(module, options, example_inputs=inputs, calibration=calibration, target=target,
                             recalibrate_bn=recalibrate_bn, metric=metric, memory_check=not no_memory_check)
    trained = result.source is not None and result.source.trained
    if trained and init == "default" and result.report.replaced:
        what = "checkpoint's" if checkpoint else "pretrained weights'"
        console.info(f"Note: the converted sites start fresh (--init default); --init svd starts them from the "
                     f"{what} own filters (best rank-1 / truncated-SVD fit).")
    if (target_macs or target_params) and not calib:
        console.info("Note: without --calib nothing was measured: the sites were ranked by the filter energy "
                     "--init svd keeps, a weaker guide than measured fidelity (--calib SET).")
    note = cannot_keep_line(result.report)
    if note:
        console.info(note)
    if out:
        result.save(out, force=force)
    if as_json:
        console.print_json(result.report.to_json())
    else:
        render_conversion(result.report, console.out)
    if out:
        if not as_json:
            console.info(f"Saved to {out}/ (model.safetensors, surgery.json).")
        console.info(_next_step(out, result.source))  # unwrapped


def _next_step(out, source) -> str:
    """The handoff: the command that fine-tunes the converted model (stderr, so --json stays clean);
    it distils from the source model when the conversion started from trained weights."""
    command = (f"bsconv-surgery train finetune-short --model {shlex.quote(str(out))} "
               "--data imagefolder:PATH --out runs/NAME")
    data = "--data also takes digits, or cifar10/cifar100 with --data-dir DIR."
    label_free = (f"Without labels, distil from the source model alone:\n  bsconv-surgery train distill-label-free "
                  f"--model {shlex.quote(str(out))} --data images:PATH --out runs/NAME")
    if source is not None and source.pretrained is not None and source.head_replaced is None:
        hint = (f"{data} distill.enabled=true distils from the source model with its pretrained weights "
                f"({source.pretrained.name}, read from the cache again); its {source.pretrained.num_classes} classes "
                f"must be the data's.\n{label_free}")
    elif source is not None and source.checkpoint is not None:
        hint = f"{data} distill.enabled=true distils from the source model with its weights from --checkpoint.\n{label_free}"
    else:
        return (f"Next, fine-tune it:\n  {command}\n{data} --teacher-checkpoint FILE distils from the source model "
                "with trained weights.")
    return f"Next, fine-tune it:\n  {command} --set distill.enabled=true\n{hint}"
