"""The learned correction: JSON round trip, prediction without sklearn, the committed model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from ember.cost_models.measured import (
    DEFAULT_CORRECTION,
    FEATURES,
    Correction,
    fit,
    kernel_cases,
    load_correction,
)


def _synthetic_dataset(n: int = 120) -> dict:
    rng = random.Random(0)
    recs = []
    for _ in range(n):
        f = {k: rng.uniform(0, 6) for k in FEATURES}
        f["cls"] = float(rng.randrange(4))
        # the "truth": small kernels are slower than the roofline, GEMMs faster
        ratio = math.exp(0.8 * (f["cls"] == 0) - 0.3 * f["log_flops"] / 6 + rng.gauss(0, 0.02))
        recs.append({"features": f, "analytical_s": 1e-4, "measured_s": 1e-4 * ratio})
    return {"device": {"notes": "synthetic"}, "records": recs}


def test_fit_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    data = _synthetic_dataset()
    out = tmp_path / "corr.json"
    corr = fit(data, out, n_estimators=30)
    doc = json.loads(out.read_text())
    assert doc["format"] == "ember-gbrt" and doc["version"] == 1
    assert "pickle" not in out.read_text()
    back = Correction.from_json(doc)
    assert back == corr
    for r in data["records"][:20]:
        assert back.factor(r["features"]) == pytest.approx(corr.factor(r["features"]))
    # it learned the synthetic residual: better than the roofline alone
    assert corr.meta["within10_train"] > corr.meta["within10_roofline"]


def test_bad_version_is_rejected() -> None:
    with pytest.raises(ValueError, match="version"):
        Correction.from_json({"format": "ember-gbrt", "version": 999, "features": [],
                              "init": 0, "learning_rate": 0.1, "trees": []})


def test_committed_correction_loads() -> None:
    if not DEFAULT_CORRECTION.is_file():
        pytest.skip("no committed correction")
    corr = load_correction()
    assert corr is not None and len(corr.trees) > 0
    assert corr.meta["n_records"] >= 50
    f = {k: 1.0 for k in corr.features}
    assert 1 / 20 <= corr.factor(f) <= 20


def test_kernel_cases_cover_every_family() -> None:
    fams = {f for f, _ in kernel_cases()}
    assert fams == {"linear", "matmul", "conv", "attention", "layer_norm", "softmax",
                    "elementwise"}
    assert len(list(kernel_cases(quick=True))) < len(list(kernel_cases()))
