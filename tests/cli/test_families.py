"""Every torchvision family from the command line: detection, segmentation, video, optical flow and
the float quantization models (one fast run per family; the full-size ones are ``slow``)."""

import math

import pytest
import torch
import torchvision

import bsconv_surgery as bs
from bsconv_surgery.recovery.fidelity import measure_fidelity
from bsconv_surgery.layers import bsconv_u_params
from bsconv_surgery.models import (
    INPUT_FAMILIES,
    create_model,
    default_input_size,
    input_family,
    parse_model_spec,
    torchvision_family,
    torchvision_model_names,
    training_loss,
)

from ..helpers import json_output

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_torchvision_model_resolves_with_its_family():
    names = torchvision.models.list_models()
    assert sorted(torchvision_model_names()) == sorted(names) and len(names) == 121
    expected = {"classification": 80, "detection": 12, "segmentation": 6, "video": 9, "optical_flow": 2, "quantization": 12}
    found = {}
    for name in names:
        spec = parse_model_spec(f"tv:{name}")
        found[spec.family] = found.get(spec.family, 0) + 1
    assert found == expected
    assert parse_model_spec("r3d_18") == bs.models.ModelSpec("torchvision", "r3d_18")  # bare names too
    assert torchvision_family("quantized_mobilenet_v2") == "quantization" and torchvision_family("nope") is None


@pytest.mark.parametrize("spec,size", [
    ("tv:r3d_18", (3, 16, 112, 112)),              # the video weights' crop, 16 frames
    ("tv:s3d", (3, 16, 224, 224)),
    ("tv:fasterrcnn_mobilenet_v3_large_fpn", (3, 800, 800)),  # the size its transform resizes to
    ("tv:ssdlite320_mobilenet_v3_large", (3, 320, 320)),
    ("tv:deeplabv3_mobilenet_v3_large", (3, 520, 520)),        # the weights' resize size
    ("tv:raft_small", (3, 224, 224)),
    ("tv:quantized_mobilenet_v2", (3, 224, 224)),
])
def test_default_input_sizes_come_from_the_weights(spec, size):
    s = parse_model_spec(spec)
    with torch.device("meta"):
        model = create_model(s)
    assert default_input_size(s, model) == size
    assert bs.example_inputs_for(bs.load_model(str(s)), size).size == size


def test_family_arguments_and_outputs():
    images = input_family("detection").make((3, 8, 8), batch=2)
    assert len(images) == 1 and [tuple(x.shape) for x in images[0]] == [(3, 8, 8)] * 2
    flow = input_family("optical_flow").make((3, 8, 8))
    assert len(flow) == 2 and not torch.equal(flow[0], flow[1])
    video = input_family("video").make((3, 4, 8, 8), batch=2)
    assert tuple(video[0].shape) == (2, 3, 4, 8, 8)
    assert input_family("segmentation").output({"out": 1, "aux": 2}) == 1
    assert input_family("optical_flow").output([1, 2, 3]) == 3
    detections = [{"boxes": torch.zeros(3, 4), "scores": torch.zeros(3)}]
    assert input_family("detection").structure(detections) == [{"boxes": ["n", 4], "scores": ["n"]}]
    assert set(INPUT_FAMILIES) == {"classification", "quantization", "segmentation", "detection", "video",
                                   "optical_flow", "tensor"}


def test_detection_training_step_with_synthetic_targets():
    """A detection model in training mode needs targets: boxes and labels (masks, keypoints where
    the heads exist); the loss dict backpropagates."""
    model = create_model(parse_model_spec("tv:fasterrcnn_mobilenet_v3_large_320_fpn"), num_classes=3)
    family = input_family("detection")
    args = family.train_args(model, (3, 64, 64), batch=2)
    images, targets = args
    assert len(images) == len(targets) == 2 and set(targets[0]) == {"boxes", "labels"}
    model.train()
    losses = model(*args)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    training_loss(losses).backward()
    assert model.backbone.body["0"][0].weight.grad is not None
    keypoints = create_model(parse_model_spec("tv:keypointrcnn_resnet50_fpn"), num_classes=2)
    (target,) = family.train_args(keypoints, (3, 64, 64), batch=1)[1]
    assert tuple(target["keypoints"].shape) == (1, 17, 3)


