"""Frontends: PyTorch (torch.export / FX) and ONNX models into the Ember IR."""

from __future__ import annotations

__all__ = ["fx"]
