"""Ops introduced by Ember's fusion passes (fused linear/conv epilogues, fused norms, ...)."""

from __future__ import annotations
