"""``bsconv-surgery analyze``: how much of each filter one blueprint explains (paper 3.1, Fig. 3)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, List

import click
from rich import box
from rich.table import Table
from rich.text import Text

from .console import console
from .format import name_column, number_columns, source_lines
from .lazy import lazy_module
from .options import (checkpoint_option, json_option, model_args_option, model_argument, parse_model_args, num_classes_option, path, pretrained_option,
                      source_json, weights_option)

if TYPE_CHECKING:
    from ..tools.analyze import Analysis

library = lazy_module("bsconv_surgery.tools.analyze")
zoo = lazy_module("bsconv_surgery.models.zoo")


def terminal_bars(counts: List[int], width: int = 32) -> List[str]:
    """One line per bin: ``0.0-0.1 |#####      12``, bars scaled to the largest bin."""
    top = max(counts) or 1
    step = 1.0 / len(counts)
    lines = []
    for i, c in enumerate(counts):
        bar = "█" * math.ceil(width * c / top) if c else ""
        lines.append(f"  {i * step:.1f}-{(i + 1) * step:.1f} │{bar:<{width}} {c}")
    return lines


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _summary(analysis: Analysis) -> Table:
    table = Table(title=f"{analysis.model}: PC1 share of each filter's variance (per stage)", box=box.SIMPLE_HEAD)
    name_column(table, "stage")
    number_columns(table, "convs", "filters", "mean PC1", "median PC1", "--init svd keeps")
    rows = [s.to_json() for s in analysis.stages] + [dict(analysis.overall().to_json(), name="all")]
    for r in rows:
        table.add_row(r["name"], str(r["convs"]), f"{r['filters']:,}", _fmt(r["pc1_mean"]), _fmt(r["pc1_median"]),
                      "n/a" if r["svd_energy_kept"] is None else f"{100 * r['svd_energy_kept']:.1f}%")
    return table


def render_analysis(analysis: Analysis, out) -> None:
    """Per stage: a 10-bin histogram of the PC1 shares with its mean; then the summary table."""
    for stage in analysis.stages:
        info = stage.to_json()
        undefined = f", {info['undefined']} undefined" if info["undefined"] else ""
        out.print(Text.assemble((stage.name, "bold"), f": {info['convs']} convs, {info['filters']:,} filters{undefined}, "
                                f"mean PC1 share {_fmt(info['pc1_mean'])}"), highlight=False)
        counts = stage.histogram()
        for line in terminal_bars([a + b for a, b in zip(counts[::2], counts[1::2])]):
            out.print(Text(line), highlight=False)
    out.print(_summary(analysis))
    out.print("PC1 share: PCA over each filter's M slices of K x K (paper 3.1); 1.0 = every slice is a "
              "scaled copy of one blueprint. '--init svd keeps': share of the filters' energy their best "
              "rank-1 (BSConv-U) approximation keeps.", highlight=False)


@click.command()
@model_argument
@checkpoint_option
@pretrained_option
@weights_option
@model_args_option
@num_classes_option
@click.option("--plot", "plot", type=path(dir_okay=False), default=None, metavar="FILE.png",
              help="Also draw the per-stage histograms into this PNG (needs the 'plot' extra: matplotlib).")
@click.option("--force", is_flag=True, help="Replace an existing --plot file.")
@json_option
def analyze(model, checkpoint, pretrained, weights, model_args, num_classes, plot, force, as_json):
    """For every filter of every standard conv of MODEL, the share of the variance of its M slices
    (K x K each) explained by the first principal component, histogrammed per stage (timm feature
    stages, else top-level children)."""
    if plot:  # refuse before the work, write after it
        library.check_plot_path(plot, force)
    module = zoo.load_model(model, num_classes=num_classes, checkpoint=checkpoint, pretrained=pretrained,
                            weights=weights, model_args=parse_model_args(model_args) or None)
    source = zoo.model_source(module)
    result = library.analyze(module, label=source.spec)
    if plot:
        library.write_plot(result, plot, force=force)
    if as_json:
        console.print_json(source_json(result.to_json(), checkpoint, source, plot))
        return
    for line in source_lines(source if source.pretrained is not None else None):
        console.info(line)
    render_analysis(result, console.out)
    if plot:
        console.info(f"Wrote {plot}.")
