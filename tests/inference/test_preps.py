"""Named preparations and the automatic choice (``inference/preps.py``): the registry, the choice
rule on fake timings (never a candidate measured slower), the on-disk choice cache, and
``prepare_for_inference(prep=...)``. No test here times anything for real."""

import copy
import json
import random
import sys

import pytest
import torch
from torch import nn

from bsconv_surgery import SurgeryError, prepare_for_inference
from bsconv_surgery.inference import relative_error
from bsconv_surgery.inference.preps import (
    AUTO_MARGIN,
    PREPARATIONS,
    auto_candidates,
    choice_cache_path,
    choose_fastest,
    choose_preparation,
    preparation_from_flags,
    resolve_preparation,
)
from bsconv_surgery.inference.timing import Timing

from ..helpers import Blocks, batchnorms, outputs, randomize_batchnorm


def fake_timer(medians_ms, calls=None):
    """A ``time_interleaved`` stand-in: each model's timings are its given median, whatever runs."""

    def timer(models, inputs, **kwargs):
        if calls is not None:
            calls.append(sorted(models))
        with torch.inference_mode():
            for name, model in models.items():  # the prepared modules must run on their inputs
                model(*(inputs[name] if isinstance(inputs[name], tuple) else (inputs[name],)))
        return {n: Timing(n, 1, times=[medians_ms[n] / 1e3] * 3) for n in models}

    return timer


def test_unknown_preparation_lists_the_valid_names():
    with pytest.raises(SurgeryError) as err:
        resolve_preparation("fastest")
    message = str(err.value)
    assert "'fastest'" in message
    for name in ("auto", "eager", "fused", "channels_last", "compiled", "aot"):
        assert name in message
    assert set(PREPARATIONS.names()) == {"eager", "fused", "channels_last", "compiled", "aot", "aot_conv", "ort"}


def test_labels_and_flags_name_the_registered_preparation():
    assert resolve_preparation("channels_last").label == "fused+channels_last"
    assert resolve_preparation("aot").label == "fused+channels_last+lowered+aot-compiled"
    assert preparation_from_flags(fuse=True, channels_last=True).name == "channels_last"
    assert preparation_from_flags(fuse=True, channels_last=True, compile=True).name == "compiled"  # lowered by default
    assert preparation_from_flags(fuse=False).name == "eager"
    custom = preparation_from_flags(fuse=True, channels_last=True, lower=True)
    assert custom.name == "custom" and custom.label == "fused+channels_last+lowered"
    assert preparation_from_flags(fuse=True, channels_last=True, aot=True, lower=False).name == "aot_conv"


def test_auto_candidates_leave_out_compiled_ones_without_a_compiler(monkeypatch):
    import bsconv_surgery.inference.preps as preps

    monkeypatch.setattr(preps, "compiler_available", lambda: False)
    assert auto_candidates(torch.device("cpu"))[:2] == ["fused", "channels_last"]
    assert not set(auto_candidates(torch.device("cpu"))) & {"aot", "aot_conv", "compiled"}
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # and without onnxruntime
    assert auto_candidates(torch.device("cpu")) == ["fused", "channels_last"]


def test_choose_fastest_takes_the_lowest_median():
    assert choose_fastest({"fused": 5.0, "channels_last": 4.0}) == "channels_last"
    assert choose_fastest({"fused": 5.0, "channels_last": 4.0, "aot": 3.0}, compiled=["aot"]) == "aot"


def test_choose_fastest_never_picks_a_compiled_candidate_measured_slower():
    assert choose_fastest({"fused": 4.0, "channels_last": 5.0, "aot": 4.5}, compiled=["aot"]) == "fused"
    # within the margin a compiled candidate does not displace the eager one
    near = 4.0 * (1 - AUTO_MARGIN / 2)
    assert choose_fastest({"fused": 4.0, "aot": near}, compiled=["aot"]) == "fused"


def test_choose_fastest_is_never_slower_than_any_eager_candidate():
    gen = random.Random(0)
    for _ in range(500):
        medians = {n: gen.uniform(1, 10) for n in ("fused", "channels_last", "compiled", "aot")}
        compiled = [n for n in ("compiled", "aot") if gen.random() < 0.7]
        chosen = choose_fastest(medians, compiled)
        eager_best = min(t for n, t in medians.items() if n not in compiled)
        assert medians[chosen] <= eager_best
        assert chosen not in compiled or medians[chosen] <= (1 - AUTO_MARGIN) * eager_best


