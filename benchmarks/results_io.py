"""Writing a benchmark's results: ``NAME.json`` (the measurements) next to ``NAME.md`` (rendered
from them), so a table can be re-rendered later without measuring again (``--from-json``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(out: Path, data: Dict[str, Any], render: Callable[[Dict[str, Any]], str]) -> None:
    """Write ``data`` to ``out`` with suffix ``.json`` and ``render(data)`` to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    out.write_text(render(data))
    print(f"wrote {out}", file=sys.stderr)


def rerender(out: Path, from_json: Path, render: Callable[[Dict[str, Any]], str]) -> None:
    """Render ``out`` again from a saved ``.json``."""
    out.write_text(render(json.loads(from_json.read_text())))


def ms(value: float) -> str:
    """Milliseconds with three significant figures up to 10 ms, one decimal above."""
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def load_averages(data: Dict[str, Any]) -> tuple:
    """The 1/5/15-minute load averages at the start and end of a run, as printed in the tables."""
    return tuple(", ".join(f"{v:.2f}" for v in data[key]) for key in ("load_average_start", "load_average_end"))


def add_output_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out`` (default ``results/NAME.md``) and ``--from-json`` (re-render without measuring)."""
    parser.add_argument("--out", type=Path, default=RESULTS / f"{name}.md")
    parser.add_argument("--from-json", type=Path, default=None, help=f"re-render a saved {name}.json")


def run_and_write(args: argparse.Namespace, run: Callable[[argparse.Namespace], Dict[str, Any]],
                  render: Callable[[Dict[str, Any]], str]) -> None:
    """Re-render ``args.out`` from ``--from-json``, or measure with ``run(args)`` and write both files."""
    if args.from_json:
        rerender(args.out, args.from_json, render)
    else:
        write_results(args.out, run(args), render)
