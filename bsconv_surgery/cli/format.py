"""Formatting for people: numbers (``human``, ``short``, ``ratio``, ``percent``), the fidelity
line and the conversion report's tables. Every command renders through here or its own module;
the library never formats for the terminal.

Tables never cut a name or a number, at any width (80 columns in a pipe or a CI log): a column of
names or text is added with ``name_column`` (folded onto more lines when the table is narrow), a
column of numbers with ``number_columns`` (never wrapped: the names give way)."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..core.records import ConversionReport, SiteRecord
from .console import labelled

__all__ = ["human", "short", "ratio", "percent", "fidelity_line", "render_conversion", "conversion_summary",
           "name_column", "number_columns"]


def name_column(table: Table, header: str = "", **kwargs: Any) -> None:
    """A column of names or text: wrapped at spaces, a long word (a qualified name, a path)
    folded onto the next lines; never cut."""
    table.add_column(header, overflow="fold", **kwargs)


def number_columns(table: Table, *headers: str, justify: str = "right") -> None:
    """Columns of numbers: never wrapped or cut (the name columns give way)."""
    for header in headers:
        table.add_column(header, justify=justify, no_wrap=True)


def human(n: Optional[float], fmt: str = ".2f") -> str:
    """``11689512`` -> ``11.69M``; ``None`` -> ``n/a``."""
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:{fmt}}{unit}"
    return str(int(n))


def short(n: Optional[float]) -> str:
    """Three significant digits: ``36864`` -> ``36.9K``."""
    return human(n, ".3g")


def ratio(after: Optional[float], before: Optional[float]) -> str:
    if after is None or not before:
        return "n/a"
    return f"{after / before:.3f}x"


def conversion_summary(report: ConversionReport) -> Table:
    table = Table(title=f"{report.model}  variant {report.variant}  input {'x'.join(map(str, report.input_size))}")
    name_column(table)
    number_columns(table, "before", "after", "after / before")
    table.add_row("params", f"{report.params_before:,}", f"{report.params_after:,}",
                  ratio(report.params_after, report.params_before))
    mb, ma = report.macs_before, report.macs_after
    table.add_row("MACs", human(mb), human(ma), ratio(ma, mb))
    table.add_row("sites converted", "", str(len(report.replaced)), "")
    table.add_row("sites skipped", "", str(len(report.skipped)), "")
    return table


def _sites_table(rows: List[SiteRecord]) -> Table:
    """One row per converted site. What the sites became (a variant's one target) is in the title,
    so a column of kinds shows only what each was, and none when all were the same: room for the
    qualified names at 80 columns."""
    kinds = sorted({r.kind for r in rows})
    targets = sorted({k.split("->")[-1] for k in kinds})
    what = kinds[0] if len(kinds) == 1 else f"to {', '.join(targets)}"
    table = Table(title=f"Converted sites ({what})", box=box.SIMPLE_HEAD, pad_edge=False)
    name_column(table, "name")
    kind = (lambda r: r.kind.split("->")[0]) if len(targets) == 1 else (lambda r: r.kind)  # noqa: E731
    if len(kinds) > 1:
        name_column(table, "from" if len(targets) == 1 else "kind")
    number_columns(table, "channels", "kernel", "params", "MACs")
    kept = any("energy_kept" in r.details for r in rows)  # --init svd: share of the filters' energy kept
    if kept:
        number_columns(table, "kept")
    for r in rows:
        mid = f"({r.details['mid_channels']})" if "mid_channels" in r.details else "->"
        kernel = "x".join(map(str, r.kernel or []))
        stride = r.stride or [1, 1]
        table.add_row(
            Text(r.name),
            *([kind(r)] if len(kinds) > 1 else []),
            f"{r.in_channels}{mid}{r.out_channels}",
            kernel + (f"/{stride[0]}" if max(stride) > 1 else ""),
            f"{short(r.params_before)}→{short(r.params_after)}",
            f"{short(r.macs_before)}→{short(r.macs_after)}",
            *([percent(r.details.get("energy_kept"))] if kept else []),
        )
    return table


def percent(share: Optional[float]) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"


def _g(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def fidelity_line(fid: Dict[str, Any], brief: bool = False) -> str:
    """``Fidelity on digits (64 samples): relative logit error 0.0123, top-1 agreement 98.4%``."""
    what = "logit" if "outputs" not in fid else f"output ({fid['outputs']} tensors)"
    line = "" if brief else f"Fidelity on {fid['calib']} ({fid['samples']} samples, eval mode): "
    line += (f"relative {what} error {_g(fid['relative_logit_error'])} (worst sample "
             f"{_g(fid['max_sample_relative_error'])}), top-1 agreement {percent(fid['top1_agreement'])}")
    if "detections_original" in fid:
        line += (f"; detections {fid['detections_original']} original, {fid['detections_converted']} converted "
                 f"({fid['images_compared']} image(s) where both detect something)")
    if "top1_accuracy_converted" in fid:
        line += (f"; top-1 accuracy {percent(fid['top1_accuracy_original'])} original, "
                 f"{percent(fid['top1_accuracy_converted'])} converted")
    if fid.get("loss") is not None and not brief:
        line += f"; loss {_g(fid['loss'])} ({fid.get('loss_name')})"
    return line


def _first_sentence(text: Optional[str], limit: int = 90) -> str:
    """The first sentence of an error message, at most ``limit`` characters (JSON keeps it all)."""
    first = (text or "").split(". ")[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _reason_table(title: str, rows: Iterable[Tuple[str, str]]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD)
    name_column(table, "name")
    name_column(table, "reason")
    for name, reason in rows:
        table.add_row(Text(name or "(model)"), Text(str(reason)))
    return table


def source_lines(source) -> List[str]:
    """Where the source model's weights came from, for people (``[]`` for random init)."""
    if source is None:
        return []
    lines = []
    if source.pretrained is not None:
        w = source.pretrained
        lines.append(f"Pretrained weights: {w.name} ({w.hub_id or w.url}), {w.file}"
                     + (f" at revision {w.revision}" if w.revision else "") + (f", from {w.path}" if w.path else "") + ".")
    elif source.checkpoint is not None:
        lines.append(f"Weights: {source.checkpoint} (SHA-256 {source.checkpoint_sha256}).")
    if source.head_replaced is not None:
        old, new = source.head_replaced
        lines.append(f"Classifier replaced: {old} -> {new} classes; the new head starts random, the backbone keeps "
                     "the pretrained weights.")
    return lines


def render_conversion(report: ConversionReport, console: Console) -> None:
    """Print a conversion report for people."""
    for line in source_lines(report.source):
        console.print(Text(line), highlight=False)
    tracing = report.tracing
    if tracing.partial:
        console.print(labelled("Traced in parts:", "yellow", tracing.note or ""), highlight=False)
        console.print(_reason_table("Traced parts and fallbacks", [
            *((p, "traced (FX graph)") for p in tracing.parts),
            *((name, f"did not trace: {_first_sentence(why)}") for name, why in tracing.fallbacks.items()),
        ]))
    elif not tracing.traced:
        console.print(labelled("Tracing failed", "yellow", f"({tracing.error}). {tracing.note or ''}"))
    if report.replaced:
        console.print(_sites_table(report.replaced))
    if report.skipped:
        console.print(_reason_table("Skipped sites", [(s.name, s.reason) for s in report.skipped]))
    if report.hidden_convs:
        console.print(_reason_table("Convs hidden from the graph", [(h["name"], h["reason"]) for h in report.hidden_convs]))
    if report.other_convs:
        console.print(_reason_table("Other convolution modules", [(o["name"], o["reason"]) for o in report.other_convs]))
    console.print(Text("Convs found: ") + ", ".join(f"{k} {v}" for k, v in report.conv_census.items()))
    for when, numbers in (("before", report.before), ("after", report.after)):
        if numbers is None:
            continue
        if numbers.error:
            console.print(labelled(f"MACs {when}: not counted:", "yellow", str(numbers.error)))
        if numbers.uncounted_compute_ops:
            ops = ", ".join(f"{k} x{v}" for k, v in numbers.uncounted_compute_ops.items())
            console.print(labelled("Warning:", "yellow", f"fvcore counted these compute operators as zero ({when}): {ops}"))
    unsupported = report.after.unsupported_ops if report.after is not None else {}
    if unsupported:
        console.print(Text("fvcore skipped (counted as 0): ") + ", ".join(f"{k} x{v}" for k, v in sorted(unsupported.items())))
    counter = report.counter
    console.print(Text(f"MACs counted by {counter.get('name')} {counter.get('version')} at batch 1."))
    console.print(conversion_summary(report))
    if report.selection:
        render_selection(report.selection, console)
    if report.recalibration:
        console.print(Text(recalibration_line(report.recalibration)), highlight=False)
    if report.fidelity:
        console.print(Text(fidelity_line(report.fidelity)), highlight=False)


def recalibration_line(rec: Dict[str, Any]) -> str:
    """What BatchNorm recalibration did: kept (with the fidelity before it), or reverted and why."""
    line = f"BatchNorm recalibration: {rec['batchnorms']} BatchNorm(s) re-estimated on {rec['samples']} samples " \
           f"({rec['seconds']:.2f}s). "
    if rec.get("kept", True) is False:
        return line + f"Reverted: {rec['reverted']}."
    before = rec.get("fidelity_before")
    return line + ("Kept. Before it: " + fidelity_line(before, brief=True)
                   + (f", loss {_g(before['loss'])}" if before.get("loss") is not None else "") if before else "Kept.")


def cannot_keep_line(report: ConversionReport) -> Optional[str]:
    """One line on the depthwise-separable reorders across a nonlinearity of a model with trained
    weights (their records carry the note), or ``None``."""
    noted = [r.name for r in report.replaced if r.details.get("cannot_keep_function")]
    if not noted:
        return None
    names = ", ".join(noted[:4]) + (f" and {len(noted) - 4} more" if len(noted) > 4 else "")
    return (f"Note: {len(noted)} depthwise-separable reorder(s) cross a nonlinearity ({names}): with trained weights "
            "such a site cannot keep the function (the activation between the depthwise and the pointwise conv is "
            "dropped); measure with --calib and expect to retrain, or leave them with --type conv.")


def render_selection(sel: Dict[str, Any], console: Console) -> None:
    """The budget: what was asked and reached, the chosen sites and their measured single-site
    losses, predicted against measured loss of the whole set."""
    table = Table(title="Budget", box=box.SIMPLE_HEAD)
    name_column(table)
    number_columns(table, "original", "asked", "reached", "closest reachable")
    for t in sel["targets"]:
        asked = f"{t['fraction']:.3g}x" if "fraction" in t else short(t["count"])
        reached = "n/a" if t.get("reached") is None else f"{short(t['reached'])} ({t['reached_fraction']:.3f}x)"
        table.add_row(t["metric"], short(t["original"]), f"{asked} = {short(t['limit'])}", reached,
                      f"{t['best_reachable_fraction']:.3f}x")
    console.print(table)
    chosen = Table(title=f"Chosen sites: {len(sel['chosen'])} of {sel['candidates']}", box=box.SIMPLE_HEAD)
    name_column(chosen, "site")
    number_columns(chosen, "loss alone", "MACs saved", "params saved")
    for c in sel["chosen"]:
        chosen.add_row(Text(c["name"]), f"{c['loss']:.3g}", short(c["macs_saved"]), short(c["params_saved"]))
    console.print(chosen)
    console.print(Text(f"How: {sel['method']}."), highlight=False)
    line = f"Loss of the whole set: predicted {sel['predicted_loss']:.3g} (sum of the sites alone)"
    if "measured_loss" in sel:
        line += f", measured {sel['measured_loss']:.3g}"
        if "measured_loss_before_recalibration" in sel:
            line += f" ({sel['measured_loss_before_recalibration']:.3g} before BatchNorm recalibration)"
    console.print(Text(line + "."), highlight=False)
