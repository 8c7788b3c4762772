"""Ember passes, one module per pass (see passes/README.md).

`ember.passmanager` finds a pass by name: it imports ``ember.passes.<name>`` on first lookup,
and importing the module registers the pass. This package imports none of them itself.
"""

from __future__ import annotations

__all__: list[str] = []
