"""The loss sensitivity and budgets rank by follows the decision output (``losses.py``, issue 23 item 6)."""

import copy
import math

import pytest
import torch
from torch import nn

import bsconv_surgery as bs
from bsconv_surgery import SurgeryError, measure_sensitivity
from bsconv_surgery.core.options import SurgeryOptions
from bsconv_surgery.recovery.fidelity import head_of, measure_fidelity
from bsconv_surgery.recovery.sensitivity import plan_sites

from ..helpers import SmallNet, random_batches

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (3, 8, 8)


def _grey(batches=4, n=16, spread=0.05, seed=0):
    """Images whose three channels are one value ``z`` (near 1) everywhere, plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        z = 1 + spread * torch.randn(n, 1, 1, 1, generator=gen)
        out.append(z.expand(n, *SIZE) + 0.002 * torch.randn(n, *SIZE, generator=gen))
    return out


class MultiLabel(nn.Module):
    """Two conv sites -> per-channel means -> 4 bins -> sigmoid: independent per-bin
    probabilities, the arg-max bin is the decision (a pitch or tagging head)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, bias=False)
        self.b = nn.Conv2d(3, 4, 3, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return torch.sigmoid(self.head(torch.cat([self.a(x).mean((2, 3)), self.b(x).mean((2, 3))], 1)))


def _ring(value):
    ring = torch.full((3, 3), value)
    ring[1, 1] = 0.0
    return ring


def multilabel_net():
    """Hand-set weights. On grey inputs of value ``z`` each filter answers ``z * sum(filter)``.
    Every filter is a centre tap (1.0) on one channel, the rank-1 part BSConv-U keeps, plus a
    ring of weights on another channel that the rank-1 fit drops:

    - site ``a``: a ring of 0.1 (sum 0.8) in all four filters, so converting it scales every
      ``a`` feature from ``1.8 z`` to ``z``; the head reads the ``a`` features equally into every
      bin, so every bin's logit drops by ``0.8 z``: a large change of every probability, and the
      arg-max bin is kept;
    - site ``b``: a ring of 0.025 (sum 0.2) in filter 0 only (the others are exact); the head
      reads that feature into bin 0 with +0.5 and into bin 1 with -0.5, and bins 0 and 1 are
      ``1.2 z - 1.1`` apart: converting ``b`` moves them ``0.2 z`` closer, which flips the
      decision for every ``z`` below 1.1, with a small change of the probabilities.
    """
    net = MultiLabel()
    with torch.no_grad():
        for conv, rings in ((net.a, (0.1, 0.1, 0.1, 0.1)), (net.b, (0.025, 0.0, 0.0, 0.0))):
            conv.weight.zero_()
            for n, ring in enumerate(rings):
                conv.weight[n, n % 3, 1, 1] = 1.0
                conv.weight[n, (n + 1) % 3] = _ring(ring)
        net.head.weight.zero_()
        net.head.weight[:, :4] = 0.25
        net.head.weight[0, 4], net.head.weight[1, 4] = 0.5, -0.5
        net.head.bias.copy_(torch.tensor([-2.2, -1.1, -2.8, -3.3]))
    return net.eval()


def _one_site_target(model):
    """A MAC budget that either site meets alone (and no empty set)."""
    plan = plan_sites(model, SurgeryOptions.create("u", init="svd"), SIZE)
    saved = [s.macs_saved for s in plan.sites]
    assert len(saved) == 2 and min(saved) > 0
    return (plan.macs_before - 0.9 * min(saved)) / plan.macs_before


def test_the_budget_keeps_the_decision_of_a_sigmoid_head():
    model, calib = multilabel_net(), _grey()
    rows = {r.name: r for r in measure_sensitivity(model, calib, example_inputs=SIZE, init="svd").rows}
    a, b = rows["a"].fidelity, rows["b"].fidelity
    # the construction: a keeps every decision with the larger relative error, b flips decisions with a small one
    assert a["head"] == "sigmoid" and "Bernoulli" in a["loss_name"]
    assert a["top1_agreement"] == 1.0 and b["top1_agreement"] < 0.5
    assert a["relative_logit_error"] > 3 * b["relative_logit_error"]
    assert rows["a"].loss < rows["b"].loss
    target = {"macs": _one_site_target(model)}
    chosen = bs.convert(copy.deepcopy(model), "u", init="svd", example_inputs=SIZE, calibration=calib, target=target)
    assert [r.name for r in chosen.report.replaced] == ["a"]
    assert chosen.report.selection["loss"].startswith("decision: per-bin binary cross-entropy")
    held_out = _grey(seed=1)
    assert measure_fidelity(model, chosen.model, held_out)["top1_agreement"] == 1.0
    # the relative output error, the earlier loss, picks the site that flips the decision
    old = bs.convert(copy.deepcopy(model), "u", init="svd", example_inputs=SIZE, calibration=calib, target=target,
                     metric="relative-error")
    assert [r.name for r in old.report.replaced] == ["b"]
    assert measure_fidelity(model, old.model, held_out)["top1_agreement"] < 0.5


def _softmax_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5), nn.Softmax(1))


