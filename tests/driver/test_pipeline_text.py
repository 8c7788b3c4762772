"""The pipeline text form parses, expands named levels and round-trips."""

from __future__ import annotations

import pytest

from ember.errors import CompilerError
from ember.passmanager import PassManager, format_pipeline, parse_pipeline
from ember.pipelines import PIPELINES


def test_named_levels_expand():
    assert parse_pipeline("O0") == []
    assert [s.name for s in parse_pipeline("O2")] == PIPELINES["O2"]


def test_options_parse_and_round_trip():
    steps = parse_pipeline("O1,fold_constants,cse")
    assert format_pipeline(steps) == ",".join(PIPELINES["O1"] + ["fold_constants", "cse"])
    s = parse_pipeline("x{a=1,b=2.5,c=true,d=w8a8-dynamic,e=2:4}")[0]
    assert s.options == {"a": 1, "b": 2.5, "c": True, "d": "w8a8-dynamic", "e": "2:4"}
    assert parse_pipeline(format_pipeline([s]))[0] == s


def test_errors_are_clear():
    with pytest.raises(CompilerError, match="unknown pass 'nope'"):
        PassManager("O1,nope")
    with pytest.raises(CompilerError, match="needs key=value"):
        parse_pipeline("dce{oops}")
    with pytest.raises(CompilerError, match="takes no options"):
        parse_pipeline("O2{a=1}")
    with pytest.raises(CompilerError, match="has no option"):
        PassManager("dce{bogus=1}")


# ----------------------------------------------------------------------------- contracts
def _toy_graph(dead: bool):
    from ember.ir import GraphBuilder, TensorType

    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (2, 3)))
    if dead:
        b.op("exp", [x])
    b.set_outputs([b.op("relu", [x])])
    return b.build()


@pytest.fixture
def toy_passes(monkeypatch: pytest.MonkeyPatch):
    """Three throwaway passes with contracts, registered only for one test."""
    from ember import passmanager as pm

    monkeypatch.setattr(pm, "_PASSES", dict(pm.all_passes()))

    @pm.register_pass(provides=("layout",))
    def t_provide(g, cfg, ctx):
        return g

    @pm.register_pass(invalidates=("layout",))
    def t_invalidate(g, cfg, ctx):
        from ember.passes.dce import DceConfig, dce

        return dce(g, DceConfig(), ctx)

    @pm.register_pass(requires=("types", "layout"))
    def t_require(g, cfg, ctx):
        return g


def test_contracts_are_checked_before_running(toy_passes):
    from ember.passmanager import FRONTEND_PROVIDES

    assert {"types", "shapes"} <= FRONTEND_PROVIDES
    PassManager("t_provide,t_require")
    with pytest.raises(CompilerError, match="pass 't_require' .*requires layout: no earlier "
                                            "pass provides 'layout'"):
        PassManager("O1,t_require")
    with pytest.raises(CompilerError, match="'layout' was invalidated by 't_invalidate'"):
        PassManager("t_provide,t_invalidate,t_require")
    PassManager("t_require", given={"types", "layout"})


def test_every_registered_pass_states_what_it_requires():
    from ember.passmanager import FRONTEND_PROVIDES, all_passes

    for info in all_passes().values():
        assert info.requires and info.requires <= FRONTEND_PROVIDES, info.name


def test_modified_is_recorded(toy_passes):
    pm = PassManager("t_provide,dce,t_require,cse")
    pm.run(_toy_graph(dead=True))
    assert pm.modified == {"t_provide": False, "dce": True, "t_require": False, "cse": False}
    pm = PassManager("dce,t_invalidate")
    pm.run(_toy_graph(dead=False))
    assert pm.modified == {"dce": False, "t_invalidate": False}


def test_verify_each_is_on_in_tests():
    from ember import passmanager

    assert passmanager.VERIFY_EACH
    assert PassManager("dce").verify_each
