"""Generality: architectures the frontend was not written against import and match eager."""

from __future__ import annotations

import pytest
import torch
import unseen_models
from test_fx import assert_matches, eager_outputs

from ember.backends.reference import run_graph
from ember.frontends import fx
from ember.ir import verify


@pytest.mark.parametrize("name", sorted(unseen_models.UNSEEN))
def test_unseen_model_matches_eager(name: str) -> None:
    z = unseen_models.UNSEEN[name]()
    g = fx.import_module(z.model, z.example_inputs, z.dynamic_dims, z.input_names)
    verify(g)
    assert_matches(run_graph(g, *z.example_inputs), eager_outputs(z.model, z.example_inputs))
    ins = z.make_inputs(batch=3, seq=5)
    assert tuple(ins[0].shape) != tuple(z.example_inputs[0].shape)
    assert_matches(run_graph(g, *ins), eager_outputs(z.model, ins))


def test_unet_uses_upsampling_and_concat() -> None:
    z = unseen_models.unet()
    ops = fx.import_module(z.model, z.example_inputs).op_counts()
    assert ops["interpolate"] == 2 and ops["concat"] == 2 and ops["conv_transpose"] == 1
    assert ops["group_norm"] == 10


def test_exported_program_entry_point() -> None:
    z = unseen_models.whisper_encoder()
    with torch.no_grad():
        ep = torch.export.export(z.model.eval(), z.example_inputs, strict=False)
    g = fx.import_exported_program(ep, ["mel"])
    verify(g)
    assert_matches(run_graph(g, *z.example_inputs), eager_outputs(z.model, z.example_inputs))
