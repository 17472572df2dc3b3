"""Shared pytest setup: GPU tests skip cleanly on machines without CUDA."""

from __future__ import annotations

import pytest

GPU_TEST_TIMEOUT_S = 300  # per GPU test (cold Triton compiles included)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a core dependency
        has_cuda = False
    if has_cuda:
        # A GPU test that hangs (a kernel spinning on a signal that never comes) blocks inside
        # a CUDA call, where pytest-timeout's default signal method cannot interrupt it; the
        # thread method ends the process, so the device call returns with the log instead of
        # holding the lent GPU until its limit.
        if config.pluginmanager.hasplugin("timeout"):
            for item in items:
                if "gpu" in item.keywords and item.get_closest_marker("timeout") is None:
                    item.add_marker(pytest.mark.timeout(GPU_TEST_TIMEOUT_S, method="thread"))
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_run.sh on the lent machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
