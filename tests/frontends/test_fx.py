"""FX frontend: every zoo model imports, verifies, runs on the reference interpreter like eager,
at the example shapes and at other values of its symbolic dims, and survives a JSON round trip.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
import zoo
from torch import nn
from torch.utils._pytree import tree_flatten

from ember.errors import UnsupportedOpError
from ember.frontends import fx
from ember.ir import Graph, graph_from_json, graph_to_json, run_graph, sym, verify

SMALL = ["mlp", "resnet", "mobilenet_v2", "vit", "bert", "bert_eager", "gpt2", "llama"]


def eager_outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*inputs)
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def assert_matches(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if not w.is_floating_point():
            assert torch.equal(g, w)
            continue
        tol = 1e-4 * max(1.0, float(w.abs().max()) if w.numel() else 1.0)
        assert float((g - w).abs().max()) <= tol


@functools.cache
def imported(name: str) -> tuple[zoo.ZooModel, Graph]:
    z = zoo.get(name)
    return z, fx.import_module(z.model, z.example_inputs, z.dynamic_dims, z.input_names)


@pytest.mark.parametrize("name", SMALL)
def test_zoo_model_imports_and_matches_eager(name: str) -> None:
    z, g = imported(name)
    verify(g)
    assert list(g.input_names) == z.input_names
    assert_matches(run_graph(g, *z.example_inputs), eager_outputs(z.model, z.example_inputs))


@pytest.mark.parametrize("name", SMALL)
def test_dynamic_dims_run_at_two_shapes(name: str) -> None:
    z, g = imported(name)
    for v, n in zip(g.inputs, g.input_names):
        for d, s in z.dynamic_dims.get(n, {}).items():
            assert v.type.shape[d] == sym(s), f"{n} dim {d} is {v.type.shape[d]}, not {s}"
            assert s in g.meta["dim_ranges"]
    for dims in ({"batch": 3, "seq": 5}, {"batch": 1, "seq": 11}):
        ins = z.make_inputs(**dims)
        assert_matches(run_graph(g, *ins), eager_outputs(z.model, ins))


@pytest.mark.parametrize("name", ["bert", "gpt2", "resnet"])
def test_json_round_trip(name: str) -> None:
    z, g = imported(name)
    doc = json.loads(json.dumps(graph_to_json(g)))
    g2 = graph_from_json(doc, g.weights)
    verify(g2)
    assert graph_to_json(g2) == graph_to_json(g)
    assert str(g2) == str(g)
    ins = z.make_inputs(batch=2, seq=6)
    assert_matches(run_graph(g2, *ins), run_graph(g, *ins))


def test_high_level_ops_survive_decomposition() -> None:
    assert {"linear", "layer_norm", "attention", "gelu"} <= set(imported("bert")[1].op_counts())
    eager = imported("bert_eager")[1].op_counts()
    assert {"matmul", "softmax"} <= set(eager) and "attention" not in eager
    cnn = imported("resnet")[1].op_counts()
    assert {"conv", "batch_norm", "max_pool", "relu"} <= set(cnn)
    assert imported("mobilenet_v2")[1].op_counts().get("clamp", 0) > 0  # relu6
    gpt2 = imported("gpt2")[1].op_counts()
    assert gpt2.get("linear", 0) == 9  # Conv1D addmm became linear (+ lm_head)


def test_output_names_follow_the_model_output_structure() -> None:
    assert imported("bert")[1].output_names == ("last_hidden_state", "pooler_output")
    assert imported("gpt2")[1].output_names == ("logits",)
    assert imported("mlp")[1].output_names == ("output",)


def test_params_and_locations() -> None:
    z, g = imported("mlp")
    assert sorted(g.weights) == sorted(n.replace(".", "_") for n, _ in
                                       z.model.named_parameters())
    lin = [n for n in g.nodes if n.op == "linear"][0]
    assert lin.loc.frontend_op == "aten.linear.default"
    assert lin.loc.file.endswith("zoo.py") and lin.loc.line > 0
    assert lin.loc.frontend_node


class _TwoUnsupported(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.cumprod(x, dim=1)
        b = torch.sort(x, dim=-1).values
        return a + b + torch.relu(x)


def test_unsupported_ops_are_all_listed_with_locations() -> None:
    with pytest.raises(UnsupportedOpError) as ei:
        fx.import_module(_TwoUnsupported(), (torch.randn(2, 4),))
    ops = {o.op for o in ei.value.ops}
    assert ops == {"aten.cumprod.default", "aten.sort.default"}, ops
    for o in ei.value.ops:
        assert "test_fx.py:" in o.loc
    msg = str(ei.value)
    assert "aten.cumprod" in msg and "aten.sort" in msg


class _Scalars(nn.Module):
    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        y = (x * 2 + 1.5) / x.shape[-1]
        y = y.masked_fill(n > 3, -1.0).clamp(-2.0, 2.0)
        m = torch.arange(x.shape[-1]) < x.shape[-1] // 2
        return torch.where(m, y, y.pow(2)).sum(-1, keepdim=True) + n.float()


def test_scalars_symbolic_arithmetic_and_masks() -> None:
    x, n = torch.randn(2, 6), torch.tensor([[1], [5]])
    g = fx.import_module(_Scalars(), (x, n), {"x": {1: "len"}})
    verify(g)
    for length in (6, 9):
        xi = torch.randn(2, length)
        assert_matches(run_graph(g, xi, n), eager_outputs(_Scalars(), (xi, n)))


class _Indexing(nn.Module):
    def forward(self, x: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = x[i]                              # index along dim 0
        b = x[:, i[:2]]                       # index along dim 1
        c = x[i[:2], :, i[:2]]                # non-adjacent advanced indices
        d = x[..., -1]
        e, f = torch.split(x, [1, 2], dim=1)
        return a, b, c, d, torch.cat([f, e], 1), x.flatten(1).unsqueeze(0).transpose(0, 1)


def test_indexing_split_and_views() -> None:
    x, i = torch.randn(4, 3, 5), torch.tensor([2, -1, 0])
    g = fx.import_module(_Indexing(), (x, i))
    verify(g)
    assert_matches(run_graph(g, x, i), eager_outputs(_Indexing(), (x, i)))


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("resnet", "50"), ("bert", "base"), ("vit", "base"),
                                       ("gpt2", "base"), ("mobilenet_v2", "base")])
def test_full_size_models(name: str, size: str) -> None:
    z = zoo.get(name, size=size, batch=1)
    g = fx.import_module(z.model, z.example_inputs, z.dynamic_dims, z.input_names)
    verify(g)
    n_params = sum(p.numel() for p in z.model.parameters())
    assert sum(t.numel() for t in g.weights.values()) >= 0.9 * n_params
    assert_matches(run_graph(g, *z.example_inputs), eager_outputs(z.model, z.example_inputs))


def test_import_keeps_every_submodule_mode():
    """Importing a wrapper still in training mode leaves the wrapped model in eval mode."""
    from ember.frontends.fx import import_module

    inner = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).eval()
    wrapper = torch.nn.Sequential(inner)  # a fresh module: training mode
    import_module(wrapper, (torch.randn(2, 4),))
    assert wrapper.training and not inner.training and not inner[1].training
