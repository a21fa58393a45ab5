"""``bsconv-surgery sensitivity``: what converting each site alone costs (fidelity) and saves."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import click
from rich import box
from rich.table import Table

from .console import console
from .format import name_column, number_columns, percent, short, source_lines
from .lazy import lazy_module
from .options import (TEXT, json_option, load_source, metric_option, model_argument, model_source_options,
                      options_from, path, source_json, surgery_options)

if TYPE_CHECKING:
    from ..recovery.sensitivity import Sensitivity

dataset = lazy_module("bsconv_surgery.data.dataset")
library = lazy_module("bsconv_surgery.recovery.sensitivity")
plots = lazy_module("bsconv_surgery.io.plots")
zoo = lazy_module("bsconv_surgery.models.zoo")


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
    name_column(table, "site")
    if len(kinds) > 1:
        name_column(table, "kind")
    number_columns(table, "MACs -", "params -", "kept", "loss", "/MMAC")
    if measured:
        number_columns(table, "agree")
    if labelled:
        number_columns(table, "acc")
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
        out.print(f"The original itself after recalibration on this data: loss {_fmt(result.baseline['loss'])} "
                  "(part of the loss of every site whose recalibration was kept).", highlight=False)
    across = [row.name for row in result.rows if row.nonlinear_between]
    if across:
        out.print(f"{len(across)} depthwise-separable reorder(s) cross a nonlinearity ({', '.join(across[:4])}"
                  f"{' ...' if len(across) > 4 else ''}): with trained weights such a site cannot keep the function"
                  + (", whatever energy the fit keeps (ranked with loss 1 without calibration data)."
                     if result.calib is None else "; its measured loss says what it costs."), highlight=False)
    if result.skipped:
        out.print(f"{len(result.skipped)} site(s) skipped (see --json).", highlight=False)
    out.print(f"{len(result.rows)} sites in {result.seconds.get('total', 0):.1f}s.", highlight=False)


@click.command()
@model_argument
@model_source_options
@click.option("--calib", type=TEXT, default=None, metavar="SET",
              help="Measure on digits, random, imagefolder:PATH or images:PATH (without it: filter energy only).")
@click.option("--calib-batches", type=click.IntRange(min=1), default=4, show_default=True,
              help="Calibration batches (16 images each).")
@surgery_options("variant", "kernel_sizes", "include", "exclude", "types", "p", "allow_growth", "allow_unmatched")
@click.option("--recalibrate-bn", is_flag=True,
              help="Also re-estimate BatchNorm statistics on the calibration data for every single-site model and "
              "measure it again; a site keeps the lower loss (as convert keeps a recalibration only if it helps).")
@metric_option
@click.option("--plot", type=path(dir_okay=False), default=None, metavar="FILE.png",
              help="Also draw MACs saved against loss, one point per site (needs the 'plot' extra: matplotlib).")
@click.option("--force", is_flag=True, help="Replace an existing --plot file.")
@json_option
def sensitivity(model, checkpoint, pretrained, weights, model_args, calib, calib_batches, recalibrate_bn, metric,
                num_classes, input_size, plot, force, as_json, **option_values):
    """Convert each candidate site of MODEL alone (--init svd) and measure, on the calibration data, the
    fidelity it costs (the loss: by default decision disagreement plus a divergence suited to the head,
    see --metric; top-1 agreement, accuracy on labelled sets) next to the MACs and params it saves and
    the filter energy it keeps. Sorted by loss per MAC saved: the sites at the top are the cheapest to
    convert. One process, no rebuild per site."""
    if plot:  # refuse before the work, write after it
        plots.check_plot_path(plot, force)
    if recalibrate_bn and not calib:
        raise click.UsageError("--recalibrate-bn needs --calib SET.")
    if metric and not calib:
        raise click.UsageError("--metric needs --calib SET: without calibration data nothing is measured.")
    options = options_from(**option_values)
    data = dataset.Dataset(calib, limit=calib_batches) if calib else None  # bad names fail before any work
    module, inputs = load_source(model, num_classes, checkpoint, input_size, pretrained, weights, model_args)
    source = zoo.model_source(module)
    result = library.measure_sensitivity(module, data, options=options, example_inputs=inputs,
                                         recalibrate_bn=recalibrate_bn, metric=metric)
    result.model = source.spec
    if plot:
        library.write_sensitivity_plot(result, plot, force=force)
    if as_json:
        console.print_json(source_json(result.to_json(), checkpoint, source, plot))
        return
    for line in source_lines(source if source.trained else None):
        console.info(line)
    render_sensitivity(result, console.out)
    if plot:
        console.info(f"Wrote {plot}.")
