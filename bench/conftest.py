"""Benchmark suite configuration.

Tiers (``--tier``): ``quick`` (default; the whole tier runs in a few minutes
on 2 cores), ``full`` (the sizes the issues name) and ``gpu`` (CUDA kernels and
models; skipped without a GPU). A benchmark declares the tiers it belongs to
with ``@pytest.mark.tier("quick", "full")``; unmarked benchmarks run in every
CPU tier. Sizes that depend on the tier come from the ``tier`` fixture.

Every benchmark compares itself with an anchor (the tool a user would
otherwise pick) in the same run through :func:`_harness.compare`, which
stores ``ratio`` = ours / anchor (lower is better) in ``extra_info``;
``bench/check.py`` compares those ratios with a committed baseline.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

TIERS = ("quick", "full", "gpu")


def pytest_addoption(parser):
    parser.addoption("--tier", choices=TIERS, default="quick", help="benchmark tier (default: quick)")


def pytest_configure(config):
    config.addinivalue_line("markers", "tier(*names): tiers a benchmark belongs to")


def pytest_collection_modifyitems(config, items):
    tier = config.getoption("--tier")
    for item in items:
        marker = item.get_closest_marker("tier")
        tiers = marker.args if marker else ("quick", "full")
        if tier not in tiers:
            item.add_marker(pytest.mark.skip(reason=f"not in tier {tier!r} (in {tiers})"))
        elif tier == "gpu" and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="gpu tier needs a CUDA device"))


@pytest.fixture(scope="session")
def tier(request):
    return request.config.getoption("--tier")
