"""torch.compile(model, backend="ember"): matches eager; unsupported graphs fall back."""

from __future__ import annotations

import warnings

import torch

from .models import small_net


def test_torch_compile_backend_matches_eager():
    torch._dynamo.reset()
    model, x = small_net()
    compiled = torch.compile(model, backend="ember")
    with torch.no_grad():
        got = compiled(*x)
        want = model(*x)
    assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))


class Weird(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Bessel functions have no Ember op: the frontend raises UnsupportedOpError
        return torch.special.bessel_j0(x) + x.sum()


def test_torch_compile_falls_back_with_warning():
    torch._dynamo.reset()
    m = Weird()
    x = torch.randn(8)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = torch.compile(m, backend="ember")(x)
    assert torch.allclose(out, m(x))
    assert any("ember" in str(w.message) for w in rec)


def test_torch_compile_changing_shapes_runs_ember_for_every_shape(monkeypatch):
    """Dynamo's second shape recompiles the graph with symbolic sizes: Ember compiles it once
    with those dims symbolic, and every shape after runs Ember's program (no eager fallback)."""
    from transformers import BertConfig, BertModel

    from ember.compiled import CompiledModel

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    calls: list[tuple[int, ...]] = []
    real_run = CompiledModel.run

    def counting_run(self, *args):
        calls.append(tuple(args[0].shape))
        return real_run(self, *args)
    monkeypatch.setattr(CompiledModel, "run", counting_run)
    compiled = torch.compile(model, backend="ember")
    shapes = [(1, 8), (2, 16), (3, 5), (4, 32)]
    with warnings.catch_warnings(record=True) as rec, torch.no_grad():
        warnings.simplefilter("always")
        for b, s in shapes:
            ids = torch.randint(0, 100, (b, s))
            got = compiled(input_ids=ids).last_hidden_state
            want = model(input_ids=ids).last_hidden_state
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not [w for w in rec if "ember" in str(w.message)], [str(w.message) for w in rec]
    assert [c for c in calls] == list(shapes), calls
