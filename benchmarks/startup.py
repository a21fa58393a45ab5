"""Start-up: how long ``bsconv-surgery --help`` (and ``--version``, ``convert --help``) take next to
``python -c "import torch, timm"``, the imports a command's own work needs, measured side by side.

Each round runs every command once in a fresh interpreter, in turn (so load on a shared machine
hits all of them alike); the medians over ``--rounds`` rounds and their ratio to the torch + timm
import are printed and written. Target: ``--help`` <= 10% of the import.

    python benchmarks/startup.py                 # 7 rounds
    python benchmarks/startup.py --rounds 15

Writes ``benchmarks/results/startup.json`` and ``startup.md``. Never part of the tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List

from results_io import add_output_arguments, load_averages, ms, run_and_write

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "import torch, timm"
COMMANDS = {
    "bsconv-surgery --help": ["-m", "bsconv_surgery", "--help"],
    "bsconv-surgery --version": ["-m", "bsconv_surgery", "--version"],
    "bsconv-surgery convert --help": ["-m", "bsconv_surgery", "convert", "--help"],
    f'python -c "{BASELINE}"': ["-c", BASELINE],
}


def wall_seconds(args: List[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's package
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL, env=env, cwd=ROOT)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> Dict[str, Any]:
    load_start = list(os.getloadavg())
    for command in COMMANDS.values():  # warm the file cache once, untimed
        wall_seconds(command)
    times: Dict[str, List[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, command in COMMANDS.items():
            times[name].append(wall_seconds(command))
    baseline = statistics.median(times[f'python -c "{BASELINE}"'])
    rows = [{"command": name, "median_ms": 1000 * statistics.median(t), "min_ms": 1000 * min(t),
             "ratio": statistics.median(t) / baseline} for name, t in times.items()]
    return {"rows": rows, "rounds": args.rounds, "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
            "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def render(data: Dict[str, Any]) -> str:
    start, end = load_averages(data)
    lines = [
        "# Start-up time",
        "",
        f"Wall time of each command in a fresh interpreter, median of {data['rounds']} interleaved rounds "
        f"(Python {data['python']}, {data['cpu_count']} CPUs, load average {start} at the start, {end} at the end; "
        f"{data['date']}). Ratio: to `{BASELINE}`, the imports a command's own work needs. Target for `--help`: <= 0.10.",
        "",
        "| command | median ms | min ms | ratio |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| `{r['command']}` | {ms(r['median_ms'])} | {ms(r['min_ms'])} | {r['ratio']:.3f} |" for r in data["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    add_output_arguments(parser, "startup")
    args = parser.parse_args()
    run_and_write(args, run, render)
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
