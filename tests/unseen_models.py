"""Architectures that are NOT in the zoo: the frontend was not written against them.

Importing them proves the FX frontend generalises: DistilBERT, a T5 encoder (relative
position buckets: log, abs, min, where on integer tensors), a Whisper-style audio encoder
(conv1d stem, nn.MultiheadAttention, sinusoidal positions) and a small UNet (strided conv,
transposed conv, bilinear/nearest upsampling, skip concatenation, GroupNorm, SiLU).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn
from zoo import ZooModel, _randomize_bn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["distilbert", "t5_encoder", "whisper_encoder", "unet", "UNSEEN", "WhisperEncoder",
           "UNet"]


def distilbert(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                           max_position_embeddings=64)
    model = DistilBertModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, -3:] = 0
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    return ZooModel("distilbert", model, (ids, mask), dyn, ["input_ids", "attention_mask"])


def t5_encoder(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   feed_forward_proj="gated-gelu")
    model = T5EncoderModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    return ZooModel("t5_encoder", model, (ids,), {"input_ids": {0: "batch", 1: "seq"}},
                    ["input_ids"])


class _EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class WhisperEncoder(nn.Module):
    """Log-mel frames [B, n_mels, T] -> conv1d x2 (stride 2) -> transformer encoder."""

    def __init__(self, n_mels: int = 16, d: int = 32, heads: int = 4, layers: int = 2,
                 max_frames: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.register_buffer("pos", self._sinusoids(max_frames, d), persistent=False)
        self.layers = nn.ModuleList(_EncoderLayer(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    @staticmethod
    def _sinusoids(length: int, channels: int) -> torch.Tensor:
        inc = math.log(10000) / (channels // 2 - 1)
        inv = torch.exp(-inc * torch.arange(channels // 2))
        t = torch.arange(length)[:, None] * inv[None, :]
        return torch.cat([torch.sin(t), torch.cos(t)], dim=1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.conv1(mel))
        x = nn.functional.gelu(self.conv2(x)).permute(0, 2, 1)
        x = x + self.pos[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.ln(x)


def whisper_encoder(batch: int = 2, frames: int = 16, seed: int = 0) -> ZooModel:
    torch.manual_seed(seed)
    model = WhisperEncoder().eval()
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(batch, 16, frames, generator=g)
    return ZooModel("whisper_encoder", model, (mel,), {"mel": {0: "batch"}}, ["mel"])


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout),
                                  nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
                                  nn.GroupNorm(4, cout), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UNet(nn.Module):
    """Two-level UNet: downsample by strided conv and avg-pool, upsample by a transposed conv
    and by bilinear interpolation, skip connections by concatenation."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.inc = _Block(3, c)
        self.down1 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.enc1 = _Block(c, 2 * c)
        self.down2 = nn.AvgPool2d(2)
        self.mid = _Block(2 * c, 2 * c)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec2 = _Block(4 * c, c)
        self.up1 = nn.ConvTranspose2d(c, c, 2, stride=2)
        self.dec1 = _Block(2 * c, c)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.inc(x)
        x1 = self.enc1(self.down1(x0))
        m = self.mid(self.down2(x1))
        y = self.dec2(torch.cat([self.up2(m), x1], dim=1))
        y = self.dec1(torch.cat([self.up1(y), x0], dim=1))
        y = nn.functional.interpolate(y, scale_factor=0.5, mode="nearest")
        return torch.sigmoid(self.out(y))


def unet(batch: int = 2, hw: int = 16, seed: int = 0) -> ZooModel:
    torch.manual_seed(seed)
    model = UNet().eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, hw, hw, generator=g)
    return ZooModel("unet", model, (x,), {"x": {0: "batch"}}, ["x"])


UNSEEN = {"distilbert": distilbert, "t5_encoder": t5_encoder,
          "whisper_encoder": whisper_encoder, "unet": unet}


# ------------------------------------------------------------ Hugging Face, built from configs
# Tiny random-init configs (hidden 32, 2 layers, 4 heads, vocab 100): none of these
# architectures was in the zoo when the frontend and passes were written.
_DYN_TEXT = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _text(name: str, model: nn.Module, vocab: int, batch: int, seq: int, seed: int,
          mask: bool = True) -> ZooModel:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    if not mask:
        return ZooModel(name, model.eval(), (ids,), {"input_ids": {0: "batch", 1: "seq"}},
                        ["input_ids"])
    m = torch.ones(batch, seq, dtype=torch.long)
    m[-1, -3:] = 0
    return ZooModel(name, model.eval(), (ids, m), dict(_DYN_TEXT),
                    ["input_ids", "attention_mask"])


