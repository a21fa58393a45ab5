"""The ``ort`` preparation (``inference/ort.py``): ONNX Runtime behind an eval-only module that
matches the eager model at several batch sizes, keeps tuple outputs, refuses training; ``auto``
picks it only when (fake) timings make it fastest, skips it with the reason when onnxruntime is
missing, and keys its cache on onnxruntime. Nothing here times anything for real."""

import copy
import json
import sys

import pytest
import torch
from torch import nn

from bsconv_surgery import SurgeryError, prepare_for_inference
from bsconv_surgery.inference import relative_error
from bsconv_surgery.inference.ort import OrtModule
from bsconv_surgery.inference.preps import AUTO_MARGIN, auto_candidates, choice_cache_path, choose_fastest, \
    choose_preparation

from ..helpers import Blocks, outputs, randomize_batchnorm
from .test_preps import fake_timer

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

HINT = "pip install onnx onnxruntime onnxscript"


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return y, y.mean(dim=(2, 3))


def no_onnxruntime(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError


def test_ort_preparation_matches_eager_at_other_batch_sizes_and_is_eval_only(rng):
    model = randomize_batchnorm(Blocks()).eval()
    info = {}
    prepared = prepare_for_inference(copy.deepcopy(model), prep="ort", example_input=torch.randn(2, 3, 16, 16),
                                     report=info)
    assert isinstance(prepared, OrtModule) and info["prep"]["label"] == "fused+onnxruntime"
    assert info["ort"]["dynamic_batch"] and info["ort"]["threads"] == torch.get_num_threads()
    for batch in (1, 5):
        x = torch.randn(batch, 3, 16, 16, generator=rng)
        y = prepared(x)
        assert isinstance(y, torch.Tensor) and y.shape[0] == batch
        assert torch.allclose(y, outputs(model, x), rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        assert prepared(x.to(memory_format=torch.channels_last)).shape[0] == 5
    with pytest.raises(SurgeryError, match="requires grad"):
        prepared(x.requires_grad_())
    prepared.train()
    with pytest.raises(SurgeryError, match="inference only"):
        prepared(torch.randn(1, 3, 16, 16))

    two = TwoHeads().eval()
    x = torch.randn(3, 3, 8, 8, generator=rng)
    out = prepare_for_inference(copy.deepcopy(two), prep="ort", example_input=x)(x)
    assert isinstance(out, tuple) and len(out) == 2
    for a, e in zip(out, outputs(two, x)):
        assert torch.allclose(a, e, rtol=1e-4, atol=1e-5)


def test_auto_picks_ort_only_when_fastest_and_keys_its_cache_on_onnxruntime(rng, tmp_path, monkeypatch):
    monkeypatch.setenv("BSCONV_SURGERY_CACHE", str(tmp_path))
    model = randomize_batchnorm(Blocks()).eval()
    x = torch.randn(1, 3, 16, 16, generator=rng)
    names = ["fused", "channels_last", "ort"]
    info = {}
    prepared, prep = choose_preparation(model, x, candidates=names, report=info,
                                        timer=fake_timer({"fused": 5.0, "channels_last": 4.0, "ort": 2.0}))
    assert prep.name == "ort" and isinstance(prepared, OrtModule) and info["prep"]["chosen"] == "ort"
    assert relative_error(prepared(x), outputs(model, x)) < 1e-5
    # never a slower one, nor one within the margin of the fastest eager candidate
    assert choose_fastest({"fused": 5.0, "channels_last": 4.0, "ort": 4.5}, compiled=["ort"]) == "channels_last"
    near = 4.0 * (1 - AUTO_MARGIN / 2)
    assert choose_fastest({"fused": 5.0, "channels_last": 4.0, "ort": near}, compiled=["ort"]) == "channels_last"

    # without onnxruntime: not a candidate, skipped with the reason, and the cached "ort" is not reused
    no_onnxruntime(monkeypatch)
    assert "ort" not in auto_candidates(torch.device("cpu"))
    info = {}
    _, prep = choose_preparation(model, x, candidates=names, report=info,
                                 timer=fake_timer({"fused": 5.0, "channels_last": 4.0}))
    assert prep.name == "channels_last" and not info["prep"]["cached"]
    assert HINT in info["prep"]["candidates"]["ort"]["unavailable"]
    assert len(json.loads(choice_cache_path().read_text())) == 2, "one decision with onnxruntime, one without"
    with pytest.raises(SurgeryError, match=r"not available: onnxruntime is not installed.*pip install onnx onnxruntime onnxscript"):
        prepare_for_inference(copy.deepcopy(model), prep="ort", example_input=x)


def test_auto_lists_a_missing_onnxruntime_among_its_default_candidates(rng, tmp_path, monkeypatch):
    import bsconv_surgery.inference.preps as preps

    monkeypatch.setenv("BSCONV_SURGERY_CACHE", str(tmp_path))
    monkeypatch.setattr(preps, "compiler_available", lambda: False)
    no_onnxruntime(monkeypatch)
    info = {}
    _, prep = choose_preparation(randomize_batchnorm(Blocks()).eval(), torch.randn(1, 3, 16, 16, generator=rng),
                                 report=info, timer=fake_timer({"fused": 1.0, "channels_last": 2.0}))
    assert prep.name == "fused"
    assert HINT in info["prep"]["candidates"]["ort"]["unavailable"]
    assert "C++ compiler" in info["prep"]["candidates"]["aot"]["unavailable"]


def test_benchmark_cli_prep_ort_without_onnxruntime_gives_the_install_hint(cli, monkeypatch):
    no_onnxruntime(monkeypatch)
    result = cli("benchmark", "timm:test_resnet", "--input-size", "3,32,32", "--prep", "ort")
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--prep ort is not available here: onnxruntime is not installed" in text and HINT in text


def test_benchmark_cli_names_an_unavailable_default_candidate_with_the_reason_and_the_install_line(cli, monkeypatch):
    import bsconv_surgery.inference.preps as preps

    monkeypatch.setattr(preps, "compiler_available", lambda: False)  # no compiling here: the fast candidates only
    no_onnxruntime(monkeypatch)
    result = cli("benchmark", "timm:test_resnet", "--input-size", "3,32,32", "--runs", "3", "--warmup", "1",
                 "--no-cache")
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert f"Not measured, unavailable here: ort: onnxruntime is not installed. onnx, onnxruntime and onnxscript " \
           f"are dependencies of bsconv-surgery; install them with: {HINT}." in text
    assert "aot: inductor on CPU needs a C++ compiler (g++ or clang++) on PATH; install one (" in text
    assert text.count("Not measured, unavailable here: ort") == 1  # once, not once per model
