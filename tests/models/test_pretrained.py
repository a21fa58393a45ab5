"""Published weights from the libraries' caches, offline: the tests fill private caches with weights
they generate (``zoo_caches``: HF_HOME, TORCH_HOME, HF_HUB_OFFLINE=1, downloads and connections
refused), then build from them."""

import time

import pytest
import timm
import torch
import torchvision

from bsconv_surgery.core.errors import SurgeryError
from bsconv_surgery.models import pretrained
from bsconv_surgery.models.checkpoints import file_sha256
from bsconv_surgery.models.zoo import build_source_model, model_from_source, parse_model_spec
from bsconv_surgery.core.records import ModelSource

from ..helpers import HF_REVISION, fill_hf_cache, fill_torch_cache, random_state

pytestmark = pytest.mark.usefixtures("one_thread")

TIMM = "test_resnet.r160_in1k"
TV = "mobilenet_v3_small"


def _tv_url(name=TV, entry="DEFAULT"):
    enum = torchvision.models.get_model_weights(name)
    return (enum.DEFAULT if entry == "DEFAULT" else enum[entry]).url


def _equal(model, state, skip=()):
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith(tuple(skip)))


@pytest.fixture
def timm_cached(zoo_caches):
    hf_home, _ = zoo_caches
    state = random_state(timm.create_model(TIMM))
    return state, fill_hf_cache(hf_home, f"timm/{TIMM}", state)


@pytest.fixture
def tv_cached(zoo_caches):
    _, torch_home = zoo_caches
    state = random_state(torchvision.models.get_model(TV))
    return state, fill_torch_cache(torch_home, _tv_url(), state)


def test_timm_weights_load_from_the_hub_cache_with_their_provenance(timm_cached):
    state, path = timm_cached
    model, source = build_source_model(parse_model_spec("timm:test_resnet"), pretrained=True)  # timm's default tag
    assert _equal(model, state) and source.spec == f"timm:{TIMM}" and source.num_classes == 1000
    w = source.pretrained
    assert (w.zoo, w.name, w.hub_id, w.revision, w.file) == ("timm", TIMM, f"timm/{TIMM}", HF_REVISION, "model.safetensors")
    assert w.sha256 == file_sha256(path) and source.weights == TIMM and source.head_replaced is None
    assert ModelSource.from_json(source.to_json()) == source


def test_timm_num_classes_keeps_the_backbone_and_gives_a_fresh_head(timm_cached):
    state, _ = timm_cached
    model, source = build_source_model(parse_model_spec(f"timm:{TIMM}"), pretrained=True, num_classes=10)
    assert source.head_replaced == (1000, 10) and source.num_classes == 10
    assert _equal(model, state, skip=("fc.",)) and model.fc.out_features == 10
    assert not torch.equal(model.fc.weight, state["fc.weight"][:10])


def test_torchvision_weights_load_from_torch_home(tv_cached):
    state, path = tv_cached
    model, source = build_source_model(parse_model_spec(f"tv:{TV}"), weights="IMAGENET1K_V1")
    assert _equal(model, state)
    w = source.pretrained
    assert (w.zoo, w.name, w.file, w.url) == ("torchvision", "MobileNet_V3_Small_Weights.IMAGENET1K_V1", path.name,
                                              _tv_url())
    assert w.sha256 == file_sha256(path) and w.revision is None and w.num_classes == 1000


def test_torchvision_num_classes_replaces_the_head_after_loading(tv_cached):
    state, _ = tv_cached
    model, source = build_source_model(parse_model_spec(f"tv:{TV}"), pretrained=True, num_classes=7)
    assert source.head_replaced == (1000, 7) and model.classifier[3].out_features == 7
    assert _equal(model, state, skip=("classifier.3.",))
    rebuilt = model_from_source(source)  # the architecture only: no weights, no cache
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert not torch.equal(rebuilt.features[0][0].weight, model.features[0][0].weight)


def test_rebuilding_the_architecture_needs_no_cache(tv_cached, timm_cached):
    tv_state, tv_path = tv_cached
    _, timm_path = timm_cached
    tv_source = build_source_model(parse_model_spec(f"tv:{TV}"), pretrained=True)[1]
    timm_source = build_source_model(parse_model_spec(f"timm:{TIMM}"), pretrained=True)[1]
    tv_path.unlink(), timm_path.unlink()
    assert model_from_source(tv_source).state_dict().keys() == tv_state.keys()
    assert isinstance(model_from_source(timm_source), torch.nn.Module)
    with pytest.raises(SurgeryError, match="not cached here"):
        model_from_source(tv_source, load_weights=True)


