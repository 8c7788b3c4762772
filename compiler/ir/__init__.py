"""Ember IR: typed SSA graphs with symbolic dims, an op registry, verifier, printer, JSON."""

from .graph import NO_LOC, Graph, GraphBuilder, Node, SourceLoc, Value, rewrite
from .ops import REQUIRED, OpDef, OpTypeError, all_ops, get_op, has_op, register_op
from .printer import format_graph, format_node
from .serialize import graph_from_json, graph_to_json
from .shapes import Dim, ShapeError, bind_symbols, evaluate, sym
from .types import TensorType, from_torch_dtype, to_torch_dtype
from .verify import verify

__all__ = [
    "NO_LOC", "Graph", "GraphBuilder", "Node", "SourceLoc", "Value", "rewrite",
    "REQUIRED", "OpDef", "OpTypeError", "all_ops", "get_op", "has_op", "register_op",
    "format_graph", "format_node", "graph_from_json", "graph_to_json",
    "Dim", "ShapeError", "bind_symbols", "evaluate", "sym",
    "TensorType", "from_torch_dtype", "to_torch_dtype", "verify",
]
