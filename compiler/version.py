"""Ember's version string (a leaf: the artifact manifest records it, ``ember.__version__`` is it)."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
