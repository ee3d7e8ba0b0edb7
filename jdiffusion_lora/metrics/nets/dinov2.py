"""DINOv2 vision transformer (Oquab et al. 2023), matching transformers' `Dinov2Model`.

Used by the scorer: the "dino" sub-score is the cosine similarity of `pooler_output` (the CLS
token after the final layer norm) between a generated image and each reference of its style.

Parameter names are those of the published checkpoints (facebook/dinov2-*, written by
transformers 4): `embeddings.cls_token`, `embeddings.patch_embeddings.projection.weight`,
`encoder.layer.N.attention.attention.query.weight`, `encoder.layer.N.attention.output.dense.weight`,
`encoder.layer.N.layer_scale1.lambda1`, `encoder.layer.N.mlp.fc1.weight`, `layernorm.weight`.
transformers 5 renames the attention to `attention.{q,k,v,o}_proj` and the SwiGLU MLP to
`mlp.{gate,up,down}_proj`; both layouts load.

The position embeddings are learned for `image_size` (518 -> 37 x 37 patches); other inputs
(224 -> 16 x 16) use a bicubic resize of them (torch's `interpolate(mode="bicubic",
align_corners=False)`), computed here once per grid size.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional, Tuple, Union

import numpy as np

from ..._runtime import jt
from ...models.layers import activation, attention
from ...models.modeling import ConfigError, ModelMixin

nn = jt.nn


@dataclass
class Dinov2Config:
    """transformers' `Dinov2Config` fields (config.json keys)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    image_size: Union[int, Tuple[int, int]] = 224
    patch_size: Union[int, Tuple[int, int]] = 14
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float = 1.0
    drop_path_rate: float = 0.0
    use_swiglu_ffn: bool = False
    use_mask_token: bool = True
    apply_layernorm: bool = True             # Dinov2Backbone only
    reshape_hidden_states: bool = True       # Dinov2Backbone only


_IGNORED_KEYS = ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "out_features",
                 "out_indices", "stage_names", "id2label", "label2id", "name_or_path", "return_dict",
                 "output_hidden_states", "output_attentions", "use_bfloat16", "tie_word_embeddings")


def _pair(x) -> Tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel with torch's a = -0.75."""
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


@lru_cache(maxsize=32)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of F.interpolate(mode="bicubic", align_corners=False) along one axis
    (no antialiasing; border pixels repeated)."""
    scale = n_in / n_out
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        src = scale * (i + 0.5) - 0.5
        base = int(np.floor(src))
        t = src - base
        weights = _cubic(np.array([t + 1, t, 1 - t, 2 - t]))
        for k, w in enumerate(weights):
            m[i, min(max(base - 1 + k, 0), n_in - 1)] += w
    return m


@dataclass
class Dinov2ModelOutput:
    """`last_hidden_state` (B, 1 + N, C) after the final layer norm; `pooler_output` (B, C): its CLS token."""

    last_hidden_state: jt.Var
    pooler_output: jt.Var

    def __getitem__(self, i):
        return (self.last_hidden_state, self.pooler_output)[i]


class Dinov2PatchEmbeddings(nn.Module):
    def __init__(self, config: Dinov2Config):
        self.patch_size = _pair(config.patch_size)
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, self.patch_size, stride=self.patch_size)

    def execute(self, pixel_values):
        x = self.projection(pixel_values)                                  # (B, C, h, w)
        b, c = x.shape[:2]
        return x.reshape(b, c, -1).transpose(0, 2, 1)                      # (B, hw, C)


class Dinov2Embeddings(nn.Module):
    def __init__(self, config: Dinov2Config):
        h, w = _pair(config.image_size)
        ph, pw = _pair(config.patch_size)
        self.num_positions = (h // ph) * (w // pw)
        self.cls_token = jt.zeros((1, 1, config.hidden_size))
        if config.use_mask_token:
            self.mask_token = jt.zeros((1, config.hidden_size))            # used in pre-training only
        self.patch_embeddings = Dinov2PatchEmbeddings(config)
        self.position_embeddings = jt.zeros((1, self.num_positions + 1, config.hidden_size))

    def interpolated_positions(self, height: int, width: int):
        """Position embeddings for an input of height x width pixels, (1, 1 + n, C)."""
        ph, pw = self.patch_embeddings.patch_size
        new_h, new_w = height // ph, width // pw
        if new_h * new_w == self.num_positions and height == width:
            return self.position_embeddings
        side = int(round(self.num_positions ** 0.5))
        cls_pos = self.position_embeddings[:, :1]
        grid = self.position_embeddings[0, 1:].reshape(side, side, -1)       # (s, s, C)
        my = jt.array(bicubic_matrix(side, new_h).astype(np.float32))        # (new_h, s)
        mx = jt.array(bicubic_matrix(side, new_w).astype(np.float32))        # (new_w, s)
        c = grid.shape[-1]
        grid = jt.matmul(my, grid.reshape(side, side * c)).reshape(new_h, side, c)        # rows
        grid = jt.matmul(mx, grid.transpose(1, 0, 2).reshape(side, new_h * c))           # columns
        grid = grid.reshape(new_w, new_h, c).transpose(1, 0, 2).reshape(1, new_h * new_w, c)
        return jt.concat([cls_pos, grid], dim=1)

    def execute(self, pixel_values):
        b, _, height, width = pixel_values.shape
        patches = self.patch_embeddings(pixel_values)                       # (B, N, C)
        cls = self.cls_token.broadcast((b, 1, patches.shape[2]))
        x = jt.concat([cls, patches], dim=1)                                 # (B, 1 + N, C)
        return x + self.interpolated_positions(height, width)


class Dinov2SelfAttention(nn.Module):
    def __init__(self, config: Dinov2Config):
        c = config.hidden_size
        self.query = nn.Linear(c, c, bias=config.qkv_bias)
        self.key = nn.Linear(c, c, bias=config.qkv_bias)
        self.value = nn.Linear(c, c, bias=config.qkv_bias)


class Dinov2SelfOutput(nn.Module):
    def __init__(self, config: Dinov2Config):
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)


class Dinov2Attention(nn.Module):
    def __init__(self, config: Dinov2Config):
        self.heads = config.num_attention_heads
        self.attention = Dinov2SelfAttention(config)
        self.output = Dinov2SelfOutput(config)

    def execute(self, x):  # (B, N, C)
        a = self.attention
        return self.output.dense(attention(a.query(x), a.key(x), a.value(x), self.heads))


class Dinov2LayerScale(nn.Module):
    def __init__(self, config: Dinov2Config):
        self.lambda1 = jt.full((config.hidden_size,), float(config.layerscale_value))

    def execute(self, x):
        return x * self.lambda1


class Dinov2MLP(nn.Module):
    def __init__(self, config: Dinov2Config):
        hidden = int(config.hidden_size * config.mlp_ratio)
        self.act = activation(config.hidden_act, what="Dinov2Model: hidden_act")
        self.fc1 = nn.Linear(config.hidden_size, hidden)
        self.fc2 = nn.Linear(hidden, config.hidden_size)

    def execute(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Dinov2SwiGLUFFN(nn.Module):
    """Giant model's MLP: weights_out(silu(x1) * x2) with [x1, x2] = weights_in(x)."""

    def __init__(self, config: Dinov2Config):
        hidden = int(config.hidden_size * config.mlp_ratio)
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.weights_in = nn.Linear(config.hidden_size, 2 * hidden)
        self.weights_out = nn.Linear(hidden, config.hidden_size)

    def execute(self, x):
        x1, x2 = jt.chunk(self.weights_in(x), 2, dim=-1)
        return self.weights_out(nn.silu(x1) * x2)