def test_torchvision_architecture_follows_the_weights(zoo_caches):
    """GoogLeNet with weights drops its auxiliary heads after loading them: the architecture-only
    rebuild (no file read) must build exactly that, or the saved weights would not fit."""
    _, torch_home = zoo_caches
    full = torchvision.models.GoogLeNet(aux_logits=True, init_weights=False, transform_input=True)
    fill_torch_cache(torch_home, _tv_url("googlenet"), random_state(full))
    model, source = build_source_model(parse_model_spec("tv:googlenet"), pretrained=True)
    assert model.aux1 is None and model.transform_input
    rebuilt = model_from_source(source)
    assert rebuilt.aux1 is None and rebuilt.transform_input
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_recorded_weights_are_checked_when_rebuilt_with_them(tv_cached):
    state, path = tv_cached
    source = build_source_model(parse_model_spec(f"tv:{TV}"), pretrained=True)[1]
    assert _equal(model_from_source(source, load_weights=True), state)
    torch.save(random_state(torchvision.models.get_model(TV), seed=1), path)
    with pytest.raises(SurgeryError, match="are not the ones recorded: SHA-256"):
        model_from_source(source, load_weights=True)


@pytest.mark.parametrize("spec, weights, message", [
    ("timm:resnet50", None, "not cached here and cannot be downloaded: HF_HUB_OFFLINE is set"),
    ("tv:resnet50", "IMAGENET1K_V2", "cannot be downloaded: download.pytorch.org cannot be reached"),
])
def test_weights_neither_cached_nor_downloadable(zoo_caches, no_network, spec, weights, message):
    hf_home, torch_home = zoo_caches
    started = time.perf_counter()
    with pytest.raises(SurgeryError) as info:
        build_source_model(parse_model_spec(spec), pretrained=True, weights=weights)
    text = str(info.value)
    assert message in text and time.perf_counter() - started < 10
    if spec.startswith("timm"):
        assert str(hf_home / "hub" / "models--timm--resnet50.a1_in1k") in text and "hf download timm/resnet50.a1_in1k" in text
        assert no_network.attempts == []  # HF_HUB_OFFLINE: not even a reachability check
    else:
        assert str(torch_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in text
        assert "weights='IMAGENET1K_V2'" in text and no_network.attempts == [("download.pytorch.org", 443)]


def test_an_unreachable_hub_fails_fast_and_a_cached_file_needs_no_network(timm_cached, no_network, monkeypatch):
    """Without HF_HUB_OFFLINE, huggingface_hub would retry for about a minute here: a cached file
    is read without asking, and a missing one fails after one refused connection."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    state, _ = timm_cached
    started = time.perf_counter()
    assert _equal(build_source_model(parse_model_spec(f"timm:{TIMM}"), pretrained=True)[0], state)
    assert no_network.attempts == [] and time.perf_counter() - started < 10
    with pytest.raises(SurgeryError, match="huggingface.co cannot be reached"):
        build_source_model(parse_model_spec("timm:resnet18"), pretrained=True)
    assert no_network.attempts == [("huggingface.co", 443)]


def test_a_missing_file_is_downloaded_into_the_hub_cache(zoo_caches, monkeypatch):
    """The download path, with the downloader replaced: what it fetches lands in the cache and is
    recorded like a cached file."""
    hf_home, _ = zoo_caches
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(pretrained, "_probe", lambda url: None)
    state = random_state(timm.create_model(TIMM), seed=3)
    fetched = []

    def download(pub, revision):
        fetched.append((pub.hub_id, pub.hub_files))
        return fill_hf_cache(hf_home, pub.hub_id, state)

    monkeypatch.setattr(pretrained, "_download_hub", download)
    model, source = build_source_model(parse_model_spec(f"timm:{TIMM}"), pretrained=True)
    assert fetched == [(f"timm/{TIMM}", ("model.safetensors", "pytorch_model.bin"))] and _equal(model, state)
    assert source.pretrained.revision == HF_REVISION


@pytest.mark.parametrize("spec, kwargs, message", [
    ("timm:resnet50.zzz", None, "Unknown pretrained tag 'zzz' for timm:resnet50. Valid tags: a1_in1k, a1h_in1k"),
    ("tv:resnet50", {"weights": "IMAGENET1K_V9"}, "Valid weights: DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"),
    ("timm:resnet50", {"weights": "IMAGENET1K_V2"}, "a timm model takes its pretrained tag in the spec"),
    ("cifar_resnet20", {"pretrained": True}, "has no pretrained weights in timm"),
    ("tv:quantized_mobilenet_v2", {"pretrained": True}, "use tv:mobilenet_v2 with pretrained=True instead"),
    ("tv:fasterrcnn_mobilenet_v3_large_320_fpn", {"pretrained": True, "num_classes": 5}, "head cannot be replaced"),
    ("tv:resnet18", {"pretrained": True, "checkpoint": "x.pt"}, "pass one of them"),
])
def test_bad_requests_name_what_is_valid(zoo_caches, spec, kwargs, message):
    with pytest.raises(SurgeryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_source_model(parse_model_spec(spec), **kwargs)
