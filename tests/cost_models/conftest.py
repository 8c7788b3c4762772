"""Fixtures for the cost-model tests: one quick CPU measurement in a temporary cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.cost_models.devices import DeviceSpec, get_device


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ember_cache")


@pytest.fixture(scope="session")
def cpu(cache_dir: Path) -> DeviceSpec:
    """This CPU on one thread, measured with the quick micro-benchmarks into a temporary cache.

    One thread: on a shared machine two OpenMP threads can be descheduled mid-barrier and run
    tens of times slower, while one thread degrades gracefully.
    """
    return get_device("cpu", cache_dir=cache_dir, quick=True, threads=1)
