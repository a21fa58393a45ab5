"""``bsconv-surgery models``: list models and what the surgery would find in each."""

from __future__ import annotations

import click
from rich.table import Table

from ..core.errors import SurgeryError
from .console import console
from .format import name_column, number_columns
from .lazy import lazy_module
from .options import TEXT, json_option

survey = lazy_module("bsconv_surgery.tools.survey")

#: Matches surveyed when --limit is not given (each takes about a second).
SURVEY_LIMIT = 20


def _sites(entry: dict) -> str:
    sites = ", ".join(f"{kind.split('->')[0]} {n}" for kind, n in entry["sites"].items()) or "none"
    return sites + (f" (skip {entry['skipped']})" if entry["skipped"] else "")


@click.command()
@click.argument("pattern", type=TEXT, required=False, default="*")
@click.option("--limit", type=click.IntRange(min=0), default=None,
              help="At most this many matches (0: all). Default: the first 20 surveyed (each takes about a second), "
              "every name with --names-only.")
@click.option("--names-only", is_flag=True, help="Only list the matching names (fast).")
@json_option
def models(pattern, limit, names_only, as_json):
    """List models matching PATTERN (a glob; 'timm:', 'tv:' prefixes allowed) with, per variant,
    the sites the surgery would convert, counted by kind, without touching any weights."""
    specs = survey.match_models(pattern)
    if not specs:
        raise SurgeryError(f"No timm or torchvision model matches '{pattern}'.")
    if limit is None:
        limit = 0 if names_only else SURVEY_LIMIT
    shown = specs if limit == 0 else specs[:limit]
    if len(shown) < len(specs):
        what = "Listing" if names_only else "Surveying"
        console.info(f"{what} the first {len(shown)} of {len(specs)} matches; use --limit 0 for all.")
    if names_only:
        rows = [{"model": str(s)} for s in shown]
    else:
        rows = []
        for spec in shown:
            try:
                rows.append(survey.survey_model(spec))
            except SurgeryError as exc:
                rows.append({"model": str(spec), "error": str(exc)})
    if as_json:
        console.print_json({"pattern": pattern, "matches": len(specs), "models": rows})
        return
    table = Table(title=f"{len(specs)} model(s) match '{pattern}'")
    name_column(table, "model")
    if not names_only:
        number_columns(table, "params", "convs (std/pw/dw/grp/hidden)", justify="left")
        name_column(table, "variant u")
        name_column(table, "variant s")
    for r in rows:
        if names_only:
            table.add_row(r["model"])
        elif "error" in r:
            table.add_row(r["model"], "", "", r["error"], "")
        else:
            c = r["conv_census"]
            census = "/".join(str(c[k]) for k in ("standard", "pointwise", "depthwise", "grouped", "hidden"))
            table.add_row(r["model"], f"{r['params'] / 1e6:.2f}M", census, _sites(r["u"]), _sites(r["s"]))
    console.print(table)
