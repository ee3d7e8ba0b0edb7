"""CLIP text encoder (the Stable Diffusion `text_encoder`), matching transformers 5.24's `CLIPTextModel`.

Parameter names are those of transformers 4.x checkpoints, which is what SD-1/SD-2 folders hold:
`text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.N.self_attn.q_proj.weight`,
`text_model.final_layer_norm.weight`, ... transformers 5 dropped the `text_model.` prefix from
`CLIPTextModel` (its `save_pretrained` writes `embeddings.token_embedding.weight`); both layouts
load here, and `save_pretrained` writes the prefixed one, which transformers 5 also reads.

SD-1 uses `hidden_act="quick_gelu"` (x * sigmoid(1.702 x)); SD-2 (OpenCLIP ViT-H) uses the exact
erf `gelu`. Clip-skip needs `output_hidden_states=True`: `hidden_states[0]` is the embedding
output and `hidden_states[i]` the output of layer i, before the final layer norm.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from .._runtime import jt
from .attention import attention
from .checkpointing import Checkpointable
from .layers import LayerNorm, Linear, activation
from .modeling import ConfigError, ModelMixin

nn = jt.nn

# Added to attention scores of masked keys. Finite, so a row never becomes NaN; scores are
# float32 when the mask is added, and exp(-1e9) is exactly 0 there.
MASK_VALUE = -1e9


@dataclass
class CLIPTextConfig:
    """transformers' `CLIPTextConfig` fields (config.json keys)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: Optional[int] = 512  # only used by CLIPTextModelWithProjection; kept for round trips
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    dropout: float = 0.0  # unused by CLIPTextModel (present in SD configs)
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 49406
    eos_token_id: Union[int, Tuple[int, ...], None] = 49407


# config.json keys of transformers' PretrainedConfig that never change the text encoder's output.
_GENERIC_CONFIG_KEYS = (
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "name_or_path",
    "output_hidden_states", "output_attentions", "return_dict", "torchscript", "use_bfloat16",
    "tie_word_embeddings", "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "cross_attention_hidden_size", "chunk_size_feed_forward", "pruned_heads", "use_cache",
    "id2label", "label2id", "finetuning_task", "problem_type", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "gradient_checkpointing",
)


# transformers' CLIP accepts more; these are the ones CLIP checkpoints use
CLIP_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")


def clip_activation(config):
    return activation(config.hidden_act, CLIP_ACTIVATIONS, f"{type(config).__name__}: hidden_act")


