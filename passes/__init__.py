"""Ember passes. Importing this package registers every pass (see passes/README.md)."""

from __future__ import annotations

from . import (  # noqa: F401  (each module registers its pass)
    cse,
    dce,
    fold_constants,
    fold_conv_bn,
    fuse_attention,
    fuse_linear_act,
    fuse_norms,
    fuse_qkv,
)

__all__: list[str] = []
