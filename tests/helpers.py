"""Models and helpers the tests share (test modules import from here, never from each other)."""

import json
import os
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import Conv2dSame
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from bsconv_surgery import BSConvU
from bsconv_surgery.models.cifar import CifarResNet

#: ``train`` arguments for a run of seconds: timm's 70K-parameter test ResNet on 8x8 digits, 3 steps
#: of 16 per epoch.
TINY = ["digits-demo", "--model", "timm:test_resnet", "--set", "data.image_size=8", "--set", "data.batch_size=16",
        "--set", "max_steps_per_epoch=3", "--set", "epochs=2"]
#: The same, converted on the fly to BSConv-S (10 regularised sites).
TINY_S = TINY + ["--set", "surgery.variant=s"]


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics.

    timm ResNets zero-initialise the last BN gamma of each residual block, so at random init a
    residual branch outputs zero and an equivalence test on it passes trivially (NOTES.md).
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


def standard_convs(model: nn.Module, kernel=None):
    """Names of standard (groups 1, kernel > 1) ``nn.Conv2d`` modules, optionally of one kernel."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1 and tuple(m.kernel_size) != (1, 1):
            if kernel is None or tuple(m.kernel_size) == kernel:
                out.append(name)
    return out


class RankOneZoo(nn.Module):
    """Convs of every flavour the pass must carry over: stride, dilation, string padding,
    padding mode, bias, timm's dynamic 'same' padding, a rectangular kernel."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.c = nn.Conv2d(8, 12, 3, padding="same", padding_mode="reflect")
        self.d = Conv2dSame(12, 12, 3, stride=2, bias=True)
        self.e = nn.Conv2d(12, 6, (1, 5), padding=(0, 2), padding_mode="circular")

    def forward(self, x):
        return self.e(F.relu(self.d(self.c(F.relu(self.b(self.a(x)))))))


def make_rank_one_(conv: nn.Conv2d, gen):
    n, m, kh, kw = conv.weight.shape
    w = torch.randn(n, m, generator=gen, dtype=torch.float64)
    b = torch.randn(n, kh, kw, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(w[:, :, None, None] * b[:, None])
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(n, generator=gen))
    return w, b


def rank_one_cifar_resnet20(path, seed=0):
    """A cifar_resnet20 checkpoint whose 3x3 filters are rank-1, BatchNorms randomised."""
    gen = torch.Generator().manual_seed(seed)
    model = randomize_batchnorm(timm.create_model("cifar_resnet20"), seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            make_rank_one_(m, gen)
    torch.save(model.state_dict(), path)
    return model


class DSC(nn.Module):
    """dw -> [between] -> pw -> bn -> relu, with knobs for the guards."""

    def __init__(self, m=6, n=10, k=(5, 3), stride=2, between=None, dw_bias=True, pw_bias=True,
                 padding_mode="reflect", dilation=1, dw_cls=nn.Conv2d):
        super().__init__()
        kw = {} if dw_cls is not nn.Conv2d else {"padding_mode": padding_mode}
        pad = (k[0] // 2 * dilation, k[1] // 2 * dilation) if dw_cls is nn.Conv2d else 0
        self.dw = dw_cls(m, m, k, stride, pad, dilation, groups=m, bias=dw_bias, **kw)
        self.between = nn.Sequential(*(between if between is not None else [nn.GroupNorm(2, m), nn.SiLU()]))
        self.pw = nn.Conv2d(m, n, 1, bias=pw_bias)
        self.bn = nn.BatchNorm2d(n)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.pw(self.between(self.dw(x)))))


