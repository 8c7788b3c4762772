"""Ember IR: typed SSA graphs with symbolic dims, an op registry with op traits, a verifier,
a printer, JSON, and the graph evaluator. Importing it registers every op (the opset modules)."""

# the opsets register their ops on import: every op exists once `ember.ir` is imported
from . import opset, opset_cache, opset_extra, opset_fused, opset_quant, opset_tokens  # noqa: F401
from .graph import NO_LOC, Graph, GraphBuilder, Node, Rebuilder, SourceLoc, Value, rewrite
from .interpret import Interpreter, concretize, evaluate_values, run_graph
from .ops import (
    REQUIRED,
    TRAITS,
    OpDef,
    OpTypeError,
    all_ops,
    get_op,
    has_op,
    has_trait,
    ops_with,
    register_op,
)
from .printer import format_graph, format_node
from .serialize import graph_from_json, graph_to_json
from .shapes import Dim, ShapeError, bind_symbols, evaluate, sym
from .types import TensorType, from_torch_dtype, to_torch_dtype
from .verify import verify

__all__ = [
    "NO_LOC", "Graph", "GraphBuilder", "Node", "Rebuilder", "SourceLoc", "Value", "rewrite",
    "Interpreter", "concretize", "evaluate_values", "run_graph",
    "REQUIRED", "TRAITS", "OpDef", "OpTypeError", "all_ops", "get_op", "has_op", "has_trait",
    "ops_with", "register_op",
    "format_graph", "format_node", "graph_from_json", "graph_to_json",
    "Dim", "ShapeError", "bind_symbols", "evaluate", "sym",
    "TensorType", "from_torch_dtype", "to_torch_dtype", "verify",
]
