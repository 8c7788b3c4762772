"""Instruction counts of Ember's NEON schedules vs TVM's untuned kernels on a GEMM-heavy model.

Both builds of the same model run under qemu-aarch64 with an instruction-count plugin (see
ember.backends.mobile.analysis); the script prints instructions per inference, the ratio, and
the NEON instructions in each binary. Exit status 1 when the ratio is below --min-ratio.

    python examples/mobile_insn_count.py [--batch 16] [--width 256] [--min-ratio 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
from torch import nn

import ember.backends.mobile  # noqa: F401  (registers the backend)
from ember.backends.mobile.analysis import compare_schedules
from ember.driver import import_model

log = logging.getLogger("mobile_insn_count")


def gemm_model(width: int, depth: int = 3) -> nn.Module:
    """Linear+ReLU stack: almost all of its work is GEMM."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--min-ratio", type=float, default=10.0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = gemm_model(a.width, a.depth)
    x = torch.randn(a.batch, a.width)
    graph = import_model(model, (x,))
    res = compare_schedules(graph, [x])
    macs = a.batch * a.width * a.width * a.depth
    for s in ("none", "neon"):
        r = res[s]
        log.info("%-5s %12d instructions/inference (%.2f per MAC), %d fmla v.4s in the binary",
                 s, r["instructions"], r["instructions"] / macs, r["neon"]["fmla_4s"])
    log.info("ratio untuned/neon: %.1fx", res["ratio"])
    log.info("%s", json.dumps(res, indent=1))
    return 0 if res["ratio"] >= a.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
