"""ONNX export: an Ember `Graph` becomes a checked ONNX model that ONNX Runtime can run.

Params become initializers, symbolic input dims become ``dim_param``s, and symbolic dims inside
attributes (reshape targets, slice bounds, ...) are computed in the ONNX graph from the inputs'
``Shape``. IR ops map onto standard ONNX ops; fused ops (``fused_linear``, ``fused_conv``, ...)
decompose into their base op plus epilogue. An op with no mapping is written as a node of the
custom domain ``ai.ember`` (same name, attributes as ONNX attributes): the model still passes
``onnx.checker`` but needs an Ember custom-op library to run; `ExportReport.custom` lists them.

The exporter looks each node's emitter up in `registry.EMITTERS`: this module registers the
standard ONNX emitters; the fusion stage (`fusions`) runs over the graph before emission; the
package's other modules register the contrib-op emitters (attention, quantized, token ops).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import sympy
import torch
from onnx import TensorProto, helper, numpy_helper

from ember.errors import CompilerError
from ember.ir import Graph, Node, Value
from ember.ir.opset import BIG

from .fusions import fusion_sources, hard_sigmoid, skip_layer_norm
from .registry import EMBER_DOMAIN, EMITTERS, MS_DOMAIN, NoMapping, register_emitter

__all__ = ["export_onnx", "checkable", "ExportReport", "EMBER_DOMAIN", "PARAMS_LOCATION", "detach_params",
           "detached_param_names"]

log = logging.getLogger(__name__)

_TO_ONNX = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE,
            "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
            "int64": TensorProto.INT64, "int32": TensorProto.INT32, "int16": TensorProto.INT16,
            "int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "bool": TensorProto.BOOL}


@dataclass
class ExportReport:
    """What the export did: op mapping counts, decomposed fused ops, custom-domain ops."""

    path: str
    opset: int
    standard: dict[str, int] = field(default_factory=dict)  # IR op -> nodes exported natively
    decomposed: dict[str, int] = field(default_factory=dict)  # fused IR op -> count
    custom: dict[str, int] = field(default_factory=dict)  # IR op -> ai.ember nodes

    @property
    def runnable_by_onnxruntime(self) -> bool:
        return not self.custom

    def __str__(self) -> str:
        parts = [f"exported {self.path} (opset {self.opset}): "
                 f"{sum(self.standard.values())} IR nodes as standard ONNX"]
        if self.decomposed:
            parts.append(f"decomposed {dict(self.decomposed)}")
        if self.custom:
            parts.append(f"custom domain '{EMBER_DOMAIN}' for {dict(self.custom)}")
        return "; ".join(parts)


def export_onnx(g: Graph, path: str | Path, opset: int = 17, *,
                contrib_ops: bool = False, skip_layernorm: bool = True,
                masked_mha: bool = True) -> ExportReport:
    """Writes ``g`` as an ONNX model at ``path`` and returns what was exported how.

    Args:
        g: the graph.
        path: where the model goes.
        opset: the default-domain opset (13 and up).
        contrib_ops: also use ONNX Runtime's fused ``com.microsoft`` ops where Ember's graph
            already holds their pattern (Gelu/FastGelu, SkipLayerNormalization); the model then
            runs in ONNX Runtime only. The CPU backend's ONNX Runtime candidate sets it.
        skip_layernorm: with ``contrib_ops``, write residual-add + LayerNorm pairs as
            ``SkipLayerNormalization`` (the CPU backend measures whether that kernel is the
            faster form on the machine: `ember.backends.cpu.ort_tuning`).
        masked_mha: with ``contrib_ops``, write masked attention as ``MultiHeadAttention``;
            False: as standard ops with one additive [B, 1, 1, L] bias per mask (also measured
            per machine).
    """
    if not 13 <= opset <= onnx.defs.onnx_opset_version():
        raise CompilerError(f"ONNX export supports opsets 13..{onnx.defs.onnx_opset_version()}, "
                            f"got {opset}")
    ex = _Exporter(g, opset, contrib_ops, skip_layernorm, masked_mha)
    model = ex.build()
    try:
        onnx.checker.check_model(checkable(model))
    except Exception as e:
        raise CompilerError(f"exported ONNX model fails onnx.checker: {e}") from e
    onnx.save(model, str(path))
    ex.report.path = str(path)
    log.info("%s", ex.report)
    return ex.report


# ONNX Runtime kernels registered in the default domain that the ONNX standard does not define
_ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


def checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` for onnx.checker: ORT's own default-domain ops moved to its contrib domain
    (which the checker does not look inside), everything else checked as exported."""
    if not any(nd.op_type in _ORT_DEFAULT_DOMAIN_OPS and not nd.domain
               for nd in model.graph.node):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for nd in m.graph.node:
        if nd.op_type in _ORT_DEFAULT_DOMAIN_OPS and not nd.domain:
            nd.domain = MS_DOMAIN
    if not any(o.domain == MS_DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return m


# An artifact's model.onnx refers to the IR params by name instead of holding them: their
# initializers are external references to this location (the artifact's weights file), which the
# loader supplies from the IR's weights (`detached_param_names`, ORT add_external_initializers).
PARAMS_LOCATION = "weights.safetensors"


def detach_params(model: onnx.ModelProto, weights: Mapping[str, torch.Tensor]) -> list[str]:
    """Drops the data of every initializer that is an IR param (same name, dtype, shape and
    values as ``weights[name]``) and marks it external at `PARAMS_LOCATION`; returns the names.

    bfloat16 params keep their data (numpy, through which ONNX Runtime takes them, has no
    bfloat16)."""
    names = []
    for init in model.graph.initializer:
        t = weights.get(init.name)
        if t is None or t.dtype == torch.bfloat16 or init.data_location == TensorProto.EXTERNAL:
            continue
        arr = t.detach().cpu().contiguous().numpy()
        have = numpy_helper.to_array(init)
        if have.dtype != arr.dtype or have.shape != arr.shape or not np.array_equal(have, arr):
            continue
        for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
            init.ClearField(f)
        init.data_location = TensorProto.EXTERNAL
        del init.external_data[:]
        for k, v in (("location", PARAMS_LOCATION), ("length", str(arr.nbytes))):
            init.external_data.add(key=k, value=v)
        names.append(init.name)
    return names


def detached_param_names(model: onnx.ModelProto) -> list[str]:
    """Names of the initializers `detach_params` turned into references to the IR's weights."""
    return [i.name for i in model.graph.initializer if i.data_location == TensorProto.EXTERNAL
            and any(e.key == "location" and e.value == PARAMS_LOCATION for e in i.external_data)]


class _Exporter:
    def __init__(self, g: Graph, opset: int, contrib_ops: bool = False,
                 skip_layernorm: bool = True, masked_mha: bool = True) -> None:
        self.g = g
        self.opset = opset
        self.contrib = contrib_ops
        self.skip_ln = contrib_ops and skip_layernorm
        self.masked_mha = masked_mha
        self.producer: dict[str, Node] = {v.name: n for n in g.nodes for v in n.outputs}
        self.users: dict[str, list[int]] = {}  # value -> positions of its consumers (-1: output)
        for i, n in enumerate(g.nodes):
            for v in n.inputs:
                if v is not None:
                    self.users.setdefault(v.name, []).append(i)
        for v in g.outputs:
            self.users.setdefault(v.name, []).append(-1)
        self.position = {id(n): i for i, n in enumerate(g.nodes)}
        # IR values not emitted where they are defined: their one consumer emits their producer
        # fused into itself (an add or residual linear feeding a LayerNorm -> SkipLayerNorm)
        self.deferred: dict[str, Node] = {}
        self._named: set[str] = set()  # ONNX tensors renamed to an IR value's name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.report = ExportReport("", opset)
        self._n = 0
        self._const_cache: dict[tuple, str] = {}
        self._sym_src: dict[str, tuple[str, int]] = {}  # symbol -> (input name, dim)
        self._sym_cache: dict[str, str] = {}
        self._shape_cache: dict[str, str] = {}
        # ONNX tensors that are a Transpose of another: name -> (its input, perm); a permute
        # that undoes one reads the input instead (the fused-attention output's layout change)
        self.transposed: dict[str, tuple[str, list[int]]] = {}
        # tensors an emitter makes once per model and shares between nodes (attention biases)
        self.shared: dict[tuple[str, str], str] = {}

    # ----- helpers ---------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}__{self._n}"

    def node(self, op: str, ins: Sequence[str], n_out: int = 1, domain: str = "",
             **attrs: Any) -> list[str]:
        outs = [self.fresh(op.lower()) for _ in range(n_out)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op, list(ins), outs, domain=domain or None, **attrs))
        return outs

    def one(self, op: str, ins: Sequence[str], **attrs: Any) -> str:
        return self.node(op, ins, **attrs)[0]

    def const(self, value: Any, dtype: str = "int64") -> str:
        arr = np.asarray(value, dtype=_np_dtype(dtype))
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        name = self._const_cache.get(key)
        if name is None:
            name = self.fresh("const")
            self.inits.append(numpy_helper.from_array(arr, name))
            self._const_cache[key] = name
        return name

    def dim(self, d: Any) -> str:
        """A 1-element int64 tensor holding dim ``d`` (int or sympy expression)."""
        if isinstance(d, int):
            return self.const([d])
        key = str(d)
        if key in self._sym_cache:
            return self._sym_cache[key]
        out = self._expr(sympy.sympify(d))
        self._sym_cache[key] = out
        return out

    def _expr(self, e: sympy.Expr) -> str:
        if e.is_Integer:
            return self.const([int(e)])
        if e.is_Symbol:
            src = self._sym_src.get(e.name)
            if src is None:
                raise CompilerError(f"symbol '{e.name}' is not a dim of any graph input")
            name, i = src
            shape = self._shape_cache.get(name)
            if shape is None:
                shape = self.one("Shape", [name])
                self._shape_cache[name] = shape
            return self.one("Gather", [shape, self.const([i])], axis=0)
        if e.is_Add or e.is_Mul:
            args = [self._expr(a) for a in e.args]
            acc = args[0]
            for a in args[1:]:
                acc = self.one("Add" if e.is_Add else "Mul", [acc, a])
            return acc
        if isinstance(e, sympy.floor):  # dims are >= 0: integer Div truncates = floors
            num, den = sympy.fraction(sympy.together(e.args[0]))
            if den != 1:
                return self.one("Div", [self._expr(sympy.expand(num)), self._expr(den)])
        if isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) > 0:
            base = self._expr(e.base)
            acc = base
            for _ in range(int(e.exp) - 1):
                acc = self.one("Mul", [acc, base])
            return acc
        if isinstance(e, sympy.Max | sympy.Min):
            return self.one("Max" if isinstance(e, sympy.Max) else "Min",
                            [self._expr(a) for a in e.args])
        raise CompilerError(f"cannot export the symbolic dim expression '{e}' to ONNX")

    def shape(self, dims: Sequence[Any]) -> str:
        if all(isinstance(d, int) for d in dims):
            return self.const(list(dims))
        return self.one("Concat", [self.dim(d) for d in dims], axis=0)

    def cast(self, name: str, v: Value | None, dtype: str) -> str:
        if v is not None and v.type.dtype == dtype:
            return name
        return self.one("Cast", [name], to=_TO_ONNX[dtype])

    # ----- driver ----------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        g = self.g
        inputs = []
        for v in g.inputs:
            dims = []
            for i, d in enumerate(v.type.shape):
                if isinstance(d, int):
                    dims.append(d)
                else:
                    dims.append(str(d))
                    if isinstance(d, sympy.Symbol) and d.name not in self._sym_src:
                        self._sym_src[d.name] = (v.name, i)
            inputs.append(helper.make_tensor_value_info(v.name, _TO_ONNX[v.type.dtype], dims))
        for v in g.params:
            t = g.weights[v.name]
            self.inits.append(_tensor_proto(t, v.name))
        for n in g.nodes:
            for src in fusion_sources(self, n):
                self.deferred[src.outputs[0].name] = src
        for n in g.nodes:
            self.emit(n)
        outputs = []
        out_names = list(g.output_names) or [f"output_{i}" for i in range(len(g.outputs))]
        for v, name in zip(g.outputs, out_names):
            self.nodes.append(helper.make_node("Identity", [v.name], [name]))
            dims = [d if isinstance(d, int) else str(d) for d in v.type.shape]
            outputs.append(helper.make_tensor_value_info(name, _TO_ONNX[v.type.dtype], dims))
        # params only the folded-away nodes read (a HardSigmoid's alpha) would be dropped by
        # ONNX Runtime at load, before it could take their data from the artifact's weights
        self.nodes = _live_nodes(self.nodes, {o.name for o in outputs})
        used = {i for nd in self.nodes for i in nd.input}
        self.inits = [t for t in self.inits if t.name in used]
        graph = helper.make_graph(self.nodes, g.name or "ember", inputs, outputs, self.inits,
                                  value_info=self._value_info())
        opsets = [helper.make_opsetid("", self.opset)]
        if self.report.custom:
            opsets.append(helper.make_opsetid(EMBER_DOMAIN, 1))
        if any(nd.domain == "com.microsoft" for nd in self.nodes):  # ORT contrib ops
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="ember")
        model.ir_version = min(model.ir_version, 10)
        return model

    def _value_info(self) -> list[onnx.ValueInfoProto]:
        """Types (symbolic dims as ``dim_param``) of every IR value in the model: ONNX shape
        inference loses dims through computed reshape targets, and ONNX Runtime applies its
        shape-dependent fusions (MatMul+Add -> Gemm, SkipLayerNorm, ...) only on known shapes."""
        out = []
        ins = {v.name for v in self.g.inputs}
        for n in self.g.nodes:
            for v in n.outputs:
                if v.name in ins or v.name in self.deferred or v.type.dtype not in _TO_ONNX:
                    continue
                dims = [d if isinstance(d, int) else str(d) for d in v.type.shape]
                out.append(helper.make_tensor_value_info(v.name, _TO_ONNX[v.type.dtype], dims))
        return out

    def emit(self, n: Node) -> None:
        if n.outputs and n.outputs[0].name in self.deferred:
            return  # emitted by its consumer
        start = len(self.nodes)
        base = n.op
        if n.op.startswith("fused_") and n.op[6:] in EMITTERS and "activation" in n.attrs:
            outs = self._fused(n)
            self.report.decomposed[n.op] = self.report.decomposed.get(n.op, 0) + 1
        elif n.op in EMITTERS:
            ins = ["" if v is None else v.name for v in n.inputs]
            try:
                outs = EMITTERS[n.op](self, n, ins)
            except NoMapping:
                outs = None
            if outs is not None:
                self.report.standard[base] = self.report.standard.get(base, 0) + 1
        else:
            outs = None
        if outs is None:
            outs = self._custom(n)
        self._name_outputs(n, outs, start)

    def _name_outputs(self, n: Node, outs: Sequence[str], start: int) -> None:
        """Gives the IR outputs' names to the ONNX tensors that hold them: the node that made
        one in this emission is renamed; an input, a constant or a cached tensor gets an
        Identity (renaming those would break their other uses)."""
        made = {o for nd in self.nodes[start:] for o in nd.output}
        cached = set(self._sym_cache.values()) | set(self._shape_cache.values())
        renames: dict[str, str] = {}
        for v, o in zip(n.outputs, outs):
            if o in made and o not in cached and o not in renames and o not in self._named:
                renames[o] = v.name
                self._named.add(v.name)
                if o in self.transposed:
                    self.transposed[v.name] = self.transposed.pop(o)
            else:
                self.nodes.append(helper.make_node("Identity", [o], [v.name]))
        if not renames:
            return
        for nd in self.nodes[start:]:
            for i, name in enumerate(nd.output):
                if name in renames:
                    nd.output[i] = renames[name]
            for i, name in enumerate(nd.input):
                if name in renames:
                    nd.input[i] = renames[name]

    def _custom(self, n: Node) -> list[str]:
        attrs = {}
        for k, v in n.attrs.items():
            if v is None:
                continue
            if isinstance(v, sympy.Basic):
                v = str(v)
            elif isinstance(v, tuple) and any(isinstance(x, sympy.Basic) for x in v):
                v = [str(x) for x in v]
            attrs[k] = list(v) if isinstance(v, tuple) else v
        self.report.custom[n.op] = self.report.custom.get(n.op, 0) + 1
        ins = ["" if v is None else v.name for v in n.inputs]
        return self.node(n.op, ins, n_out=len(n.outputs), domain=EMBER_DOMAIN, **attrs)

    def _fused(self, n: Node) -> list[str]:
        base = n.op[6:]
        a = n.attrs
        base_attrs = {k: v for k, v in a.items() if k in _BASE_ATTRS.get(base, ())}
        fake = Node(base, n.inputs[:3], n.outputs, base_attrs, n.loc)
        ins = ["" if v is None else v.name for v in n.inputs]
        (y,) = EMITTERS[base](self, fake, ins[:3])
        res = ins[3] if len(ins) > 3 and ins[3] else ""
        if res and a.get("residual") == "before_act":
            y = self.one("Add", [y, res])
        y = self._activation(y, a.get("activation", "none"), a)
        if res and a.get("residual") == "after_act":
            y = self.one("Add", [y, res])
        return [y]

    def _activation(self, y: str, act: str, a: dict) -> str:
        if act in ("none", None, ""):
            return y
        simple = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "hardswish": "HardSwish"}
        if act in simple:
            return self.one(simple[act], [y])
        if act == "silu":
            return self.one("Mul", [y, self.one("Sigmoid", [y])])
        if act == "gelu":
            return _gelu(self, y, a.get("approximate", "none"))
        if act == "leaky_relu":
            return self.one("LeakyRelu", [y], alpha=float(a["alpha"]))
        if act == "elu":
            return self.one("Elu", [y], alpha=float(a["alpha"]))
        if act == "clamp":
            return _clip(self, y, a.get("min"), a.get("max"), "float32")
        raise CompilerError(f"cannot export fused activation '{act}'")


