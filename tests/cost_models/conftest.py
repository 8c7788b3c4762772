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
    """This CPU, measured with the quick micro-benchmarks into a temporary cache."""
    return get_device("cpu", cache_dir=cache_dir, quick=True)
