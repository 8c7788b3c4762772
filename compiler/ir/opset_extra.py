"""Ops beyond the core set, needed by frontends (ONNX and others): resize, ...."""

from __future__ import annotations
