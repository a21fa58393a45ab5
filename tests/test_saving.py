import json

import pytest
import torch

from bsconv_surgery import SurgeryError, convert, load_converted
from bsconv_surgery.io.files import atomic_dir

from .helpers import randomize_batchnorm


@pytest.mark.parametrize("spec,options", [
    ("timm:resnet18", dict(variant="u", kernel_sizes="3")),
    ("torchvision:resnet18", dict(variant="s", p="1/4", with_bn=True)),
])
def test_save_then_load_converted_is_bit_identical(tmp_path, spec, options):
    result = convert(spec, num_classes=10, input_size=(3, 32, 32), **options)
    randomize_batchnorm(result.model)
    result.model.eval()
    out_dir = result.save(tmp_path / "converted")
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.safetensors", "surgery.json"]
    meta = json.loads((out_dir / "surgery.json").read_text())
    assert meta["source"] == {"spec": spec, "num_classes": 10}
    assert meta["options"]["variant"] == options["variant"]
    assert {"torch", "timm", "torchvision", "fvcore"} <= set(meta["versions"])
    assert meta["report"]["params_after"] == result.report.to_json()["params_after"]

    loaded = load_converted(out_dir).model.eval()
    assert type(loaded) is type(result.model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    for (k1, v1), (k2, v2) in zip(result.model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_existing_output_is_refused_unless_forced(tmp_path):
    result = convert("timm:resnet18", "u", num_classes=4, count=False)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(SurgeryError, match="already exists; pass --force"):
        result.save(target)
    assert (target / "keep.txt").read_text() == "user data"
    result.save(target, force=True)
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors", "surgery.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary directories left behind"


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_save_without_a_source_spec_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    result = convert(model, "u", input_size=(3, 8, 8))
    with pytest.raises(SurgeryError, match="without a source spec"):
        result.save(tmp_path / "x")


def test_load_converted_rejects_bad_directories(tmp_path):
    with pytest.raises(SurgeryError, match="not a directory"):
        load_converted(tmp_path / "missing")
    (tmp_path / "surgery.json").write_text("{not json")
    with pytest.raises(SurgeryError, match="Could not read"):
        load_converted(tmp_path)


def test_load_converted_rejects_corrupt_weights(tmp_path):
    result = convert("timm:resnet18", "u", num_classes=4, count=False)
    out = result.save(tmp_path / "c")
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SurgeryError, match="do not fit the rebuilt model"):
        load_converted(out)
