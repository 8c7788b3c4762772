"""``ember report``: the HTML page on an artifact, its sections and plots, rendered by Chromium.

Chromium comes from the system (``apt-get install -y chromium``); without it the render test
is skipped with that reason. The screenshot is kept at ``$EMBER_REPORT_SHOT`` when set.
"""

from __future__ import annotations

import base64
import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import ember
from ember import planner
from ember.report import build_report, time_nodes

pytest.importorskip("matplotlib", reason="report plots need matplotlib (dev extra)")

SECTIONS = ("Where the time goes", "Passes and their effect", "Accuracy and fidelity",
            "Backend placement", "Accuracy-budget planner")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_planner import SPACE, make_digits_vit

    m, x, y = make_digits_vit()
    mp = pytest.MonkeyPatch()
    mp.setattr(planner, "default_space", lambda *a, **k: SPACE)
    try:
        cm = ember.compile(m, (x[:64],), target="reference", max_drop=0.3,
                           calib=(x[:256], y[:256]))
    finally:
        mp.undo()
    return cm.save(tmp_path_factory.mktemp("rep") / "vit.ember")


@pytest.fixture(scope="module")
def page(artifact: Path) -> str:
    return build_report(artifact, repeats=2)


def test_report_has_every_section_and_embedded_plots(page: str, artifact: Path) -> None:
    for s in SECTIONS:
        assert s in page, s
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) >= 3  # cost by class, op counts, planner scatter
    for b in imgs:
        assert base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "measured: reference interpreter, node by node" in page
    assert "predicted now from ir.json" in page and "predicted at compile" in page
    m = ember.artifact.read_manifest(artifact)
    assert html.escape(m["pass_records"]["planner"]["pipeline"]) in page
    for rec in m["pass_records"]["planner"]["records"]:
        assert html.escape(rec["reason"]) in page


def test_report_without_planner_or_measurement(tmp_path: Path) -> None:
    from zoo import mlp

    z = mlp()
    art = ember.compile(z.model, z.example_inputs, target="reference").save(tmp_path / "a.ember")
    text = build_report(art, measure=False)
    assert "compiled without a planner" in text
    assert "measured: reference interpreter" not in text


def test_time_nodes_covers_every_node(artifact: Path) -> None:
    cm = ember.load(artifact, fallback="reference")
    from ember.driver import make_example_inputs

    us = time_nodes(cm.graph, make_example_inputs(cm.graph), repeats=1)
    assert len(us) == len(cm.graph.nodes) and all(t >= 0 for t in us) and sum(us) > 0


def test_cli_report(artifact: Path, tmp_path: Path) -> None:
    from ember.cli import main

    out = tmp_path / "r.html"
    assert main(["report", str(artifact), "-o", str(out), "--no-measure"]) == 0
    assert "Accuracy-budget planner" in out.read_text()


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None,
                    reason="headless Chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_chromium(page: str, tmp_path: Path) -> None:
    doc = tmp_path / "report.html"
    doc.write_text(page, encoding="utf-8")
    shot = Path(os.environ.get("EMBER_REPORT_SHOT", tmp_path / "report.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(_chromium()), "--headless", "--no-sandbox", "--disable-gpu",
           "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1200,2000",
           doc.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a page, not a blank
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1200, 2000)
    # rendered content: a blank white page has (almost) one grey level
    hist = img.histogram()
    assert sum(1 for h in hist if h > 200) > 10
    assert torch.tensor(list(img.getdata()), dtype=torch.float32).std() > 10
