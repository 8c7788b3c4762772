"""Backend registry: ``get_backend("cpu")``, ``register(backend)``.

The built-in backends register lazily on first lookup, so importing this module stays cheap.
"""

from __future__ import annotations

import logging

from ember.errors import CompilerError

from .base import Backend

__all__ = ["register", "get_backend", "all_backends"]

log = logging.getLogger(__name__)

_BACKENDS: dict[str, Backend] = {}
_BUILTINS_LOADED = False


def register(backend: Backend) -> Backend:
    """Registers ``backend`` under ``backend.name``; re-registering the same object is a no-op."""
    prev = _BACKENDS.get(backend.name)
    if prev is not None and prev is not backend:
        raise ValueError(f"backend '{backend.name}' registered twice")
    _BACKENDS[backend.name] = backend
    return backend


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from .cpu import CpuBackend
    from .reference import ReferenceBackend

    for b in (ReferenceBackend(), CpuBackend()):
        if b.name not in _BACKENDS:
            register(b)


def get_backend(name: str) -> Backend:
    _load_builtins()
    try:
        return _BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(_BACKENDS))
        raise CompilerError(f"unknown backend '{name}'; known backends: {known}") from None


def all_backends() -> dict[str, Backend]:
    _load_builtins()
    return dict(_BACKENDS)
