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
