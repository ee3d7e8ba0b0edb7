"""CLIP image tower and the full two-tower CLIP, matching transformers' `CLIPVisionModel`,
`CLIPVisionModelWithProjection` and `CLIPModel`.

Used by the scorer for CLIP-R (top-5 retrieval of an image's own prompt, ViT-L/14) and, with
a transformers CLIP folder, for CLIP-IQA. The transformer blocks are those of the text encoder
(`models/clip.py`), run without a mask.

Parameter names as the published checkpoints (openai/clip-vit-*):
`vision_model.embeddings.class_embedding`, `vision_model.embeddings.patch_embedding.weight`,
`vision_model.embeddings.position_embedding.weight`, `vision_model.pre_layrnorm.weight` (sic),
`vision_model.encoder.layers.N.self_attn.q_proj.weight`, `vision_model.post_layernorm.weight`,
`visual_projection.weight`; a `CLIPModel` folder adds `text_model.*`, `text_projection.weight`
and `logit_scale`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np

from ..._runtime import jt
from ...models.clip import CLIPEncoder, CLIPTextConfig, CLIPTextModel, clip_activation
from ...models.modeling import ConfigError, ModelMixin, config_from_dict

nn = jt.nn


@dataclass
class CLIPVisionConfig:
    """transformers' `CLIPVisionConfig` fields (config.json keys)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0


@dataclass
class CLIPConfig:
    """transformers' `CLIPConfig`: nested text/vision configs, the shared projection size and logit scale."""

    text_config: Dict[str, Any] = field(default_factory=dict)
    vision_config: Dict[str, Any] = field(default_factory=dict)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    initializer_factor: float = 1.0


_GENERIC = CLIPTextModel.config_ignore + ("text_config_dict", "vision_config_dict")


def _drop_position_ids(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}


class _Hidden:
    """Holds a module without making it a child (no parameters, no state-dict entries)."""

    __slots__ = ("module",)

    def __init__(self, module):
        self.module = module


@dataclass
class CLIPVisionOutput:
    """`last_hidden_state` (B, 1 + N, C): encoder output (no final norm, as transformers);
    `pooler_output` (B, C): post_layernorm of the class token; `image_embeds` (B, P) with a projection."""

    last_hidden_state: jt.Var
    pooler_output: jt.Var
    image_embeds: Optional[jt.Var] = None


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        c, p = config.hidden_size, config.patch_size
        self.image_size = config.image_size
        self.class_embedding = jt.zeros((c,))
        self.patch_embedding = nn.Conv2d(config.num_channels, c, p, stride=p, bias=False)
        self.position_embedding = nn.Embedding((config.image_size // p) ** 2 + 1, c)

    def execute(self, pixel_values):
        b, _, h, w = pixel_values.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"input image size ({h}*{w}) does not match the model ({self.image_size}*{self.image_size})")
        x = self.patch_embedding(pixel_values)                               # (B, C, g, g)
        x = x.reshape(b, x.shape[1], -1).transpose(0, 2, 1)                  # (B, g*g, C)
        cls = self.class_embedding.reshape(1, 1, -1).broadcast((b, 1, x.shape[2]))
        x = jt.concat([cls, x], dim=1)                                        # (B, 1 + g*g, C)
        return x + self.position_embedding.weight.unsqueeze(0)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)   # same blocks as the text encoder (duck-typed config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def execute(self, pixel_values):
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        no_mask = jt.zeros((1, 1, 1, 1), dtype="float32")                   # bidirectional attention
        for layer in self.encoder.layers:
            x = layer(x, no_mask)
        return x, self.post_layernorm(x[:, 0])


