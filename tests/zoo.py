"""The test model zoo: small, seeded, offline models that every part of Ember is tested on.

Each function returns a `ZooModel`: the module (in eval mode), example inputs, the dynamic
dims to declare when importing (input name -> {dim index: symbol}), and the input names.
Hugging Face models are built from configs with random weights (no downloads). ``size``
picks a small test config (default) or the real architecture size ("base", "50").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__ = [
    "ZooModel",
    "bert",
    "vit",
    "gpt2",
    "llama",
    "resnet",
    "mobilenet_v2",
    "mlp",
    "ZOO",
    "get",
    "ResNet",
    "MobileNetV2",
    "MLP",
]


@dataclass
class ZooModel:
    """A test model with everything needed to import and run it."""

    name: str
    model: nn.Module
    example_inputs: tuple[Any, ...]
    dynamic_dims: dict[str, dict[int, str]] = field(default_factory=dict)
    input_names: list[str] = field(default_factory=list)

    def make_inputs(self, seed: int = 1234, **dims: int) -> tuple[torch.Tensor, ...]:
        """New inputs shaped like the examples with the given symbol values (batch=3, seq=7),
        drawn from ``seed``.

        Integer inputs are drawn in [0, max of the example input]; float inputs are normal.
        """
        g = torch.Generator().manual_seed(seed)
        out = []
        for name, x in zip(self.input_names, self.example_inputs):
            shape = list(x.shape)
            for d, s in self.dynamic_dims.get(name, {}).items():
                if s in dims:
                    shape[d] = dims[s]
            if x.dtype.is_floating_point:
                out.append(torch.randn(shape, generator=g, dtype=x.dtype))
            elif x.dtype == torch.bool:
                out.append(torch.ones(shape, dtype=torch.bool))
            else:
                hi = int(x.max()) + 1 if x.numel() else 2
                if name == "attention_mask":
                    out.append(torch.ones(shape, dtype=x.dtype))
                else:
                    out.append(torch.randint(0, max(hi, 2), shape, generator=g, dtype=x.dtype))
        return tuple(out)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def _ids(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.long)


# ----------------------------------------------------------------------------- transformers
def bert(size: str = "small", attn_implementation: str = "sdpa", batch: int = 2,
         seq: int = 8, seed: int = 0) -> ZooModel:
    """HF BertModel; inputs input_ids + attention_mask (with padding in row 1)."""
    from transformers import BertConfig, BertModel

    _seed(seed)
    if size == "base":
        cfg = BertConfig(attn_implementation=attn_implementation)
    else:
        cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=64, attn_implementation=attn_implementation)
    model = BertModel(cfg).eval()
    ids = _ids(batch, seq, cfg.vocab_size, seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and seq > 2:
        mask[1, -2:] = 0
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    name = "bert" + ("_base" if size == "base" else "") + (
        "" if attn_implementation == "sdpa" else f"_{attn_implementation}")
    return ZooModel(name, model, (ids, mask), dyn, ["input_ids", "attention_mask"])


def vit(size: str = "small", batch: int = 2, seed: int = 0) -> ZooModel:
    """HF ViTForImageClassification (ViT-B/16 at 224 with size="base")."""
    from transformers import ViTConfig, ViTForImageClassification

    _seed(seed)
    if size == "base":
        cfg = ViTConfig(num_labels=1000)
    else:
        cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        num_labels=10)
    model = ViTForImageClassification(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    return ZooModel("vit" + ("_base" if size == "base" else ""), model, (x,),
                    {"pixel_values": {0: "batch"}}, ["pixel_values"])


def gpt2(size: str = "small", batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    """HF GPT2LMHeadModel without KV cache (GPT-2 small, 124M, with size="base")."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _seed(seed)
    if size == "base":
        cfg = GPT2Config(use_cache=False)
    else:
        cfg = GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                         use_cache=False, bos_token_id=127, eos_token_id=127)
    model = GPT2LMHeadModel(cfg).eval()
    ids = _ids(batch, seq, cfg.vocab_size, seed)
    return ZooModel("gpt2" + ("_base" if size == "base" else ""), model, (ids,),
                    {"input_ids": {0: "batch", 1: "seq"}}, ["input_ids"])


