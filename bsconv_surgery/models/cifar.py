"""The BSConv paper's CIFAR reference architectures (section 5.1), registered in timm.

Importing ``bsconv_surgery`` registers these names in timm's model registry, so
``timm.create_model("cifar_resnet20", num_classes=10)`` and
``bsconv-surgery convert cifar_resnet110 --variant u`` work. Each is a *standard* model: the
BSConv versions come from the surgery (``bsconv_surgery.convert``), never from here.

- ``cifar_resnet{20,56,110,302}``: post-activation ResNets with basic blocks of 16/32/64
  channels, a 3x3 conv + BN + ReLU stem and 1x1 conv + BN projection shortcuts wherever the
  shape changes.
- ``cifar_wrn{16,28,40}_{k}``: pre-activation wide ResNets (depth ``6n + 4``, widths 16k/32k/64k
  after a plain 3x3 stem conv of 16 channels, 1x1 conv projection shortcuts, final BN + ReLU).
- ``cifar_mobilenetv1_*``, ``cifar_mobilenetv2_*``, ``cifar_mobilenetv3_{small,large}_*``:
  MobileNets with the first two downsamplings removed (32x32 input, 4x4 final feature map), width
  multipliers applied as ``int(channels * w)``.

All of them start with an affine BatchNorm on the input channels (``data_bn``, 6 parameters
for RGB) as the reference implementation does, so parameter counts equal NOTES.md's table
as printed; ``data_bn=False`` drops it (6 parameters fewer). Convs carry no bias; the classifier
is an ``nn.Linear`` with bias (the reference's 1x1 conv classifier has the same parameters and
MACs). Activations match the reference: ReLU (ResNets, MobileNetV1), ReLU6 (MobileNetV2), ReLU
or hard-swish per stage (MobileNetV3).
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = [
    "CifarResNet",
    "CifarMobileNetV1",
    "CifarMobileNetV2",
    "CifarMobileNetV3",
    "CIFAR_MODELS",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------


def _act(name: Optional[str]) -> nn.Module:
    if name is None:
        return nn.Identity()
    return {"relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": nn.Hardswish}[name](inplace=True)


class ConvNormAct(nn.Module):
    """``conv`` (no bias) -> ``bn`` -> ``act``; ``norm=False`` / ``act=None`` make those identities."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 norm: bool = True, act: Optional[str] = "relu"):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs) if norm else nn.Identity()
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """Post-activation basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN, add, ReLU; 1x1 conv + BN shortcut
    when the shape changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))
        else:
            self.shortcut = nn.Identity()
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class PreActBlock(nn.Module):
    """Pre-activation basic block (wide ResNet): BN-ReLU, 3x3 conv, BN-ReLU, 3x3 conv, add. A 1x1
    conv shortcut (no BN) reads the pre-activated input when the shape changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride, bias=False) if stride != 1 or in_chs != out_chs else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        x = self.conv1(pre)
        x = self.conv2(self.act2(self.bn2(x)))
        return x + shortcut


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 block: 3x3 depthwise-BN-ReLU, then 1x1 pointwise-BN-ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(in_chs, in_chs, 3, stride, 1, groups=in_chs, bias=False)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv_dw(x)))
        return self.act2(self.bn2(self.conv_pw(x)))


