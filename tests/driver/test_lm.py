"""Causal LMs compiled with a KV cache (`ember.lm`): exact against `transformers` eager on
random-init decoders of several families, through prefill, decode steps and the artifact."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ember.generate import generate
from ember.lm import KVCache, compile_lm

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    elif family == "qwen2":
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL))
    elif family == "gpt2":
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256))
    elif family == "mistral":
        m = transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=5))
    elif family == "phi3":
        m = transformers.Phi3ForCausalLM(transformers.Phi3Config(**SMALL, pad_token_id=0))
    elif family == "gemma3":
        m = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **SMALL, head_dim=16, sliding_window=6, layer_types=["sliding_attention",
                                                                 "full_attention"]))
    else:
        raise ValueError(family)
    return m.eval()


FAMILIES = ["llama", "qwen2", "gpt2", "gemma3", "mistral", "phi3"]


@pytest.fixture(scope="module", params=FAMILIES)
def compiled(request):
    m = _model(request.param)
    return request.param, m, compile_lm(m)


PROMPTS = [[5, 17, 33, 2, 9], [7], [100, 3, 3, 3, 8, 19, 64, 1, 12, 40, 41]]


def test_prefill_and_decode_logits_equal_eager(compiled):
    """Logits of the prompt in one prefill, and of the same tokens fed one decode step at a
    time, both equal the model's full-sequence logits (so perplexity through either is the
    model's)."""
    _, m, lm = compiled
    ids = torch.tensor([PROMPTS[2]])
    t = ids.shape[1]
    with torch.no_grad():
        want = m(input_ids=ids).logits
    cache = lm.new_cache(1, 32)
    got = lm.step(ids, torch.arange(t)[None], cache)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    cache = lm.new_cache(1, 32)
    steps = [lm.step(ids[:, i:i + 1], torch.tensor([[i]]), cache, last_only=True)
             for i in range(t)]
    torch.testing.assert_close(torch.stack(steps, 1), want, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_equal_transformers_generate(compiled):
    """Token for token what `model.generate(do_sample=False)` makes, up to and without its
    end-of-sequence token (both stop there)."""
    family, m, lm = compiled
    eos = tuple(lm.config["eos_token_id"])
    for p in PROMPTS:
        got = generate(lm, [p], max_new_tokens=20, stop_token_ids=eos).tokens[0]
        with torch.no_grad():
            ref = m.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p),
                                                                          dtype=torch.long),
                             do_sample=False, max_new_tokens=20,
                             pad_token_id=0)[0, len(p):].tolist()
        cut = next((i for i, t in enumerate(ref) if t in eos), len(ref))
        assert got == ref[:cut], (family, p)


def test_mixed_length_batch_equals_one_at_a_time(compiled):
    _, _, lm = compiled
    batch = generate(lm, PROMPTS, max_new_tokens=12).tokens
    for p, toks in zip(PROMPTS, batch):
        assert toks == generate(lm, [p], max_new_tokens=12).tokens[0]


def test_cache_is_explicit_ir_state(compiled):
    family, _, lm = compiled
    ops = lm.graph.op_counts()
    assert ops.get("attention", 0) == 0
    assert ops["cached_attention"] == lm.spec.layers and ops["cache_write"] == 2 * lm.spec.layers
    if family == "gemma3":
        assert lm.spec.windows == (6, None)
    if family == "mistral":
        assert lm.spec.windows == (5, 5)
    k = KVCache.allocate(lm.spec, 2, 40)
    assert len(k.k) == lm.spec.layers and k.k[0].shape == (2, lm.spec.kv_heads, 40,
                                                             lm.spec.head_dim)


def test_step_writes_in_place_without_growing(compiled):
    _, _, lm = compiled
    cache = lm.new_cache(1, 64)
    ptr = cache.k[0].data_ptr()
    lm.step(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], cache)
    assert cache.k[0].data_ptr() == ptr and bool(cache.k[0][:, :, :3].abs().sum() > 0)
    assert float(cache.k[0][:, :, 3:].abs().sum()) == 0.0


def test_lm_artifact_round_trip_and_cli_generate(tmp_path):
    from tokenizers import Tokenizer as Tok
    from tokenizers import models, pre_tokenizers, trainers

    from ember.lm_artifact import load_lm, save_lm
    from ember.tokenizer import Tokenizer

    m = _model("llama")
    lm = compile_lm(m)
    raw = Tok(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["the cat sat on the mat"] * 10, trainers.BpeTrainer(
        vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = Tokenizer(raw.to_str(), "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                    "<s>", "</s>")
    path = save_lm(lm, tok, tmp_path / "lm.ember")
    lm2, tok2, _ = load_lm(path)
    ids = tok.encode("the cat")
    assert generate(lm2, [ids], max_new_tokens=8).tokens == \
        generate(lm, [ids], max_new_tokens=8).tokens
    assert tok2.decode(ids) == tok.decode(ids)
    r = subprocess.run([sys.executable, "-m", "ember.cli", "generate", str(path), "--prompt",
                        "the cat", "--max-new-tokens", "6"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr and "time to first token" in r.stderr
