"""Your own trained model end to end from the command line (issue 22): ``py:`` and ``file:``
specs, ``--model-arg``, saving and reloading any conversion, exporting a run, ``--trust-code``."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import bsconv_surgery as bs
from bsconv_surgery.inference import relative_error
from bsconv_surgery.inference.ort import ort_session

from ..helpers import json_output

#: A model file outside any package: the importable test module, copied.
NET = (Path(__file__).resolve().parents[1] / "own_models.py").read_text()


@pytest.fixture
def own(tmp_path):
    """A model file outside any package, its trained weights, and a folder of unlabelled images."""
    from PIL import Image

    (tmp_path / "mynet.py").write_text(NET)
    images = tmp_path / "images"
    images.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(20):
        pixels = (torch.rand(20, 20, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
    return tmp_path


def _weights(own, spec_class):
    torch.manual_seed(0)
    model = spec_class()
    torch.save(model.state_dict(), own / "w.pt")
    return own / "w.pt"


@pytest.mark.parametrize("kind", ["file", "py"])
def test_own_model_convert_train_reload(cli, own, kind):
    if kind == "file":
        import importlib.util

        spec_loader = importlib.util.spec_from_file_location("mynet_for_weights", own / "mynet.py")
        module = importlib.util.module_from_spec(spec_loader)
        spec_loader.loader.exec_module(module)
        spec, make = f"file:{own / 'mynet.py'}:TinyNet", module.TinyNet
    else:
        from ..own_models import TinyNet as make

        spec = "py:tests.own_models:TinyNet"
    weights = _weights(own, make)
    out = own / "converted"
    report = json_output(cli("convert", spec, "--model-arg", "width=8", "--checkpoint", weights, "--input-size",
                             "3,16,16", "--out", out, "--json"))
    assert report["model"].startswith(f"{kind}:") and report["options"]["init"] == "svd"
    assert len(report["replaced"]) == 2
    meta = json.loads((out / "surgery.json").read_text())
    assert meta["source"]["spec"] == report["model"] and meta["source"]["model_args"] == {"width": 8}
    assert ("code_sha256" in meta["source"]) == (kind == "file")
    run = own / "run"
    result = cli("train", "distill-label-free", "--model", out, "--trust-code", "--data", f"images:{own / 'images'}",
                 "--set", "epochs=1", "--set", "max_steps_per_epoch=2", "--set", "data.image_size=16",
                 "--set", "data.batch_size=8", "--set", "data.augment.resize=18", "--out", run, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs_done"] == 1 and summary["final"]["train_kd"] >= 0  # distilled from the original
    refused = cli("export", run, "--format", "onnx")
    assert refused.exit_code == 1 and "runs its own code" in refused.output and "--trust-code" in refused.output
    exported = json_output(cli("export", run, "--trust-code", "--format", "onnx", "--json"))
    assert exported["source"]["kind"] == "run" and exported["parity"]["within_tolerance"]
    student = bs.load_converted(out, trust_code=True).model  # the run's architecture, with best.pt's weights
    student.load_state_dict(torch.load(run / "best.pt", weights_only=True)["model"])
    session = ort_session(exported["file"], threads=1)
    for n in (1, 3):
        x = torch.randn(n, 3, 16, 16)
        with torch.no_grad():
            expected = student.eval()(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert relative_error(got, expected) < 1e-5
    with pytest.raises(bs.SurgeryError, match="needs trust_code=True"):
        bs.load_converted(out)
    saved = bs.load_converted(out, trust_code=True)
    direct = bs.load_model(spec, checkpoint=weights, model_args={"width": 8})
    converted = bs.convert(direct, example_inputs=(3, 16, 16)).model.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(saved.model.eval()(x), converted(x))  # the saved weights are the conversion's


def test_a_changed_model_file_is_refused(cli, own):
    spec = f"file:{own / 'mynet.py'}:TinyNet"
    json_output(cli("convert", spec, "--input-size", "3,16,16", "--out", own / "c", "--json"))
    bs.load_converted(own / "c", trust_code=True)  # unchanged: fine
    (own / "mynet.py").write_text(NET + "\n# edited\n")
    with pytest.raises(bs.SurgeryError, match=r"mynet.py' of file:.* has changed \(SHA-256"):
        bs.load_converted(own / "c", trust_code=True)
    result = cli("benchmark", own / "c", "--trust-code", "--prep", "eager", "--runs", "2")
    assert result.exit_code == 1 and "has changed" in result.output and "Traceback" not in result.output


def test_a_py_spec_is_not_rebuilt_without_trust(cli, own):
    json_output(cli("convert", "py:tests.own_models:TinyNet", "--input-size", "3,16,16", "--out", own / "c", "--json"))
    result = cli("benchmark", own / "c", "--prep", "eager", "--runs", "2")
    assert result.exit_code == 1
    assert "runs its own code (py:tests.own_models:TinyNet), so it needs --trust-code" in result.output
    result = cli("train", "digits-demo", "--model", own / "c", "--set", "epochs=1", "--out", own / "run")
    assert result.exit_code == 1 and "--trust-code" in result.output


@pytest.mark.parametrize("spec, args, message", [
    ("py:tests.no_such_module:Net", [], "Cannot import module 'tests.no_such_module'"),
    ("py:tests.own_models:TinyNte", [], "has no attribute 'TinyNte' (model spec py:tests.own_models:TinyNte). "
                                        "Close matches: TinyNet"),
    ("py:tests.own_models:raises", [], "raised ValueError: width 8 is not supported by this factory"),
    ("py:tests.own_models:not_a_module", [], "returned a dict, not an nn.Module"),
    ("py:tests.own_models:NOT_CALLABLE", [], "is a int, not a class or function"),
    ("py:tests.own_models:TinyNet", [], "has no default input size"),
    ("py:tests.own_models:TinyNet", ["--model-arg", "depth"], "Bad --model-arg 'depth': expected KEY=VALUE"),
    ("py:tests.own_models:TinyNet", ["--model-arg", "depth=3", "--input-size", "3,8,8"],
     "got an unexpected keyword argument 'depth'"),
    ("py:tests.own_models", [], "expected py:package.module:callable"),
    ("file:nowhere/net.py:Net", [], "does not exist or is not a file"),
])
def test_each_failure_of_your_own_code_is_one_clear_error(cli, spec, args, message):
    result = cli("convert", spec, *args)
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_a_factory_that_builds_fixed_weights_counts_as_trained():
    model = bs.load_model("py:tests.own_models:trained_tiny")
    source = bs.model_source(model)
    assert source.callable_weights and source.trained
    assert bs.convert(model, example_inputs=(3, 16, 16)).options.init == "svd"
    fresh = bs.model_source(bs.load_model("py:tests.own_models:TinyNet"))
    assert not fresh.callable_weights and not fresh.trained


def test_a_module_converted_in_python_saves_and_reloads_onto_the_same_class(tmp_path):
    from ..own_models import TinyNet

    result = bs.convert(TinyNet(), example_inputs=torch.randn(1, 3, 16, 16))
    result.save(tmp_path / "mine")
    with pytest.raises(bs.SurgeryError, match="without a spec to rebuild it from"):
        bs.load_converted(tmp_path / "mine")
    again = bs.load_converted(tmp_path / "mine", model=TinyNet())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(again.model.eval()(x), result.model.eval()(x))
    shutil.rmtree(tmp_path / "mine")


def test_a_timm_hf_hub_model_is_read_from_the_cache(cli, zoo_caches, tmp_path):
    """``hf-hub:ORG/NAME``: the architecture from the cached config.json, the weights with --pretrained."""
    import timm

    from ..helpers import fill_hf_cache

    hf_home, _ = zoo_caches
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=3)
    path = fill_hf_cache(hf_home, "acme/tiny-resnet", {k: v.contiguous() for k, v in source.state_dict().items()})
    (path.parent / "config.json").write_text(json.dumps({"architecture": "test_resnet", "num_classes": 3}))
    model = bs.load_model("hf-hub:acme/tiny-resnet", pretrained=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    assert bs.model_source(model).spec == "hf-hub:acme/tiny-resnet" and bs.model_source(model).trained
    out = json_output(cli("convert", "hf-hub:acme/tiny-resnet", "--pretrained", "--input-size", "3,32,32", "--out",
                          tmp_path / "c", "--json"))
    assert out["model"] == "hf-hub:acme/tiny-resnet" and out["options"]["init"] == "svd"
    assert bs.load_converted(tmp_path / "c").source.spec == "hf-hub:acme/tiny-resnet"
    missing = cli("convert", "hf-hub:acme/nothing")
    assert missing.exit_code == 1 and "hf-hub:acme/nothing is not in the Hugging Face cache" in missing.output
    bad = cli("convert", "hf-hub:not-a-repo")
    assert bad.exit_code == 1 and "expected hf-hub:ORG/NAME" in bad.output


def test_own_model_labelled_distillation_from_the_same_spec_and_weights(cli, own):
    """``train`` with labels and distillation: the teacher is the same spec, arguments and checkpoint."""
    from ..own_models import TinyNet

    torch.manual_seed(0)
    torch.save(TinyNet(width=8, num_classes=10).state_dict(), own / "w10.pt")
    result = cli("train", "digits-demo", "--model", "py:tests.own_models:TinyNet", "--model-arg", "num_classes=10",
                 "--checkpoint", own / "w10.pt", "--set", "distill.enabled=true", "--set", "epochs=1",
                 "--set", "max_steps_per_epoch=2", "--set", "data.image_size=16", "--out", own / "run", "--json")
    assert result.exit_code == 0, result.output
    assert "train_kd" in json.loads(result.stdout)["final"]
    wrong = cli("train", "digits-demo", "--model", "py:tests.own_models:TinyNet", "--checkpoint", _weights(own, TinyNet),
                "--set", "distill.enabled=true", "--set", "epochs=1", "--set", "data.image_size=16", "--out", own / "r2")
    assert wrong.exit_code == 1 and "predicts 4 classes and the data has 10" in " ".join(wrong.output.split())
