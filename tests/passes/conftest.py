"""Fixtures of the pass tests: a cache dir for imported zoo graphs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(scope="session")
def zoo_cache(request: pytest.FixtureRequest) -> Path:
    return Path(request.config.cache.mkdir("ember_zoo_graphs"))
