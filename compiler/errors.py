"""Ember's errors. Each renders as one line a user can act on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "EmberError",
    "CompilerError",
    "UnsupportedOpError",
    "UnsupportedOp",
    "VerificationError",
    "PassError",
    "ArtifactError",
    "FrontendError",
    "BackendUnavailableError",
]


class EmberError(Exception):
    """Base of every error Ember raises on purpose: one line naming the file, op or field."""


class CompilerError(EmberError):
    """An error compiling, loading or running a model (every Ember error today is one)."""


@dataclass(frozen=True)
class UnsupportedOp:
    op: str
    loc: str
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.op} at {self.loc}" + (f": {self.reason}" if self.reason else "")


class UnsupportedOpError(CompilerError):
    """One or more frontend ops have no Ember mapping. Lists every one, not only the first."""

    def __init__(self, ops: Sequence[UnsupportedOp], frontend: str = "", backend: str = "") -> None:
        self.ops = list(ops)
        where = f"backend '{backend}'" if backend else f"the {frontend or 'Ember'} frontend"
        names = sorted({o.op for o in self.ops})
        lines = [f"{len(self.ops)} unsupported op(s) for {where} ({', '.join(names)}):"]
        lines += [f"  - {o}" for o in self.ops]
        super().__init__("\n".join(lines))


class VerificationError(CompilerError):
    """The IR broke an invariant (SSA, types, shapes)."""


class PassError(CompilerError):
    """A pass failed; names the pass and the passes that ran before it."""

    def __init__(self, pass_name: str, previous: Sequence[str], cause: BaseException) -> None:
        self.pass_name = pass_name
        self.previous = list(previous)
        self.__cause__ = cause
        prev = ", ".join(previous) or "none"
        super().__init__(f"pass '{pass_name}' failed (after: {prev}): {cause}")


class ArtifactError(CompilerError):
    """An artifact is missing, tampered, truncated or of the wrong version/target."""


class FrontendError(CompilerError):
    """The input model could not be read or traced."""


class BackendUnavailableError(CompilerError):
    """A backend cannot run here (no GPU, missing toolchain); says why."""
