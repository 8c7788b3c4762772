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
