"""Shared test setup: import paths, seeds, the Hypothesis profile, IR verification helpers."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch

_TESTS = Path(__file__).resolve().parent
# `import zoo` / `import strategies` from any test folder, and `import tests.zoo` too
for _p in (str(_TESTS), str(_TESTS.parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ember",
        max_examples=int(os.environ.get("EMBER_HYPOTHESIS_EXAMPLES", "40")),
        derandomize=True,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ember"))
except ImportError:  # hypothesis is a dev dependency; tests that need it import it themselves
    pass


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same RNG state."""
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _verify_after_every_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every PassManager in every test verifies the IR after each pass (`ember.ir.verify`)."""
    from ember import passmanager

    monkeypatch.setattr(passmanager, "VERIFY_EACH", True)
