"""fuse_linear_act: bias/activation/residual epilogues -> fused_linear / fused_conv."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import check_pass

from ember.ir import Graph, GraphBuilder, TensorType, Value, get_op, sym
from ember.passmanager import PassContext

ACTS = [("relu", {}), ("gelu", {}), ("gelu", {"approximate": "tanh"}), ("silu", {}),
        ("sigmoid", {}), ("tanh", {}), ("hardswish", {}), ("leaky_relu", {"negative_slope": 0.2}),
        ("elu", {"alpha": 0.5}), ("clamp", {"min": 0.0, "max": 6.0}), ("mish", {})]


def _c(b: GraphBuilder, v: float) -> Value:
    return b.add_param("c", torch.tensor(v))


def _linear(b: GraphBuilder, x: Value, n_out: int, bias: str) -> Value:
    n_in = int(x.type.shape[-1])
    w = b.add_param("w", torch.randn(n_out, n_in) / math.sqrt(n_in))
    if bias == "input":
        return b.op("linear", [x, w, b.add_param("b", torch.randn(n_out))])
    y = b.op("linear", [x, w, None])
    if bias == "add":
        y = b.op("add", [y, b.add_param("b", torch.randn(n_out))])
    return y


@pytest.mark.parametrize("act,attrs", ACTS)
@pytest.mark.parametrize("bias", ["none", "input", "add"])
def test_linear_activation(act: str, attrs: dict, bias: str) -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("batch"), 6, 16)))
    y = b.op(act, [_linear(b, x, 24, bias)], attrs)
    b.set_outputs([y])
    ctx = PassContext()
    out = check_pass(b.build(), "fuse_linear_act", ctx=ctx)
    assert out.op_counts() == {"fused_linear": 1}
    node = out.nodes[0]
    want = {"leaky_relu": "leaky_relu", "clamp": "clamp"}.get(act, act)
    assert node.attrs["activation"] == want and node.attrs["residual"] == "none"
    assert (node.inputs[2] is not None) == (bias != "none")
    if act == "gelu":
        assert node.attrs["approximate"] == attrs.get("approximate", "none")


def test_linear_output_used_twice_is_not_fused() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (4, 8)))
    y = _linear(b, x, 8, "input")
    b.set_outputs([b.op("relu", [y]), y])
    ctx = PassContext()
    out = check_pass(b.build(), "fuse_linear_act", ctx=ctx)
    assert out.op_counts() == {"linear": 1, "relu": 1}


def _gelu_decomposed(b: GraphBuilder, x: Value, form: str) -> Value:
    half = b.op("mul", [x, _c(b, 0.5)])
    if form == "tanh":  # GPT-2's NewGELUActivation, as torch.export writes it
        cube = b.op("mul", [b.op("pow", [x, _c(b, 3.0)]), _c(b, 0.044715)])
        inner = b.op("mul", [b.op("add", [x, cube]), _c(b, math.sqrt(2 / math.pi))])
        f = b.op("tanh", [inner])
    else:
        f = b.op("erf", [b.op("div", [x, _c(b, math.sqrt(2.0))])])
    if form == "erf_onnx":  # torch.onnx's association: (x * (1 + erf)) * 0.5
        return b.op("mul", [b.op("mul", [x, b.op("add", [f, _c(b, 1.0)])]), _c(b, 0.5)])
    return b.op("mul", [half, b.op("add", [f, _c(b, 1.0)])])


@pytest.mark.parametrize("form,approx", [("tanh", "tanh"), ("erf", "none"), ("erf_onnx", "none")])
def test_decomposed_gelu_after_reshaped_linear(form: str, approx: str) -> None:
    """GPT-2 MLP: linear on [b*s, k] -> reshape [b, s, n] -> decomposed GELU."""
    b = GraphBuilder()
    bs, s = sym("batch"), sym("seq")
    x = b.add_input("x", TensorType("float32", (bs * s, 16)))
    r = b.add_input("r", TensorType("float32", (bs, s, 16)))
    y = b.op("reshape", [_linear(b, x, 32, "input")], {"shape": (bs, s, 32)})
    h = b.op("reshape", [_gelu_decomposed(b, y, form)], {"shape": (bs * s, 32)})
    z = b.op("reshape", [_linear(b, h, 16, "input")], {"shape": (bs, s, 16)})
    b.set_outputs([b.op("add", [r, z])])
    g = b.build()
    ctx = PassContext()
    out = check_pass(g, "fuse_linear_act", [torch.randn(6, 16), torch.randn(2, 3, 16)], ctx=ctx)
    counts = out.op_counts()
    assert counts == {"fused_linear": 2, "reshape": 4}, counts
    first, second = (n for n in out.nodes if n.op == "fused_linear")
    assert (first.attrs["activation"], first.attrs["approximate"]) == ("gelu", approx)
    assert second.attrs["residual"] == "before_act"
    assert ctx.records["fuse_linear_act"]["hits"]["gelu"] == 1


def test_matmul_by_param_plus_bias_becomes_linear() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (4, 8)))
    w = b.add_param("w", torch.randn(8, 12))
    y = b.op("add", [b.op("matmul", [x, w]), b.add_param("b", torch.randn(12))])
    b.set_outputs([b.op("silu", [y])])
    out = check_pass(b.build(), "fuse_linear_act")
    assert out.op_counts() == {"fused_linear": 1}
    assert tuple(out.weights[out.nodes[0].inputs[1].name].shape) == (12, 8)


def _resnet_block(residual_first: bool) -> Graph:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("batch"), 4, 8, 8)))
    w = b.add_param("w", torch.randn(4, 4, 3, 3) / 6)
    c = b.op("conv", [x, w, None], {"padding": 1})
    c = b.op("add", [c, b.add_param("b", torch.randn(1, 4, 1, 1))])  # bias as a broadcast add
    if residual_first:
        y = b.op("relu", [b.op("add", [x, c])])  # ResNet: relu(conv + identity)
    else:
        y = b.op("add", [b.op("clamp", [c], {"min": 0.0, "max": 6.0}), x])
    b.set_outputs([y])
    return b.build()


@pytest.mark.parametrize("residual_first", [True, False])
def test_conv_bias_activation_residual(residual_first: bool) -> None:
    out = check_pass(_resnet_block(residual_first), "fuse_linear_act", [torch.randn(2, 4, 8, 8)])
    assert out.op_counts() == {"fused_conv": 1}
    node = out.nodes[0]
    assert node.attrs["residual"] == ("before_act" if residual_first else "after_act")
    assert node.attrs["activation"] == ("relu" if residual_first else "clamp")
    assert node.inputs[2] is not None and node.inputs[3].name == "x"


def test_bias_on_wrong_axis_is_a_plain_add() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (2, 4, 8, 8)))
    c = b.op("conv", [x, b.add_param("w", torch.randn(4, 4, 1, 1)), None])
    b.set_outputs([b.op("add", [c, b.add_param("b", torch.randn(8))])])  # broadcasts over W
    out = check_pass(b.build(), "fuse_linear_act")
    assert out.op_counts() == {"add": 1, "conv": 1}


def test_config_disables_conv() -> None:
    out = check_pass(_resnet_block(True), "fuse_linear_act{conv=false}", [torch.randn(2, 4, 8, 8)])
    assert "fused_conv" not in out.op_counts()


def test_fused_op_rejects_bad_epilogue() -> None:
    op = get_op("fused_linear")
    x, w = TensorType("float32", (2, 4)), TensorType("float32", (3, 4))
    with pytest.raises(TypeError):
        op.infer([x, w, None], op.normalize_attrs({"activation": "nope"}))
    with pytest.raises(TypeError):  # residual mode without a residual input
        op.infer([x, w, None], op.normalize_attrs({"activation": "relu",
                                                   "residual": "after_act"}))
    with pytest.raises(TypeError):  # residual must not broadcast
        op.infer([x, w, None, TensorType("float32", (1, 3))],
                 op.normalize_attrs({"activation": "relu", "residual": "after_act"}))