class CLIPVisionModel(ModelMixin):
    """CLIP image tower: pixels (B, 3, S, S) normalised with CLIP mean/std -> tokens and pooled class token."""

    config_class = CLIPVisionConfig
    config_ignore = _GENERIC
    weights_names = ("model", "pytorch_model")
    save_weights_name = "model.safetensors"

    def __init__(self, config: CLIPVisionConfig):
        self.config = config
        clip_activation(config)
        self.vision_model = CLIPVisionTransformer(config)

    @classmethod
    def load_config(cls, folder: str) -> Dict[str, Any]:
        """A CLIPVisionModel folder, or a full CLIPModel one (its vision_config + projection_dim)."""
        raw = super().load_config(folder)
        if "vision_config" in raw:
            raw = {**raw["vision_config"], "projection_dim": raw.get("projection_dim", 512)}
        return raw

    def convert_state_dict(self, state):
        """Accept transformers-5 names (no `vision_model.` prefix); ignore a full CLIP's text side."""
        out = {}
        for key, value in _drop_position_ids(state).items():
            if key.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")):
                key = "vision_model." + key
            if key.startswith("vision_model.") or (key == "visual_projection.weight"
                                                   and hasattr(self, "visual_projection")):
                out[key] = value
        return out

    def execute(self, pixel_values) -> CLIPVisionOutput:
        last, pooled = self.vision_model(pixel_values.cast(self.dtype))
        return CLIPVisionOutput(last_hidden_state=last, pooler_output=pooled)


class CLIPVisionModelWithProjection(CLIPVisionModel):
    """Image tower + `visual_projection` (no bias): `image_embeds` is what CLIP compares with text."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def execute(self, pixel_values) -> CLIPVisionOutput:
        out = super().execute(pixel_values)
        out.image_embeds = self.visual_projection(out.pooler_output)
        return out


class CLIPModel(ModelMixin):
    """Both CLIP towers with their projections (an openai/clip-vit-* folder)."""

    config_class = CLIPConfig
    config_ignore = _GENERIC
    weights_names = ("model", "pytorch_model")
    save_weights_name = "model.safetensors"

    def __init__(self, config: CLIPConfig):
        self.config = config
        self.text_config = config_from_dict(CLIPTextConfig, dict(config.text_config), ignore=_GENERIC,
                                            source="CLIPConfig.text_config")
        self.vision_config = config_from_dict(CLIPVisionConfig, dict(config.vision_config), ignore=_GENERIC,
                                              source="CLIPConfig.vision_config")
        # The text side runs through CLIPTextModel (causal mask, EOS pooling). Only its transformer
        # is a child module here, so the parameter names stay `text_model.*`; the wrapper is held
        # in a plain object that Jittor's module traversal does not enter.
        text_encoder = CLIPTextModel(self.text_config)
        self.text_model = text_encoder.text_model
        self._text = _Hidden(text_encoder)
        self.vision_model = CLIPVisionTransformer(self.vision_config)
        self.text_projection = nn.Linear(self.text_config.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(self.vision_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = jt.array(np.array(config.logit_scale_init_value, dtype=np.float32))

    def convert_state_dict(self, state):
        state = _drop_position_ids(state)
        if "logit_scale" in state:   # a 0-d tensor in the file; Jittor scalars have shape (1,)
            state["logit_scale"] = np.asarray(state["logit_scale"], np.float32).reshape(1)
        return state

    def numpy_state_dict(self) -> Dict[str, np.ndarray]:
        state = super().numpy_state_dict()
        state["logit_scale"] = state["logit_scale"].reshape(())
        return state

    def get_text_features(self, input_ids, attention_mask=None, inputs_embeds=None):
        """Token ids (B, T) -> projected text embeddings (B, P), not normalised. `inputs_embeds` (B, T, C):
        token vectors to use instead of the ids' (soft prompts)."""
        pooled = self._text.module(input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds).pooler_output
        return self.text_projection(pooled)

    def get_image_features(self, pixel_values):
        """Pixels (B, 3, S, S) -> projected image embeddings (B, P), not normalised."""
        _, pooled = self.vision_model(pixel_values.cast(self.dtype))
        return self.visual_projection(pooled)

    @classmethod
    def load_config(cls, folder: str) -> Dict[str, Any]:
        raw = super().load_config(folder)
        if "text_config" not in raw or "vision_config" not in raw:
            raise ConfigError(f"{folder}/config.json is not a CLIPModel config (no text_config / vision_config)")
        return raw
