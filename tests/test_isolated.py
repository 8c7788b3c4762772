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


def make_cold_first(cold_s: float, warm_s: float):
    """A runner whose call after an idle gap is slow and whose back-to-back calls are fast."""
    import time

    last = [0.0]

    def run(x):
        now = time.perf_counter()
        time.sleep(cold_s if now - last[0] > 0.02 else warm_s)
        last[0] = time.perf_counter()
        return torch.from_numpy(x)

    return run


def test_isolated_back_to_back_calls_give_cold_and_warm_figures() -> None:
    res = time_isolated({"c": Contender("test_isolated:make_cold_first", (0.03, 0.002))},
                        [torch.randn(2)], repeats=3, warmup=1, threads=1, settle_s=0.05,
                        sys_path=[HERE], calls=4, warm_s=0.0)["c"]
    assert len(res.samples) == 3 and len(res.warm_samples) == 3
    assert min(res.samples) >= 30 and res.ms >= 30  # the first call of each round
    assert max(res.warm_samples) < 25 and res.warm_ms < 25  # the median of the other three
    one = time_isolated({"c": Contender("test_isolated:make_cold_first", (0.03, 0.002))},
                        [torch.randn(2)], repeats=2, warmup=0, threads=1, settle_s=0.05,
                        sys_path=[HERE])["c"]
    assert one.warm_ms is None and not one.warm_samples and min(one.samples) >= 30


def test_isolated_warm_calls_wait_for_the_busy_time() -> None:
    import time

    t0 = time.perf_counter()
    res = time_isolated({"c": Contender("test_isolated:make_cold_first", (0.03, 0.01))},
                        [torch.randn(2)], repeats=2, warmup=0, threads=1, settle_s=0.0,
                        sys_path=[HERE], calls=2, warm_s=0.3)["c"]
    # each round: the cold call, >= 0.3 s of untimed back-to-back calls, one timed warm call
    assert time.perf_counter() - t0 >= 0.6
    assert len(res.warm_samples) == 2 and res.warm_ms < 25
