"""ONNX Runtime sessions built the one way Ember times and ships them.

CPU execution provider, ``threads`` intra-op threads and one inter-op thread, every graph
optimization on, busy-waiting workers unless ``spinning=False``, errors-only logging unless
``quiet=False``, and the graph transformers the CPU backend measured slower on this machine
switched off (``disabled``). The CPU backend's program, its per-machine kernel tuning, its pass
gate (`ember.backends.cpu.gate`), the device-spec measurement, the ORT profile collector and the
benchmarks all open sessions here, so a layer timed by a gate runs as the shipped program runs
it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["session_options", "open_session", "graph_session"]


def session_options(threads: int, *, spinning: bool = True, quiet: bool = True) -> Any:
    """``onnxruntime.SessionOptions`` with Ember's settings (callers may add to them)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:  # idle workers sleep instead of busy-waiting for the next op
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if quiet:  # errors only: unused-initializer notes are not for users
        so.log_severity_level = 3
    return so


def open_session(model: str | Path | bytes, options: Any, disabled: Sequence[str] = ()) -> Any:
    """A CPU ``InferenceSession`` on a model file or serialized model bytes."""
    import onnxruntime as ort

    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled) or None)


def graph_session(nodes: Sequence[Any], inputs: dict[str, Any], threads: int,
                  inits: dict[str, Any] | None = None, disabled: Sequence[str] = (),
                  dynamic_rows: bool = False) -> Any:
    """A session on a one-off graph of ONNX ``nodes`` (default and ``com.microsoft`` domains)
    reading ``inputs`` (name -> example array, for dtype and shape) and the constant arrays
    ``inits``, writing one float output ``y``: the form micro-benchmarks time kernels in.
    ``dynamic_rows``: every input's first dim is the symbol ``rows`` (any size is fed)."""
    from onnx import TensorProto, helper, numpy_helper

    vi = [helper.make_tensor_value_info(
        k, helper.np_dtype_to_tensor_dtype(v.dtype),
        (["rows"] + list(v.shape[1:])) if dynamic_rows and v.ndim else list(v.shape))
        for k, v in inputs.items()]
    g = helper.make_graph(list(nodes), "k", vi,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid("com.microsoft", 1)])
    return open_session(m.SerializeToString(), session_options(threads), disabled)
