"""FLOP/byte counts of the analytical model, symbolic dims, monotonicity, fusion."""

from __future__ import annotations

import sympy
import torch

from ember.cost_models.analytical import (
    estimate_graph,
    estimate_node,
    fusion_groups,
    node_cost,
    op_class,
)
from ember.cost_models.devices import A100_80GB, H100_SXM, PHONE_X3
from ember.ir import Graph, GraphBuilder, TensorType, sym

B, S = sym("batch"), sym("seq")


def _linear_graph(bias: bool = True) -> Graph:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (B, S, 64)))
    w = b.add_param("w", torch.randn(128, 64))
    ins = [x, w] + ([b.add_param("b", torch.randn(128))] if bias else [])
    b.set_outputs([b.op("linear", ins)])
    return b.build()


def test_linear_flops_symbolic() -> None:
    g = _linear_graph(bias=False)
    c = node_cost(g.nodes[0])
    assert sympy.simplify(c.flops - 2 * B * S * 64 * 128) == 0
    # x read, weight read, y written, fp32
    assert sympy.simplify(c.bytes - (4 * B * S * 64 + 4 * 128 * 64 + 4 * B * S * 128)) == 0
    assert op_class(g.nodes[0]) == "gemm"


def test_linear_bias_adds_one_flop_per_output() -> None:
    c = node_cost(_linear_graph(bias=True).nodes[0])
    assert sympy.simplify(c.flops - (2 * B * S * 64 * 128 + B * S * 128)) == 0


def test_matmul_batched_flops() -> None:
    b = GraphBuilder()
    q = b.add_input("q", TensorType("float32", (B, 12, S, 64)))
    k = b.add_input("k", TensorType("float32", (B, 12, 64, S)))
    b.set_outputs([b.op("matmul", [q, k])])
    c = node_cost(b.build().nodes[0])
    assert sympy.simplify(c.flops - 2 * B * 12 * S * S * 64) == 0


def test_conv_flops_exact() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (B, 3, 32, 32)))
    w = b.add_param("w", torch.randn(16, 3, 3, 3))
    b.set_outputs([b.op("conv", [x, w], {"stride": 2, "padding": 1})])
    n = b.build().nodes[0]
    # out 16 x 16 x 16 per image; 2 * Cin * 3 * 3 FLOPs per output element
    assert sympy.simplify(node_cost(n).flops - 2 * B * 16 * 16 * 16 * 3 * 9) == 0
    assert op_class(n) == "conv"


def test_depthwise_conv_class_and_flops() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (2, 32, 14, 14)))
    w = b.add_param("w", torch.randn(32, 1, 3, 3))
    b.set_outputs([b.op("conv", [x, w], {"padding": 1, "groups": 32})])
    n = b.build().nodes[0]
    assert op_class(n) == "dwconv"
    assert node_cost(n).flops == 2 * 2 * 32 * 14 * 14 * 1 * 9


def _attention(causal: bool, lq: object = S) -> Graph:
    b = GraphBuilder()
    q = b.add_input("q", TensorType("float32", (B, 4, lq, 32)))
    k = b.add_input("k", TensorType("float32", (B, 4, lq, 32)))
    v = b.add_input("v", TensorType("float32", (B, 4, lq, 16)))
    b.set_outputs([b.op("attention", [q, k, v], {"is_causal": causal})])
    return b.build()


def test_attention_flops() -> None:
    c = node_cost(_attention(False).nodes[0])
    assert sympy.simplify(c.flops - B * 4 * S * S * (2 * 32 + 2 * 16 + 5)) == 0
    # causal at a concrete length keeps exactly L(L+1)/2 score pairs
    c2 = node_cost(_attention(True, 10).nodes[0])
    assert sympy.simplify(c2.flops - B * 4 * 55 * (2 * 32 + 2 * 16 + 5)) == 0
    c3 = node_cost(_attention(True).nodes[0])
    assert sympy.simplify(c3.flops - B * 4 * S * (S + 1) / 2 * (2 * 32 + 2 * 16 + 5)) == 0