class SqueezeExcite(nn.Module):
    """MobileNetV3 squeeze-excite: pool, 1x1 conv (bias) -> ReLU -> 1x1 conv (bias) -> hard sigmoid."""

    def __init__(self, chs: int, reduction: int = 4):
        super().__init__()
        rd = max(1, chs // reduction)
        self.conv_reduce = nn.Conv2d(chs, rd, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(rd, chs, 1, bias=True)
        self.gate = nn.Hardsigmoid(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.conv_expand(self.act1(self.conv_reduce(s)))
        return x * self.gate(s)


class InvertedResidual(nn.Module):
    """Linear bottleneck: 1x1 expand-BN-act, KxK depthwise-BN-act [-> SE], 1x1 linear projection-BN;
    residual add when stride 1 and channels match. The expansion is always present (also at
    expansion ratio 1), as in the reference implementation."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, stride: int, kernel_size: int = 3,
                 act: str = "relu6", se: bool = False):
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.act1 = _act(act)
        self.conv_dw = nn.Conv2d(mid_chs, mid_chs, kernel_size, stride, kernel_size // 2, groups=mid_chs, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.act2 = _act(act)
        self.se = SqueezeExcite(mid_chs) if se else nn.Identity()
        self.conv_pwl = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv_pw(x)))
        out = self.se(self.act2(self.bn2(self.conv_dw(out))))
        out = self.bn3(self.conv_pwl(out))
        return out + x if self.has_skip else out


# ---------------------------------------------------------------------------------------------
# shared model plumbing (timm conventions: forward_features / forward_head / classifier access)
# ---------------------------------------------------------------------------------------------


class _CifarNet(nn.Module):
    """``data_bn`` -> ``stem`` -> ``stages`` -> ``final`` -> pool -> ``head_drop`` -> ``fc``."""

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float,
                   head_hidden_size: Optional[int] = None) -> None:
        self.num_classes = num_classes
        self.num_features = num_features
        self.head_hidden_size = head_hidden_size or num_features
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"{type(self).__name__} supports global_pool='avg' only, not {global_pool!r}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.data_bn(x))
        x = self.stages(x)
        return self.final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.flatten(self.global_pool(x)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _data_bn(in_chans: int, enabled: bool) -> nn.Module:
    return nn.BatchNorm2d(in_chans) if enabled else nn.Identity()


def _stages(blocks: List[List[nn.Module]]) -> nn.Sequential:
    return nn.Sequential(*[nn.Sequential(*stage) for stage in blocks])


# ---------------------------------------------------------------------------------------------
# ResNets and wide ResNets
# ---------------------------------------------------------------------------------------------


class CifarResNet(_CifarNet):
    """CIFAR ResNet (``preact=False``: basic blocks, conv-BN-ReLU stem) or pre-activation wide
    ResNet (``preact=True``: plain conv stem, pre-activation blocks, final BN-ReLU).

    ``layers`` blocks per stage, ``widths`` channels per stage; the first block of stages 2 and
    3 has stride 2 (32 -> 16 -> 8).
    """

    def __init__(self, layers: Sequence[int] = (3, 3, 3), widths: Sequence[int] = (16, 32, 64), stem_width: int = 16,
                 preact: bool = False, num_classes: int = 10, in_chans: int = 3, data_bn: bool = True,
                 drop_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"CifarResNet supports global_pool='avg' only, not {global_pool!r}")
        self.data_bn = _data_bn(in_chans, data_bn)
        self.stem = ConvNormAct(in_chans, stem_width, 3, norm=not preact, act=None if preact else "relu")
        block = PreActBlock if preact else BasicBlock
        chs, blocks, self.feature_info = stem_width, [], [dict(num_chs=stem_width, reduction=1, module="stem")]
        for i, (depth, width) in enumerate(zip(layers, widths)):
            stage = []
            for j in range(depth):
                stage.append(block(chs, width, 2 if (j == 0 and i > 0) else 1))
                chs = width
            blocks.append(stage)
            self.feature_info.append(dict(num_chs=width, reduction=2 ** i, module=f"stages.{i}"))
        self.stages = _stages(blocks)
        self.final = nn.Sequential(nn.BatchNorm2d(chs), nn.ReLU(inplace=True)) if preact else nn.Identity()
        self._init_head(chs, num_classes, drop_rate)
        self._init_weights()


# ---------------------------------------------------------------------------------------------
# MobileNets (first two downsamplings removed for 32x32 input)
# ---------------------------------------------------------------------------------------------


def _scale(chs: int, w: float) -> int:
    return int(chs * w)


def _stage_feature_info(stem_chs: int, stage_chs: Sequence[int], strides: Sequence[int]) -> List[dict]:
    info, reduction = [dict(num_chs=stem_chs, reduction=1, module="stem")], 1
    for i, (chs, stride) in enumerate(zip(stage_chs, strides)):
        reduction *= stride
        info.append(dict(num_chs=chs, reduction=reduction, module=f"stages.{i}"))
    return info


class CifarMobileNetV1(_CifarNet):
    """MobileNetV1 for 32x32: stem stride 1 and stage strides 1, 1, 2, 2, 2 (ImageNet: 2 and 1, 2, 2, 2, 2)."""

    STAGES = ((64,), (128, 128), (256, 256), (512,) * 6, (1024, 1024))
    STRIDES = (1, 1, 2, 2, 2)

    def __init__(self, width: float = 1.0, num_classes: int = 10, in_chans: int = 3, data_bn: bool = True,
                 drop_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        stem_chs = _scale(32, width)
        self.data_bn = _data_bn(in_chans, data_bn)
        self.stem = ConvNormAct(in_chans, stem_chs, 3, act="relu")
        chs, blocks = stem_chs, []
        for stage_chs, stride in zip(self.STAGES, self.STRIDES):
            stage = []
            for j, out in enumerate(stage_chs):
                stage.append(DepthwiseSeparable(chs, _scale(out, width), stride if j == 0 else 1))
                chs = _scale(out, width)
            blocks.append(stage)
        self.stages = _stages(blocks)
        self.feature_info = _stage_feature_info(stem_chs, [_scale(s[-1], width) for s in self.STAGES], self.STRIDES)
        self.final = nn.Identity()
        self._init_head(chs, num_classes, drop_rate)
        self._init_weights()


class CifarMobileNetV2(_CifarNet):
    """MobileNetV2 for 32x32: stem stride 1, stage strides 1, 1, 2, 2, 2; final 1x1 conv to 1280
    channels (scaled only for width > 1)."""

    STAGES = ((16,), (24, 24), (32, 32, 32), (64, 64, 64, 64, 96, 96, 96), (160, 160, 160, 320))
    MID = ((32,), (96, 144), (144, 192, 192), (192, 384, 384, 384, 384, 576, 576), (576, 960, 960, 960))
    STRIDES = (1, 1, 2, 2, 2)

    def __init__(self, width: float = 1.0, num_classes: int = 10, in_chans: int = 3, data_bn: bool = True,
                 drop_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        stem_chs = _scale(32, width)
        head_chs = _scale(1280, width) if width > 1.0 else 1280
        self.data_bn = _data_bn(in_chans, data_bn)
        self.stem = ConvNormAct(in_chans, stem_chs, 3, act="relu6")
        chs, blocks = stem_chs, []
        for stage_chs, stage_mid, stride in zip(self.STAGES, self.MID, self.STRIDES):
            stage = []
            for j, (out, mid) in enumerate(zip(stage_chs, stage_mid)):
                stage.append(InvertedResidual(chs, _scale(mid, width), _scale(out, width), stride if j == 0 else 1))
                chs = _scale(out, width)
            blocks.append(stage)
        self.stages = _stages(blocks)
        self.feature_info = _stage_feature_info(stem_chs, [_scale(s[-1], width) for s in self.STAGES], self.STRIDES)
        self.final = ConvNormAct(chs, head_chs, 1, act="relu6")
        self._init_head(head_chs, num_classes, drop_rate)
        self._init_weights()


_V3_CONFIGS: Dict[str, dict] = {
    "small": dict(
        stages=((16,), (24, 24), (40, 40, 40, 48, 48), (96, 96, 96)),
        mid=((16,), (72, 88), (96, 240, 240, 120, 144), (288, 576, 576)),
        strides=(1, 2, 2, 2),
        kernels=(3, 3, 5, 5),
        acts=("relu", "relu", "hswish", "hswish"),
        se=((1,), (0, 0), (1, 1, 1, 1, 1), (1, 1, 1)),
        final=(576, 1024),
        final_se=True,
    ),
    "large": dict(
        stages=((16,), (24, 24), (40, 40, 40), (80, 80, 80, 80, 112, 112), (160, 160, 160)),
        mid=((16,), (64, 72), (72, 120, 120), (240, 200, 184, 184, 480, 672), (672, 960, 960)),
        strides=(1, 1, 2, 2, 2),
        kernels=(3, 3, 5, 3, 5),
        acts=("relu", "relu", "relu", "hswish", "hswish"),
        se=((0,), (0, 0), (1, 1, 1), (0, 0, 0, 0, 1, 1), (1, 1, 1)),
        final=(960, 1280),
        final_se=False,
    ),
}


class CifarMobileNetV3(_CifarNet):
    """MobileNetV3 small/large for 32x32: stem stride 1 and the first stage stride(s) 1 (small:
    1, 2, 2, 2; large: 1, 1, 2, 2, 2). ``final``: 1x1 conv-BN-hswish [-> SE]; after pooling a 1x1
    conv (no BN) with hswish widens to 1024/1280 before the classifier."""

    def __init__(self, version: str = "large", width: float = 1.0, num_classes: int = 10, in_chans: int = 3,
                 data_bn: bool = True, drop_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        cfg = _V3_CONFIGS[version]
        stem_chs = _scale(16, width)
        final_chs = _scale(cfg["final"][0], width) if width > 1.0 else cfg["final"][0]
        self.data_bn = _data_bn(in_chans, data_bn)
        self.stem = ConvNormAct(in_chans, stem_chs, 3, act="hswish")
        chs, blocks = stem_chs, []
        for i, stride in enumerate(cfg["strides"]):
            stage = []
            for j, (out, mid, se) in enumerate(zip(cfg["stages"][i], cfg["mid"][i], cfg["se"][i])):
                stage.append(InvertedResidual(chs, _scale(mid, width), _scale(out, width), stride if j == 0 else 1,
                                              cfg["kernels"][i], cfg["acts"][i], bool(se)))
                chs = _scale(out, width)
            blocks.append(stage)
        self.stages = _stages(blocks)
        self.feature_info = _stage_feature_info(stem_chs, [_scale(s[-1], width) for s in cfg["stages"]], cfg["strides"])
        final = [ConvNormAct(chs, final_chs, 1, act="hswish")]
        if cfg["final_se"]:
            final.append(SqueezeExcite(final_chs))
        self.final = nn.Sequential(*final)
        # after pooling, a 1x1 conv (no BN) widens the features before the classifier
        self.conv_head = nn.Conv2d(final_chs, cfg["final"][1], 1, bias=False)
        self.act_head = nn.Hardswish(inplace=True)
        self._init_head(final_chs, num_classes, drop_rate, head_hidden_size=cfg["final"][1])
        self._init_weights()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.act_head(self.conv_head(self.global_pool(x)))
        x = self.head_drop(self.flatten(x))
        return x if pre_logits else self.fc(x)


# ---------------------------------------------------------------------------------------------
# timm registration
# ---------------------------------------------------------------------------------------------

_RESNET_DEPTHS = {20: 3, 56: 9, 110: 18, 302: 50}
_WRN_DEPTHS = {16: 2, 28: 4, 40: 6}
_WRN_WIDTHS = (1, 2, 3, 4, 6, 8, 10)
_MOBILENET_WIDTHS = {"v1": (0.25, 0.5, 0.75, 1.0), "v2": (0.25, 0.5, 0.75, 1.0), "v3": (0.35, 0.5, 0.75, 1.0)}


class _Entry(NamedTuple):
    cls: Callable[..., nn.Module]
    args: dict
    stages: int  # feature stages after the stem
    pool: int  # final feature map size at 32x32
    doc: str


def _cfg(entry: _Entry) -> dict:
    return dict(
        url="", num_classes=10, input_size=(3, 32, 32), pool_size=(entry.pool, entry.pool), crop_pct=1.0,
        interpolation="bilinear", mean=CIFAR10_MEAN, std=CIFAR10_STD, first_conv="stem.conv",
        classifier="fc", license="mit",
    )


def _width_tag(w: float) -> str:
    return f"{int(round(w * 100)):03d}"


def _model_table() -> Dict[str, _Entry]:
    table = {}
    for depth, n in _RESNET_DEPTHS.items():
        table[f"cifar_resnet{depth}"] = _Entry(
            CifarResNet, dict(layers=(n, n, n)), 3, 8,
            f"CIFAR ResNet-{depth}: {n} basic blocks per stage, 16/32/64 channels, 1x1 conv + BN projection shortcuts.",
        )
    for depth, n in _WRN_DEPTHS.items():
        for k in _WRN_WIDTHS:
            table[f"cifar_wrn{depth}_{k}"] = _Entry(
                CifarResNet, dict(layers=(n, n, n), widths=(16 * k, 32 * k, 64 * k), preact=True), 3, 8,
                f"CIFAR wide ResNet WRN-{depth}-{k}: pre-activation, {n} blocks per stage, {16 * k}/{32 * k}/{64 * k} channels.",
            )
    for w in _MOBILENET_WIDTHS["v1"]:
        table[f"cifar_mobilenetv1_{_width_tag(w)}"] = _Entry(
            CifarMobileNetV1, dict(width=w), 5, 4, f"CIFAR MobileNetV1 x{w}: first two downsamplings removed.",
        )
    for w in _MOBILENET_WIDTHS["v2"]:
        table[f"cifar_mobilenetv2_{_width_tag(w)}"] = _Entry(
            CifarMobileNetV2, dict(width=w), 5, 4, f"CIFAR MobileNetV2 x{w}: first two downsamplings removed.",
        )
    for version in ("small", "large"):
        for w in _MOBILENET_WIDTHS["v3"]:
            table[f"cifar_mobilenetv3_{version}_{_width_tag(w)}"] = _Entry(
                CifarMobileNetV3, dict(version=version, width=w), len(_V3_CONFIGS[version]["strides"]), 4,
                f"CIFAR MobileNetV3-{version} x{w}: first two downsamplings removed.",
            )
    return table


_MODELS = _model_table()

#: Registered model names, in a stable order.
CIFAR_MODELS: Tuple[str, ...] = tuple(_MODELS)

default_cfgs = generate_default_cfgs({name: _cfg(entry) for name, entry in _MODELS.items()})


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    entry = _MODELS[name]
    feature_cfg = dict(flatten_sequential=True, out_indices=tuple(range(entry.stages + 1)))  # stem + stages

    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return build_model_with_cfg(
            entry.cls, name, pretrained, feature_cfg=dict(feature_cfg), **dict(entry.args, **kwargs)
        )

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = entry.doc
    return entrypoint


for _name in CIFAR_MODELS:
    globals()[_name] = register_model(_entrypoint(_name))
del _name
