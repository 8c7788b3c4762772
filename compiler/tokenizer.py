"""A causal LM's tokenizer and chat template, as data: `tokenizer.json` and a Jinja template.

The tokenizer is the `tokenizers` library's `Tokenizer` built from its JSON (what a Hugging
Face fast tokenizer saves; ``hf_tokenizer.backend_tokenizer.to_str()``), so nothing of
`transformers` is needed to generate. The chat template is rendered in Jinja's immutable
sandbox: a template read from a file is data, and attribute access such as
``''.__class__.__mro__`` is refused with Ember's one-line error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .errors import CompilerError

__all__ = ["Tokenizer", "IncrementalDecoder"]

log = logging.getLogger(__name__)

_MAX_JSON = 64 << 20
_MAX_TEMPLATE = 64 << 10


class Tokenizer:
    """Encode/decode, special tokens and the chat template of one LM."""

    def __init__(self, tokenizer_json: str, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 add_bos: bool = False) -> None:
        from tokenizers import Tokenizer as _Tok

        if len(tokenizer_json) > _MAX_JSON:
            raise CompilerError(f"tokenizer.json is {len(tokenizer_json)} bytes (at most "
                                f"{_MAX_JSON})")
        if chat_template is not None and len(chat_template) > _MAX_TEMPLATE:
            raise CompilerError(f"chat template is {len(chat_template)} characters (at most "
                                f"{_MAX_TEMPLATE})")
        try:
            self._tok = _Tok.from_str(tokenizer_json)
        except Exception as e:  # noqa: BLE001  (the library raises its own exception types)
            raise CompilerError(f"tokenizer.json is not a valid tokenizer "
                                f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})"
                                ) from None
        self.json = tokenizer_json
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.add_bos = bos_token, eos_token, add_bos

    @classmethod
    def from_hf(cls, tok: Any) -> Tokenizer:
        """From a `transformers` fast tokenizer (its `tokenizer.json`, template, specials)."""
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            raise CompilerError(f"{type(tok).__name__} is not a fast tokenizer "
                                f"(no tokenizer.json to take)")
        bos = getattr(tok, "bos_token", None)
        # whether encode() should put BOS first: what the HF tokenizer itself does
        probe = tok("a").input_ids if callable(tok) else []
        add_bos = bool(bos) and bool(probe) and probe[0] == tok.bos_token_id
        return cls(backend.to_str(), getattr(tok, "chat_template", None), bos,
                   getattr(tok, "eos_token", None), add_bos)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with BOS first where the model's tokenizer adds it."""
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        bos = self.token_id(self.bos_token)
        if self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` ([{"role", "content"}, ...]) by the model's own
        template, rendered in a sandbox."""
        if not self.chat_template:
            raise CompilerError("this model has no chat template: use a plain prompt")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg: str) -> None:
            raise CompilerError(f"chat template: {msg}")
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except SecurityError as e:
            raise CompilerError(f"chat template refused: {str(e)[:160]}") from None
        except TemplateError as e:
            raise CompilerError(f"chat template is invalid: {str(e)[:160]}") from None

    def decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Text increments for a growing token list: a character split over several tokens
    (UTF-8 bytes of one emoji, say) appears once it is whole, never as U+FFFD."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for its next byte
        new = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        return new

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character stays U+FFFD)."""
        text = self.tok.decode(self.ids)
        new = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        return new

    def feed(self, tokens: Iterator[int]) -> Iterator[str]:
        """The text pieces of ``tokens`` as they come, then whatever was held back."""
        for t in tokens:
            piece = self.push(t)
            if piece:
                yield piece
        rest = self.flush()
        if rest:
            yield rest