def llama(size: str = "small", batch: int = 2, seq: int = 8, seed: int = 0) -> ZooModel:
    """HF LlamaForCausalLM without KV cache: RMSNorm, rotary embeddings, GQA, SwiGLU.

    size="base" is still small (about 40M params): a full LLaMA is too big for tests.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    _seed(seed)
    if size == "base":
        cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376,
                          num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                          max_position_embeddings=512, use_cache=False)
    else:
        cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, use_cache=False)
    model = LlamaForCausalLM(cfg).eval()
    ids = _ids(batch, seq, cfg.vocab_size, seed)
    return ZooModel("llama" + ("_base" if size == "base" else ""), model, (ids,),
                    {"input_ids": {0: "batch", 1: "seq"}}, ["input_ids"])


# ----------------------------------------------------------------------------- CNNs
class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (stride) -> 1x1, BatchNorm, residual."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + idt)


class ResNet(nn.Module):
    """ResNet with bottleneck blocks (layers=[3, 4, 6, 3], base_width=64 is ResNet-50)."""

    def __init__(self, layers: list[int], base_width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, base_width, 7, 2, 3, bias=False),
                                  nn.BatchNorm2d(base_width), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        blocks: list[nn.Module] = []
        cin = base_width
        for i, n in enumerate(layers):
            width = base_width * 2**i
            for j in range(n):
                blocks.append(Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * Bottleneck.expansion
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomize_bn(model: nn.Module, seed: int) -> None:
    # Fresh BatchNorm has mean 0 / var 1 / weight 1 / bias 0: that would hide bugs in how
    # running stats are imported, so give them random values.
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def resnet(size: str = "small", batch: int = 2, seed: int = 0) -> ZooModel:
    """ResNet-style CNN; size="50" gives ResNet-50 (layers [3, 4, 6, 3], 224x224)."""
    _seed(seed)
    if size == "50":
        model, hw = ResNet([3, 4, 6, 3], 64, 1000), 224
    else:
        model, hw = ResNet([1, 1, 1, 1], 8, 10), 32
    _randomize_bn(model, seed)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, hw, hw, generator=g)
    return ZooModel("resnet" + ("50" if size == "50" else ""), model, (x,),
                    {"x": {0: "batch"}}, ["x"])


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 project, ReLU6, residual."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (torchvision layout) with a width multiplier."""

    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000,
                 settings: list[tuple[int, int, int, int]] | None = None) -> None:
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        feats: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, cin, 3, 2, 1, bias=False),
                                                nn.BatchNorm2d(cin), nn.ReLU6(inplace=True))]
        for t, c, n, s in settings or self.SETTINGS:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                feats.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        feats.append(nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last),
                                   nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.mean((2, 3))
        return self.classifier(x)


def mobilenet_v2(size: str = "small", batch: int = 2, seed: int = 0) -> ZooModel:
    """MobileNetV2-style CNN; size="base" is the real MobileNetV2 1.0 at 224x224."""
    _seed(seed)
    if size == "base":
        model, hw = MobileNetV2(1.0, 1000), 224
    else:
        small = [(1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2)]
        model, hw = MobileNetV2(0.25, 10, small), 32
    _randomize_bn(model, seed)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, hw, hw, generator=g)
    return ZooModel("mobilenet_v2" + ("_base" if size == "base" else ""), model, (x,),
                    {"x": {0: "batch"}}, ["x"])


class MLP(nn.Module):
    """Linear -> GELU -> LayerNorm -> Linear -> ReLU -> Linear."""

    def __init__(self, din: int = 16, hidden: int = 32, dout: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(din, hidden)
        self.act1 = nn.GELU()
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, dout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.act1(self.fc1(x)))
        return self.fc3(torch.relu(self.fc2(x)))


def mlp(size: str = "small", batch: int = 4, seed: int = 0) -> ZooModel:
    _seed(seed)
    model = (MLP(768, 3072, 1000) if size == "base" else MLP()).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.fc1.in_features, generator=g)
    return ZooModel("mlp", model, (x,), {"x": {0: "batch"}}, ["x"])


def bert_eager(**kw: Any) -> ZooModel:
    """BERT with explicit matmul/softmax attention (the pattern attention fusion matches)."""
    return bert(attn_implementation="eager", **kw)


# name -> factory; every factory takes size= and seed=
ZOO: Mapping[str, Callable[..., ZooModel]] = {
    "bert": bert,
    "bert_eager": bert_eager,
    "vit": vit,
    "gpt2": gpt2,
    "llama": llama,
    "resnet": resnet,
    "mobilenet_v2": mobilenet_v2,
    "mlp": mlp,
}


def get(name: str, **kw: Any) -> ZooModel:
    """The zoo model called ``name`` (see `ZOO`)."""
    if name not in ZOO:
        raise KeyError(f"no zoo model '{name}'; known: {', '.join(ZOO)}")
    return ZOO[name](**kw)
