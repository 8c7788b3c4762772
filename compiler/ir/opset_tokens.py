"""Ops introduced by token merging/pruning and layer skipping (token_merge, token_select, ...)."""

from __future__ import annotations
