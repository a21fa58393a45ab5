import pytest
import torch
from click.testing import CliRunner

from bsconv_surgery.cli import bsconv_surgery


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