def test_convert_detection_model_reorders_its_backbone_pairs(cli):
    """fasterrcnn_mobilenet_v3_large_320_fpn: the whole model does not trace; its backbone does, and
    its depthwise-separable pairs are reordered as in the classifier (7 of torchvision's
    mobilenet_v3_large with --allow-growth; the other 8 have a squeeze-excite between dw and pw)."""
    report = json_output(cli("convert", "tv:fasterrcnn_mobilenet_v3_large_320_fpn", "--variant", "u", "--allow-growth",
                             "--json"))
    tracing = report["tracing"]
    assert tracing["method"] == "fx parts" and tracing["parts"] == ["backbone", "rpn.head.conv"]
    assert "" in tracing["fallbacks"] and "rpn.head" in tracing["fallbacks"]
    kinds = {}
    for r in report["replaced"]:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    assert kinds["dsc->bsconv_u"] == 7
    assert all(r["name"].startswith("backbone.body.") for r in report["replaced"] if r["kind"] == "dsc->bsconv_u")
    assert report["output_shape"] == [{"boxes": ["n", 4], "labels": ["n"], "scores": ["n"]}]
    assert report["input_family"] == "detection" and report["input_size"] == [3, 320, 320]
    assert sum(r["params_after"] - r["params_before"] for r in report["replaced"]) == \
        report["params_after"] - report["params_before"]


def test_convert_video_model_closed_form(cli):
    """r3d_18: 17 standard Conv3d (the 3x7x7 stem and 16 3x3x3) become BSConvU3d; the parameter
    count follows ``M N + N prod(k)`` per conv, and the start matches torchvision's own count."""
    model = create_model(parse_model_spec("tv:r3d_18"))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size != (1, 1, 1)]
    assert len(convs) == 17
    before = sum(p.numel() for p in model.parameters())
    closed = before - sum(m.weight.numel() for m in convs) + sum(
        bsconv_u_params(m.in_channels, m.out_channels, m.kernel_size, None) - 0 for m in convs)
    report = json_output(cli("convert", "tv:r3d_18", "--input-size", "3,4,32,32", "--json"))
    assert report["params_before"] == before == 33_371_472  # torchvision's weights meta num_params
    assert report["params_after"] == closed == 1_720_720
    stem = next(r for r in report["replaced"] if r["name"] == "stem.0")
    assert stem["kernel"] == [3, 7, 7] and stem["params_after"] == 3 * 64 + 64 * 3 * 7 * 7
    assert report["output_shape"] == [1, 400] and report["input_family"] == "video"
    assert report["macs_after"] < report["macs_before"]


@pytest.mark.parametrize("spec,size,kind,expected", [
    ("tv:lraspp_mobilenet_v3_large", "3,64,64", "segmentation", {"out": [1, 21, 64, 64]}),
    ("tv:quantized_mobilenet_v2", "3,64,64", "quantization", [1, 1000]),
])
def test_convert_segmentation_and_quantization_models(cli, spec, size, kind, expected):
    report = json_output(cli("convert", spec, "--input-size", size, "--variant", "s", "--json"))
    assert report["input_family"] == kind and report["output_shape"] == expected
    assert any(r["kind"] == "bottleneck->bsconv_s" for r in report["replaced"])
    assert report["params_after"] <= report["params_before"]


def test_convert_optical_flow_model(cli):
    report = json_output(cli("convert", "tv:raft_small", "--input-size", "3,128,128", "--json"))
    assert report["input_family"] == "optical_flow" and report["tracing"]["method"] == "fx parts"
    assert report["tracing"]["parts"] == ["feature_encoder", "context_encoder", "update_block"]
    assert len(report["output_shape"]) == 12 and report["output_shape"][-1] == [1, 2, 128, 128]  # 12 flow updates
    assert len(report["replaced"]) == 22


