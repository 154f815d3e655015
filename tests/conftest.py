"""Shared fixtures: the devices every kernel test loops over, and a guard that
the suite runs against the compiled extension, never a silent fallback."""
import os

import pytest
import torch

import mmh_fast

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    info = mmh_fast.backend_info()
    if not info["native"] and os.environ.get("MMH_ALLOW_NO_NATIVE") != "1":
        raise pytest.UsageError(
            "mmh_fast._C is not built; the tests run against the compiled extension. "
            f"Build it first (make test does). Import error: {info.get('error')}"
        )


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def single_thread():
    """Run a test module with one intra-op thread (use it with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``). Tiny networks gain
    nothing from threads and lose to their synchronisation: a small MLP training
    step was 6x slower with 2 threads than with 1 on the busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
