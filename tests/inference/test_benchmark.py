"""Timing (``benchmark.py``): quantiles, the paired speed-up, interleaving, preparing both models alike."""

import copy
import os
import re

import pytest
import timm
import torch

from bsconv_surgery import SurgeryError, convert
from bsconv_surgery.inference.benchmark import PrepOptions, Timing, benchmark, paired_speedup, time_interleaved

from ..helpers import batchnorms, randomize_batchnorm


def test_timing_quantiles_and_throughput():
    t = Timing("m", batch_size=4, times=[0.01 * i for i in range(1, 11)])
    assert t.p90 == pytest.approx(0.09) and t.median == pytest.approx(0.055)
    assert t.throughput == pytest.approx(4 / 0.055)


def test_paired_speedup_ignores_load_drift_between_rounds():
    # the machine slows down 3x halfway; each round the original takes 3x the converted
    original = Timing("o", 1, times=[0.03, 0.03, 0.03, 0.09, 0.09, 0.09, 0.09])
    converted = Timing("c", 1, times=[0.01, 0.01, 0.01, 0.03, 0.03, 0.03, 0.03])
    assert paired_speedup(original, converted) == pytest.approx(3.0)
    assert original.median / converted.median == pytest.approx(3.0)
    converted.times = [0.01, 0.01, 0.01, 0.01, 0.03, 0.03, 0.03]  # drift hits the rounds unevenly
    assert original.median / converted.median == pytest.approx(9.0), "the ratio of medians is fooled"
    assert paired_speedup(original, converted) == pytest.approx(3.0)


def test_time_interleaved_alternates_and_warms_up():
    calls = []
    models = {"a": lambda x: calls.append("a"), "b": lambda x: calls.append("b")}
    x = torch.zeros(2, 1)
    timings = time_interleaved(models, {"a": x, "b": x}, warmup=2, runs=4)
    assert calls == ["a", "b"] * 2 + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert all(len(t.times) == 4 and t.batch_size == 2 for t in timings.values())


def test_benchmark_prepares_copies_the_same_way():
    original = randomize_batchnorm(timm.create_model("test_resnet"))
    converted = convert(copy.deepcopy(original), "u", count=False).model
    r = benchmark(original, converted, (3, 32, 32), batch_size=2, prep=PrepOptions(fuse=True, channels_last=True),
                       warmup=1, runs=3)
    assert r["prep"] == "fused+channels_last" and r["original"]["runs"] == 3
    assert r["fold"]["original"]["folded"] > 0 and r["fold"]["converted"]["folded"] > 0
    assert r["speedup_median"] > 0
    assert batchnorms(original) and batchnorms(converted)  # the caller's models are untouched


def test_prep_labels_name_every_step():
    assert PrepOptions().label == "eager"
    assert PrepOptions(fuse=True, channels_last=True, compile=True, lower=True).label == \
        "fused+channels_last+lowered+compiled"
    assert PrepOptions(fuse=True, compile=True, aot=True).label == "fused+aot-compiled"


def test_benchmark_auto_prepares_each_model_its_fastest_way():
    original = randomize_batchnorm(timm.create_model("test_resnet"))
    converted = convert(copy.deepcopy(original), "u", count=False).model
    r = benchmark(original, converted, (3, 32, 32), candidates=["fused", "channels_last"], warmup=1, runs=3)
    for name in ("original", "converted"):
        assert r["preps"][name]["name"] in ("fused", "channels_last")
        assert set(r["auto"][name]["candidates"]) == {"fused", "channels_last"}
    assert r["original"]["runs"] == 3 and batchnorms(original)


def test_benchmark_onnxruntime_matches_torch_and_compares_backends():
    pytest.importorskip("onnxruntime")
    original = randomize_batchnorm(timm.create_model("test_resnet"))
    converted = convert(copy.deepcopy(original), "u", count=False).model
    r = benchmark(original, converted, (3, 32, 32), batch_size=2, prep="fused", backend="both", warmup=1, runs=3)
    assert r["prep"] == "fused" and r["backend"] == "both"
    assert r["ort"]["parity"]["original"] < 1e-4 and r["ort"]["parity"]["converted"] < 1e-4
    assert r["ort"]["original"]["runs"] == 3 and r["ort"]["speedup_median"] > 0
    cross = r["cross_backend"]
    assert {cross["original"]["backend"], cross["converted"]["backend"]} <= {"torch", "ort"}
    best_o = min(r["original"]["median_ms"], r["ort"]["original"]["median_ms"])
    best_c = min(r["converted"]["median_ms"], r["ort"]["converted"]["median_ms"])
    assert cross["speedup"] == pytest.approx(best_o / best_c, rel=1e-3)
    ort_only = benchmark(original, converted, (3, 32, 32), backend="ort", warmup=0, runs=2)
    assert ort_only["prep"] == "onnxruntime (fused)" and ort_only["converted"]["runs"] == 2


def test_benchmark_rejects_an_unknown_backend_or_preparation():
    from bsconv_surgery import SurgeryError

    model = timm.create_model("test_resnet")
    with pytest.raises(SurgeryError, match="Valid backends"):
        benchmark(model, model, (3, 32, 32), backend="tensorrt")
    with pytest.raises(SurgeryError, match="Valid preparations"):
        benchmark(model, model, (3, 32, 32), prep="fastest")


@pytest.mark.parametrize("threads,suggests", [(1, False), (2, True)])
def test_the_busy_machine_warning_suggests_one_thread_only_when_more_are_used(monkeypatch, threads, suggests):
    import bsconv_surgery.inference.benchmark as library

    monkeypatch.setattr(library, "load_average", lambda: (1000.0, 1000.0, 1000.0))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        warning = library.busy_warning()
    finally:
        torch.set_num_threads(saved)
    assert warning.startswith("The machine is busy (load average 1000.0")
    assert ("--threads 1" in warning) == suggests


@pytest.mark.parametrize("value", [0, -1, "cpus+1", 100000, 2.5, True, "2", None])
def test_a_thread_count_beyond_the_machine_is_refused(value):
    from bsconv_surgery.core.options import bounded_threads

    cpus = os.cpu_count()
    value = cpus + 1 if value == "cpus+1" else value
    with pytest.raises(SurgeryError, match=rf"--threads {re.escape(repr(value))} is not a thread count for this "
                                           rf"machine: give a whole number from 1 to {cpus} \(its CPUs\)\."):
        bounded_threads(value, "--threads")
    assert bounded_threads(1) == 1 and bounded_threads(cpus) == cpus


def test_an_onnx_runtime_session_refuses_an_impossible_thread_count(tmp_path):
    from bsconv_surgery.inference.ort import ort_session

    with pytest.raises(SurgeryError, match="threads 100000 is not a thread count for this machine"):
        ort_session(tmp_path / "never-read.onnx", threads=100000)
