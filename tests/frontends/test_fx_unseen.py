"""Generality: architectures the frontend was not written against import and match eager."""

from __future__ import annotations

import pytest
import torch
import unseen_models
from test_fx import assert_matches, eager_outputs
from torch import nn

from ember.frontends import fx
from ember.ir import run_graph, verify


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in unseen_models.HF_UNSEEN else n
    for n in sorted(unseen_models.UNSEEN)])
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


class _SliceAssign(nn.Module):
    """In-place writes into a fresh tensor (BEiT's relative position index): aten.copy and
    aten.fill.Tensor after functionalization."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.zeros(x.shape[0] + 1, x.shape[1] + 1, dtype=torch.long)
        idx[1:, 1:] = (x * 3).long()
        idx[0, 0:] = 7
        idx[0:, 0] = x[0, 0].long()
        idx[0, 0] = x.sum().long()
        return x.sum(0, keepdim=True) + idx[1:, 1:].float() + idx[0:1, 1:]


def test_slice_assignment_copy_and_fill_tensor() -> None:
    m, x = _SliceAssign(), torch.randn(4, 5) * 3
    g = fx.import_module(m, (x,))
    verify(g)
    assert_matches(run_graph(g, x), eager_outputs(m, (x,)))


class _VarArgs(nn.Module):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return xs[0] * 2 + xs[1].sum(-1, keepdim=True)


def test_var_positional_forward_with_dynamic_dims() -> None:
    m, ins = _VarArgs(), (torch.randn(2, 3), torch.randn(2, 4))
    g = fx.import_module(m, ins, {"a": {0: "batch"}, "b": {0: "batch"}}, ["a", "b"])
    verify(g)
    assert str(g.inputs[0].type.shape[0]) == "batch"
    new = (torch.randn(5, 3), torch.randn(5, 4))
    assert_matches(run_graph(g, *new), eager_outputs(m, new))
