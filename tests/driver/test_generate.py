"""The generation loop (`ember.generate`) and the tokenizer (`ember.tokenizer`), on a small real
transformer with a KV cache that honours `ember.lm`'s step contract (rows written at their
positions, attention to rows <= position), and a BPE tokenizer trained here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ember.errors import CompilerError
from ember.generate import GenerationConfig, generate, process_logits, stream_tokens
from ember.tokenizer import Tokenizer

V, D, H, L = 50, 32, 2, 2


class TinyLM(nn.Module):
    """A 2-layer causal transformer; `step` runs on a preallocated cache, `full` recomputes
    the whole sequence without one (the oracle)."""

    max_positions = 256

    def __init__(self, vocab: int = V) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vocab_size = vocab
        self.emb = nn.Embedding(vocab, D)
        self.pos = nn.Embedding(256, D)
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(L))
        self.out = nn.ModuleList(nn.Linear(D, D) for _ in range(L))
        self.head = nn.Linear(D, vocab)
        self.allocations = 0

    def new_cache(self, batch: int, max_len: int) -> list[torch.Tensor]:
        self.allocations += 1
        return [torch.zeros(batch, H, max_len, D // H) for _ in range(2 * L)]

    def _layer(self, i: int, x: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
               q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv[i](x).split(D, -1)
        q = q.view(b, t, H, -1).transpose(1, 2)
        mask = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
        a = torch.nn.functional.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return x + self.out[i](a.transpose(1, 2).reshape(b, t, D))

    @torch.no_grad()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, cache: list[torch.Tensor],
             last_only: bool = False) -> torch.Tensor:
        x = self.emb(ids) + self.pos(positions)
        b, t = ids.shape
        n = int(positions.max()) + 1
        rows = torch.arange(b)[:, None].expand(b, t)
        for i in range(L):
            _, k, v = self.qkv[i](x).split(D, -1)
            kc, vc = cache[2 * i], cache[2 * i + 1]
            kc[rows, :, positions] = k.view(b, t, H, -1)
            vc[rows, :, positions] = v.view(b, t, H, -1)
            x = self._layer(i, x, kc[:, :, :n], vc[:, :, :n], positions,
                            torch.arange(n).expand(b, n))
        logits = self.head(x)
        return logits[:, -1] if last_only else logits

    @torch.no_grad()
    def full(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor([ids])
        pos = torch.arange(len(ids))[None]
        x = self.emb(t) + self.pos(pos)
        for i in range(L):
            _, k, v = self.qkv[i](x).split(D, -1)
            k = k.view(1, len(ids), H, -1).transpose(1, 2)
            v = v.view(1, len(ids), H, -1).transpose(1, 2)
            x = self._layer(i, x, k, v, pos, pos)
        return self.head(x)[0, -1]


@pytest.fixture(scope="module")
def lm() -> TinyLM:
    return TinyLM().eval()


def _oracle_greedy(lm: TinyLM, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(lm.full(ids).argmax()))
    return ids[len(prompt):]


def test_greedy_equals_full_recompute_and_cache_is_allocated_once(lm):
    lm.allocations = 0
    res = generate(lm, [[1, 2, 3, 4]], max_new_tokens=12)
    assert res.tokens[0] == _oracle_greedy(lm, [1, 2, 3, 4], 12)
    assert lm.allocations == 1 and res.finish_reasons == ["length"]
    assert res.ttft_s > 0 and res.decode_tokens_per_s > 0


def test_mixed_length_batch_equals_one_at_a_time(lm):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [12, 13, 14]]
    batch = generate(lm, prompts, max_new_tokens=10)
    for p, got in zip(prompts, batch.tokens):
        assert got == generate(lm, [p], max_new_tokens=10).tokens[0]


def test_seeded_sampling_is_reproducible_and_stop_tokens_end_rows(lm):
    cfg = GenerationConfig(max_new_tokens=20, do_sample=True, temperature=0.8, top_k=10,
                           top_p=0.9, seed=3)
    a, b = generate(lm, [[1, 2]], cfg), generate(lm, [[1, 2]], cfg)
    assert a.tokens == b.tokens
    assert generate(lm, [[1, 2]], cfg, seed=4).tokens != a.tokens
    stop = a.tokens[0][5]
    c = generate(lm, [[1, 2]], cfg, stop_token_ids=(stop,))
    assert c.tokens[0] == a.tokens[0][: a.tokens[0].index(stop)]
    assert c.finish_reasons == ["stop_token"]
    assert list(stream_tokens(lm, [1, 2], cfg, stop_token_ids=(stop,))) == c.tokens[0]


def test_logits_processing_matches_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(1)
    logits = torch.randn(3, 40) * 3
    hist = [[1, 2, 2, 7], [0], [39, 5]]
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=12, top_p=0.8,
                           repetition_penalty=1.3)
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(h) for h in hist], batch_first=True,
                                          padding_value=hist[0][0])
    want = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7),
                 TopKLogitsWarper(12), TopPLogitsWarper(0.8)):
        want = proc(ids, want)
    got = process_logits(logits, hist, cfg)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = ~torch.isinf(want)
    torch.testing.assert_close(got[fin], want[fin])


def test_bad_settings_are_one_line_errors(lm):
    for kw in ({"temperature": 0.0, "do_sample": True}, {"top_p": 0.0},
               {"max_new_tokens": -1}):
        with pytest.raises(CompilerError):
            generate(lm, [[1]], **kw)
    with pytest.raises(CompilerError, match="at least one token"):
        generate(lm, [[]])
    with pytest.raises(CompilerError, match="positions"):
        generate(lm, [[1] * 250], max_new_tokens=10)


# ----------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from tokenizers import Tokenizer as Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    t = Tok(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the cat sat on the mat", "a dog ran", "caf\u00e9 cr\u00e8me \U0001f525 hot"] * 20
    t.train_from_iterator(text, trainer)
    tmpl = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
    return Tokenizer(t.to_str(), tmpl, bos_token="<s>", eos_token="</s>", add_bos=True)


def test_tokenizer_round_trip_and_incremental_decode(tok):
    text = "the cat caf\u00e9 \U0001f525"
    ids = tok.encode(text)
    assert ids[0] == tok.token_id("<s>")
    assert tok.decode(ids) == text
    dec = tok.decoder()
    pieces = [dec.push(t) for t in ids]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_chat_template_renders_and_is_sandboxed(tok):
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<user>hi<assistant>"
    evil = Tokenizer(tok.json, "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(CompilerError, match="refused"):
        evil.apply_chat_template([{"role": "user", "content": "x"}])


def test_stop_strings_trim_and_streaming_text_matches(tok):
    lm = TinyLM(tok.vocab_size).eval()
    prompt = tok.encode("the cat")
    full = generate(lm, [prompt], max_new_tokens=16, decode=tok.decode)
    text = full.texts[0]
    assert text == tok.decode(full.tokens[0])
    streamed = "".join(tok.decoder().feed(stream_tokens(lm, prompt, max_new_tokens=16)))
    assert streamed == text
    if len(text.strip()) >= 3:
        stop = text.strip()[1:3]
        cut = generate(lm, [prompt], max_new_tokens=16, decode=tok.decode, stop_strings=(stop,))
        assert cut.texts[0] == text[: text.find(stop)] and cut.finish_reasons == ["stop_string"]