BAD = [
    (["convert", "tv:r3d_18", "--input-size", "3,32,32"], "expected --input-size C,T,H,W such as 3,16,112,112"),
    (["convert", "tv:raft_small", "--num-classes", "3"], "optical flow model"),
    (["convert", "tv:r3d_18", "--input-size", "3,4,32,32", "--calib", "digits"], "--calib random"),
    (["convert", "tv:fasterrcnn_resnet50_fp"], "Close matches: fasterrcnn_resnet50_fpn"),
    (["convert", "tv:resnet18", "--input-size", "3,4,32,32"], "expected --input-size C,H,W"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_for_a_family_is_one_clear_error(cli, args, message):
    result = cli(*args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert message in result.output, result.output


def test_models_command_lists_the_new_families(cli):
    report = json_output(cli("models", "tv:r3d_18", "--json"))
    (row,) = report["models"]
    assert row["family"] == "video" and row["u"]["sites"] == {"conv->bsconv_u": 17}
    names = json_output(cli("models", "tv:*rcnn*", "--names-only", "--limit", "0", "--json"))
    assert names["matches"] == 7


def test_fidelity_on_a_video_model():
    result = bs.convert("tv:r3d_18", "u", example_inputs=(3, 4, 16, 16), init="svd", calibration=bs.Dataset("random", limit=1))
    fid = result.report.fidelity
    assert fid["samples"] == 16 and fid["relative_logit_error"] > 0 and 0 <= fid["top1_agreement"] <= 1


def test_detection_fidelity_compares_detections_by_rank():
    model = create_model(parse_model_spec("tv:fasterrcnn_mobilenet_v3_large_320_fpn")).eval()
    for p in model.roi_heads.box_predictor.parameters():  # detect something: a biased class score
        torch.nn.init.zeros_(p)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1] = 10.0
    same = measure_fidelity(model, model, bs.Dataset("random", limit=1, batch_size=2), bs.ExampleInputs.of("detection", (3, 64, 64)))
    assert same["detections_original"] == same["detections_converted"] > 0
    assert same["relative_logit_error"] == 0.0 and same["top1_agreement"] == 1.0
    assert math.isclose(same["max_sample_relative_error"], 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("variant,kind,count", [("u", "dsc->bsconv_u", 7), ("s", "bottleneck->bsconv_s", 14)])
def test_must_show_fasterrcnn_mobilenet_v3_large_fpn(cli, variant, kind, count):
    """The backbone's 7 reorderable pairs (with --allow-growth: 2 of them would grow) and 14 bottlenecks."""
    report = json_output(cli("convert", "tv:fasterrcnn_mobilenet_v3_large_fpn", "--variant", variant, "--allow-growth",
                             "--json"))
    assert sum(r["kind"] == kind for r in report["replaced"]) == count
    assert report["output_shape"] == [{"boxes": ["n", 4], "labels": ["n"], "scores": ["n"]}]
    assert report["input_size"] == [3, 800, 800] and report["tracing"]["method"] == "fx parts"


@pytest.mark.slow
@pytest.mark.parametrize("spec,parts", [
    ("tv:deeplabv3_mobilenet_v3_large", None),
    ("tv:ssdlite320_mobilenet_v3_large", 13),
    ("tv:raft_small", 3),
])
def test_must_show_models_at_their_default_size(cli, spec, parts):
    report = json_output(cli("convert", spec, "--json"))
    assert report["replaced"] and report["output_shape"]
    if parts is None:
        assert report["tracing"]["method"] == "fx"
    else:
        assert report["tracing"]["method"] == "fx parts" and len(report["tracing"]["parts"]) == parts


@pytest.mark.parametrize("spec,size", [("tv:r3d_18", "3,4,16,16"), ("tv:raft_small", "3,128,128")])
def test_benchmark_feeds_each_family_its_own_arguments(cli, spec, size):
    out = json_output(cli("benchmark", spec, "--input-size", size, "--prep", "eager", "--runs", "2", "--warmup", "0",
                          "--json"))
    assert out["timing"]["input_size"] == [int(v) for v in size.split(",")]
    assert out["timing"]["original"]["runs"] == 2 and out["params"]["converted"] < out["params"]["original"]
