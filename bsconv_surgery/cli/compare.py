"""``bsconv-surgery compare``: params and MACs of several variants of one model, side by side."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .console import console, labelled
from .format import human, name_column, number_columns
from .lazy import lazy_module
from .options import (TEXT, input_size_option, json_option, memory_check_option, model_args_option, model_argument,
                      parse_model_args, num_classes_option,
                      path, pretrained_option, weights_option)

if TYPE_CHECKING:
    from ..tools.compare import Comparison

library = lazy_module("bsconv_surgery.tools.compare")
counting = lazy_module("bsconv_surgery.analysis.counting")
zoo = lazy_module("bsconv_surgery.models.zoo")


def _times(value: Optional[int], base: Optional[int]) -> str:
    return "n/a" if value is None or not base else f"{value / base:.3f}x"


def _sites(sites: dict) -> str:
    parts = [f"{n} {kind}" for kind, n in sites.items() if kind != "skipped"] or ["none"]
    if sites.get("skipped"):
        parts.append(f"{sites['skipped']} skipped")
    return ", ".join(parts)


def _summary_table(c: Comparison) -> Table:
    size = "x".join(map(str, c.input_size))
    classes = f"  {c.num_classes} classes" if c.num_classes else ""
    table = Table(title=f"{c.model}  input {size}  batch 1{classes}")
    name_column(table, "variant")
    number_columns(table, "params", "x orig", "MACs", "x orig", "conv+linear MACs")
    for v in c.variants:
        table.add_row(
            v.spec.label, f"{v.params:,}", _times(v.params, c.original.params), human(v.macs),
            _times(v.macs, c.original.macs), human(v.budget.conv_linear_macs),
        )
    return table


def _stage_table(c: Comparison) -> Table:
    table = Table(title="Per stage: params / MACs")
    name_column(table, "stage")
    for v in c.variants:  # "params / MACs": wraps at the spaces when narrow
        name_column(table, v.spec.label, justify="right")
    for st in c.rows():
        table.add_row(st.label, *[f"{v.stages[st.name][0]:,} / {human(v.stages[st.name][1])}" for v in c.variants])
    return table


def render_comparison(c: Comparison, out: Console) -> None:
    """The side-by-side table, the per-stage table, what was counted and any warnings."""
    out.print(_summary_table(c))
    out.print(_stage_table(c))
    for v in c.variants:
        if v.report is not None:
            out.print(Text(f"{v.spec.label}: {_sites(v.sites())}."), highlight=False)
    info = counting.counter_info()
    out.print(Text(f"MACs by {info['name']} {info['version']}: {info['counts']}; one multiply-add = 1."), highlight=False)
    checked = [v for v in c.variants if v.budget.conv_check is not None]
    if checked:
        bad = [v.spec.label for v in checked if not v.budget.conv_check.agree]
        verdict = Text("agree for every variant") if not bad else Text.assemble(("DISAGREE", "red"), f" for {', '.join(bad)}")
        out.print(Text.assemble(f"Conv MACs cross-checked against {info['cross_check']}: ", verdict, "."), highlight=False)
    for v in c.variants:
        for warning in v.budget.warnings():
            out.print(labelled("Warning", "yellow", f"({v.spec.label}): {warning}"), highlight=False)


@click.command()
@model_argument
@click.option(
    "--variant", "variants", type=TEXT, multiple=True, metavar="SPEC",
    help="orig, u, s, or a variant with options: s:p=1/6, s:p=auto, u:kernel-sizes=3,5, s:p=1/4,with-bn, "
    "s:p=1/6,exclude=GLOB (repeatable, or comma-separated; default orig,u,s).",
)
@input_size_option
@num_classes_option
@pretrained_option
@weights_option
@model_args_option
@click.option("--csv", "csv_path", type=path(dir_okay=False), default=None,
              help="Also write one row per variant and stage to this CSV file.")
@click.option("--force", is_flag=True, help="Replace an existing --csv file.")
@click.option("--no-cross-check", is_flag=True, help="Skip recounting conv MACs with torch's FlopCounterMode.")
@memory_check_option
@json_option
def compare(model, variants, input_size, num_classes, pretrained, weights, model_args, csv_path, force, no_cross_check,
            no_memory_check, as_json):
    """Count MODEL as the original and as each BSConv variant (a fresh model each, converted by the
    surgery), in total and per stage (timm feature stages, else top-level children)."""
    specs = library.parse_variants(variants or library.DEFAULT_VARIANTS)
    size = zoo.parse_input_size(input_size) if input_size else None
    if csv_path:  # refuse before the work, write after it
        library.check_csv_path(csv_path, force)
    result = library.compare(model, specs, input_size=size, num_classes=num_classes, cross_check=not no_cross_check,
                             memory_check=not no_memory_check, pretrained=pretrained, weights=weights,
                             model_args=parse_model_args(model_args) or None)
    if csv_path:
        library.write_csv(result, csv_path, force=force)
    if as_json:
        console.print_json(result.to_json())
        return
    render_comparison(result, console.out)
    if csv_path:
        console.info(f"Wrote {csv_path}.")

