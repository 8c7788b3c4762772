"""Ops introduced by quantization and sparsity passes (qlinear, sparse_matmul, lut_matmul, ...)."""

from __future__ import annotations
