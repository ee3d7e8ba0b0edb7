"""CLIP-IQA (Wang et al. 2023, "Exploring CLIP for Assessing the Look and Feel of Images"), in Jittor.

    clip_iqa(image) = softmax(s * [cos(f, t_good), cos(f, t_bad)])[0]

f is the CLIP image embedding, t_good / t_bad the text embeddings of "Good photo." and
"Bad photo.", s the CLIP logit scale (100). The score is the probability of the good prompt.

Two backbones:
- `OpenAICLIPResNet`: OpenAI CLIP RN50, the backbone of the paper, piq and torchmetrics' default
  ("clip_iqa"). The image goes in at its own resolution, normalised with CLIP mean/std, and the
  attention pool runs without positional embedding (piq's `pos_embedding=False`), which is what
  lets CLIP-IQA score any size. Weights: OpenAI's `RN50.pt` (TorchScript, as OpenAI and piq ship
  it) or the same state dict as .pt/.bin/.safetensors (open_clip's "RN50/openai"). The text
  vocabulary is CLIP's BPE, read from a transformers CLIP folder (vocab.json + merges.txt).
- a transformers `CLIPModel` folder (torchmetrics' `model_name_or_path` variant): CLIP image
  processor (224 crop) and projected features, scale 100.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..._runtime import jt
from ...models.layers import attention
from ...weights import WeightsError, load_weights
from .nn_utils import BatchNorm2d, drop_num_batches_tracked
from .torchscript import is_torchscript_archive, read_torchscript_tensors

nn = jt.nn

PROMPTS = ("Good photo.", "Bad photo.")
RN50_NAMES = ("RN50.pt", "RN50.safetensors", "RN50.bin", "open_clip_pytorch_model.bin")


def avg_pool2(x, k: int):
    """nn.AvgPool2d(k): non-overlapping k x k mean (trailing rows/columns that do not fit are dropped)."""
    if k == 1:
        return x
    b, c, h, w = x.shape
    h2, w2 = h // k, w // k
    x = x[:, :, : h2 * k, : w2 * k]
    return x.reshape(b, c, h2, k, w2, k).mean(dims=(3, 5))


class Bottleneck(nn.Module):
    """ResNet bottleneck with CLIP's anti-aliased stride: an average pool replaces strided convs."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        self.stride = stride
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            # torch names: downsample."-1" (the pool, no weights), downsample.0 conv, downsample.1 bn
            self.downsample = nn.Sequential(OrderedDict([("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
                                                         ("1", BatchNorm2d(planes * 4))]))

    def execute(self, x):
        out = nn.relu(self.bn1(self.conv1(x)))
        out = nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(avg_pool2(out, self.stride)))
        identity = x if self.downsample is None else self.downsample[1](self.downsample[0](avg_pool2(x, self.stride)))
        return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention of the mean feature over all positions (+ itself); returns the pooled vector."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int):
        self.positional_embedding = jt.zeros((spacial_dim ** 2 + 1, embed_dim))   # unused: pos_embedding=False
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def execute(self, x):  # (B, C, H, W) -> (B, output_dim)
        b, c = x.shape[:2]
        tokens = x.reshape(b, c, -1).transpose(0, 2, 1)                       # (B, HW, C)
        tokens = jt.concat([tokens.mean(dim=1, keepdims=True), tokens], dim=1)  # (B, 1 + HW, C)
        query = self.q_proj(tokens[:, :1])                                     # only the mean token's output is kept
        out = attention(query, self.k_proj(tokens), self.v_proj(tokens), self.num_heads)
        return self.c_proj(out[:, 0])


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: 3-conv stem + average pool, anti-aliased bottlenecks, attention pooling."""

    def __init__(self, layers: Sequence[int], output_dim: int, heads: int, input_resolution: int, width: int):
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = BatchNorm2d(width)
        inplanes = width
        for i, (n, stride) in enumerate(zip(layers, (1, 2, 2, 2))):
            planes = width * 2 ** i
            blocks = [Bottleneck(inplanes, planes, stride)] + [Bottleneck(planes * 4, planes) for _ in range(n - 1)]
            inplanes = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def execute(self, x):
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = nn.relu(bn(conv(x)))
        x = avg_pool2(x, 2)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
        return self.attnpool(x)


class ResidualAttentionBlock(nn.Module):
    """OpenAI CLIP text block: x + attn(ln_1(x)), x + mlp(ln_2(x)); fused in_proj, QuickGELU."""

    def __init__(self, width: int, heads: int):
        self.heads = heads
        self.attn = nn.Module()
        self.attn.in_proj_weight = jt.zeros((3 * width, width))
        self.attn.in_proj_bias = jt.zeros((3 * width,))
        self.attn.out_proj = nn.Linear(width, width)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def execute(self, x, mask):  # (B, T, C), additive (1, 1, T, T)
        h = self.ln_1(x)
        qkv = jt.matmul(h, self.attn.in_proj_weight.transpose(1, 0)) + self.attn.in_proj_bias
        q, k, v = jt.chunk(qkv, 3, dim=-1)
        x = x + self.attn.out_proj(attention(q, k, v, self.heads, mask=mask))
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * jt.sigmoid(1.702 * h))


class OpenAICLIPResNet(nn.Module):
    """OpenAI CLIP with a ModifiedResNet image tower (RN50, ...), OpenAI parameter names."""

    def __init__(self, embed_dim: int, image_resolution: int, vision_layers: Sequence[int], vision_width: int,
                 context_length: int, vocab_size: int, transformer_width: int, transformer_heads: int,
                 transformer_layers: int):
        self.visual = ModifiedResNet(vision_layers, embed_dim, vision_width * 32 // 64, image_resolution, vision_width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[ResidualAttentionBlock(transformer_width, transformer_heads)
                                                     for _ in range(transformer_layers)])
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = jt.zeros((context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        self.text_projection = jt.zeros((transformer_width, embed_dim))
        self.logit_scale = jt.zeros((1,))
        self.context_length = context_length

    def encode_image(self, pixels):
        """(B, 3, H, W), CLIP-normalised, any size divisible by 32 -> (B, embed_dim)."""
        return self.visual(pixels.float32())

    def encode_text(self, ids: np.ndarray):
        """(B, T) token ids (OpenAI layout: sot ... eot, zero padded) -> (B, embed_dim) at the eot token."""
        ids = np.asarray(ids, dtype=np.int64)
        b, t = ids.shape
        x = self.token_embedding(jt.array(ids)) + self.positional_embedding[:t].unsqueeze(0)
        mask = jt.array(np.triu(np.full((t, t), -1e9, np.float32), 1)[None, None])     # causal
        for block in self.transformer.resblocks:
            x = block(x, mask)
        x = self.ln_final(x)
        flat = np.arange(b) * t + ids.argmax(-1)
        return jt.matmul(x.reshape(b * t, -1)[jt.array(flat.astype(np.int32))], self.text_projection)

    @staticmethod
    def config_from_state_dict(state: Dict[str, np.ndarray]) -> Dict[str, object]:
        """Architecture sizes read off the tensors, as OpenAI's `build_model` does."""
        if "visual.layer1.0.conv1.weight" not in state:
            raise WeightsError("not an OpenAI CLIP ResNet state dict (no visual.layer1.0.conv1.weight)")
        layers = tuple(len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{i}.")}) for i in (1, 2, 3, 4))
        width = state["ln_final.weight"].shape[0]
        return dict(
            embed_dim=state["text_projection"].shape[1],
            image_resolution=round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5) * 32,
            vision_layers=layers, vision_width=state["visual.layer1.0.conv1.weight"].shape[0],
            context_length=state["positional_embedding"].shape[0], vocab_size=state["token_embedding.weight"].shape[0],
            transformer_width=width, transformer_heads=max(width // 64, 1),
            transformer_layers=len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}))

    @classmethod
    def from_state_dict(cls, state: Dict[str, np.ndarray], source: str = "state dict") -> "OpenAICLIPResNet":
        drop = ("input_resolution", "context_length", "vocab_size")
        state = {k: v for k, v in drop_num_batches_tracked(state).items()
                 if k not in drop and not k.endswith("attn_mask")}
        model = cls(**cls.config_from_state_dict(state))
        own = model.state_dict()
        state["logit_scale"] = np.asarray(state["logit_scale"]).reshape(1)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        bad = [k for k in own if k in state and tuple(own[k].shape) != tuple(np.shape(state[k]))]
        if missing or unexpected or bad:
            raise WeightsError(f"{source}: not an OpenAI CLIP ResNet ({len(missing)} missing e.g. {missing[:3]}, "
                               f"{len(unexpected)} unexpected e.g. {unexpected[:3]}, shape mismatch {bad[:3]})")
        for k, var in own.items():
            var.assign(jt.array(np.asarray(state[k], dtype=np.float32)))   # OpenAI files are fp16
        model.eval()
        return model

    @classmethod
    def from_file(cls, path: str) -> "OpenAICLIPResNet":
        """OpenAI's TorchScript `RN50.pt`, or a plain state dict with the same names."""
        state = read_torchscript_tensors(path) if is_torchscript_archive(path) else load_weights(path)
        return cls.from_state_dict(state, source=path)