class Dinov2Layer(nn.Module):
    """Pre-norm block with layer scale: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, config: Dinov2Config):
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Dinov2Attention(config)
        self.layer_scale1 = Dinov2LayerScale(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Dinov2SwiGLUFFN(config) if config.use_swiglu_ffn else Dinov2MLP(config)
        self.layer_scale2 = Dinov2LayerScale(config)

    def execute(self, x):
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Dinov2Encoder(nn.Module):
    def __init__(self, config: Dinov2Config):
        self.layer = nn.ModuleList([Dinov2Layer(config) for _ in range(config.num_hidden_layers)])


# transformers-5 parameter names -> the published (transformers-4) ones.
_V5_RENAMES = (
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".mlp.down_proj.", ".mlp.weights_out."),
)


class Dinov2Model(ModelMixin):
    """DINOv2 backbone: pixels (B, 3, H, W), normalised with ImageNet mean/std -> CLS + patch tokens."""

    config_class = Dinov2Config
    config_ignore = _IGNORED_KEYS
    weights_names = ("model", "pytorch_model")
    save_weights_name = "model.safetensors"

    def __init__(self, config: Dinov2Config):
        self.config = config
        activation(config.hidden_act, what="Dinov2Model: hidden_act")
        self.embeddings = Dinov2Embeddings(config)
        self.encoder = Dinov2Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def convert_state_dict(self, state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        out = {}
        gate_up: Dict[str, Dict[str, np.ndarray]] = {}
        for key, value in state.items():
            if key.startswith("dinov2."):                      # Dinov2ForImageClassification checkpoints
                key = key[len("dinov2."):]
            elif key.startswith("classifier."):
                continue
            for new, old in _V5_RENAMES:
                key = key.replace(new, old)
            for part in ("gate_proj", "up_proj"):                # transformers 5 splits weights_in in two
                tag = f".mlp.{part}."
                if tag in key:
                    stem, suffix = key.split(tag)
                    gate_up.setdefault(f"{stem}.mlp.weights_in.{suffix}", {})[part] = value
                    break
            else:
                out[key] = value
        for key, parts in gate_up.items():
            out[key] = np.concatenate([parts["gate_proj"], parts["up_proj"]], axis=0)
        if "embeddings.mask_token" not in out and self.config.use_mask_token:
            out["embeddings.mask_token"] = np.zeros((1, self.config.hidden_size), np.float32)
        return out

    def execute(self, pixel_values) -> Dinov2ModelOutput:
        x = self.embeddings(pixel_values.cast(self.dtype))
        for layer in self.encoder.layer:
            x = layer(x)
        last = self.layernorm(x)
        return Dinov2ModelOutput(last_hidden_state=last, pooler_output=last[:, 0])
