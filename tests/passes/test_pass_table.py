"""Every pass over a set of real models, one table (HF optimum's ``_TRANSFORMATIONS_TO_TEST``):
the output shape stays, every record names a module that now exists with the class the pass
produces and the parameters it counted, every skip has a reason, the graph nodes carry their
record, the pass found the sites it should, and a pass that preserves the computation does."""

import pytest
import torch
from torch import nn

import bsconv_surgery as bs
from bsconv_surgery.fx.modules import param_count
from bsconv_surgery.layers import (
    BSConvS,
    BSConvS1d,
    BSConvU,
    BSConvU3d,
    DepthwiseAsStencil,
    PointwiseAsLinear,
    SubspaceProjection,
    SubspaceProjection1d,
)
from bsconv_surgery.core.options import SurgeryOptions
from bsconv_surgery.passes import BottleneckToBSConvS, ConvToBSConv, DSCToBSConvU, SurgeryContext
from bsconv_surgery.passes.base import SITE_KEY
from bsconv_surgery.passes.batchnorm import FoldBatchNorm
from bsconv_surgery.passes.lowering import LowerBSConv

from ..helpers import ToyNd, randomize_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


def _zoo(spec):
    return lambda: bs.load_model(spec)


def _converted(spec, variant, **options):
    return lambda: bs.convert(spec, variant, count=False, **options).model


# (id, pass, model, input size (an int: 3 x size x size), sites it finds at least, class of the module at
# each record's name)
PASSES_TO_TEST = [
    ("conv-u-cifar_resnet20", lambda: ConvToBSConv("u"), _zoo("cifar_resnet20"), 32, 19, BSConvU),
    ("conv-u-tv_resnet18", lambda: ConvToBSConv("u"), _zoo("torchvision:resnet18"), 64, 17, BSConvU),
    ("conv-s-cifar_resnet20", lambda: ConvToBSConv("s"), _zoo("cifar_resnet20"), 32, 19, BSConvS),
    ("conv-s-timm_mobilenetv2", lambda: ConvToBSConv("s"), _zoo("timm:mobilenetv2_100"), 32, 1, BSConvS),
    # 8 of MobileNetV1's 13 pairs: the other 5 change the channel count and would grow (the growth guard)
    ("dsc-timm_mobilenetv1", lambda: DSCToBSConvU(), _zoo("timm:mobilenetv1_100"), 32, 8, nn.Conv2d),
    ("dsc-cifar_resnet20", lambda: DSCToBSConvU(), _zoo("cifar_resnet20"), 32, 0, nn.Conv2d),
    ("bottleneck-timm_mobilenetv2", lambda: BottleneckToBSConvS(), _zoo("timm:mobilenetv2_100"), 32, 16,
     SubspaceProjection),
    ("bottleneck-cifar_mobilenetv2", lambda: BottleneckToBSConvS(), _zoo("cifar_mobilenetv2_050"), 32, 17,
     SubspaceProjection),
    ("fold-cifar_resnet20", lambda: FoldBatchNorm(), _zoo("cifar_resnet20"), 32, 21, nn.Conv2d),
    ("fold-tv_resnet18", lambda: FoldBatchNorm(), _zoo("torchvision:resnet18"), 64, 20, nn.Conv2d),
    ("fold-timm_mobilenetv2", lambda: FoldBatchNorm(), _zoo("timm:mobilenetv2_100"), 32, 52, nn.Conv2d),
    ("lower-cifar_resnet20-u", lambda: LowerBSConv(), _converted("cifar_resnet20", "u"), 32, 38,
     (PointwiseAsLinear, DepthwiseAsStencil)),
    ("lower-tv_resnet18-s", lambda: LowerBSConv(), _converted("torchvision:resnet18", "s", with_bn=True), 64, 51,
     (PointwiseAsLinear, DepthwiseAsStencil)),
    # 3-D (video) and 1-D convs
    ("conv-u-tv_r3d_18", lambda: ConvToBSConv("u"), _zoo("torchvision:r3d_18"), (3, 4, 16, 16), 17, BSConvU3d),
    ("fold-tv_r3d_18", lambda: FoldBatchNorm(), _zoo("torchvision:r3d_18"), (3, 4, 16, 16), 20, nn.Conv3d),
    ("conv-s-toy1d", lambda: ConvToBSConv("s"), lambda: ToyNd(1), (3, 32), 1, BSConvS1d),
    ("dsc-toy1d", lambda: DSCToBSConvU(), lambda: ToyNd(1), (3, 32), 2, nn.Conv1d),
    ("bottleneck-toy1d", lambda: BottleneckToBSConvS(), lambda: ToyNd(1), (3, 32), 1, SubspaceProjection1d),
    ("fold-toy1d", lambda: FoldBatchNorm(), lambda: ToyNd(1), (3, 32), 7, nn.Conv1d),
]


@pytest.mark.parametrize("make_pass,make_model,size,min_sites,produces", [case[1:] for case in PASSES_TO_TEST],
                         ids=[case[0] for case in PASSES_TO_TEST])
def test_pass(make_pass, make_model, size, min_sites, produces):
    surgery_pass = make_pass()
    model = randomize_batchnorm(make_model()).double().eval()
    size = (3, size, size) if isinstance(size, int) else size
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        before = model(x)

    ctx = SurgeryContext.for_model(model, SurgeryOptions())
    surgery_pass.transform(model, ctx)

    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape
    assert len(ctx.replaced) >= min_sites, f"{type(surgery_pass).__name__} found {len(ctx.replaced)} sites, expected {min_sites}+"
    nodes = ctx.trace.nodes_by_module()
    for record in ctx.replaced:
        assert record.kind == surgery_pass.kind
        assert isinstance(model.get_submodule(record.name), produces), (record.name, type(model.get_submodule(record.name)))
        swapped = [model.get_submodule(name) for name in record.module_names]  # each name exists in the model
        assert record.params_after == sum(param_count(m) for m in swapped), record.name
        if nodes.get(record.name):  # graph passes: the nodes that call the site carry its record
            assert any(node.meta.get(SITE_KEY) is record for node in nodes[record.name]), record.name
    for skip in ctx.skipped:
        assert skip.kind == surgery_pass.kind and skip.reason.strip(), skip
    if surgery_pass.preserves_computation:
        assert torch.allclose(after, before, rtol=1e-9, atol=1e-9), float((after - before).abs().max())
