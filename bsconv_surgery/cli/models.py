"""``bsconv-surgery models``: list models and what the surgery would find in each."""

from __future__ import annotations

import click
from rich.table import Table

from ..errors import SurgeryError
from ..survey import match_models, survey_model
from .console import console
from .options import TEXT, json_option


def _sites(entry: dict) -> str:
    sites = ", ".join(f"{kind.split('->')[0]} {n}" for kind, n in entry["sites"].items()) or "none"
    return sites + (f" (skip {entry['skipped']})" if entry["skipped"] else "")


@click.command(short_help="List models and the sites the surgery would find")
@click.argument("pattern", type=TEXT, required=False, default="*")
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True,
              help="Survey at most this many matches (0: all; each takes about a second).")
@click.option("--names-only", is_flag=True, help="Only list the matching names (fast).")
@json_option
def models(pattern, limit, names_only, as_json):
    """List models matching PATTERN (a glob; 'timm:', 'tv:' prefixes allowed) with, per variant,
    the sites the surgery would convert, counted by kind, without touching any weights."""
    specs = match_models(pattern)
    if not specs:
        raise SurgeryError(f"No timm or torchvision model matches '{pattern}'.")
    shown = specs if limit == 0 else specs[:limit]
    if len(shown) < len(specs):
        console.info(f"Surveying the first {len(shown)} of {len(specs)} matches; use --limit 0 for all.")
    if names_only:
        rows = [{"model": str(s)} for s in shown]
    else:
        rows = []
        for spec in shown:
            try:
                rows.append(survey_model(spec))
            except SurgeryError as exc:
                rows.append({"model": str(spec), "error": str(exc)})
    if as_json:
        console.print_json({"pattern": pattern, "matches": len(specs), "models": rows})
        return
    table = Table(title=f"{len(specs)} model(s) match '{pattern}'")
    table.add_column("model", no_wrap=True)
    if not names_only:
        for col in ("params", "convs (std/pw/dw/grp/hidden)", "variant u", "variant s"):
            table.add_column(col)
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
