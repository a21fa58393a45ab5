import os
import socket

import pytest
import torch
from click.testing import CliRunner

from bsconv_surgery.cli import bsconv_surgery
from bsconv_surgery.models import pretrained


@pytest.fixture(scope="session", autouse=True)
def choice_cache(tmp_path_factory):
    """``prep="auto"`` caches its choices on disk: in a folder of the test session, never the user's."""
    saved = os.environ.get("BSCONV_SURGERY_CACHE")
    os.environ["BSCONV_SURGERY_CACHE"] = str(tmp_path_factory.mktemp("bsconv-cache"))
    yield
    if saved is None:
        os.environ.pop("BSCONV_SURGERY_CACHE", None)
    else:
        os.environ["BSCONV_SURGERY_CACHE"] = saved


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one torch thread. Batch-1 counting at 32x32 is latency-bound, and
    on a loaded machine torch's OpenMP threads spin-wait: a ResNet-110 forward took 9 s with two
    threads and 0.05 s with one. Tiny training runs are fastest on one thread too. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli():
    """The command line, in process: ``cli("convert", "resnet18", "--json")`` returns click's
    ``Result`` (``.output`` holds stdout and stderr together, ``.stdout`` / ``.stderr`` apart)."""
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(bsconv_surgery, [str(a) for a in args])

    return invoke


class _Network:
    """What the ``no_network`` fixture saw: every attempt to open a connection."""

    def __init__(self):
        self.attempts = []


@pytest.fixture
def no_network(monkeypatch):
    """No connection can be opened: ``socket.create_connection`` (what urllib, httpx and the
    reachability check use) raises ``OSError`` as on a machine without network, and records the
    attempt; ``.attempts`` lists them."""
    seen = _Network()

    def refuse(address, *args, **kwargs):
        seen.attempts.append(address)
        raise OSError(101, "Network is unreachable (the tests never use the network)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return seen


@pytest.fixture
def zoo_caches(tmp_path, monkeypatch, no_network):
    """Empty, private weight caches (``HF_HOME``, ``TORCH_HOME``) with ``HF_HUB_OFFLINE=1``, and the
    downloaders replaced by a failure: a test that reaches for the network fails. Returns
    ``(hf_home, torch_home)``."""
    hf_home, torch_home = tmp_path / "hf-home", tmp_path / "torch-home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)

    def download(*args, **kwargs):
        raise AssertionError("a test tried to download weights")

    monkeypatch.setattr(pretrained, "_download_hub", download)
    monkeypatch.setattr(pretrained, "_download_url", download)
    return hf_home, torch_home
