import pytest
import torch
from torch import nn


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one torch thread. Batch-1 counting at 32x32 is latency-bound, and
    on a loaded machine torch's OpenMP threads spin-wait: a ResNet-110 forward took 9 s with two
    threads and 0.05 s with one. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