def test_views_are_free_and_estimate_is_symbolic(cpu) -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (B, S, 64)))
    y = b.op("reshape", [x], {"shape": (B, S, 4, 16)})
    b.set_outputs([b.op("permute", [y], {"perm": (0, 2, 1, 3)})])
    g = b.build()
    assert all(estimate_node(n, cpu).latency_s == 0 for n in g.nodes)
    est = estimate_node(_linear_graph().nodes[0], cpu)
    assert {s.name for s in est.latency_s.free_symbols} == {"batch", "seq"}
    at = est.at({"batch": 2, "seq": 8})
    assert isinstance(at.latency_s, float) and at.flops == 2 * 16 * 64 * 128 + 16 * 128


def _block() -> Graph:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (B, S, 64)))
    w1 = b.add_param("w1", torch.randn(256, 64))
    w2 = b.add_param("w2", torch.randn(64, 256))
    h = b.op("gelu", [b.op("linear", [x, w1])])
    y = b.op("add", [b.op("linear", [h, w2]), x])
    z = b.op("layer_norm", [y])
    q = b.op("permute", [b.op("reshape", [z], {"shape": (B, S, 4, 16)})], {"perm": (0, 2, 1, 3)})
    b.set_outputs([b.op("attention", [q, q, q])])
    return b.build()


def test_estimates_monotone_in_batch_and_seq(cpu) -> None:
    g = _block()
    for dev in (cpu, H100_SXM, A100_80GB, PHONE_X3):
        prev = 0.0
        for bs in (1, 2, 4, 8, 16):
            t = estimate_graph(g, dev, {"batch": bs, "seq": 64}).total_us
            assert t > prev
            prev = t
        prev = 0.0
        for s in (8, 32, 128, 512):
            t = estimate_graph(g, dev, {"batch": 2, "seq": s}).total_us
            assert t > prev
            prev = t


def test_fusion_groups_and_bytes_once(cpu) -> None:
    g = _block()
    groups = fusion_groups(g)
    ops = [[g.nodes[i].op for i in grp] for grp in groups]
    # gelu fuses into the first GEMM, the residual add into the second; views join the norm
    assert ["linear", "gelu"] in ops
    assert ["linear", "add"] in ops
    env = {"batch": 4, "seq": 128}
    fused = estimate_graph(g, cpu, env)
    eager = estimate_graph(g, cpu, env, runtime="eager")
    assert len(fused.groups) < len(eager.groups)
    assert fused.bytes < eager.bytes   # the gelu input/output never touches memory
    assert fused.total_us < eager.total_us
    assert abs(sum(fused.node_us) - fused.total_us) < 1e-6 * fused.total_us


def test_gpu_faster_than_phone_for_big_gemm(cpu) -> None:
    g = _linear_graph()
    env = {"batch": 64, "seq": 512}
    t = {d.name: estimate_graph(g, d, env).total_us for d in (H100_SXM, A100_80GB, PHONE_X3)}
    assert t["h100"] < t["a100"] < t["phone"]


def test_quantized_weight_bytes_by_dtype() -> None:
    # an int8 weight moves a quarter of the fp32 weight's bytes (weights are counted by dtype)
    def cost(dtype: torch.dtype) -> int:
        b = GraphBuilder()
        x = b.add_input("x", TensorType("float32", (1, 1024)))
        w = b.add_param("w", torch.zeros(1024, 1024, dtype=dtype))
        b.set_outputs([b.op("matmul", [x, b.op("cast", [w], {"dtype": "float32"})])])
        return node_cost(b.build().nodes[0]).bytes, node_cost(b.build().nodes[1]).bytes
    cast8, _ = cost(torch.int8)
    cast32, _ = cost(torch.float32)
    assert cast8 == 1024 * 1024 * (1 + 4)
    assert cast32 == 1024 * 1024 * (4 + 4)
