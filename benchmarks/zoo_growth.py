"""What the growth guard changes in the zoo sweep, without re-running it: for every run of
``benchmarks/results/zoo.json`` that converted at least one site, convert the model again the way
the ``models`` command does (a meta-device copy, ``count=False``, the sweep's input size) and count
the sites converted now and those skipped because their replacement would grow the parameters or
the MACs (``--allow-growth`` converts them).

    python benchmarks/zoo_growth.py          # resumes: rows already in the output are kept

Writes ``benchmarks/results/zoo_growth.jsonl`` (one row per run) and prints a summary. Never part of
the tests.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

import bsconv_surgery as bs
from bsconv_surgery.models.zoo import create_model, parse_model_spec

RESULTS = Path(__file__).resolve().parent / "results"


def _build(spec):
    try:
        with torch.device("meta"):
            return create_model(spec)
    except Exception:  # some constructors compute real values
        return create_model(spec)


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = json.loads((RESULTS / "zoo.json").read_text())["rows"]
    path = RESULTS / "zoo_growth.jsonl"
    done = {(r["model"], r["variant"]) for r in map(json.loads, path.read_text().splitlines())} if path.exists() else set()
    with path.open("a") as out:
        for row in rows:
            if (row["model"], row["variant"]) in done or not row.get("replaced"):
                continue
            started = time.time()
            spec = parse_model_spec(row["model"])
            try:
                report = bs.convert(_build(spec), row["variant"], count=False,
                                    example_inputs=row["input_size"]).report
                grown = [s.name for s in report.skipped if "--allow-growth" in s.reason]
                result = {"model": row["model"], "variant": row["variant"], "before": row["replaced"],
                          "now": len(report.replaced), "growth_skips": len(grown), "examples": grown[:3],
                          "s": round(time.time() - started, 1)}
            except Exception as exc:
                result = {"model": row["model"], "variant": row["variant"], "error": repr(exc)[:200]}
            out.write(json.dumps(result) + "\n")
            out.flush()
    results = [json.loads(line) for line in path.read_text().splitlines()]
    ok = [r for r in results if "error" not in r]
    print(f"{len(results)} runs that converted a site; errors: {len(results) - len(ok)}")
    print(f"converting at least one site now: {sum(1 for r in ok if r['now'])}; nothing left but growth: "
          f"{sum(1 for r in ok if not r['now'])}; fewer sites: {sum(1 for r in ok if 0 < r['now'] < r['before'])}; "
          f"growth skips: {sum(r['growth_skips'] for r in ok)} in {sum(1 for r in ok if r['growth_skips'])} runs")


if __name__ == "__main__":
    main()