class Boxes(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))[:, :1]


@pytest.mark.parametrize("output, family, head", [
    (torch.tensor([[0.2, 0.8], [0.5, 0.5]]), "image", "softmax"),
    (torch.tensor([[0.2, 0.9, 0.6], [0.1, 0.1, 0.0]]), "image", "sigmoid"),
    (torch.tensor([[-1.0, 2.0], [0.5, 0.1]]), "image", "logits"),
    (torch.tensor([0.3, 0.4]), "image", "regression"),
    (torch.tensor([[0.3], [0.4]]), "image", "regression"),
    (torch.randn(2, 2, 4, 4), "optical_flow", "regression"),
    (torch.randn(2, 3), "detection", "detection"),
])
def test_the_head_is_told_from_the_outputs(output, family, head):
    assert head_of(output, family) == head


def _pair():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[2].weight.add_(0.05 * torch.randn_like(b[2].weight))
    return a, b


@pytest.mark.parametrize("metric, key", [
    ("relative-error", "relative_logit_error"), ("kl", "kl_divergence"), ("bce", "bernoulli_kl"),
])
def test_named_metrics_are_the_fidelity_numbers(metric, key):
    a, b = _pair()
    fid = measure_fidelity(a, b, random_batches(2, size=SIZE), metric=metric)
    assert fid["loss"] == pytest.approx(fid[key]) and fid["loss"] > 0


def test_the_default_loss_of_class_logits_is_disagreement_plus_kl():
    a, b = _pair()
    fid = measure_fidelity(a, b, random_batches(2, size=SIZE))
    assert fid["head"] == "logits" and "softmax KL" in fid["loss_name"]
    assert fid["loss"] == pytest.approx(1 - fid["top1_agreement"] + fid["kl_divergence"])
    assert measure_fidelity(a, b, random_batches(2, size=SIZE), metric="disagreement")["loss"] == \
        pytest.approx(1 - fid["top1_agreement"])


def test_bce_is_the_bernoulli_kl_of_the_sigmoids():
    a, b = _pair()
    batches = random_batches(2, size=SIZE)
    fid = measure_fidelity(a, b, batches, metric="bce")
    x = torch.cat(batches)
    with torch.no_grad():
        p, q = torch.sigmoid(a(x)).double(), torch.sigmoid(b(x)).double()
    expected = nn.functional.binary_cross_entropy(q, p) - nn.functional.binary_cross_entropy(p, p)
    assert fid["bernoulli_kl"] == pytest.approx(float(expected), rel=1e-5)


