"""Saving a conversion (``model.safetensors`` + ``surgery.json``, atomically) and rebuilding it with
``load_converted``: bit-identical, with its report, options and source."""

import hashlib
import json

import pytest
import timm
import torch

from bsconv_surgery import SurgeryError, convert, load_converted, load_model
from bsconv_surgery.io.files import atomic_dir

from ..helpers import randomize_batchnorm


@pytest.mark.parametrize("spec,options", [
    ("timm:resnet18", dict(variant="u", kernel_sizes="3")),
    ("torchvision:resnet18", dict(variant="s", p="1/4", with_bn=True)),
])
def test_save_then_load_converted_is_bit_identical(tmp_path, spec, options):
    result = convert(load_model(spec, num_classes=10), example_inputs=(3, 32, 32), **options)
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
    result = convert(load_model("timm:resnet18", num_classes=4), "u", count=False)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(SurgeryError, match="already exists; pass force=True"):
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


def test_a_module_without_a_spec_saves_and_reloads_onto_a_module_built_alike(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    result = convert(model, "u", example_inputs=(3, 8, 8), allow_growth=True)
    result.save(tmp_path / "x")
    with pytest.raises(SurgeryError, match="without a spec to rebuild it from"):
        load_converted(tmp_path / "x")
    again = load_converted(tmp_path / "x", model=torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(again.model(x), result.model(x))


def test_load_converted_rejects_bad_directories(tmp_path):
    with pytest.raises(SurgeryError, match="not a directory"):
        load_converted(tmp_path / "missing")
    (tmp_path / "surgery.json").write_text("{not json")
    with pytest.raises(SurgeryError, match="Could not read"):
        load_converted(tmp_path)


def test_load_converted_rejects_corrupt_weights(tmp_path):
    result = convert(load_model("timm:resnet18", num_classes=4), "u", count=False)
    out = result.save(tmp_path / "c")
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SurgeryError, match="is not the file that was saved: its SHA-256 is"):
        load_converted(out)
    meta = json.loads((out / "surgery.json").read_text())
    del meta["weights_sha256"]  # a file written before the hash was recorded: read, and refused as damaged
    (out / "surgery.json").write_text(json.dumps(meta))
    with pytest.raises(SurgeryError, match="model.safetensors' .*the file is damaged"):
        load_converted(out)


def test_a_checkpoint_given_to_the_python_api_travels_with_the_saved_model(tmp_path):
    """convert(spec, checkpoint=...) records the weights (path and SHA-256) in the result's source;
    saved and loaded back, the source still names them (the default distillation teacher)."""
    source = timm.create_model("test_resnet", num_classes=3)
    weights = tmp_path / "w.pt"
    torch.save(source.state_dict(), weights)
    result = convert(load_model("timm:test_resnet", num_classes=3, checkpoint=weights), "u", count=False)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert result.source.checkpoint == str(weights) and result.source.checkpoint_sha256 == digest
    assert result.report.to_json()["checkpoint"] == str(weights)
    assert torch.equal(result.model.fc.weight, source.fc.weight)  # the weights were loaded
    out = result.save(tmp_path / "saved")
    assert result.report.saved_to == str(tmp_path / "saved")
    meta = json.loads((out / "surgery.json").read_text())
    assert meta["source"]["checkpoint_sha256"] == digest and "saved_to" not in meta["report"]
    loaded = load_converted(out)
    assert loaded.source == result.source and loaded.options == result.options
    assert loaded.report.to_json()["checkpoint"] == str(weights)


def test_a_module_given_with_a_checkpoint_gets_its_weights(tmp_path):
    source = timm.create_model("test_resnet", num_classes=3)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = timm.create_model("test_resnet", num_classes=3)
    result = convert(load_model(model, checkpoint=tmp_path / "w.pt"), "u", count=False)
    assert torch.equal(model.fc.weight, source.fc.weight)
    assert result.source.spec is None and result.source.checkpoint == str(tmp_path / "w.pt")
    assert result.options.init == "svd"  # trained weights: init "auto" starts from them


def test_an_older_surgery_json_with_the_checkpoint_in_its_report_still_names_it(tmp_path):
    out = convert(load_model("timm:test_resnet", num_classes=3), "u", count=False).save(tmp_path / "old")
    meta = json.loads((out / "surgery.json").read_text())
    meta["report"]["checkpoint"] = "trained.pt"  # how the CLI recorded it before sources had one
    (out / "surgery.json").write_text(json.dumps(meta))
    assert load_converted(out).source.checkpoint == "trained.pt"


@pytest.fixture
def saved(tmp_path):
    out = convert(load_model("timm:test_resnet", num_classes=3), "u", count=False).save(tmp_path / "c")
    return out, json.loads((out / "surgery.json").read_text())


def test_surgery_json_records_the_weights_sha256_and_a_flipped_byte_is_caught(saved):
    out, meta = saved
    weights = out / "model.safetensors"
    assert meta["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit in a weight: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(SurgeryError, match=f"'{weights}' is not the file that was saved: its SHA-256 is "):
        load_converted(out)


def _edit(out, meta, path, value):
    node = meta = json.loads(json.dumps(meta))
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (out / "surgery.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("path,value,message", [
    (("source", "num_classes"), "ten", "source.num_classes: Input should be a valid integer (got 'ten')"),
    (("source", "num_classes"), 0, "source.num_classes: Input should be greater than or equal to 1 (got 0)"),
    (("source",), 5, "source: Input should be a valid dictionary or instance of _SourceJSON (got 5)"),
    (("source", "spec"), 5, "source.spec: Input should be a valid string (got 5)"),
    (("options",), "u", "options: Input should be a valid dictionary"),
    (("options", "with_bn"), "yes", "options.with_bn: Input should be a valid boolean (got 'yes')"),
    (("options", "kernel_sizes"), 3, "options.kernel_sizes: Input should be a valid list (got 3)"),
    (("report", "params_after"), "many", "report.params_after: Input should be a valid integer (got 'many')"),
    (("report", "replaced"), [{"kind": "x"}], "report.replaced.0.name: Field required"),
    (("report",), [], "report: Input should be a valid dictionary"),
    (("input_size",), "3,32,32", "input_size: Input should be a valid list"),
    (("weights_sha256",), "abc", "weights_sha256: String should match pattern"),
])
def test_a_mistyped_surgery_json_names_the_field(saved, path, value, message):
    out, meta = saved
    _edit(out, meta, path, value)
    with pytest.raises(SurgeryError) as info:
        load_converted(out)
    assert f"'{out / 'surgery.json'}' is not a valid surgery.json: {message}" in str(info.value)


def test_an_unknown_variant_in_surgery_json_is_named(saved):
    out, meta = saved
    _edit(out, meta, ("options", "variant"), "z")
    with pytest.raises(SurgeryError, match=r"surgery.json' has options this version does not accept: Unknown variant"):
        load_converted(out)


def test_options_that_do_not_rebuild_the_saved_sites_name_them(saved):
    """surgery.json's options say 7x7 kernels only, its report lists the 3x3 sites it converted
    (the hash matches: the file is the one saved, the architecture is not): the rebuild converts
    exactly the recorded sites, and names those the options cannot convert."""
    out, meta = saved
    _edit(out, meta, ("options", "kernel_sizes"), [[7, 7]])
    with pytest.raises(SurgeryError, match="surgery.json' is inconsistent: options .* but report.options"):
        load_converted(out)
    meta["options"]["kernel_sizes"] = meta["report"]["options"]["kernel_sizes"] = [[7, 7]]
    (out / "surgery.json").write_text(json.dumps(meta))
    with pytest.raises(SurgeryError) as info:
        load_converted(out)
    text = str(info.value)
    assert "surgery.json' does not rebuild the model it saved: Site(s) conv1.0, conv1.3, conv1.6," in text
    assert "are not candidates of variant u" in text


def test_weights_that_do_not_fit_the_rebuilt_model_name_the_keys(saved):
    """A weights file with its hash recorded, but with one tensor missing and one renamed."""
    from safetensors.torch import load_file, save_file

    out, meta = saved
    state = load_file(out / "model.safetensors")
    state["conv1.0.dw.extra"] = state.pop("conv1.0.dw.weight")
    save_file(state, out / "model.safetensors")
    _edit(out, meta, ("weights_sha256",), hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    with pytest.raises(SurgeryError) as info:
        load_converted(out)
    text = str(info.value)
    assert "do not fit the rebuilt model: 1 missing key(s): conv1.0.dw.weight" in text
    assert "1 unexpected key(s): conv1.0.dw.extra" in text


def test_a_surgery_json_written_before_the_hash_still_loads(saved):
    out, meta = saved
    del meta["weights_sha256"]
    (out / "surgery.json").write_text(json.dumps(meta))
    assert load_converted(out).source.spec == "timm:test_resnet"
