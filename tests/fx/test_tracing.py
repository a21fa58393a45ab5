"""Partial tracing: a model that does not trace whole is traced in parts (the largest submodules
that trace), every part's graph names modules by their qualified name, and discovery and the passes
run on each part."""

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from bsconv_surgery import ExampleInputs
from bsconv_surgery import convert, fold_batchnorm
from bsconv_surgery.fx.discovery import discover
from bsconv_surgery.fx.tracing import module_call_counts, trace_model
from bsconv_surgery.layers import BSConvU
from bsconv_surgery.core.records import ConversionReport
from tests.helpers import outputs, randomize_batchnorm


class Head(nn.Module):
    """Takes a list of feature maps (like torchvision's RPN head): does not trace."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.cls = nn.Conv2d(16, 4, 1)

    def forward(self, feats):
        return [self.cls(self.conv(f)) for f in feats]


class ListModel(nn.Module):
    """A detection-style model: a list of images in, a list of maps out. The root and the head do
    not trace; the backbone (a stem and a depthwise-separable pair) and ``head.conv`` do."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.head = Head()

    def forward(self, images):
        return self.head([self.backbone(x[None]) for x in images])


def test_the_largest_submodules_that_trace_become_parts():
    model = ListModel()
    trace = trace_model(model)
    assert list(trace.parts) == ["backbone", "head.conv"]
    assert list(trace.failed) == ["", "head"] and "iterated" in trace.failed[""]
    assert not trace.ok and trace.partial and trace.standalone_parts == ["backbone", "head.conv"]
    targets = [n.target for n in trace.module_nodes()]
    assert targets == [f"backbone.{i}" for i in range(9)] + ["head.conv.0", "head.conv.1"]  # qualified names
    stacks = [list(n.meta["nn_module_stack"].values())[-1][0] for n in trace.module_nodes()]
    assert stacks[0] == "backbone.0" and stacks[-1] == "head.conv.1"
    assert trace.covers("backbone.3") and not trace.covers("head.cls") and not trace.covers("head")
    calls = module_call_counts(trace)
    assert calls["backbone.3"] == 1 and calls["head.conv.0"] == 1  # counted within the part
    discovery = discover(model, trace)
    assert discovery.convs["backbone.3"].calls == 1 and discovery.convs["head.cls"].calls is None
    assert [c.name for c in discovery.untraced] == ["head.cls"]
    assert discovery.census() == {"standard": 2, "pointwise": 2, "depthwise": 1, "grouped": 0, "hidden": 0}


def test_passes_run_on_every_part_and_the_report_names_them():
    model = randomize_batchnorm(ListModel()).eval()
    images = [torch.randn(3, 8, 8), torch.randn(3, 8, 8)]
    shapes = [o.shape for o in outputs(model, images)]
    result = convert(model, "u", example_inputs=ExampleInputs.of("detection", (3, 8, 8)), allow_growth=True)
    report = result.report
    tracing = report.tracing.to_json()
    assert tracing["method"] == "fx parts" and tracing["parts"] == ["backbone", "head.conv"]
    assert set(tracing["fallbacks"]) == {"", "head"}
    assert "1 conv(s) outside every part" in tracing["note"]
    kinds = {r.name: r.kind for r in report.replaced}
    # the pair inside the backbone is found as in a classifier; standard convs in both parts
    assert kinds == {"backbone.3": "dsc->bsconv_u", "backbone.0": "conv->bsconv_u", "head.conv.0": "conv->bsconv_u"}
    assert model.backbone[3].kernel_size == (1, 1) and model.backbone[6].groups == 16
    assert isinstance(model.backbone[4], nn.Identity) and isinstance(model.head.conv[0], BSConvU)
    assert report.output_shape == [["n", 4, 8, 8]]  # batch 1: one image
    assert [o.shape for o in outputs(model, images)] == shapes
    assert ConversionReport.from_json(report.to_json()).to_json() == report.to_json()


def test_batchnorm_folds_inside_parts():
    model = randomize_batchnorm(ListModel()).eval()
    images = [torch.randn(3, 8, 8)]
    reference = outputs(model, images)
    report = fold_batchnorm(model)
    assert [f["conv"] for f in report.folded] == ["backbone.0", "backbone.3", "backbone.6"]
    assert report.method.startswith("fx, 2 part(s)")
    torch.testing.assert_close(outputs(model, images), reference)


def test_a_leaf_that_does_not_trace_is_split_into_the_parts_that_do():
    """timm's no-trace leaves are parts too; when a leaf does not trace, its children are tried."""

    @register_notrace_module
    class Leaf(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())

        def forward(self, x):
            if x.shape[-1] % 2:  # python control flow on a traced shape: the leaf does not trace
                x = F.pad(x, (0, 1))
            return self.inner(x)

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Leaf())
    trace = trace_model(model)
    assert list(trace.parts) == ["", "1.inner"] and list(trace.failed) == ["1"]
    report = convert(model, "u", example_inputs=(3, 8, 8)).report
    assert [r.name for r in report.replaced] == ["0", "1.inner.0"] and report.tracing.method == "fx"
