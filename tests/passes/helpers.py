"""Shared checks for pass tests: run with verification, compare with the reference, idempotence."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ember.ir import Graph, run_graph, verify
from ember.passmanager import PassContext, PassManager

__all__ = ["run_pass", "assert_close_outputs", "check_pass", "random_inputs"]


def run_pass(g: Graph, pipeline: str, ctx: PassContext | None = None) -> Graph:
    """Runs ``pipeline`` with `verify` after every pass, and checks the input is untouched."""
    before = str(g)
    weights = {k: t.clone() for k, t in g.weights.items()}
    out = PassManager(pipeline, verify_each=True).run(g, ctx or PassContext())
    verify(out)
    assert str(g) == before, "the pass mutated its input graph"
    assert set(weights) == set(g.weights)
    assert all(torch.equal(weights[k], g.weights[k]) for k in weights), "input weights changed"
    return out


def assert_close_outputs(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor],
                         rtol: float = 1e-5) -> None:
    """Equal up to ``rtol`` relative to each output's scale (float reassociation allowed)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, y.shape, x.dtype, y.dtype)
        if not x.dtype.is_floating_point:
            assert torch.equal(x, y)
            continue
        scale = max(float(x.abs().max()), 1e-6) if x.numel() else 1.0
        err = float((x - y).abs().max()) if x.numel() else 0.0
        assert err <= rtol * scale, f"max error {err:.3g} > {rtol} * scale {scale:.3g}"


def random_inputs(g: Graph, seed: int = 0, **dims: int) -> list[torch.Tensor]:
    """Random tensors for the inputs of ``g`` (symbolic dims from ``dims``, default 3)."""
    from ember.ir import evaluate, to_torch_dtype

    gen = torch.Generator().manual_seed(seed)
    out = []
    for v in g.inputs:
        shape = []
        for d in v.type.shape:
            shape.append(d if isinstance(d, int) else evaluate(d, {s.name: dims.get(s.name, 3)
                                                                  for s in d.free_symbols}))
        dt = to_torch_dtype(v.type.dtype)
        if dt == torch.bool:
            out.append(torch.rand(shape, generator=gen) > 0.3)
        elif dt.is_floating_point:
            out.append(torch.randn(shape, generator=gen, dtype=dt))
        else:
            out.append(torch.randint(0, 4, shape, generator=gen, dtype=dt))
    return out


def check_pass(g: Graph, pipeline: str, inputs: Sequence[torch.Tensor] | None = None,
               rtol: float = 1e-5, ctx: PassContext | None = None) -> Graph:
    """Runs the pipeline, compares outputs with the original graph, checks idempotence."""
    out = run_pass(g, pipeline, ctx)
    ins = list(inputs) if inputs is not None else random_inputs(g)
    assert_close_outputs(run_graph(g, *ins), run_graph(out, *ins), rtol)
    again = run_pass(out, pipeline)
    assert str(again) == str(out), f"not idempotent:\n{out}\n--- second run ---\n{again}"
    return out
