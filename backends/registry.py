"""Backend registry: ``get_backend("cpu")``, ``register(backend)``.

The built-in backends register lazily on first lookup, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
from typing import Any

from ember.errors import BackendUnavailableError, CompilerError

from .base import Availability, Backend, Support

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
    # optional backends: their modules import triton / tvm; when that fails the backend is
    # still known, and says why it cannot be used
    import importlib

    for name, module, cls in (("cuda", "ember.backends.cuda", "CudaBackend"),
                              ("mobile", "ember.backends.mobile", "MobileBackend")):
        if name in _BACKENDS:
            continue
        try:
            mod = importlib.import_module(module)
            if name not in _BACKENDS:
                register(getattr(mod, cls)())
        except ImportError as e:
            register(UnavailableBackend(name, f"{module} cannot be imported: {e}"))


class UnavailableBackend:
    """A known backend whose dependencies are missing here: every use says why."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    def available(self) -> Availability:
        return Availability(False, self.reason)

    def supports(self, node: Any) -> Support:
        return Support(False, self.reason)

    def compile(self, graph: Any, example_inputs: Any, **opts: Any) -> Any:
        raise BackendUnavailableError(f"backend '{self.name}' is unavailable: {self.reason}")

    def load(self, directory: Any, info: Any, **kw: Any) -> Any:
        raise BackendUnavailableError(f"backend '{self.name}' is unavailable: {self.reason}")


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
