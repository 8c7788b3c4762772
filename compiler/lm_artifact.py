"""Causal LMs in and out: a `transformers` folder or GGUF file in, a generating ``.ember`` out.

An LM artifact is an ordinary Ember artifact (same integrity checks, signatures and trust
rules) whose IR is the cached graph of `ember.lm` and whose manifest says ``"kind":
"causal-lm"``, with three more members, all data:

    tokenizer.json        the `tokenizers` tokenizer (`ember.tokenizer`)
    chat_template.jinja   the model's chat template (rendered in a sandbox), if it has one
    generation.json       the cache spec, vocabulary, positions, special token ids and the
                          generation defaults

The program is rebuilt from the IR when loading (the CPU backend's eager kind): no code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .errors import CompilerError, FrontendError

__all__ = ["load_hf", "save_lm", "load_lm", "LM_KIND"]

log = logging.getLogger(__name__)

LM_KIND = "causal-lm"


def load_hf(path: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a `transformers` folder or a ``.gguf`` file, fp32, eval mode,
    offline (nothing is downloaded)."""
    import os

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = Path(path)
    if not p.exists():
        raise FrontendError(f"{p}: no such model folder or file")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise FrontendError(f"loading {p} needs the 'transformers' package: {e}") from None
    kw: dict[str, Any] = {}
    where = p
    if p.is_file():
        if p.suffix != ".gguf":
            raise FrontendError(f"{p}: expected a transformers model folder or a .gguf file")
        where, kw = p.parent, {"gguf_file": p.name}
    try:
        tok = AutoTokenizer.from_pretrained(str(where), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32,
                                                     **kw).eval()
    except Exception as e:  # noqa: BLE001  (a foreign library's many errors: one line)
        raise FrontendError(f"{p}: cannot load as a causal LM ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return model, tok


def save_lm(lm: Any, tokenizer: Any, path: str | Path,
            defaults: dict[str, Any] | None = None) -> Path:
    """Writes a compiled LM (`ember.lm.CompiledLM`) and its tokenizer (`ember.tokenizer.
    Tokenizer`) as one ``.ember``."""
    from .artifact import save_artifact

    gen = {"spec": asdict(lm.spec), "vocab_size": lm.vocab_size,
           "max_positions": lm.max_positions, "config": lm.config,
           "defaults": defaults or {}, "bos_token": tokenizer.bos_token,
           "eos_token": tokenizer.eos_token, "add_bos": tokenizer.add_bos}
    data = {"tokenizer.json": tokenizer.json.encode(),
            "generation.json": json.dumps(gen, indent=1).encode()}
    if tokenizer.chat_template:
        data["chat_template.jinja"] = tokenizer.chat_template.encode()
    return save_artifact(lm.compiled, Path(path), data=data, extra={"kind": LM_KIND})


def load_lm(path: str | Path, **kwargs: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(compiled LM, tokenizer, generation defaults) from an LM artifact; keyword arguments
    are `ember.artifact.read_artifact`'s."""
    from .artifact import read_artifact
    from .lm import CacheSpec, CompiledLM
    from .tokenizer import Tokenizer

    a = read_artifact(path, **kwargs)
    if a.manifest.get("kind") != LM_KIND or a.root is None:
        raise CompilerError(f"{path}: not a causal-LM artifact (compile one with "
                            f"`ember compile MODEL --task generate`)")
    try:
        gen = json.loads((a.root / "generation.json").read_text())
        spec = CacheSpec(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in gen["spec"].items()})
        tmpl = a.root / "chat_template.jinja"
        tok = Tokenizer((a.root / "tokenizer.json").read_text(),
                        tmpl.read_text() if tmpl.is_file() else None,
                        gen.get("bos_token"), gen.get("eos_token"), bool(gen.get("add_bos")))
        lm = CompiledLM.from_parts(a.graph, a.program, spec, int(gen["vocab_size"]),
                                   int(gen["max_positions"]), dict(gen.get("config") or {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CompilerError(f"{path}: generation.json or tokenizer.json is invalid "
                            f"({type(e).__name__}: {str(e)[:160]})") from None
    return lm, tok, dict(gen.get("defaults") or {})