@dataclass
class CLIPTextModelOutput:
    """`last_hidden_state` (B, T, C), `pooler_output` (B, C), `hidden_states`: T+1 tuple of (B, T, C) or None.

    Like transformers' ModelOutput, `out[0]` is `last_hidden_state`, `out[1]` `pooler_output` and
    `out[-1]` `hidden_states` when requested.
    """

    last_hidden_state: jt.Var
    pooler_output: jt.Var
    hidden_states: Optional[Tuple[jt.Var, ...]] = None

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def execute(self, input_ids: jt.Var, inputs_embeds: Optional[jt.Var] = None) -> jt.Var:
        """Token + position embeddings; `inputs_embeds` (B, T, C) replaces the token lookup."""
        seq_len = input_ids.shape[-1]
        max_len = self.position_embedding.weight.shape[0]
        if seq_len > max_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings {max_len}")
        tokens = self.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        return tokens + self.position_embedding.weight[:seq_len].unsqueeze(0)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"hidden_size {self.embed_dim} is not a multiple of num_attention_heads {self.num_heads}")
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.dropout = config.attention_dropout
        self.k_proj = Linear(self.embed_dim, self.embed_dim)
        self.v_proj = Linear(self.embed_dim, self.embed_dim)
        self.q_proj = Linear(self.embed_dim, self.embed_dim)
        self.out_proj = Linear(self.embed_dim, self.embed_dim)

    def execute(self, x: jt.Var, mask: jt.Var, row_valid: Optional[jt.Var] = None) -> jt.Var:
        """x (B, T, C); mask (B or 1, 1, T, T) additive float32; row_valid (B, 1, T, 1) or None."""
        dropout = self.dropout if self.is_training() else 0.0
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads, mask=mask,
                        dropout=dropout)                                   # (B, T, C)
        if row_valid is not None:  # queries that may see no key at all attend to nothing (as torch's SDPA)
            out = out * row_valid.reshape(row_valid.shape[0], -1, 1)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.act = clip_activation(config)
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def execute(self, x: jt.Var) -> jt.Var:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(Checkpointable, nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def execute(self, x: jt.Var, mask: jt.Var, row_valid: Optional[jt.Var] = None) -> jt.Var:
        x = x + self.self_attn(self.layer_norm1(x), mask, row_valid)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


def _as_numpy_ids(input_ids) -> np.ndarray:
    if isinstance(input_ids, jt.Var):
        input_ids = input_ids.numpy()
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integer ids of shape (B, T), got {ids.dtype} {ids.shape}")
    return ids.astype(np.int64)


class CLIPTextModel(ModelMixin):
    """CLIP text transformer: token ids (B, T) -> hidden states (B, T, C) and the pooled EOS state (B, C)."""

    config_class = CLIPTextConfig
    config_ignore = _GENERIC_CONFIG_KEYS
    weights_names = ("model", "pytorch_model")
    save_weights_name = "model.safetensors"

    def gradient_checkpointing_enable(self):
        """transformers' name for `enable_gradient_checkpointing` (each encoder layer recomputed)."""
        return self.enable_gradient_checkpointing()

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        clip_activation(config)  # fail early on an unknown activation
        self.text_model = CLIPTextTransformer(config)

    def convert_state_dict(self, state):
        """Accept transformers-5 names (no `text_model.` prefix) and drop the old `position_ids` buffer."""
        out = {}
        for key, value in state.items():
            if not key.startswith("text_model.") and (key.startswith(("embeddings.", "encoder.", "final_layer_norm."))):
                key = "text_model." + key
            if key == "text_model.embeddings.position_ids":
                continue
            out[key] = value
        return out

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def resize_token_embeddings(self, num_tokens: int) -> nn.Embedding:
        """Grow (or cut) the token table to `num_tokens` rows, keeping the existing rows; new rows are
        the mean of the old ones (overwrite them, e.g. with a Textual Inversion vector)."""
        old = self.get_input_embeddings().weight
        n_old, width = old.shape
        if num_tokens == n_old:
            return self.get_input_embeddings()
        weight = old.numpy()
        if num_tokens > n_old:
            mean = weight.mean(axis=0, keepdims=True)
            weight = np.concatenate([weight, np.repeat(mean, num_tokens - n_old, axis=0)], axis=0)
        table = nn.Embedding(num_tokens, width)
        table.weight = jt.array(weight[:num_tokens])
        if old.is_stop_grad():
            table.weight.stop_grad()
        self.text_model.embeddings.token_embedding = table
        self.config.vocab_size = num_tokens
        return table

    def _pool_positions(self, ids: np.ndarray) -> np.ndarray:
        """Index of the pooled token in each row, as transformers picks it."""
        eos = self.config.eos_token_id
        if eos == 2:
            # Configs written before transformers PR #24773 say eos_token_id=2; for them transformers
            # keeps the original rule: the highest id in the row (CLIP's EOS is the largest id).
            return ids.argmax(-1)
        eos = np.asarray(eos).reshape(-1)
        return np.isin(ids, eos).astype(np.int32).argmax(-1)  # first EOS (0 when there is none)

    def execute(self, input_ids, attention_mask=None, output_hidden_states: bool = False,
                inputs_embeds=None) -> CLIPTextModelOutput:
        """input_ids: (B, T) ints (numpy or jt.Var); attention_mask: optional (B, T), 1 = real token.
        inputs_embeds: optional (B, T, C) token vectors used instead of looking the ids up (the ids still
        choose the pooled position), for soft prompts (PEZ, Textual Inversion training)."""
        ids = _as_numpy_ids(input_ids)
        b, t = ids.shape
        tm = self.text_model

        # Causal mask, plus padded keys masked out when an attention mask is given.
        allowed = np.tril(np.ones((t, t), dtype=bool))[None, None]  # (1, 1, T, T)
        row_valid = None
        if attention_mask is not None:
            keys = attention_mask.numpy() if isinstance(attention_mask, jt.Var) else np.asarray(attention_mask)
            keys = (keys.reshape(1, -1) if keys.ndim == 1 else keys) != 0  # (B, T)
            if keys.shape != (b, t):
                raise ValueError(f"attention_mask shape {keys.shape} does not match input_ids {(b, t)}")
            allowed = allowed & keys[:, None, None, :]  # (B, 1, T, T)
            valid = allowed.any(-1, keepdims=True)  # (B, 1, T, 1)
            if not valid.all():
                row_valid = jt.array(valid.astype(np.float32))
        mask = jt.array(np.where(allowed, 0.0, MASK_VALUE).astype(np.float32))

        x = tm.embeddings(jt.array(ids), inputs_embeds)  # (B, T, C)
        hidden_states = [x] if output_hidden_states else None
        for layer in tm.encoder.layers:
            x = layer(x, mask, row_valid)
            if output_hidden_states:
                hidden_states.append(x)
        last = tm.final_layer_norm(x)  # (B, T, C)

        flat = np.arange(b) * t + self._pool_positions(ids)
        pooled = last.reshape(b * t, -1)[jt.array(flat.astype(np.int32))]  # (B, C)
        return CLIPTextModelOutput(last_hidden_state=last, pooler_output=pooled,
                                   hidden_states=tuple(hidden_states) if output_hidden_states else None)