def _image(name: str, model: nn.Module, batch: int, size: int, seed: int,
           channels: int = 3) -> ZooModel:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    return ZooModel(name, model.eval(), (x,), {"pixel_values": {0: "batch"}}, ["pixel_values"])


class CausalLogits(nn.Module):
    """A causal LM without KV cache returning only its logits tensor."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


class FirstOutput(nn.Module):
    """A model returning its first output tensor (last hidden state / logits)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model(*args)[0]


def roberta(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=100, max_position_embeddings=64, pad_token_id=1, **_TINY)
    return _text("roberta", RobertaModel(cfg), cfg.vocab_size, batch, seq, seed)


def xlm_roberta(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = XLMRobertaConfig(vocab_size=100, max_position_embeddings=64, num_labels=3, **_TINY)
    return _text("xlm_roberta", XLMRobertaForSequenceClassification(cfg), cfg.vocab_size,
                 batch, seq, seed)


def albert(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(seed)
    cfg = AlbertConfig(vocab_size=100, embedding_size=16, max_position_embeddings=64, **_TINY)
    return _text("albert", AlbertModel(cfg), cfg.vocab_size, batch, seq, seed)


def electra(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    from transformers import ElectraConfig, ElectraModel

    torch.manual_seed(seed)
    cfg = ElectraConfig(vocab_size=100, embedding_size=16, max_position_embeddings=64, **_TINY)
    return _text("electra", ElectraModel(cfg), cfg.vocab_size, batch, seq, seed)


def deberta_v2(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(seed)
    cfg = DebertaV2Config(vocab_size=100, max_position_embeddings=64, relative_attention=True,
                          position_buckets=16, max_relative_positions=32,
                          pos_att_type=["p2c", "c2p"], **_TINY)
    return _text("deberta_v2", DebertaV2Model(cfg), cfg.vocab_size, batch, seq, seed)


def mpnet(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(seed)
    cfg = MPNetConfig(vocab_size=100, max_position_embeddings=64, **_TINY)
    return _text("mpnet", MPNetModel(cfg), cfg.vocab_size, batch, seq, seed)


def bart(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    """Full BART (encoder + decoder, no cache); decoder inputs are the shifted input_ids."""
    from transformers import BartConfig, BartModel

    torch.manual_seed(seed)
    cfg = BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, max_position_embeddings=64, use_cache=False)
    return _text("bart", FirstOutput(BartModel(cfg)), cfg.vocab_size, batch, seq, seed)


def _causal(name: str, lm: nn.Module, vocab: int, batch: int, seq: int, seed: int) -> ZooModel:
    return _text(name, CausalLogits(lm), vocab, batch, seq, seed, mask=False)


def mistral(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=100, num_key_value_heads=2, max_position_embeddings=64,
                        sliding_window=None, use_cache=False, **_TINY)
    return _causal("mistral", MistralForCausalLM(cfg), cfg.vocab_size, batch, seq, seed)


def qwen2(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=100, num_key_value_heads=2, max_position_embeddings=64,
                      use_cache=False, **_TINY)
    return _causal("qwen2", Qwen2ForCausalLM(cfg), cfg.vocab_size, batch, seq, seed)


def phi3(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    cfg = Phi3Config(vocab_size=100, num_key_value_heads=2, max_position_embeddings=64,
                     original_max_position_embeddings=64, use_cache=False, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, **_TINY)
    return _causal("phi3", Phi3ForCausalLM(cfg), cfg.vocab_size, batch, seq, seed)


def gemma(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    cfg = GemmaConfig(vocab_size=100, num_key_value_heads=1, head_dim=8,
                      max_position_embeddings=64, use_cache=False, **_TINY)
    return _causal("gemma", GemmaForCausalLM(cfg), cfg.vocab_size, batch, seq, seed)


def gpt_neox(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=100, max_position_embeddings=64, rotary_pct=0.25,
                        use_cache=False, **_TINY)
    return _causal("gpt_neox", GPTNeoXForCausalLM(cfg), cfg.vocab_size, batch, seq, seed)


def opt(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64,
                    use_cache=False)
    return _causal("opt", OPTForCausalLM(cfg), cfg.vocab_size, batch, seq, seed)


def bloom(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    """ALiBi positions (no position embeddings), fused query_key_value."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    cfg = BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4, use_cache=False)
    return _causal("bloom", BloomForCausalLM(cfg), cfg.vocab_size, batch, seq, seed)


def falcon(batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    """Parallel attention + MLP, multi-query attention, rotary positions."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(seed)
    cfg = FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, multi_query=True, parallel_attn=True,
                       new_decoder_architecture=False, alibi=False, use_cache=False)
    return _causal("falcon", FalconForCausalLM(cfg), cfg.vocab_size, batch, seq, seed)


def clip_vision(batch: int = 2, seed: int = 0) -> ZooModel:
    """CLIP's vision tower: class token, pre-LayerNorm, quick_gelu."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(image_size=32, patch_size=8, **_TINY)
    return _image("clip_vision", CLIPVisionModel(cfg), batch, cfg.image_size, seed)


def deit(batch: int = 2, seed: int = 0) -> ZooModel:
    """DeiT with a distillation token (two special tokens) and both heads."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(seed)
    cfg = DeiTConfig(image_size=32, patch_size=8, num_labels=10, **_TINY)
    return _image("deit", DeiTForImageClassificationWithTeacher(cfg), batch, cfg.image_size,
                  seed)


def beit(batch: int = 2, seed: int = 0) -> ZooModel:
    """BEiT: relative position bias tables, layer scale, mean-pooled head."""
    from transformers import BeitConfig, BeitForImageClassification

    torch.manual_seed(seed)
    cfg = BeitConfig(image_size=32, patch_size=8, num_labels=10, use_relative_position_bias=True,
                     use_mean_pooling=True, layer_scale_init_value=0.1, **_TINY)
    return _image("beit", BeitForImageClassification(cfg), batch, cfg.image_size, seed)


def swin(batch: int = 2, seed: int = 0) -> ZooModel:
    """Swin: shifted windows (roll), window partition reshapes, patch merging."""
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(seed)
    cfg = SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                     window_size=4, num_labels=10)
    return _image("swin", SwinForImageClassification(cfg), batch, cfg.image_size, seed)


def convnext(batch: int = 2, seed: int = 0) -> ZooModel:
    """ConvNeXt: depthwise 7x7, channels-last LayerNorm, layer scale."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(seed)
    cfg = ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10,
                         num_stages=2, layer_scale_init_value=0.1)
    return _image("convnext", ConvNextForImageClassification(cfg), batch, 32, seed)


def segformer(batch: int = 2, seed: int = 0) -> ZooModel:
    """SegFormer: overlapping patch embeds, spatial-reduction attention, all-MLP decoder."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(seed)
    cfg = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                          hidden_sizes=[16, 32], num_attention_heads=[1, 2], patch_sizes=[7, 3],
                          strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=32,
                          num_labels=4)
    return _image("segformer", SegformerForSemanticSegmentation(cfg), batch, 32, seed)


def mobilevit(batch: int = 2, seed: int = 0) -> ZooModel:
    """MobileViT: inverted residuals + unfold-into-patches transformer blocks."""
    from transformers import MobileViTConfig, MobileViTForImageClassification

    torch.manual_seed(seed)
    cfg = MobileViTConfig(image_size=64, patch_size=2, hidden_sizes=[16, 24, 32],
                          neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_attention_heads=2,
                          num_labels=10)
    model = MobileViTForImageClassification(cfg)
    _randomize_bn(model, seed)  # with fresh BatchNorms the activations vanish (logits all 0)
    return _image("mobilevit", model, batch, 64, seed)


def wav2vec2(batch: int = 2, samples: int = 800, seed: int = 0) -> ZooModel:
    """Wav2Vec2: conv feature extractor on raw audio, grouped positional conv, encoder."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(seed)
    cfg = Wav2Vec2Config(conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                         num_feat_extract_layers=2, num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=4, do_stable_layer_norm=True,
                         feat_extract_norm="layer", mask_time_prob=0.0, **_TINY)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, samples, generator=g)
    return ZooModel("wav2vec2", FirstOutput(Wav2Vec2Model(cfg)).eval(), (x,),
                    {"input_values": {0: "batch"}}, ["input_values"])


HF_UNSEEN = {f.__name__: f for f in (
    roberta, xlm_roberta, albert, electra, deberta_v2, mpnet, bart, mistral, qwen2, phi3, gemma,
    gpt_neox, opt, bloom, falcon, clip_vision, deit, beit, swin, convnext, segformer, mobilevit,
    wav2vec2)}
ENCODERS = {"distilbert", "t5_encoder", "whisper_encoder", "roberta", "xlm_roberta", "albert",
            "electra", "deberta_v2", "mpnet", "clip_vision", "deit", "beit", "swin",
            "wav2vec2", "bart"}
CAUSAL = {"mistral", "qwen2", "phi3", "gemma", "gpt_neox", "opt", "bloom", "falcon"}
UNSEEN.update(HF_UNSEEN)
