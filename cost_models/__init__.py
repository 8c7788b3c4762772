"""Ember's hardware cost model (placeholder API, completed below)."""
from __future__ import annotations
