"""ember.isolated: contenders timed each in its own process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ember.isolated import Contender, time_isolated

HERE = str(Path(__file__).resolve().parent)


def make_scaled(k: float):  # a factory the worker imports by name from this module
    return lambda x: torch.from_numpy(x) * k


def make_broken():
    raise RuntimeError("cannot build this one\nsecond line")


def make_dying():  # a native crash (an AOTI kernel's abort) kills the worker outright
    import os

    os._exit(3)


def test_isolated_times_outputs_and_failures(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])])
    onnx_path = tmp_path / "relu.onnx"
    onnx_path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
                          .SerializeToString())
    x = torch.randn(4, 3)
    res = time_isolated({"scaled": Contender("test_isolated:make_scaled", (3.0,)),
                         "ort": Contender("ember.isolated:load_ort", (str(onnx_path), 1, False)),
                         "broken": Contender("test_isolated:make_broken"),
                         "dying": Contender("test_isolated:make_dying")},
                        [x], repeats=4, warmup=1, threads=1, settle_s=0.0, sys_path=[HERE])
    np.testing.assert_allclose(res["scaled"].outputs[0], 3 * x.numpy(), rtol=1e-6)
    np.testing.assert_allclose(res["ort"].outputs[0], x.clamp(min=0).numpy(), rtol=1e-6)
    for k in ("scaled", "ort"):
        assert len(res[k].samples) == 4 and res[k].ms is not None and res[k].ms > 0
        s = sorted(res[k].samples)
        assert res[k].ms == (s[1] + s[2]) / 2
    assert res["broken"].ms is None and res["broken"].error == \
        "RuntimeError: cannot build this one"
    assert res["dying"].ms is None and res["dying"].error.startswith("worker died")
