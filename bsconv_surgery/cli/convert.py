"""``bsconv-surgery convert``: convert one model, report the change, optionally save it."""

from __future__ import annotations

import shlex

import click

from ..io.files import check_new_dir
from ..models.zoo import parse_input_size
from ..options import SurgeryOptions
from ..registry import INITIALIZERS, VARIANTS
from ..surgery import convert as run_convert
from .console import console
from .format import render_conversion
from .options import (TEXT, allow_growth_option, checkpoint_option, input_size_option, json_option, memory_check_option,
                      model_argument, num_classes_option, path, pretrained_option, registry_value, site_filter_options,
                      weights_option)


@click.command(short_help="Convert a model's convolutions to BSConv")
@model_argument
@click.option("--variant", type=click.Choice(sorted(VARIANTS)), default="u", show_default=True,
              help="u: BSConv-U (standard convs, depthwise-separable pairs); s: BSConv-S (standard convs, linear bottlenecks).")
@site_filter_options
@click.option("--p", "p", type=TEXT, default="1/4", show_default=True, help="BSConv-S subspace ratio M'/M: a float, a fraction such as 1/6, or auto.")
@click.option("--with-bn", is_flag=True, help="BatchNorm inside BSConv (stabilises deep ResNets; not in the paper's derivation).")
@click.option("--min-mid-channels", type=click.IntRange(min=1), default=4, show_default=True, help="Lower bound on BSConv-S M'.")
@allow_growth_option
@click.option("--init", "init", type=TEXT, default="auto", show_default=True, metavar="|".join(INITIALIZERS.names()),
              callback=registry_value(INITIALIZERS, "--init"),
              help="svd: start from the source's own filters (best rank-1 / truncated-SVD fit); default: fresh "
              "weights (as the reference implementation); auto: svd with trained weights (--checkpoint, --pretrained, "
              "--weights), else default.")
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
              help="After surgery, re-estimate every BatchNorm's running statistics on the --calib data.")
@num_classes_option
@input_size_option
@checkpoint_option
@pretrained_option
@weights_option
@click.option("--out", type=path(file_okay=False), default=None, help="Write model.safetensors and surgery.json here.")
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
@memory_check_option
@json_option
def convert(model, variant, kernel_sizes, include, exclude, p, with_bn, min_mid_channels, allow_growth, init, calib,
            calib_batches, target_macs, target_params, recalibrate_bn, num_classes, input_size, checkpoint, pretrained,
            weights, out, force, no_memory_check, as_json):
    """Convert MODEL (timm:NAME, torchvision:NAME / tv:NAME, or a bare NAME) and report the change.

    With --target-macs / --target-params only the set of sites that reaches the budget with the least
    summed single-site loss is converted (measured on --calib, else ranked by filter energy kept), and
    the fidelity of the whole chosen set is measured afterwards."""
    if out:  # refuse before the work, write after it
        check_new_dir(out, force)
    options = SurgeryOptions.create(variant, kernel_sizes=kernel_sizes, include=include, exclude=exclude, p=p,
                                    with_bn=with_bn, min_mid_channels=min_mid_channels, init=init,
                                    allow_growth=allow_growth)
    result = run_convert(model, options, input_size=parse_input_size(input_size) if input_size else None,
                         num_classes=num_classes, checkpoint=checkpoint, calib=calib, calib_batches=calib_batches,
                         memory_check=not no_memory_check, pretrained=pretrained, weights=weights,
                         target_macs=target_macs, target_params=target_params, recalibrate_bn=recalibrate_bn)
    trained = result.source is not None and result.source.trained
    if trained and init == "default" and result.report.replaced:
        what = "checkpoint's" if checkpoint else "pretrained weights'"
        console.info(f"Note: the converted sites start fresh (--init default); --init svd starts them from the "
                     f"{what} own filters (best rank-1 / truncated-SVD fit).")
    if (target_macs or target_params) and not calib:
        console.info("Note: without --calib nothing was measured: the sites were ranked by the filter energy "
                     "--init svd keeps, a weaker guide than measured fidelity (--calib SET).")
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