def openai_token_ids(tokenizer, texts: Sequence[str], context_length: int) -> np.ndarray:
    """OpenAI `clip.tokenize`: sot + BPE + eot, zero padded to `context_length`."""
    out = np.zeros((len(texts), context_length), dtype=np.int64)
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if len(ids) > context_length:
            raise ValueError(f"{text!r} is longer than the context length {context_length}")
        out[i, : len(ids)] = ids
    return out


def iqa_probability(image_embeds: np.ndarray, anchor_embeds: np.ndarray, scale: float = 100.0) -> np.ndarray:
    """P(first prompt) = softmax(scale * cosine(image, [good, bad]))[0], per image -> (B,)."""
    img = np.asarray(image_embeds, np.float64)
    anc = np.asarray(anchor_embeds, np.float64)
    img = img / np.linalg.norm(img, axis=-1, keepdims=True)
    anc = anc / np.linalg.norm(anc, axis=-1, keepdims=True)
    logits = scale * img @ anc.T                                             # (B, 2)
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    return p[:, 0] / p.sum(axis=-1)


class CLIPIQA:
    """CLIP-IQA on OpenAI CLIP RN50 (the paper's / piq's setting). `__call__(pixels)` -> (B,) probabilities."""

    def __init__(self, model: OpenAICLIPResNet, tokenizer, prompts: Tuple[str, str] = PROMPTS):
        self.model = model
        ids = openai_token_ids(tokenizer, prompts, model.context_length)
        self.anchors = model.encode_text(ids).numpy()                        # (2, E)
        self.scale = float(np.exp(model.logit_scale.numpy().reshape(-1)[0]))

    def __call__(self, pixels) -> np.ndarray:
        """pixels: (B, 3, H, W) CLIP-normalised (piq: x / 255, then (x - mean) / std, no resize)."""
        return iqa_probability(self.model.encode_image(pixels).numpy(), self.anchors, self.scale)


def find_rn50_weights(folder: Optional[str]) -> Optional[str]:
    """OpenAI CLIP RN50 weights in `folder`, `folder/clip_iqa/` or `folder/clip/` (piq caches `~/.cache/clip/RN50.pt`)."""
    if not folder or not os.path.isdir(folder):
        return None
    for sub in ("", "clip_iqa", "clip", "RN50"):
        for name in RN50_NAMES:
            path = os.path.join(folder, sub, name)
            if os.path.isfile(path):
                return path
    return None