_BASE_ATTRS = {"linear": (), "conv": ("stride", "padding", "dilation", "groups"),
               "matmul": ()}


def _np_dtype(dtype: str) -> Any:
    return {"float32": np.float32, "float64": np.float64, "float16": np.float16,
            "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8,
            "uint8": np.uint8, "bool": np.bool_}[dtype]


def _tensor_proto(t: torch.Tensor, name: str) -> onnx.TensorProto:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        p = helper.make_tensor(name, TensorProto.BFLOAT16, list(t.shape),
                               t.view(torch.int16).numpy().astype(np.uint16).tobytes(), raw=True)
        return p
    return numpy_helper.from_array(t.numpy(), name)


_UNARY = {"neg": "Neg", "abs": "Abs", "exp": "Exp", "log": "Log", "sqrt": "Sqrt",
          "sin": "Sin", "cos": "Cos", "tanh": "Tanh", "sigmoid": "Sigmoid", "relu": "Relu",
          "erf": "Erf", "reciprocal": "Reciprocal", "floor": "Floor", "ceil": "Ceil",
          "round": "Round", "sign": "Sign", "hardswish": "HardSwish", "atan": "Atan",
          "logical_not": "Not", "isnan": "IsNaN", "tan": "Tan", "asin": "Asin", "acos": "Acos",
          "sinh": "Sinh", "cosh": "Cosh", "asinh": "Asinh", "acosh": "Acosh", "atanh": "Atanh",
          "bitwise_not": "BitwiseNot"}


