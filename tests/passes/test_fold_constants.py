"""fold_constants: folding params into params, the size cap, exact simplifications."""

from __future__ import annotations

import torch
from helpers import check_pass

from ember.ir import GraphBuilder, TensorType, sym
from ember.passmanager import PassContext


def _c(b: GraphBuilder, v: object) -> object:
    return b.add_param("c", torch.tensor(v))


def test_folds_param_chain_into_one_param() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (4, 8)))
    w = b.add_param("w", torch.randn(6, 8))
    wt = b.op("permute", [b.op("mul", [w, _c(b, 2.0)])], {"perm": (1, 0)})
    b.set_outputs([b.op("matmul", [x, wt])])
    g = b.build()
    ctx = PassContext()
    out = check_pass(g, "fold_constants", ctx=ctx)
    assert out.op_counts() == {"matmul": 1}
    assert len(out.params) == 1 and ctx.records["fold_constants"]["folded"] == 2
    assert torch.equal(out.weights[out.params[0].name], (g.weights["w"] * 2).t())


def test_size_cap_keeps_big_expand_but_folds_small_one() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (4, 64)))
    p = b.add_param("p", torch.randn(1, 64))
    big = b.op("expand", [p], {"shape": (4, 64)})
    b.set_outputs([b.op("add", [x, big])])
    g = b.build()
    capped = check_pass(g, "fold_constants{max_numel=100}")
    assert capped.op_counts() == {"add": 1, "expand": 1}
    folded = check_pass(g, "fold_constants")
    assert folded.op_counts() == {"add": 1}


def test_no_fold_with_symbolic_attrs() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("batch"), 8)))
    full = b.op("full", [], {"shape": (sym("batch"), 8), "value": 1.5})
    b.set_outputs([b.op("add", [x, full])])
    out = check_pass(b.build(), "fold_constants")
    assert out.op_counts() == {"add": 1, "full": 1}


def test_neutral_operands_removed_only_when_type_is_kept() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (2, 3, 4)))
    y = b.op("mul", [_c(b, 1.0), x])
    y = b.op("add", [y, b.add_param("z", torch.zeros(4))])
    y = b.op("div", [y, _c(b, 1.0)])
    y = b.op("sub", [y, _c(b, 0.0)])
    grow = b.op("add", [y, b.add_param("zz", torch.zeros(5, 2, 3, 4))])  # broadcasts: stays
    i = b.add_input("i", TensorType("int64", (3,)))
    promo = b.op("mul", [i, _c(b, 1.0)])  # int * float -> float: stays
    b.set_outputs([y, grow, promo])
    out = check_pass(b.build(), "fold_constants")
    assert out.op_counts() == {"add": 1, "mul": 1}
    assert out.outputs[0].name == "x"


def test_shape_simplifications() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("batch"), 6, 4)))
    y = b.op("reshape", [x], {"shape": (sym("batch"), 24)})
    y = b.op("reshape", [y], {"shape": (sym("batch"), 4, 6)})  # reshape of reshape
    y = b.op("permute", [y], {"perm": (0, 2, 1)})
    y = b.op("permute", [y], {"perm": (0, 2, 1)})  # transpose of transpose: identity
    y = b.op("cast", [y], {"dtype": "float32"})
    y = b.op("slice", [y], {"dim": 1, "start": 0})
    y = b.op("expand", [y], {"shape": (-1, 4, 6)})
    z = b.op("permute", [b.op("permute", [x], {"perm": (1, 0, 2)})], {"perm": (0, 2, 1)})
    w = b.op("reshape", [b.op("reshape", [x], {"shape": (-1,)})], {"shape": (sym("batch"), 6, 4)})
    b.set_outputs([y, z, w])
    out = check_pass(b.build(), "fold_constants", [torch.randn(3, 6, 4)])
    assert out.op_counts() == {"permute": 1, "reshape": 1}
    perm = next(n for n in out.nodes if n.op == "permute")
    assert perm.attrs["perm"] == (1, 2, 0) and perm.inputs[0].name == "x"
    assert out.outputs[2].name == "x"


def test_strided_slice_and_real_cast_stay() -> None:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (4, 6)))
    s = b.op("slice", [x], {"dim": 1, "start": 0, "step": 2})
    c = b.op("cast", [x], {"dtype": "float16"})
    b.set_outputs([s, c])
    out = check_pass(b.build(), "fold_constants")
    assert out.op_counts() == {"cast": 1, "slice": 1}


def test_attention_mask_that_keeps_everything_is_dropped() -> None:
    b = GraphBuilder()
    t = TensorType("float32", (2, 4, 5, 8))
    q, k, v = (b.add_input(n, t) for n in "qkv")
    attrs = {"scale": None, "is_causal": False, "enable_gqa": False}
    keep = b.op("attention", [q, k, v, b.add_param("m", torch.ones(1, 1, 5, 5, dtype=torch.bool))],
                attrs)
    zero = b.op("attention", [q, k, v, b.add_param("z", torch.zeros(5, 5))], attrs)
    some = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    some[..., 0] = False
    real = b.op("attention", [q, k, v, b.add_param("s", some)], attrs)
    b.set_outputs([keep, zero, real])
    out = check_pass(b.build(), "fold_constants")
    masks = [n for n in out.nodes if n.op == "attention" and len(n.inputs) > 3]
    assert out.op_counts() == {"attention": 3} and len(masks) == 1  # only the real mask stays


def test_all_true_mask_expanded_to_a_symbolic_batch_is_dropped() -> None:
    """HF ViT at a dynamic batch: expand(all-True constant) to [batch, 1, S, S] is no constant
    but masks nothing; an expanded real mask stays."""
    from ember.ir import sym

    b = GraphBuilder()
    t = TensorType("float32", (sym("batch"), 4, 5, 8))
    q, k, v = (b.add_input(n, t) for n in "qkv")
    attrs = {"scale": None, "is_causal": False, "enable_gqa": False}
    shape = {"shape": (sym("batch"), 1, 5, 5)}
    ones = b.op("expand", [b.add_param("m", torch.ones(1, 1, 5, 5, dtype=torch.bool))], shape)
    some_t = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    some_t[..., 0] = False
    some = b.op("expand", [b.add_param("s", some_t)], shape)
    b.set_outputs([b.op("attention", [q, k, v, ones], attrs),
                   b.op("attention", [q, k, v, some], attrs)])
    out = check_pass(b.build(), "fold_constants")
    masks = [n for n in out.nodes if n.op == "attention" and len(n.inputs) > 3]
    assert len(masks) == 1 and out.op_counts()["attention"] == 2
