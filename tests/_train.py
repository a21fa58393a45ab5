"""Shared by the training tests: a tiny, fast configuration and a CliRunner wrapper."""

import json

import pytest
import torch
from click.testing import CliRunner

from bsconv_surgery.cli import bsconv_surgery

#: timm's 70K-parameter test ResNet on 8x8 digits, 3 steps of 16 per epoch: a run takes seconds.
TINY = ["digits-demo", "--model", "timm:test_resnet", "--set", "data.image_size=8", "--set", "data.batch_size=16",
        "--set", "max_steps_per_epoch=3", "--set", "epochs=2"]
#: The same, converted on the fly to BSConv-S (10 regularised sites).
TINY_S = TINY + ["--set", "surgery.variant=s"]


def train(*args):
    result = CliRunner().invoke(bsconv_surgery, ["train", *map(str, args)])
    return result, result.output


def train_json(*args):
    result, text = train(*args, "--json")
    assert result.exit_code == 0, text
    return json.loads(result.stdout)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and much faster on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