def test_choose_preparation_follows_the_timings_and_caches_the_choice(rng, tmp_path, monkeypatch):
    monkeypatch.setenv("BSCONV_SURGERY_CACHE", str(tmp_path))
    model = randomize_batchnorm(Blocks()).eval()
    x = torch.randn(2, 3, 16, 16, generator=rng)
    expected = outputs(model, x)
    calls = []
    info = {}
    prepared, prep = choose_preparation(model, x, candidates=["fused", "channels_last"], report=info,
                                        timer=fake_timer({"fused": 2.0, "channels_last": 3.0}, calls))
    assert prep.name == "fused" and calls == [["channels_last", "fused"]]
    assert info["prep"]["chosen"] == "fused" and not info["prep"]["cached"]
    assert info["prep"]["candidates"]["channels_last"]["median_ms"] == 3.0
    assert relative_error(outputs(prepared, x), expected) < 1e-5
    assert batchnorms(model), "auto prepares copies: the model itself is left as it is"
    assert choice_cache_path().parent == tmp_path and choice_cache_path().exists()

    # the same model structure and input again: the cached choice, nothing timed
    info = {}
    prepared, prep = choose_preparation(copy.deepcopy(model), x, candidates=["fused", "channels_last"], report=info,
                                        timer=fake_timer({"fused": 9.0, "channels_last": 1.0}, calls))
    assert prep.name == "fused" and info["prep"]["cached"] and len(calls) == 1
    # without the cache it measures again, and follows the new timings
    prepared, prep = choose_preparation(model, x, candidates=["fused", "channels_last"], cache=False,
                                        timer=fake_timer({"fused": 9.0, "channels_last": 1.0}, calls))
    assert prep.name == "channels_last" and len(calls) == 2
    # another input shape is another decision
    prepared, prep = choose_preparation(model, torch.randn(1, 3, 16, 16), candidates=["fused", "channels_last"],
                                        timer=fake_timer({"fused": 9.0, "channels_last": 1.0}, calls))
    assert prep.name == "channels_last" and len(calls) == 3


def test_a_broken_cache_file_is_measured_over(rng, tmp_path, monkeypatch):
    monkeypatch.setenv("BSCONV_SURGERY_CACHE", str(tmp_path))
    choice_cache_path().write_text("{not json")
    model = randomize_batchnorm(Blocks()).eval()
    x = torch.randn(1, 3, 16, 16, generator=rng)
    _, prep = choose_preparation(model, x, candidates=["fused", "channels_last"],
                                 timer=fake_timer({"fused": 1.0, "channels_last": 3.0}))
    assert prep.name == "fused" and json.loads(choice_cache_path().read_text())


def test_a_failing_candidate_is_left_out(rng, tmp_path, monkeypatch):
    import bsconv_surgery.inference.preps as preps

    monkeypatch.setenv("BSCONV_SURGERY_CACHE", str(tmp_path))
    real = preps.apply_preparation

    def apply(model, prep, *args, **kwargs):
        if prep.name == "channels_last":
            raise RuntimeError("simulated compiler crash")
        return real(model, prep, *args, **kwargs)

    monkeypatch.setattr(preps, "apply_preparation", apply)
    info = {}
    _, prep = choose_preparation(randomize_batchnorm(Blocks()).eval(), torch.randn(1, 3, 16, 16, generator=rng),
                                 candidates=["fused", "channels_last"], report=info,
                                 timer=fake_timer({"fused": 5.0, "channels_last": 1.0}))
    assert prep.name == "fused" and "simulated" in info["prep"]["candidates"]["channels_last"]["failed"]


def test_prepare_for_inference_by_name_and_by_default(rng):
    model = randomize_batchnorm(Blocks()).eval()
    x = torch.randn(2, 3, 16, 16, generator=rng)
    expected = outputs(model, x)
    info = {}
    prepared = prepare_for_inference(copy.deepcopy(model), prep="fused", report=info)
    assert info["prep"] == {"auto": False, "chosen": "fused", "label": "fused"} and not batchnorms(prepared)
    assert relative_error(outputs(prepared, x), expected) < 1e-5
    info = {}
    prepared = prepare_for_inference(copy.deepcopy(model), report=info)  # nothing to measure on: channels_last
    assert info["prep"]["chosen"] == "channels_last"
    assert prepared.stem.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(TypeError):
        prepare_for_inference(copy.deepcopy(model), prep="fused", fuse=True)
    with pytest.raises(SurgeryError, match="Valid preparations"):
        prepare_for_inference(copy.deepcopy(model), prep="turbo")


def test_prepare_for_inference_auto_measures_on_the_example_input(rng, tmp_path, monkeypatch):
    import bsconv_surgery.inference.preps as preps

    monkeypatch.setenv("BSCONV_SURGERY_CACHE", str(tmp_path))
    monkeypatch.setattr(preps, "time_interleaved", fake_timer({"fused": 1.0, "channels_last": 2.0}))
    model = randomize_batchnorm(Blocks()).eval()
    x = torch.randn(1, 3, 16, 16, generator=rng)
    info = {}
    prepared = prepare_for_inference(model, example_input=x, candidates=["fused", "channels_last"], report=info)
    assert info["prep"]["chosen"] == "fused" and info["prep"]["auto"]
    assert relative_error(outputs(prepared, x), outputs(model, x)) < 1e-5


def test_auto_skips_the_unlowered_twin_when_there_is_nothing_to_lower(rng, tmp_path, monkeypatch):
    import bsconv_surgery.inference.preps as preps

    monkeypatch.setenv("BSCONV_SURGERY_CACHE", str(tmp_path))
    monkeypatch.setattr(preps, "compiler_available", lambda: True)
    applied = []

    def apply(model, prep, example_input=None, report=None):  # no compiling in a unit test
        applied.append(prep.name)
        if prep.lower and report is not None:
            report["lower"] = {"lowered": [], "skipped": []}
        return model

    monkeypatch.setattr(preps, "apply_preparation", apply)
    info = {}
    _, prep = choose_preparation(nn.Conv2d(3, 4, 3).eval(), torch.randn(1, 3, 8, 8, generator=rng),
                                 candidates=["fused", "aot", "aot_conv"], report=info,
                                 timer=fake_timer({"fused": 5.0, "aot": 2.0}))
    assert applied == ["fused", "aot"] and info["prep"]["candidates"]["aot_conv"]["same_as"] == "aot"
    assert prep.name == "aot"
