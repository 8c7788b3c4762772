"""Predicted latency on the phone spec for full-size models that have published phone numbers.

Imports each model at batch 1, runs the O2 pipeline for target "mobile" and asks the cost model
(device "phone": one Cortex-X3 class core, `ember.cost_models.devices.PHONE_X3`) for one call.
The published on-device numbers these are compared with, and their sources, are in
``examples/mobile_published.md``; this script only produces the predicted column.

    python examples/mobile_published.py [--json examples/mobile_results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import zoo  # noqa: E402  (the test zoo: seeded models, random weights, no downloads)

from ember import cost_models  # noqa: E402
from ember.frontends import import_model  # noqa: E402
from ember.passmanager import PassContext, PassManager, parse_pipeline  # noqa: E402

log = logging.getLogger("mobile_published")

# row name -> (zoo factory kwargs, what it stands for)
MODELS = {
    "MobileNetV2 1.0 224": ({"name": "mobilenet_v2", "size": "base", "batch": 1},
                            "torchvision layout, 3.5M params, 224x224"),
    "ResNet-50 224": ({"name": "resnet", "size": "50", "batch": 1}, "[3,4,6,3], 224x224"),
    "BERT-base seq 128": ({"name": "bert", "size": "base", "batch": 1, "seq": 128},
                          "12 layers, hidden 768"),
    "ViT-B/16 224": ({"name": "vit", "size": "base", "batch": 1}, "12 layers, hidden 768"),
}


def predict(kwargs: dict) -> dict:
    kw = dict(kwargs)
    z = zoo.get(kw.pop("name"), **kw)
    g = import_model(z.model, z.example_inputs, None, z.input_names)
    g = PassManager(parse_pipeline("O2")).run(g, PassContext(target="mobile"))
    ms = cost_models.predict_latency_ms(g, "phone", list(z.example_inputs))
    return {"predicted_ms": round(ms, 2), "params_M": round(g.param_bytes() / 4e6, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="examples/mobile_results.json")
    ap.add_argument("--only", nargs="+", help="row names to compute")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    dev = cost_models.get_device("phone")
    rows = {}
    for name, (kw, what) in MODELS.items():
        if a.only and name not in a.only:
            continue
        rows[name] = {"model": what, **predict(kw)}
        log.info("%-20s %8.2f ms predicted on %s", name, rows[name]["predicted_ms"], dev.name)
    out = Path(a.json)
    data = json.loads(out.read_text()) if out.exists() else {}
    data["phone_predictions"] = {"device": dev.name, "notes": dev.notes, "rows": rows}
    out.write_text(json.dumps(data, indent=1) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