@register_emitter(*_UNARY)
def _unary(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    inp = ins[0]
    out_dt = n.outputs[0].type.dtype
    if n.inputs[0] is not None and n.inputs[0].type.dtype != out_dt and out_dt != "bool":
        inp = x.cast(inp, n.inputs[0], out_dt)
    return [x.one(_UNARY[n.op], [inp])]


@register_emitter("rsqrt", "silu", "gelu", "mish", "hardsigmoid", "log1p", "expm1", "leaky_relu", "elu",
    "softplus", "clamp", "cast", "isinf")
def _activations(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    a, i = n.attrs, ins[0]
    dt = n.outputs[0].type.dtype
    if n.op not in ("cast", "isinf", "clamp") and n.inputs[0].type.dtype != dt:
        i = x.cast(i, n.inputs[0], dt)
    if n.op == "rsqrt":
        return [x.one("Reciprocal", [x.one("Sqrt", [i])])]
    if n.op == "silu":
        return [x.one("Mul", [i, x.one("Sigmoid", [i])])]
    if n.op == "gelu":
        return [_gelu(x, i, a["approximate"], dt)]
    if n.op == "mish":
        return [x.one("Mul", [i, x.one("Tanh", [x.one("Softplus", [i])])])]
    if n.op == "hardsigmoid":
        return [x.one("HardSigmoid", [i], alpha=1.0 / 6, beta=0.5)]
    if n.op == "log1p":
        return [x.one("Log", [x.one("Add", [i, x.const(1, dt)])])]
    if n.op == "expm1":
        return [x.one("Sub", [x.one("Exp", [i]), x.const(1, dt)])]
    if n.op == "leaky_relu":
        return [x.one("LeakyRelu", [i], alpha=float(a["negative_slope"]))]
    if n.op == "elu":
        return [x.one("Elu", [i], alpha=float(a["alpha"]))]
    if n.op == "softplus":
        if a["beta"] != 1.0:
            raise NoMapping
        return [x.one("Softplus", [i])]
    if n.op == "clamp" and n.inputs[0].name in x.deferred:
        return [hard_sigmoid(x, n)]
    if n.op == "clamp":
        return [_clip(x, i, a["min"], a["max"], dt)]
    if n.op == "isinf":
        return [x.one("IsInf", [i], detect_positive=int(a["detect_positive"]),
                      detect_negative=int(a["detect_negative"]))]
    return [x.one("Cast", [i], to=_TO_ONNX[a["dtype"]])]


def _gelu(x: _Exporter, i: str, approximate: str, dt: str = "float32") -> str:
    if x.contrib and dt == "float32":  # one fused kernel instead of five elementwise passes
        return x.one("FastGelu" if approximate == "tanh" else "Gelu", [i], domain=MS_DOMAIN)
    if approximate == "tanh":
        inner = x.one("Mul", [x.const(math.sqrt(2 / math.pi), dt), x.one("Add", [
            i, x.one("Mul", [x.const(0.044715, dt), x.one("Mul", [i, x.one("Mul", [i, i])])])])])
        t = x.one("Add", [x.const(1.0, dt), x.one("Tanh", [inner])])
    else:
        t = x.one("Add", [x.const(1.0, dt), x.one("Erf", [
            x.one("Mul", [i, x.const(1 / math.sqrt(2), dt)])])])
    return x.one("Mul", [x.one("Mul", [i, x.const(0.5, dt)]), t])


def _clip(x: _Exporter, i: str, lo: Any, hi: Any, dt: str) -> str:
    return x.one("Clip", [i, "" if lo is None else x.const(lo, dt),
                          "" if hi is None else x.const(hi, dt)])


_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "pow": "Pow", "maximum": "Max",
           "minimum": "Min", "eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater",
           "ge": "GreaterOrEqual", "logical_and": "And", "logical_or": "Or",
           "logical_xor": "Xor", "bitwise_and": "BitwiseAnd", "bitwise_or": "BitwiseOr",
           "bitwise_xor": "BitwiseXor", "div": "Div", "ne": "Equal", "remainder": "Mod",
           "fmod": "Mod", "atan2": ""}


@register_emitter(*_BINARY)
def _binary(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    a, b = n.inputs
    out_dt = n.outputs[0].type.dtype
    work = out_dt
    if out_dt == "bool" and n.op not in ("logical_and", "logical_or", "logical_xor"):
        from ember.ir.opset import promote

        work = promote(a.type, b.type)
    if n.op == "atan2":
        raise NoMapping
    if n.op == "div" and n.attrs["rounding_mode"] == "floor":
        raise NoMapping
    if n.op in ("logical_and", "logical_or", "logical_xor"):
        work = "bool"
    if n.op == "pow":  # ONNX Pow keeps the base type; the exponent may differ
        return [x.one("Pow", [x.cast(ins[0], a, out_dt), ins[1]])]
    lhs, rhs = x.cast(ins[0], a, work), x.cast(ins[1], b, work)
    attrs = {}
    if n.op == "fmod" or (n.op == "remainder" and work.startswith("float")):
        if n.op == "remainder":
            raise NoMapping
        attrs["fmod"] = 1
    y = x.one(_BINARY[n.op], [lhs, rhs], **attrs)
    if n.op == "ne":
        y = x.one("Not", [y])
    if n.op == "div" and n.attrs["rounding_mode"] == "trunc" and work.startswith("float"):
        y = x.one("Mul", [x.one("Sign", [y]), x.one("Floor", [x.one("Abs", [y])])])
    return [y]


@register_emitter("where")
def _where(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    dt = n.outputs[0].type.dtype
    c = x.cast(ins[0], n.inputs[0], "bool")
    return [x.one("Where", [c, x.cast(ins[1], n.inputs[1], dt), x.cast(ins[2], n.inputs[2], dt)])]


_REDUCE = {"sum": "ReduceSum", "mean": "ReduceMean", "amax": "ReduceMax", "amin": "ReduceMin",
           "prod": "ReduceProd"}


def _reduce_node(x: _Exporter, op: str, i: str, axes: Sequence[int], keep: bool) -> str:
    if op == "ReduceSum" or x.opset >= 18:
        return x.one(op, [i, x.const(list(axes))], keepdims=int(keep))
    return x.one(op, [i], axes=list(axes), keepdims=int(keep))


@register_emitter(*_REDUCE, "var", "any")
def _reduce(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    v = n.inputs[0]
    dims = list(n.attrs["dims"]) if n.attrs["dims"] else list(range(v.type.rank))
    keep = n.attrs["keepdim"]
    dt = n.outputs[0].type.dtype
    i = x.cast(ins[0], v, dt) if n.op != "any" else x.cast(ins[0], v, "int32")
    if n.op == "mean" and v.type.rank >= 3 and dt == "float32" and \
            sorted(d % v.type.rank for d in dims) == list(range(2, v.type.rank)):
        # GlobalAveragePool stays in ONNX Runtime's blocked NCHWc layout (ReduceMean does not)
        y = x.one("GlobalAveragePool", [i])
        return [y if keep else x.one("Reshape", [y, x.shape(n.outputs[0].type.shape)])]
    if n.op == "any":
        s = _reduce_node(x, "ReduceMax", i, dims, keep)
        return [x.one("Cast", [s], to=TensorProto.BOOL)]
    if n.op == "var":
        mean = _reduce_node(x, "ReduceMean", i, dims, True)
        d = x.one("Sub", [i, mean])
        ssum = _reduce_node(x, "ReduceSum", x.one("Mul", [d, d]), dims, keep)
        cnt = x.one("Cast", [x.one("ReduceProd", [x.one("Gather", [x.one("Shape", [i]),
                                                                   x.const(dims)])],
                                   keepdims=0)], to=_TO_ONNX[dt])
        den = x.one("Sub", [cnt, x.const(n.attrs["correction"], dt)])
        return [x.one("Div", [ssum, den])]
    return [_reduce_node(x, _REDUCE[n.op], i, dims, keep)]


@register_emitter("argmax", "argmin")
def _argmax(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    return [x.one("ArgMax" if n.op == "argmax" else "ArgMin", [ins[0]], axis=n.attrs["dim"],
                  keepdims=int(n.attrs["keepdim"]))]


@register_emitter("softmax", "log_softmax")
def _softmax(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    dt = n.outputs[0].type.dtype
    return [x.one("Softmax" if n.op == "softmax" else "LogSoftmax",
                  [x.cast(ins[0], n.inputs[0], dt)], axis=n.attrs["dim"])]


@register_emitter("cumsum")
def _cumsum(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    dt = n.outputs[0].type.dtype
    return [x.one("CumSum", [x.cast(ins[0], n.inputs[0], dt), x.const(n.attrs["dim"])])]


@register_emitter("topk", "sort")
def _topk(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    a = n.attrs
    if n.op == "sort":
        d = a["dim"] % n.inputs[0].type.rank
        k = x.dim(n.inputs[0].type.shape[d])
        return x.node("TopK", [ins[0], k], 2, axis=d, largest=int(a["descending"]), sorted=1)
    return x.node("TopK", [ins[0], x.const([a["k"]])], 2, axis=a["dim"],
                  largest=int(a["largest"]), sorted=int(a["sorted"]))


@register_emitter("matmul")
def _matmul(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    dt = n.outputs[0].type.dtype
    return [x.one("MatMul", [x.cast(ins[0], n.inputs[0], dt), x.cast(ins[1], n.inputs[1], dt)])]


@register_emitter("linear")
def _linear(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    """``Gemm(x2d, W, b, transB=1)``, reshaped around for rank > 2: the weight is used as
    stored (ONNX Runtime prepacks it once; no transposed copy in the file) and the bias is
    added inside the GEMM. Other dtypes: ``MatMul(x, Transpose(W)) + b``."""
    xv, w = n.inputs[0], n.inputs[1]
    bias = ins[2] if len(ins) > 2 and ins[2] else ""
    k = w.type.shape[-1]
    if xv.type.dtype == w.type.dtype == "float32" and xv.type.rank >= 2 and isinstance(k, int):
        a = ins[0] if xv.type.rank == 2 else x.one("Reshape", [ins[0], x.const([-1, k])])
        y = x.one("Gemm", [a, ins[1]] + ([bias] if bias else []), transB=1)
        if xv.type.rank != 2:
            y = x.one("Reshape", [y, x.shape(n.outputs[0].type.shape)])
        return [y]
    y = x.one("MatMul", [ins[0], x.one("Transpose", [ins[1]], perm=[1, 0])])
    return [x.one("Add", [y, bias]) if bias else y]


def _sym_pads(p: Any, nsp: int) -> list[int]:
    p = [p] * nsp if isinstance(p, int) else list(p) * (nsp if len(p) == 1 else 1)
    return list(p) + list(p)


def _nt(v: Any, nsp: int) -> list[int]:
    return [v] * nsp if isinstance(v, int) else list(v) * (nsp if len(v) == 1 else 1)


@register_emitter("conv", "conv_transpose")
def _conv(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    nsp = n.inputs[1].type.rank - 2
    a = n.attrs
    attrs = dict(strides=_nt(a["stride"], nsp), pads=_sym_pads(a["padding"], nsp),
                 dilations=_nt(a["dilation"], nsp), group=a["groups"])
    if n.op == "conv_transpose":
        attrs["output_padding"] = _nt(a["output_padding"], nsp)
    ins = [i for i in ins[:3]]
    if len(ins) == 3 and not ins[2]:
        ins = ins[:2]
    return [x.one("Conv" if n.op == "conv" else "ConvTranspose", ins, **attrs)]


@register_emitter("max_pool", "avg_pool", "max_pool_with_indices")
def _pool(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    a = n.attrs
    nsp = n.inputs[0].type.rank - 2
    attrs = dict(kernel_shape=_nt(a["kernel"], nsp), strides=_nt(a["stride"] or a["kernel"], nsp),
                 pads=_sym_pads(a["padding"], nsp), ceil_mode=int(a["ceil_mode"]))
    if n.op == "avg_pool":
        return [x.one("AveragePool", [ins[0]], count_include_pad=int(a["count_include_pad"]),
                      **attrs)]
    attrs["dilations"] = _nt(a["dilation"], nsp)
    if n.op == "max_pool_with_indices":
        return x.node("MaxPool", [ins[0]], 2, storage_order=a["storage_order"], **attrs)
    return [x.one("MaxPool", [ins[0]], **attrs)]


@register_emitter("adaptive_avg_pool")
def _adaptive(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    nsp = n.inputs[0].type.rank - 2
    if any(o != 1 for o in _nt(n.attrs["output_size"], nsp)):
        raise NoMapping
    return [x.one("GlobalAveragePool", [ins[0]])]


@register_emitter("layer_norm", "rms_norm")
def _layer_norm(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    if n.inputs[0].name in x.deferred:
        return skip_layer_norm(x, n, ins)
    v = n.inputs[0]
    dt = v.type.dtype
    axes = n.attrs["axes"]
    eps = n.attrs["eps"]
    dims = list(range(v.type.rank - axes, v.type.rank))
    scale = ins[1] if len(ins) > 1 and ins[1] else ""
    fused_rms = n.op == "rms_norm" and x.contrib and dt == "float32"
    if not scale and (n.op == "layer_norm" or fused_rms):   # the fused kernels need a scale
        scale = x.one("ConstantOfShape", [x.shape(v.type.shape[v.type.rank - axes:])],
                      value=helper.make_tensor("v", _TO_ONNX[dt], [1], [1.0]))
    if n.op == "layer_norm":
        bias = ins[2] if len(ins) > 2 and ins[2] else ""
        return [x.one("LayerNormalization", [ins[0], scale] + ([bias] if bias else []),
                      axis=-axes, epsilon=float(eps))]
    if eps is None:
        eps = float(torch.finfo(torch.float32).eps)
    if fused_rms:
        # ONNX Runtime's one-pass RMS norm kernel: 2-2.7x faster than the six elementwise
        # and reduce nodes below at LLaMA sizes (32 x 512 .. 512 x 768, 2 threads)
        return [x.one("SimplifiedLayerNormalization", [ins[0], scale], axis=-axes,
                      epsilon=float(eps))]
    ms = _reduce_node(x, "ReduceMean", x.one("Mul", [ins[0], ins[0]]), dims, True)
    y = x.one("Mul", [ins[0], x.one("Reciprocal", [x.one("Sqrt", [
        x.one("Add", [ms, x.const(eps, dt)])])])])
    return [x.one("Mul", [y, scale]) if scale else y]


@register_emitter("batch_norm")
def _batch_norm(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    c = n.inputs[1].type.shape[0]
    dt = n.inputs[0].type.dtype
    scale = ins[3] if len(ins) > 3 and ins[3] else x.const(np.ones([c]), dt)
    bias = ins[4] if len(ins) > 4 and ins[4] else x.const(np.zeros([c]), dt)
    return [x.one("BatchNormalization", [ins[0], scale, bias, ins[1], ins[2]],
                  epsilon=float(n.attrs["eps"]))]


@register_emitter("group_norm")
def _group_norm(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    v = n.inputs[0]
    dt = v.type.dtype
    g = n.attrs["groups"]
    shape = v.type.shape
    r = x.one("Reshape", [ins[0], x.shape([shape[0], g, -1])])
    y = x.one("InstanceNormalization", [r, x.const(np.ones([g]), dt), x.const(np.zeros([g]), dt)],
              epsilon=float(n.attrs["eps"]))
    y = x.one("Reshape", [y, x.shape(list(shape))])
    bshape = x.const([-1] + [1] * (len(shape) - 2))
    if len(ins) > 1 and ins[1]:
        y = x.one("Mul", [y, x.one("Reshape", [ins[1], bshape])])
    if len(ins) > 2 and ins[2]:
        y = x.one("Add", [y, x.one("Reshape", [ins[2], bshape])])
    return [y]


@register_emitter("attention")
def _attention(x: _Exporter, n: Node, ins: list[str], additive_bias: str | None = None,
               ) -> list[str]:
    """Attention as standard ops; ``additive_bias``: a float bias to add to the scores in place
    of the node's mask (one made per mask and shared by the layers that read it)."""
    q, k = n.inputs[0], n.inputs[1]
    a = n.attrs
    ins = list(ins)
    if a["enable_gqa"] and q.type.shape[-3] != k.type.shape[-3]:
        # grouped-query heads: each kv head serves H/Hkv consecutive query heads
        hq, hk = q.type.shape[-3], k.type.shape[-3]
        if not (isinstance(hq, int) and isinstance(hk, int)) or q.type.rank != 4:
            raise NoMapping
        for i in (1, 2):
            kv = n.inputs[i].type.shape
            e = x.one("Expand", [x.one("Unsqueeze", [ins[i], x.const([2])]),
                                 x.shape([kv[0], hk, hq // hk, kv[2], kv[3]])])
            ins[i] = x.one("Reshape", [e, x.shape([kv[0], hq, kv[2], kv[3]])])
    dt = q.type.dtype
    scale = a["scale"] if a["scale"] is not None else None
    r = q.type.rank
    perm = list(range(r - 2)) + [r - 1, r - 2]
    s = x.one("MatMul", [ins[0], x.one("Transpose", [ins[1]], perm=perm)])
    if scale is None:
        sc = x.one("Reciprocal", [x.one("Sqrt", [x.one("Cast", [x.dim(q.type.shape[-1])],
                                                      to=_TO_ONNX[dt])])])
    else:
        sc = x.const(scale, dt)
    s = x.one("Mul", [s, sc])
    if additive_bias is not None:
        s = x.one("Add", [s, additive_bias])
    elif len(ins) > 3 and ins[3]:
        mask = n.inputs[3]
        if mask.type.dtype == "bool":
            s = x.one("Where", [ins[3], s, x.const(float("-inf"), dt)])
        else:
            s = x.one("Add", [s, ins[3]])
    if a["is_causal"]:
        lq, lk = x.dim(q.type.shape[-2]), x.dim(k.type.shape[-2])
        ones = x.one("ConstantOfShape", [x.one("Concat", [lq, lk], axis=0)],
                     value=helper.make_tensor("v", TensorProto.BOOL, [1], [True]))
        tri = x.one("Trilu", [ones], upper=0)
        s = x.one("Where", [tri, s, x.const(float("-inf"), dt)])
    p = x.one("Softmax", [s], axis=-1)
    return [x.one("MatMul", [p, ins[2]])]


@register_emitter("embedding")
def _embedding(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    return [x.one("Gather", [ins[0], ins[1]], axis=0)]


@register_emitter("reshape")
def _reshape(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    return [x.one("Reshape", [ins[0], x.shape(n.outputs[0].type.shape)])]


@register_emitter("permute")
def _permute(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    r = n.inputs[0].type.rank
    perm = [p % r for p in n.attrs["perm"]]
    src = x.transposed.get(ins[0])
    if src is not None and [src[1][p] for p in perm] == list(range(r)):
        return [src[0]]  # undoes the Transpose that made its input
    return [x.one("Transpose", [ins[0]], perm=perm)]


def _live_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes the graph outputs depend on (ONNX ops have no side effects): emitters that
    read a value's source directly (fused attention) leave the value's own nodes unread."""
    need = set(outputs)
    keep = []
    for nd in reversed(nodes):
        if any(o in need for o in nd.output):
            keep.append(nd)
            need.update(i for i in nd.input if i)
    return keep[::-1]


@register_emitter("expand")
def _expand(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    return [x.one("Expand", [ins[0], x.shape(n.outputs[0].type.shape)])]


@register_emitter("slice")
def _slice(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    a = n.attrs
    end = a["end"]
    end_t = x.const([2**63 - 1]) if isinstance(end, int) and end >= BIG else x.dim(end)
    return [x.one("Slice", [ins[0], x.dim(a["start"]), end_t, x.const([a["dim"]]),
                            x.const([a["step"]])])]


@register_emitter("select")
def _select(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    i = n.attrs["index"]
    idx = x.const(i) if isinstance(i, int) else x.one("Reshape", [x.dim(i), x.const([])])
    return [x.one("Gather", [ins[0], idx], axis=n.attrs["dim"])]


@register_emitter("concat")
def _concat(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    dt = n.outputs[0].type.dtype
    return [x.one("Concat", [x.cast(i, v, dt) for i, v in zip(ins, n.inputs)],
                  axis=n.attrs["dim"])]


@register_emitter("gather", "index_select", "gather_nd", "scatter_elements", "scatter_nd")
def _gather(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    a = n.attrs
    if n.op == "gather":
        return [x.one("GatherElements", ins, axis=a["dim"])]
    if n.op == "index_select":
        return [x.one("Gather", ins, axis=a["dim"])]
    if n.op == "gather_nd":
        return [x.one("GatherND", ins, batch_dims=a["batch_dims"])]
    red = a["reduction"]
    if n.op == "scatter_nd":
        return [x.one("ScatterND", ins, **({"reduction": red} if red != "none" else {}))]
    return [x.one("ScatterElements", ins, axis=a["dim"],
                  **({"reduction": red} if red != "none" else {}))]


@register_emitter("pad")
def _pad(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    a = n.attrs
    r = n.inputs[0].type.rank
    begins, ends = [0] * r, [0] * r
    p = list(a["pads"])
    for i in range(len(p) // 2):
        begins[r - 1 - i], ends[r - 1 - i] = p[2 * i], p[2 * i + 1]
    mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge",
            "circular": "wrap"}[a["mode"]]
    if mode == "wrap" and x.opset < 19:
        raise NoMapping
    dt = n.inputs[0].type.dtype
    extra = [x.const(a["value"], dt)] if mode == "constant" else []
    return [x.one("Pad", [ins[0], x.const(begins + ends)] + extra, mode=mode)]


@register_emitter("flip")
def _flip(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    dims = list(n.attrs["dims"])
    k = len(dims)
    return [x.one("Slice", [ins[0], x.const([-1] * k), x.const([-(2**63)] * k), x.const(dims),
                            x.const([-1] * k)])]


@register_emitter("tril", "triu")
def _trilu(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    return [x.one("Trilu", [ins[0], x.const(n.attrs["diagonal"])], upper=int(n.op == "triu"))]


@register_emitter("tile")
def _tile(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    reps = list(n.attrs["repeats"])
    r = n.inputs[0].type.rank
    i = ins[0]
    if len(reps) > r:
        i = x.one("Reshape", [i, x.shape([1] * (len(reps) - r) + list(n.inputs[0].type.shape))])
    return [x.one("Tile", [i, x.shape(reps)])]  # repeats may be symbolic (heads x batch)


@register_emitter("full")
def _full(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    dt = n.attrs["dtype"]
    v = n.attrs["value"]
    if isinstance(v, sympy.Basic):
        val = x.one("Cast", [x.one("Reshape", [x.dim(v), x.const([])])], to=_TO_ONNX[dt])
        return [x.one("Expand", [val, x.shape(n.attrs["shape"])])]
    return [x.one("ConstantOfShape", [x.shape(n.attrs["shape"])],
                  value=numpy_helper.from_array(np.array([v], dtype=_np_dtype(dt)), "v"))]


@register_emitter("arange")
def _arange(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    a = n.attrs
    dt = a["dtype"]

    def scalar(v: Any) -> str:
        if isinstance(v, sympy.Basic):
            return x.one("Cast", [x.one("Reshape", [x.dim(v), x.const([])])], to=_TO_ONNX[dt])
        return x.const(v, dt)
    return [x.one("Range", [scalar(a["start"]), scalar(a["end"]), scalar(a["step"])])]


@register_emitter("einsum")
def _einsum(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    return [x.one("Einsum", ins, equation=n.attrs["equation"])]


@register_emitter("one_hot")
def _one_hot(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    a = n.attrs
    return [x.one("OneHot", [ins[0], x.const(a["depth"]), x.const([a["off"], a["on"]],
                                                                  a["dtype"])], axis=a["dim"])]


@register_emitter("resize")
def _resize(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    a = n.attrs
    if a["antialias"] and x.opset < 18:
        raise NoMapping
    if a["coordinate_transformation_mode"] == "half_pixel_symmetric" and x.opset < 19:
        raise NoMapping
    extra = {"antialias": 1} if a["antialias"] else {}
    roi = x.const(list(a["roi"]), "float32") if a["roi"] is not None else ""
    if a["scales"] is not None:
        sizes_or_scales = [roi, x.const(list(a["scales"]), "float32")]
    else:
        sizes_or_scales = [roi, "", x.shape(a["sizes"])]
    return [x.one("Resize", [ins[0], *sizes_or_scales], mode=a["mode"],
                  coordinate_transformation_mode=a["coordinate_transformation_mode"],
                  nearest_mode=a["nearest_mode"], cubic_coeff_a=float(a["cubic_coeff_a"]),
                  exclude_outside=int(a["exclude_outside"]),
                  extrapolation_value=float(a["extrapolation_value"]), **extra)]


@register_emitter("interpolate")
def _interpolate(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    """torch F.interpolate to an output size as ONNX Resize (the coordinate rules torch's own
    exporter uses: legacy nearest floors asymmetric coordinates, nearest-exact rounds half-pixel
    ones, linear modes use pytorch_half_pixel or align_corners)."""
    a = n.attrs
    mode = a["mode"]
    if mode == "nearest":
        kw = dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                  nearest_mode="floor")
    elif mode == "nearest-exact":
        kw = dict(mode="nearest", coordinate_transformation_mode="half_pixel",
                  nearest_mode="round_prefer_ceil")
    else:
        kw = dict(mode="cubic" if mode == "bicubic" else "linear",
                  coordinate_transformation_mode="align_corners" if a["align_corners"]
                  else "pytorch_half_pixel")
        if mode == "bicubic":
            kw["cubic_coeff_a"] = -0.75
    return [x.one("Resize", [ins[0], "", "", x.shape(n.outputs[0].type.shape)], **kw)]


@register_emitter("roll")
def _roll(x: _Exporter, n: Node, ins: list[str]) -> list[str]:
    """torch.roll along each dim: the last ``shift`` elements moved to the front (two Slices
    and a Concat; the shift is static, the dim size may be symbolic)."""
    shifts, dims = list(n.attrs["shifts"]), list(n.attrs["dims"])
    if not dims or len(shifts) != len(dims):
        raise NoMapping
    out = ins[0]
    shape = n.inputs[0].type.shape
    r = n.inputs[0].type.rank
    for sh, d in zip(shifts, dims):
        d %= r
        size = shape[d]
        if isinstance(size, int):
            sh %= max(size, 1)
        if sh == 0:
            continue
        ax = x.const([d])
        tail = x.one("Slice", [out, x.const([-sh]), x.const([2**63 - 1]), ax])
        head = x.one("Slice", [out, x.const([0]), x.const([-sh]), ax])
        out = x.one("Concat", [tail, head], axis=d)
    return [out if out != ins[0] else x.one("Identity", [out])]
