"""Reference backend: interprets the IR with each op's eager-torch reference."""

from .interpreter import Interpreter, run_graph

__all__ = ["Interpreter", "run_graph"]
