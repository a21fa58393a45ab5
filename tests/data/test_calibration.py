"""Calibration data from anywhere, and fidelity on every output (``calibration.py``, ``fidelity.py``; issue 15)."""

import copy

import pytest
import torch
from torch import nn

from bsconv_surgery import Dataset
from bsconv_surgery import Batch, Labelled, SurgeryError, convert
from bsconv_surgery.data.calibration import iter_batches, take_batches
from bsconv_surgery import ExampleInputs
from bsconv_surgery.recovery.fidelity import decision_index, measure_fidelity

from ..helpers import SmallNet, TwoHeads, random_batches


class TwoInputs(nn.Module):
    """A multi-input model (an audio net's ``(features, gain)``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x, gain):
        return self.head(self.conv(x).mean((2, 3))) * gain[:, None]


def test_the_batch_convention():
    x = torch.randn(2, 3, 8, 8)
    assert [b.args[0] is x for b in iter_batches([x])] == [True]
    assert [len(b.args) for b in iter_batches([(x, torch.ones(2))])] == [2]  # a tuple: the inputs of one call
    (labelled,) = list(iter_batches(Labelled([(x, [1, 0])])))
    assert labelled.args[0] is x and labelled.labels.tolist() == [1, 0] and labelled.samples == 2
    assert take_batches([x, x, x], 2)[1].args[0] is x and len(take_batches([x, x, x], 2)) == 2
    with pytest.raises(SurgeryError, match="not a single batch"):
        list(iter_batches(x))
    with pytest.raises(SurgeryError, match="tensor or a tuple"):
        list(iter_batches([3]))
    with pytest.raises(SurgeryError, match="pairs"):
        list(Labelled([x]))
    with pytest.raises(SurgeryError, match="no batches"):
        take_batches([])


def test_fidelity_of_a_multi_input_model_from_python_batches():
    model = TwoInputs()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head.bias.add_(0.3)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 8, 8, generator=gen), torch.rand(4, generator=gen) + 0.5) for _ in range(3)]
    fid = measure_fidelity(model, other, batches)
    assert fid["samples"] == 12 and fid["batches"] == 3 and fid["relative_logit_error"] > 0
    assert "top1_accuracy_converted" not in fid
    labels = [torch.tensor([0, 1, 2, 3])] * 3
    fid = measure_fidelity(model, copy.deepcopy(model), Labelled(zip(batches, labels)))
    assert fid["relative_logit_error"] == 0 and 0 <= fid["top1_accuracy_converted"] <= 1
    assert measure_fidelity(model, other, Dataset(batches, limit=1))["samples"] == 4


def test_every_output_is_compared():
    """MTCNN returns (boxes, probability): a change in the probability alone used to go unseen,
    since only the first output was compared."""
    model = TwoHeads()
    other = copy.deepcopy(model)
    with torch.no_grad():  # the two classes swapped: every decision flips
        other.face.weight.copy_(model.face.weight.flip(0))
        other.face.bias.copy_(model.face.bias.flip(0))
    batches = random_batches(2)
    fid = measure_fidelity(model, other, batches)
    assert fid["outputs"] == 2 and fid["decision_output"] == 1
    box_err, prob_err = fid["relative_error_per_output"]
    assert box_err == 0 and prob_err > 0 and fid["relative_logit_error"] > 0
    assert fid["top1_agreement"] == 0 and fid["kl_divergence"] > 0
    assert measure_fidelity(model, other, batches, output=0)["top1_agreement"] == 1.0  # the box head decides nothing here


@pytest.mark.parametrize("out, output, expected", [
    (torch.zeros(2, 3), None, 0),
    ({"aux": torch.zeros(2, 3), "logits": torch.zeros(2, 3)}, None, 1),
    ((torch.zeros(2, 4), torch.softmax(torch.randn(2, 2), 1)), None, 1),
    ((torch.softmax(torch.randn(2, 2), 1), torch.randn(2, 4)), None, 0),
    ((torch.randn(2, 4), torch.randn(2, 5)), None, 0),
    ((torch.randn(2, 4), torch.randn(2, 5)), 1, 1),
    ({"a": torch.randn(2, 4), "b": (torch.randn(2, 5), torch.randn(2, 3))}, "b.1", 2),
])
def test_the_decision_output_rule(out, output, expected):
    assert decision_index(out, output) == expected


def test_bad_decision_output():
    with pytest.raises(SurgeryError, match="output=5"):
        decision_index((torch.zeros(2, 3),), 5)
    with pytest.raises(SurgeryError, match="not one of"):
        decision_index({"logits": torch.zeros(2, 3)}, "probs")


def test_unlabelled_image_folder_at_any_depth(tmp_path):
    from PIL import Image

    for i, rel in enumerate(["a.png", "x/b.jpg", "x/y/z/c.png", ".hidden/d.png"]):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + i, 18), (40 * i, 200, 90)).save(path)
    (tmp_path / "notes.txt").write_text("not an image")
    batches = Dataset(f"images:{tmp_path}", limit=5, batch_size=2).batches(ExampleInputs.of(None, (3, 16, 16)))
    assert [b.args[0].shape[0] for b in batches] == [2, 1] and all(b.labels is None for b in batches)
    model = SmallNet()
    assert measure_fidelity(model, model, f"images:{tmp_path}", (3, 16, 16))["samples"] == 3
    (tmp_path / "x" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SurgeryError, match="broken.png"):
        Dataset(f"images:{tmp_path}").batches(ExampleInputs.of(None, (3, 16, 16)))
    with pytest.raises(SurgeryError, match="No image files"):
        Dataset(f"images:{_empty(tmp_path)}").batches(ExampleInputs.of(None, (3, 8, 8)))


def _empty(root):
    path = root / "empty"
    path.mkdir()
    return path


def test_convert_takes_python_batches_and_names_them():
    model = SmallNet()
    batches = random_batches(3)
    report = convert(model, "u", init="svd", example_inputs=(3, 12, 12), calibration=batches).report
    assert report.fidelity["samples"] == 24 and report.fidelity["calib"] == "list of batches (Python)"
    assert convert(SmallNet(), "u", example_inputs=(3, 12, 12), calibration=Dataset([Batch((b,)) for b in batches], limit=1)).report.fidelity["samples"] == 8
