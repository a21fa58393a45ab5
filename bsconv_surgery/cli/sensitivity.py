"""``bsconv-surgery sensitivity``: what converting each site alone costs (fidelity) and saves."""

from __future__ import annotations

import math

import click
from rich import box
from rich.table import Table

from ..io.plots import check_plot_path
from ..options import SurgeryOptions
from ..registry import VARIANTS
from ..sensitivity import Sensitivity, measure_sensitivity, write_sensitivity_plot
from .console import console
from .format import percent, short, source_lines
from .options import (TEXT, allow_growth_option, build_source, checkpoint_option, input_size_option, json_option,
                      model_argument, num_classes_option, path, pretrained_option, site_filter_options, source_json,
                      weights_option)


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def sensitivity_table(result: Sensitivity) -> Table:
    """One row per site, sorted by loss per MAC saved (sites that save no MACs last)."""
    measured = result.calib is not None
    labelled = any(r.fidelity and "top1_accuracy_converted" in r.fidelity for r in result.rows)
    title = (f"{result.model}: each site converted alone (BSConv-{result.variant.upper()}, --init svd), "
             + (f"on {result.calib}" if measured else "no calibration data: ranked by filter energy lost"))
    kinds = {row.kind for row in result.rows}
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("site", no_wrap=True)
    if len(kinds) > 1:
        table.add_column("kind", no_wrap=True)
    for col in ("MACs -", "params -", "kept", "loss", "/MMAC"):
        table.add_column(col, justify="right", no_wrap=True)
    if measured:
        table.add_column("agree", justify="right", no_wrap=True)
    if labelled:
        table.add_column("acc", justify="right", no_wrap=True)
    for row in result.rows:
        per = row.loss_per_mac
        cells = [row.name, *([row.kind.split("->")[0]] if len(kinds) > 1 else []), short(row.macs_saved),
                 short(row.params_saved), "n/a" if row.energy_kept is None else f"{100 * row.energy_kept:.0f}%",
                 _fmt(row.loss), "saves none" if per is not None and math.isinf(per) else _fmt(per)]
        if measured:
            cells.append(percent(row.fidelity.get("top1_agreement")) if row.fidelity else "same")
        if labelled:
            cells.append(percent(row.fidelity.get("top1_accuracy_converted")) if row.fidelity else "same")
        table.add_row(*cells)
    return table


def render_sensitivity(result: Sensitivity, out) -> None:
    out.print(sensitivity_table(result))
    kinds = sorted({row.kind for row in result.rows})
    out.print(f"Sites: {', '.join(kinds) or 'none'}. MACs - / params -: saved by the site alone (fvcore, batch 1, "
              f"input {'x'.join(map(str, result.input_size))}; original {short(result.macs_before)} MACs, "
              f"{short(result.params_before)} params); kept: filter energy --init svd keeps; loss: {result.loss}; "
              "/MMAC: loss per million MACs saved (the sort order); agree: top-1 agreement with the original.",
              highlight=False)
    if result.calib is None:
        out.print("No calibration data, so nothing was measured: the sites are ranked by the filter energy --init svd "
                  "loses, a weaker guide than measured fidelity (--calib SET).", highlight=False)
    if result.baseline is not None:
        out.print(f"The original itself after recalibration on this data: loss {_fmt(result.baseline['relative_logit_error'])} "
                  "(part of every site's loss).", highlight=False)
    if result.skipped:
        out.print(f"{len(result.skipped)} site(s) skipped (see --json).", highlight=False)
    out.print(f"{len(result.rows)} sites in {result.seconds.get('total', 0):.1f}s.", highlight=False)


@click.command(short_help="Per-site fidelity loss and savings of converting each site alone")
@model_argument
@checkpoint_option
@pretrained_option
@weights_option
@click.option("--calib", type=TEXT, default=None, metavar="SET",
              help="Measure on digits, random, imagefolder:PATH or images:PATH (without it: filter energy only).")
@click.option("--calib-batches", type=click.IntRange(min=1), default=4, show_default=True,
              help="Calibration batches (16 images each).")
@click.option("--variant", type=click.Choice(sorted(VARIANTS)), default="u", show_default=True,
              help="u: BSConv-U sites (standard convs, depthwise-separable pairs); s: BSConv-S sites.")
@site_filter_options
@click.option("--p", "p", type=TEXT, default="1/4", show_default=True, help="BSConv-S subspace ratio (variant s).")
@allow_growth_option
@click.option("--recalibrate-bn", is_flag=True,
              help="Re-estimate BatchNorm statistics on the calibration data for every single-site model before "
              "measuring it.")
@num_classes_option
@input_size_option
@click.option("--plot", type=path(dir_okay=False), default=None, metavar="FILE.png",
              help="Also draw MACs saved against loss, one point per site (needs the 'plot' extra: matplotlib).")
@click.option("--force", is_flag=True, help="Replace an existing --plot file.")
@json_option
def sensitivity(model, checkpoint, pretrained, weights, calib, calib_batches, variant, kernel_sizes, include, exclude, p,
                allow_growth, recalibrate_bn, num_classes, input_size, plot, force, as_json):
    """Convert each candidate site of MODEL alone (--init svd) and measure, on the calibration data, the
    fidelity it costs (relative output error, top-1 agreement, accuracy on labelled sets) next to the
    MACs and params it saves and the filter energy it keeps. Sorted by loss per MAC saved: the sites
    at the top are the cheapest to convert. One process, no rebuild per site."""
    if plot:  # refuse before the work, write after it
        check_plot_path(plot, force)
    if recalibrate_bn and not calib:
        raise click.UsageError("--recalibrate-bn needs --calib SET.")
    options = SurgeryOptions.create(variant, kernel_sizes=kernel_sizes, include=include, exclude=exclude, p=p,
                                    allow_growth=allow_growth)
    spec, module, size, source = build_source(model, num_classes, checkpoint, input_size, pretrained, weights)
    result = measure_sensitivity(module, calib, variant=options, input_size=size,
                                 calib_batches=calib_batches if calib else None, recalibrate_bn=recalibrate_bn,
                                 family=spec.inputs, source=source)
    result.model = str(spec)
    if plot:
        write_sensitivity_plot(result, plot, force=force)
    if as_json:
        console.print_json(source_json(result.to_json(), checkpoint, source, plot))
        return
    for line in source_lines(source if source.trained else None):
        console.info(line)
    render_sensitivity(result, console.out)
    if plot:
        console.info(f"Wrote {plot}.")
