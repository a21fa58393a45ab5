"""Real trained weights: facenet-pytorch's MTCNN nets through the Python API (issue 15).

Slow, and skipped unless the ``mtcnn`` extra is installed (``pip install --no-deps facenet-pytorch``).
MTCNN nets return ``(box regression, face probability)`` (ONet also landmarks), the softmax inside
the net, and have no BatchNorm: every output must be compared, and the decision is the probability.
"""

import copy

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
mtcnn = pytest.importorskip("facenet_pytorch.models.mtcnn")

import bsconv_surgery as bs  # noqa: E402

SIZES = {"PNet": 12, "RNet": 24, "ONet": 48}


def _windows(size, n=4, batch=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # MTCNN's input range: (pixel - 127.5) / 128
    return [(torch.rand(batch, 3, size, size, generator=gen) * 255 - 127.5) / 128 for _ in range(n)]


@pytest.mark.parametrize("name", ["PNet", "RNet", "ONet"])
def test_sensitivity_and_fidelity_on_every_output(name):
    net = getattr(mtcnn, name)(pretrained=True).eval()
    size = SIZES[name]
    result = bs.measure_sensitivity(net, _windows(size), example_inputs=(3, size, size))
    names = {r.name for r in result.rows}
    if name == "PNet":  # at 12x12 conv3's BSConv-U replacement costs more MACs: the growth guard skips it
        assert names == {"conv1", "conv2"} and "conv3" in {s.name for s in result.skipped}
        grown = bs.measure_sensitivity(net, _windows(size), example_inputs=(3, size, size), allow_growth=True)
        conv3, = [r for r in grown.rows if r.name == "conv3"]
        assert conv3.macs_saved < 0 < conv3.params_saved and grown.rows[-1] is conv3  # ranked last
    else:
        assert names >= {"conv1", "conv2", "conv3"}
    for row in result.rows:
        fid = row.fidelity
        assert fid["outputs"] == (3 if name == "ONet" else 2)
        assert fid["decision_output"] == fid["outputs"] - 1  # the face probability
        assert row.loss > 0 and 0 <= fid["top1_agreement"] <= 1
    assert result.macs_before > 0 and all(r.params_saved > 0 for r in result.rows)


def test_a_budget_and_distillation_on_onet():
    teacher = mtcnn.ONet(pretrained=True).eval()
    calib = _windows(48)
    result = bs.convert(copy.deepcopy(teacher), "u", init="svd", example_inputs=(3, 48, 48), calibration=calib, target={"macs": 0.5})
    sel = result.report.selection
    assert all(t["met"] for t in sel["targets"]) and sel["chosen"]
    before = result.report.fidelity["relative_logit_error"]
    run = bs.distill(result.model, teacher, calib, steps=40)
    after = bs.recovery.fidelity.measure_fidelity(teacher, result.model, calib)["relative_logit_error"]
    assert run.final_loss < run.first_loss and after < before


def test_pnet_budget_that_cannot_be_reached():
    net = mtcnn.PNet(pretrained=True).eval()
    with pytest.raises(bs.SurgeryError, match=r"0\.523 of the original"):
        bs.convert(net, "u", example_inputs=(3, 12, 12), target={"macs": 0.5})