class SE(nn.Module):
    """Squeeze-excite: ``x * sigmoid(expand(relu(reduce(mean(x)))))``, a gate computed from ``x``."""

    def __init__(self, c, reduced=4):
        super().__init__()
        self.reduce = nn.Conv2d(c, reduced, 1)
        self.expand = nn.Conv2d(reduced, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


BN = nn.modules.batchnorm._BatchNorm


def batchnorms(model):
    return [n for n, m in model.named_modules() if isinstance(m, BN)]


def outputs(model, x):
    with torch.no_grad():
        return model(x)


class Blocks(nn.Module):
    """Every pattern the fold must handle: standard conv -> BN, pointwise -> BN, depthwise -> BN
    (with and without conv bias, affine and non-affine BN) and a BSConvU with its inner BN."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(16, affine=False)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.bsconv = BSConvU(16, 24, 3, padding=1, with_bn=True)
        self.bn3 = nn.BatchNorm2d(24)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = self.bn1(self.pw(x))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.bn3(self.bsconv(x))


def json_output(result) -> dict:
    """The one JSON object a successful ``--json`` command printed on stdout."""
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def metrics(out):
    """The rows of a run folder's ``metrics.jsonl``."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class ToyNd(nn.Module):
    """A small net of ``dims``-d convs (``nn.Conv1d`` / ``nn.Conv3d``): a standard stem conv with a
    bias, a depthwise-separable pair ``dw -> BN -> ReLU -> pw``, an inverted residual (expand ->
    dw -> project, linear, residual add) and the next expansion, then a classifier. ``image_input``:
    it takes a ``(B, 3, H, W)`` image and reshapes it (1-D: ``H*W`` samples; 3-D: ``H`` split
    into 4 frames), so it can be registered in timm and saved/loaded by spec."""

    def __init__(self, dims=1, num_classes=5, image_input=False, **_):
        super().__init__()
        conv, norm = CONV[dims], NORM[dims]
        self.dims, self.image_input, self.num_classes = dims, image_input, num_classes
        self.stem = conv(3, 16, 5, stride=2, padding=2, bias=True)
        self.bn0 = norm(16)
        self.dw1 = conv(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn1 = norm(16)
        self.act1 = nn.ReLU()
        self.pw1 = conv(16, 24, 1, bias=False)
        self.bn2 = norm(24)
        self.expand = conv(24, 72, 1, bias=False)
        self.bn3 = norm(72)
        self.act3 = nn.ReLU6()
        self.dw2 = conv(72, 72, 3, padding=1, groups=72, bias=False)
        self.bn4 = norm(72)
        self.act4 = nn.ReLU6()
        self.project = conv(72, 24, 1, bias=False)
        self.bn5 = norm(24)
        self.next = conv(24, 48, 1, bias=False)
        self.bn6 = norm(48)
        self.head = nn.Linear(48, num_classes)

    def _to_nd(self, x):
        b, c, h, w = x.shape
        return x.reshape(b, c, h * w) if self.dims == 1 else x.reshape(b, c, 4, h // 4, w) if self.dims == 3 else x

    def forward(self, x):
        if self.image_input:
            x = self._to_nd(x)
        x = torch.relu(self.bn0(self.stem(x)))
        x = self.bn2(self.pw1(self.act1(self.bn1(self.dw1(x)))))
        y = self.bn5(self.project(self.act4(self.bn4(self.dw2(self.act3(self.bn3(self.expand(x))))))))
        x = torch.relu(self.bn6(self.next(x + y)))
        return self.head(x.flatten(2).mean(2))


def register_toy_models():
    """``timm:toy_bsconv_1d`` and ``timm:toy_bsconv_3d`` (image input), for save/load by spec."""
    for dims in (1, 3):
        name = f"toy_bsconv_{dims}d"
        if not timm.is_model(name):
            def make(pretrained=False, _dims=dims, **kwargs):
                model = ToyNd(_dims, image_input=True, num_classes=kwargs.get("num_classes", 5))
                model.pretrained_cfg = {"input_size": (3, 16, 16)}
                return model
            make.__name__ = name
            make.__module__ = __name__
            register_model(make)


# -- published weights, offline: caches the tests fill themselves ------------------------------------

#: The hub revision the tests' Hugging Face caches hold (``refs/main`` names it).
HF_REVISION = "0123456789abcdef0123456789abcdef01234567"


def random_state(model: nn.Module, seed: int = 0) -> dict:
    """A state dict for ``model`` with every float tensor random (BatchNorm variances positive):
    weights no constructor would produce, so a test can tell them apart from any init."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            value = torch.randn(value.shape, generator=gen, dtype=value.dtype) * 0.2
            if key.endswith("running_var"):
                value = value.abs() + 0.5
        out[key] = value.clone().contiguous()
    return out


def fill_hf_cache(hf_home, hub_id: str, state: dict, filename: str = "model.safetensors", revision: str = HF_REVISION):
    """Put ``state`` where the Hugging Face hub cache keeps ``hub_id``: ``HF_HOME/hub/models--ORG--NAME/
    snapshots/REVISION/FILE`` and ``refs/main`` (what ``hf download`` leaves); returns the file."""
    root = Path(hf_home) / "hub" / ("models--" + hub_id.replace("/", "--"))
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    path = snapshot / filename
    if filename.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def fill_torch_cache(torch_home, url: str, state: dict):
    """Put ``state`` where torch hub keeps the file of ``url``: ``TORCH_HOME/hub/checkpoints/<file name>``."""
    path = Path(torch_home) / "hub" / "checkpoints" / os.path.basename(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def bsconv_kernel(module) -> torch.Tensor:
    """The full ``N x M x K x K`` kernel a ``BSConvU`` computes: ``pw[n, m] * dw[n]``."""
    pw, dw = module.pw.weight, module.dw.weight
    return pw[:, :, 0, 0, None, None] * dw


class OneChannel(nn.Module):
    """An audio-style front end: a 3x3 conv with one input channel (BSConv-U would add ``N``
    weights: ``N + N K^2 > N K^2``), then a 3x3 conv that shrinks, a patchify 4x4/4 conv (its
    pointwise step would run before the stride: more MACs) and a classifier."""

    def __init__(self, num_classes: int = 5, **_):
        super().__init__()
        self.num_classes = num_classes
        self.front = nn.Conv2d(1, 32, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(32)
        self.conv = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.patch = nn.Conv2d(32, 48, 4, stride=4, bias=True)
        self.head = nn.Linear(48, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.front(x)))
        x = torch.relu(self.patch(torch.relu(self.conv(x))))
        return self.head(x.mean((2, 3)))


#: ``pretrained_cfg``s of the timm models the tests register: a digits ResNet-20 whose published
#: weights (``timm/digits_resnet20_test.digits`` on the hub: a cache the tests fill) have 10 classes.
default_cfgs = {}


def register_test_zoo():
    """``timm:toy_one_channel`` (input 1x16x16) and ``timm:digits_resnet20_test.digits``: a CIFAR
    ResNet-20 registered with a pretrained tag whose weights live on the hub (``hf_hub_id``) and
    predict 10 classes, as a zoo model trained on the digits would."""
    if not timm.is_model("toy_one_channel"):
        def toy_one_channel(pretrained=False, **kwargs):
            model = OneChannel(num_classes=kwargs.get("num_classes", 5))
            model.pretrained_cfg = {"input_size": (1, 16, 16)}
            return model
        toy_one_channel.__module__ = __name__
        register_model(toy_one_channel)
    if not timm.is_model("digits_resnet20_test"):
        default_cfgs.update(generate_default_cfgs({"digits_resnet20_test.digits": {
            "hf_hub_id": "timm/", "num_classes": 10, "input_size": (3, 8, 8), "classifier": "fc",
            "first_conv": "stem.conv", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}}))

        def digits_resnet20_test(pretrained=False, **kwargs):
            return build_model_with_cfg(CifarResNet, "digits_resnet20_test", pretrained, layers=(3, 3, 3), **kwargs)
        digits_resnet20_test.__module__ = __name__
        register_model(digits_resnet20_test)


class SmallNet(nn.Module):
    """Four 3x3 conv -> BatchNorm -> ReLU blocks and a linear head: a tiny classifier with several
    candidate sites of different sizes (sensitivity, budgets, recalibration, distillation)."""

    def __init__(self, classes=5, widths=(8, 12, 16, 16), seed=0):
        super().__init__()
        layers, c = [], 3
        with torch.random.fork_rng(devices=[]):  # the same weights in every test, the global RNG untouched
            torch.manual_seed(seed)
            for i, w in enumerate(widths):
                layers += [nn.Conv2d(c, w, 3, stride=2 if i == 2 else 1, padding=1, bias=False), nn.BatchNorm2d(w),
                           nn.ReLU()]
                c = w
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class TwoHeads(nn.Module):
    """An MTCNN-like detector: ``(box regression, face probability)``, the softmax inside the net."""

    def __init__(self, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(8), nn.Conv2d(8, 12, 3, padding=1),
                                      nn.PReLU(12), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.box = nn.Linear(12, 4)
            self.face = nn.Linear(12, 2)

    def forward(self, x):
        h = self.body(x)
        return self.box(h), torch.softmax(self.face(h), dim=1)


def random_batches(n=4, size=(3, 12, 12), batch=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *size, generator=gen) for _ in range(n)]
