"""The orthonormal regulariser (paper eq. 9, issue 3 item 4): hand-computed values, zero on
orthonormal rows, and the same sites and value on the bare model, under
DistributedDataParallel, after torch.compile and after load_converted."""

import json
import math
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bsconv_surgery import BSConvS, SubspaceProjection, convert, load_converted, load_model, regularization_loss
from bsconv_surgery.layers.regularization import regularization_sites


def _projection(weight: torch.Tensor) -> SubspaceProjection:
    out, inp = weight.shape
    proj = SubspaceProjection(inp, out, 1, bias=False)
    with torch.no_grad():
        proj.weight.copy_(weight.reshape(out, inp, 1, 1))
    return proj


def test_hand_computed_example():
    # W = [[1, 2], [0, 1]]: W W^T - I = [[4, 2], [2, 0]], Frobenius norm sqrt(16 + 4 + 4) = sqrt(24)
    # W = [[1, 0, 1], [0, 2, 0]]: W W^T - I = [[1, 0], [0, 3]], norm sqrt(10)   (M' = 2 < M = 3)
    square = _projection(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    wide = BSConvS(3, 5, 3, padding=1, p=2 / 3, min_mid_channels=1)
    assert wide.mid_channels == 2
    with torch.no_grad():
        wide.pw1.weight.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]).reshape(2, 3, 1, 1))
    model = nn.Sequential(square, nn.ReLU(), nn.Conv2d(2, 3, 1), wide)
    loss = regularization_loss(model)
    assert loss.shape == () and loss.requires_grad
    assert loss.item() == pytest.approx(math.sqrt(24) + math.sqrt(10), abs=1e-6)
    assert [n for n, _ in regularization_sites(model)] == ["0", "3"]
    # the gradient of ||G - I||_F is 2 (G - I) W / ||G - I||_F
    loss.backward()
    w = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    expected = 2 * torch.tensor([[4.0, 2.0], [2.0, 0.0]]) @ w / math.sqrt(24)
    assert torch.allclose(square.weight.grad.reshape(2, 2), expected, atol=1e-6)
    assert model[2].weight.grad is None  # plain convs carry no regulariser


@pytest.mark.parametrize("rows,cols", [(4, 4), (3, 7), (16, 96)])
def test_orthonormal_rows_give_zero(rows, cols):
    gen = torch.Generator().manual_seed(rows)
    q, _ = torch.linalg.qr(torch.randn(cols, rows, generator=gen, dtype=torch.float64))
    w = q.t().float()  # rows x cols, orthonormal rows
    bsconv = BSConvS(cols, 8, 3, p=rows / cols, min_mid_channels=1)
    assert bsconv.mid_channels == rows
    with torch.no_grad():
        bsconv.pw1.weight.copy_(w.reshape(rows, cols, 1, 1))
    model = nn.Sequential(_projection(w), bsconv)
    # float32 Gram matrices: up to ~6e-7 per site at 16x96; two sites here
    assert all(m.orthonormal_loss().item() < 1e-6 for _, m in regularization_sites(model))
    assert regularization_loss(model).item() < 2e-6
    assert regularization_loss(model.double()).item() < 1e-6  # the same rows, float64 arithmetic
    assert regularization_loss(_projection(2 * w)).item() == pytest.approx(3 * math.sqrt(rows), rel=1e-5)


def test_no_site_gives_a_zero_tensor():
    loss = regularization_loss(nn.Sequential(nn.Conv2d(3, 4, 3)))
    assert isinstance(loss, torch.Tensor) and loss.item() == 0.0


class TinyBottleneckNet(nn.Module):
    """A stem conv (-> BSConvS) and one inverted residual (projection -> SubspaceProjection)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.exp = nn.Conv2d(8, 32, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.act1 = nn.ReLU6()
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.act2 = nn.ReLU6()
        self.proj = nn.Conv2d(32, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn3(self.proj(self.act2(self.bn2(self.dw(self.act1(self.bn1(self.exp(x))))))))
        return self.head((x + y).mean((2, 3)))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = TinyBottleneckNet()
    result = convert(model, "s", example_inputs=(3, 8, 8), count=False)
    assert [(r["name"], r["kind"]) for r in result.report.to_json()["replaced"]] == [
        ("proj", "bottleneck->bsconv_s"), ("stem", "conv->bsconv_s")]
    return model


def test_bare_model(tiny):
    sites = dict(regularization_sites(tiny))
    assert list(sites) == ["stem", "proj"] and isinstance(sites["stem"], BSConvS)
    loss = regularization_loss(tiny)
    assert loss.item() == pytest.approx(sum(m.orthonormal_loss().item() for m in sites.values()))
    assert loss.item() > 0
    (tiny(torch.randn(2, 3, 8, 8)).sum() + 0.1 * loss).backward()
    assert tiny.proj.weight.grad.abs().sum() > 0 and tiny.stem.pw1.weight.grad.abs().sum() > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_inside_distributed_data_parallel(tiny, tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path / "ddp_store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        reference = regularization_loss(tiny).item()
        ddp = nn.parallel.DistributedDataParallel(tiny)
        assert [n for n, _ in regularization_sites(ddp)] == ["module.stem", "module.proj"]
        loss = regularization_loss(ddp)
        assert loss.item() == pytest.approx(reference, abs=0)
        (ddp(torch.randn(2, 3, 8, 8)).sum() + 0.1 * loss).backward()
        assert tiny.proj.weight.grad.abs().sum() > 0 and tiny.stem.pw1.weight.grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()


def test_after_torch_compile(tiny):
    """Default (inductor) backend on CPU: ~15 s the first time on a 2-core machine, so the model
    is tiny; the compiled module's sites sit under ``_orig_mod``."""
    reference = regularization_loss(tiny)
    compiled = torch.compile(tiny)
    assert [n for n, _ in regularization_sites(compiled)] == ["_orig_mod.stem", "_orig_mod.proj"]
    x = torch.randn(2, 3, 8, 8)
    loss = regularization_loss(compiled)
    assert torch.equal(loss, reference)
    (compiled(x).sum() + 0.1 * loss).backward()
    assert tiny.proj.weight.grad.abs().sum() > 0 and tiny.stem.pw1.weight.grad.abs().sum() > 0
    # the regulariser itself compiles too (it is plain tensor code over the module tree)
    compiled_loss = torch.compile(regularization_loss)(tiny)
    assert torch.allclose(compiled_loss, reference, atol=1e-6)


def test_after_save_and_load_converted(tmp_path):
    result = convert(load_model("timm:mobilenetv2_050", num_classes=10), "s", example_inputs=(3, 32, 32), count=False)
    names = [n for n, _ in regularization_sites(result.model)]
    assert len(names) == 16 + 1  # 16 projections + the stem conv as a BSConvS
    out_dir = result.save(tmp_path / "mnv2_s")
    meta = json.loads((out_dir / "surgery.json").read_text())
    assert meta["regularization_sites"] == names  # recorded in surgery.json, not on the instance
    loaded = load_converted(out_dir).model
    assert [n for n, _ in regularization_sites(loaded)] == names
    assert all(type(m) is type(result.model.get_submodule(n)) for n, m in regularization_sites(loaded))
    loss = regularization_loss(loaded)
    assert torch.equal(loss, regularization_loss(result.model)) and loss.item() > 0
    loss.backward()
    assert all(m.weight.grad is not None for n, m in regularization_sites(loaded) if isinstance(m, SubspaceProjection))
