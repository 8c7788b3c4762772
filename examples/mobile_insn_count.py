"""Instruction counts of Ember's NEON schedules vs TVM's untuned kernels on a GEMM-heavy model.

Both builds of the same model run under qemu-aarch64 with an instruction-count plugin (see
ember.backends.mobile.analysis); the script prints instructions per inference, the ratio, and
the NEON instructions in each binary. Exit status 1 when the ratio is below --min-ratio.

    python examples/mobile_insn_count.py [--batch 16] [--width 256] [--min-ratio 10]

With ``--int8 [--json PATH]``: the same model fp32 vs w8a8-dynamic (int8 weights, int8 x int8
-> int32 GEMM), each built for ``generic`` (ARMv8.0 NEON: widening smull/saddw) and
``cortex-a76`` (+dotprod: sdot), with instructions per inference, weights-file bytes and the
error against the reference interpreter.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import torch
from torch import nn

import ember.backends.mobile  # noqa: F401  (registers the backend)
from ember.backends.mobile.analysis import compare_schedules
from ember.frontends import import_model

log = logging.getLogger("mobile_insn_count")


def gemm_model(width: int, depth: int = 3) -> nn.Module:
    """Linear+ReLU stack: almost all of its work is GEMM."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def int8_vs_fp32(model: nn.Module, x: torch.Tensor, macs: int) -> dict[str, Any]:
    """Instructions/inference, weights bytes and error of fp32 and int8 builds per cpu."""
    from ember.backends.mobile import compile_graph
    from ember.backends.mobile.analysis import count_instructions, neon_report
    from ember.driver import relative_error
    from ember.ir import run_graph
    from ember.passmanager import PassContext, PassManager, parse_pipeline

    graphs = {}
    for kind, pipe in (("fp32", "O2"), ("int8", "O2,quantize{scheme=w8a8-dynamic,gate=always}")):
        graphs[kind] = PassManager(parse_pipeline(pipe)).run(import_model(model, (x,)),
                                                             PassContext(target="mobile"))
    rows: dict[str, Any] = {}
    for cpu in ("generic", "cortex-a76"):
        for kind, g in graphs.items():
            prog = compile_graph(g, [x], cpu=cpu)
            rep = neon_report(prog.library)
            insns = count_instructions(prog, [x])
            err = relative_error(prog(x), run_graph(g, x))
            rows[f"{kind}/{cpu}"] = {
                "instructions": insns, "instructions_per_mac": round(insns / macs, 4),
                "weights_bytes": prog.weights.stat().st_size, "max_rel_error_vs_reference": err,
                "ops": g.op_counts(), "rules": prog.info["rules"],
                "binary": {k: rep.to_json()[k] for k in ("fmla_4s", "dot", "int_mac")}}
            log.info("%-18s %10d insns/inference (%.3f per MAC), weights %7d B, err %.1e",
                     f"{kind}/{cpu}", insns, insns / macs, rows[f"{kind}/{cpu}"]["weights_bytes"],
                     err)
    for cpu in ("generic", "cortex-a76"):
        f, i = rows[f"fp32/{cpu}"], rows[f"int8/{cpu}"]
        rows[f"ratio/{cpu}"] = {
            "instructions_fp32_over_int8": round(f["instructions"] / i["instructions"], 3),
            "weights_fp32_over_int8": round(f["weights_bytes"] / i["weights_bytes"], 3)}
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--min-ratio", type=float, default=10.0)
    ap.add_argument("--int8", action="store_true", help="fp32 vs int8 builds (see above)")
    ap.add_argument("--json", help="with --int8: write the results here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = gemm_model(a.width, a.depth)
    x = torch.randn(a.batch, a.width)
    macs = a.batch * a.width * a.width * a.depth
    if a.int8:
        rows = int8_vs_fp32(model, x, macs)
        res = {"model": f"{a.depth} x Linear({a.width},{a.width})+ReLU, batch {a.batch}",
               "macs": macs, "counted_by": "qemu-aarch64 -cpu max TCG plugin, 1 thread",
               "results": rows}
        log.info("%s", json.dumps(rows, indent=1, default=str))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1, default=str)
        return 0
    graph = import_model(model, (x,))
    res = compare_schedules(graph, [x])
    for s in ("none", "neon"):
        r = res[s]
        log.info("%-5s %12d instructions/inference (%.2f per MAC), %d fmla v.4s in the binary",
                 s, r["instructions"], r["instructions"] / macs, r["neon"]["fmla_4s"])
    log.info("ratio untuned/neon: %.1fx", res["ratio"])
    log.info("%s", json.dumps(res, indent=1))
    return 0 if res["ratio"] >= a.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
