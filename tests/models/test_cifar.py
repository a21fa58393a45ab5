"""The paper's CIFAR reference architectures: timm registration, layouts, parameter counts."""

import pytest
import timm
import torch
from torch import nn

import bsconv_surgery  # noqa: F401  (registers the CIFAR models)
from bsconv_surgery.models import parse_model_spec
from bsconv_surgery.models.cifar import CIFAR_MODELS

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_architecture_is_registered_in_timm():
    families = {"cifar_resnet20", "cifar_resnet56", "cifar_resnet110", "cifar_resnet302",
                "cifar_wrn16_4", "cifar_wrn28_10", "cifar_wrn40_3", "cifar_wrn40_8",
                "cifar_mobilenetv1_025", "cifar_mobilenetv1_100", "cifar_mobilenetv2_050", "cifar_mobilenetv2_100",
                "cifar_mobilenetv3_small_035", "cifar_mobilenetv3_small_100", "cifar_mobilenetv3_large_100"}
    assert families <= set(CIFAR_MODELS)
    for name in CIFAR_MODELS:
        assert timm.is_model(name), name
    assert set(timm.list_models("cifar_*")) >= set(CIFAR_MODELS)
    # a bare name resolves through timm first
    assert str(parse_model_spec("cifar_resnet110")) == "timm:cifar_resnet110"


def test_create_model_and_pretrained_cfg():
    model = timm.create_model("cifar_resnet20", num_classes=10)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32)
    assert cfg["num_classes"] == 10
    assert not cfg.get("url") and not cfg.get("hf_hub_id")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert timm.create_model("cifar_resnet20").num_classes == 10  # the cfg's default


@pytest.mark.parametrize("name,classes,params", [
    ("cifar_resnet20", 10, 272_480),
    ("cifar_resnet20", 100, 278_330),
    ("cifar_wrn40_3", 10, 5_038_560),
    ("cifar_wrn16_4", 10, 2_748_896),
    ("cifar_mobilenetv2_100", 10, 2_237_776),
])
def test_parameter_counts_of_the_originals(name, classes, params):
    """NOTES.md's table, which includes the 6-parameter input BatchNorm (``data_bn``)."""
    model = timm.create_model(name, num_classes=classes)
    assert n_params(model) == params
    assert n_params(timm.create_model(name, num_classes=classes, data_bn=False)) == params - 6


def test_resnet20_layout():
    model = timm.create_model("cifar_resnet20")
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    three = [n for n, m in convs.items() if m.kernel_size == (3, 3)]
    one = [n for n, m in convs.items() if m.kernel_size == (1, 1)]
    assert len(three) == 19 and three[0] == "stem.conv"  # stem + 3 stages x 3 blocks x 2 convs
    assert one == ["stages.1.0.shortcut.0", "stages.2.0.shortcut.0"]  # projections where the shape changes
    assert isinstance(model.stages[1][0].shortcut[1], nn.BatchNorm2d)  # 1x1 conv + BN shortcut
    assert all(m.bias is None for m in convs.values())
    assert [m.out_channels for m in convs.values()][-1] == 64
    assert isinstance(model.data_bn, nn.BatchNorm2d) and model.data_bn.affine


def test_wide_resnet_is_pre_activation():
    model = timm.create_model("cifar_wrn16_4")
    assert isinstance(model.stem.bn, nn.Identity) and isinstance(model.stem.act, nn.Identity)
    block = model.stages[0][0]
    assert [n for n, _ in block.named_children()][:2] == ["bn1", "act1"]  # BN-ReLU before the conv
    assert block.conv1.in_channels == 16 and block.conv1.out_channels == 64
    assert isinstance(block.shortcut, nn.Conv2d)  # 1x1 conv projection, no BN
    assert isinstance(model.final[0], nn.BatchNorm2d)  # the final BN-ReLU of a pre-activation net
    assert [len(s) for s in model.stages] == [2, 2, 2]
    assert [len(s) for s in timm.create_model("cifar_wrn40_3").stages] == [6, 6, 6]


@pytest.mark.parametrize("name,final", [
    ("cifar_resnet20", (64, 8, 8)),
    ("cifar_wrn16_4", (256, 8, 8)),
    ("cifar_mobilenetv1_050", (512, 4, 4)),
    ("cifar_mobilenetv2_050", (1280, 4, 4)),
    ("cifar_mobilenetv3_small_050", (576, 4, 4)),
    ("cifar_mobilenetv3_large_035", (960, 4, 4)),
])
def test_feature_maps_at_32x32(name, final):
    """MobileNets lose their first two downsamplings: 32x32 input, 4x4 final feature map."""
    model = timm.create_model(name).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 32, 32))
        logits = model(torch.randn(1, 3, 32, 32))
    assert tuple(feats.shape[1:]) == final
    assert logits.shape == (1, 10)
    assert tuple(model.pretrained_cfg["pool_size"]) == final[1:]


def test_features_only_and_reset_classifier():
    model = timm.create_model("cifar_mobilenetv3_small_100", features_only=True)
    outs = model(torch.randn(1, 3, 32, 32))
    assert [o.shape[-1] for o in outs] == [32, 32, 16, 8, 4]
    assert model.feature_info.channels() == [o.shape[1] for o in outs]
    net = timm.create_model("cifar_mobilenetv3_large_100")
    assert net.num_features == 960 and net.head_hidden_size == 1280
    net.reset_classifier(7)
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert net.get_classifier().in_features == 1280


def test_width_multipliers_scale_channels():
    full, half = timm.create_model("cifar_mobilenetv1_100"), timm.create_model("cifar_mobilenetv1_050")
    assert half.stem.conv.out_channels == full.stem.conv.out_channels // 2
    assert half.num_features == 512 and full.num_features == 1024
    # MobileNetV2 keeps its 1280-channel head below width 1
    assert timm.create_model("cifar_mobilenetv2_025").num_features == 1280