def test_a_callable_metric_gets_the_outputs_and_optionally_the_labels():
    a, b = _pair()
    batches = random_batches(3, size=SIZE)
    seen = {}

    def max_gap(reference, converted):
        seen["shapes"] = [tuple(t.shape) for t in reference]
        return float((reference[0] - converted[0]).abs().max())

    fid = measure_fidelity(a, b, batches, metric=max_gap)
    assert seen["shapes"] == [(24, 5)] and fid["loss"] > 0 and "max_gap" in fid["loss_name"]

    def wrong(reference, converted, labels):
        seen["labels"] = labels
        return float((converted[0].argmax(1) != labels).float().mean())

    labelled = bs.Labelled([(x, torch.zeros(len(x), dtype=torch.long)) for x in batches])
    fid = measure_fidelity(a, b, labelled, metric=wrong)
    assert seen["labels"].shape == (24,) and 0 <= fid["loss"] <= 1


@pytest.mark.parametrize("metric, message", [
    ("kld", r"Unknown metric 'kld'. Valid metrics: auto, bce, disagreement, kl, relative-error"),
    (lambda r, c: -1.0, "must return a finite number >= 0"),
    (lambda r, c: float("nan"), "must return a finite number >= 0"),
    (3, "metric must be a name"),
])
def test_bad_metrics_are_refused(metric, message):
    a, b = _pair()
    with pytest.raises(SurgeryError, match=message):
        measure_fidelity(a, b, random_batches(1, size=SIZE), metric=metric)


def test_kl_of_a_regression_output_is_refused():
    with pytest.raises(SurgeryError, match="metric 'kl' needs a decision output with classes"):
        measure_fidelity(Boxes(), Boxes(), random_batches(1, size=SIZE), metric="kl")


def test_the_metric_travels_through_sensitivity_and_convert():
    model = SmallNet()
    batches = random_batches(2, size=(3, 12, 12))
    result = measure_sensitivity(model, batches, example_inputs=(3, 12, 12), metric="relative-error")
    assert result.loss == "relative output error"
    assert all(r.loss == pytest.approx(r.fidelity["relative_logit_error"]) for r in result.rows)
    report = bs.convert(copy.deepcopy(model), "u", example_inputs=(3, 12, 12), calibration=batches,
                        target={"macs": 0.7}, metric="kl").report
    assert report.selection["loss"].startswith("softmax KL") and report.fidelity["loss"] == \
        pytest.approx(report.fidelity["kl_divergence"])
    with pytest.raises(SurgeryError, match="metric needs calibration data"):
        bs.convert(copy.deepcopy(model), "u", example_inputs=(3, 12, 12), metric="kl")
    with pytest.raises(SurgeryError, match="metric needs calibration data"):
        measure_sensitivity(model, example_inputs=(3, 12, 12), metric="kl")


def test_losses_are_finite_and_zero_for_the_same_model():
    model = SmallNet()
    fid = measure_fidelity(model, model, random_batches(1, size=(3, 12, 12)))
    assert fid["loss"] == 0.0 and math.isfinite(fid["kl_divergence"])


@pytest.mark.parametrize("fid, loss", [
    ({"head": "detection", "top1_agreement": 0.75, "relative_logit_error": 0.1, "detections_original": 10,
      "detections_converted": 8}, 0.25 + 0.1 + 0.2),
    ({"head": "detection", "top1_agreement": None, "relative_logit_error": None, "detections_original": 3,
      "detections_converted": 0}, 1.0),  # nothing to compare: every detection is unmatched
    ({"head": "regression", "top1_agreement": 1.0, "relative_logit_error": 0.3}, 0.3),
    ({"head": "sigmoid", "top1_agreement": 0.9, "bernoulli_kl": 0.05, "kl_divergence": 9.0}, 0.15),
    ({"head": "softmax", "top1_agreement": 0.5, "kl_divergence": 0.2}, 0.7),
])
def test_the_automatic_loss_of_each_head(fid, loss):
    from bsconv_surgery.recovery.losses import as_metric

    assert as_metric("auto").of(fid) == pytest.approx(loss)


def test_a_regression_output_is_ranked_by_its_relative_error():
    fid = measure_fidelity(Boxes(), nn.Sequential(Boxes(), nn.Identity()), random_batches(1, size=SIZE))
    assert fid["head"] == "regression" and fid["loss"] == fid["relative_logit_error"] == 0.0
    assert "regression" in fid["loss_name"]

