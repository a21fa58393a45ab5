"""Training throughput: the overhead of ``train`` over a bare PyTorch loop, and converted vs original.

1. **Overhead**: ``run_training`` (what ``bsconv-surgery train`` runs) against a bare loop with the
   same model, data, batch, optimizer, loss and threads: ``DataLoader`` -> forward -> loss ->
   backward -> step -> scheduler step, nothing else. Samples/s of the training steps of each
   epoch after the first (``train`` reports them per epoch; evaluation and checkpoints are not in
   them), the two alternated ``--repeats`` times. Target: below 5%.
2. **Converted vs original** at a realistic size (224 px): training steps of the original and
   the converted model on random images, interleaved (SGD, cross-entropy, plus the orthonormal
   regulariser where the converted model has BSConv-S sites, as ``train`` adds it). On CUDA when
   there is one (``--amp``, channels_last), else CPU.

    python benchmarks/train_speed.py                       # both parts, CPU
    python benchmarks/train_speed.py --part overhead --repeats 5
    python benchmarks/train_speed.py --part models --batch-size 32 --steps 8

Writes ``benchmarks/results/train_speed.json`` and ``train_speed.md``. Never part of the tests.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from results_io import add_output_arguments, run_and_write

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package

MODELS = ["timm:resnet18:u:3", "timm:mobilenetv2_100:u", "timm:mobilenetv2_100:s"]


def overhead(args) -> dict:
    from torch.utils.data import DataLoader

    from bsconv_surgery.training.data import build_datasets
    from bsconv_surgery.training.recipe import recipe_from_dict
    from bsconv_surgery.training.run import make_optimizer, make_scheduler, run_training
    from bsconv_surgery.training.student import build_model

    recipe = recipe_from_dict({
        "model": args.overhead_model, "epochs": args.epochs, "seed": 0, "label_smoothing": 0.1, "ortho_alpha": 0.0,
        "data": {"name": "digits", "image_size": 16, "batch_size": 64, "augment": {"crop_padding": 2}},
        "optimizer": {"name": "sgd", "lr": 0.05}, "device": "cpu",
    })
    data = build_datasets(recipe.data)

    def bare() -> list:
        torch.manual_seed(0)
        model = build_model(recipe, data.num_classes).model
        loader = DataLoader(data.train, batch_size=recipe.data.batch_size, shuffle=True, drop_last=True)
        optimizer = make_optimizer(recipe.optimizer, model.parameters())
        scheduler = make_scheduler(recipe, optimizer, len(loader))
        rates = []
        for _ in range(recipe.epochs):
            model.train()
            t0, n = time.perf_counter(), 0
            for images, targets in loader:
                loss = F.cross_entropy(model(images), targets, label_smoothing=recipe.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                n += len(images)
            rates.append(n / (time.perf_counter() - t0))
        return rates

    def train() -> list:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_training(recipe, Path(tmp) / "run", log=lambda m: None)
        return [e["samples_per_s"] for e in result.history]

    runs = {"train": [], "bare": []}
    for i in range(args.repeats):
        for name, fn in (("train", train), ("bare", bare)) if i % 2 == 0 else (("bare", bare), ("train", train)):
            rates = fn()[1:]  # the first epoch warms up
            runs[name].append(statistics.median(rates))
            print(f"  {name:5s} {runs[name][-1]:8.1f} samples/s", file=sys.stderr, flush=True)
    t, b = statistics.median(runs["train"]), statistics.median(runs["bare"])
    return {"model": args.overhead_model, "data": "digits, 16 px, batch 64", "epochs": args.epochs,
            "threads": torch.get_num_threads(), "train_samples_per_s": runs["train"], "bare_samples_per_s": runs["bare"],
            "train_median": round(t, 1), "bare_median": round(b, 1), "overhead": round(1 - t / b, 4)}


def models(args) -> list:
    import bsconv_surgery as bs
    from bsconv_surgery.models import create_model, parse_model_spec
    from bsconv_surgery.layers.regularization import regularization_loss, regularization_sites

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for entry in args.models:
        parts = entry.split(":")
        spec, variant, ks = parse_model_spec(":".join(parts[:2])), parts[2], (parts[3] if len(parts) > 3 else None)
        torch.manual_seed(0)
        original = create_model(spec)
        size = (3, args.image_size, args.image_size)
        result = bs.convert(copy.deepcopy(original), variant, example_inputs=size, kernel_sizes=ks)
        nets = {"original": original, "converted": result.model}
        fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        state = {}
        for name, net in nets.items():
            net = net.to(device, memory_format=fmt).train()
            regularize = sum(1 for _ in regularization_sites(net)) > 0
            state[name] = (net, torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9), regularize)
        x = torch.randn(args.batch_size, *size, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 1000, (args.batch_size,), device=device)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

        def step(name):
            net, opt, regularize = state[name]
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(net(x).float(), y)
            if regularize:
                loss = loss + 0.1 * regularization_loss(net)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        times = {n: [] for n in nets}
        for i in range(args.warmup + args.steps):
            for name in (nets if i % 2 == 0 else list(nets)[::-1]):
                t0 = time.perf_counter()
                step(name)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        med = {n: statistics.median(v) for n, v in times.items()}
        ratio = result.report.macs_before / result.report.macs_after
        row = {"model": str(spec), "variant": variant, "kernel_sizes": ks, "image_size": args.image_size,
               "batch_size": args.batch_size, "device": str(device), "amp": args.amp, "threads": torch.get_num_threads(),
               "steps": args.steps, "mac_ratio": round(ratio, 4),
               "regularized": state["converted"][2],
               **{f"{n}_step_ms": round(med[n] * 1e3, 1) for n in nets},
               **{f"{n}_samples_per_s": round(args.batch_size / med[n], 2) for n in nets},
               "speedup": round(med["original"] / med["converted"], 4)}
        row["share_of_mac_ratio"] = round(row["speedup"] / ratio, 4)
        rows.append(row)
        print(f"  {entry}: original {row['original_samples_per_s']} vs converted {row['converted_samples_per_s']} "
              f"samples/s: {row['speedup']:.2f}x (MAC ratio {ratio:.2f}x)", file=sys.stderr, flush=True)
    return rows


def run(args) -> dict:
    """Measure the parts asked for (``--part``), with the machine's state around them."""
    from bsconv_surgery.inference.benchmark import environment

    if args.threads:
        torch.set_num_threads(args.threads)
    data = {"environment": environment(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average_start": os.getloadavg()}
    if args.part in ("overhead", "both"):
        data["overhead"] = overhead(args)
    if args.part in ("models", "both"):
        data["models"] = models(args)
    data["load_average_end"] = os.getloadavg()
    return data


def render(data: dict) -> str:
    env = data["environment"]
    lines = ["# Training throughput", "", "Written by `benchmarks/train_speed.py`.", "",
             f"- Date: {data['date']}; CPU: {env['cpu']} ({env['cpu_count']} logical CPUs), torch {env['torch']}; "
             f"load average at the start {', '.join(f'{v:.2f}' for v in data['load_average_start'])}, at the end "
             f"{', '.join(f'{v:.2f}' for v in data['load_average_end'])}", ""]
    o = data.get("overhead")
    if o:
        lines += ["## `train` against a bare PyTorch loop", "",
                  f"{o['model']}, {o['data']}, SGD, {o['threads']} thread(s), {o['epochs']} epochs per run (the first "
                  "left out), runs alternated. Samples/s of the training steps (median over epochs, per run):", "",
                  "| | runs (samples/s) | median |", "|---|---|---:|",
                  f"| `train` (`run_training`) | {', '.join(f'{v:.0f}' for v in o['train_samples_per_s'])} | "
                  f"{o['train_median']:.0f} |",
                  f"| bare loop | {', '.join(f'{v:.0f}' for v in o['bare_samples_per_s'])} | {o['bare_median']:.0f} |",
                  "", f"Overhead of `train`: **{o['overhead'] * 100:.1f}%** (target: below 5%).", ""]
    rows = data.get("models")
    if rows:
        r0 = rows[0]
        lines += ["## Converted vs original", "",
                  f"Training steps (forward, loss, backward, SGD step) on random {r0['image_size']} px images, batch "
                  f"{r0['batch_size']}, {r0['device']}, {r0['threads']} thread(s), amp {r0['amp']}; the two models "
                  f"interleaved, {r0['steps']} timed steps each after warm-up; median step time. Converted models with "
                  "BSConv-S sites add the orthonormal regulariser, as `train` does.", "",
                  "| model | variant | MAC ratio | original samples/s | converted samples/s | speed-up | share |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            v = r["variant"] + (f" (k{r['kernel_sizes']})" if r.get("kernel_sizes") else "")
            lines.append(f"| {r['model']} | {v} | {r['mac_ratio']:.2f}x | {r['original_samples_per_s']:.1f} | "
                         f"{r['converted_samples_per_s']:.1f} | **{r['speedup']:.2f}x** | {r['share_of_mac_ratio']:.2f} |")
        lines.append("")
    lines += data.get("notes", [])
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["overhead", "models", "both"], default="both")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--overhead-model", default="cifar_resnet20")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    add_output_arguments(ap, "train_speed")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    run_and_write(args, run, render)


if __name__ == "__main__":
    main()
