"""Ember: an ahead-of-time model compiler.

    import ember
    cm = ember.compile(model, (x,), target="cpu")        # nn.Module, ExportedProgram, .pt2, .onnx
    y = cm(x)
    cm.save("model.ember"); cm2 = ember.load("model.ember")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

__all__ = ["compile", "load", "CompiledModel", "__version__"]

if TYPE_CHECKING:
    from .compiled import CompiledModel


def compile(model: Any, example_inputs: Any = None, target: str = "cpu", passes: str = "O2",
            dynamic_dims: Any = None, **kwargs: Any) -> CompiledModel:  # noqa: A001
    """Compiles a model; see `ember.driver.compile` for every argument."""
    from .driver import compile as _compile

    return _compile(model, example_inputs, target, passes, dynamic_dims, **kwargs)


def load(path: Any, **kwargs: Any) -> CompiledModel:
    """Loads a ``.ember`` artifact; see `ember.compiled.load`."""
    from .compiled import load as _load

    return _load(path, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "CompiledModel":
        from .compiled import CompiledModel

        return CompiledModel
    raise AttributeError(name)
