"""Textual Inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"): new tokens whose
input vectors were learned; the text encoder and tokenizer grow by one row / one token per vector.

Files people exchange, all read here without running any code:
- diffusers `learned_embeds.safetensors` / `.bin`: `{token: (D,) or (N, D)}`;
- A1111 `.pt` (torch zip pickle): `{"string_to_param": {"*": (N, D)}, "name": ..., ...}`;
- A1111 / civitai `.safetensors`: `{"emb_params": (N, D)}` (the token is the file's stem, as in A1111);
- kohya / A1111 `bundle_emb.<name>.string_to_param.*` keys inside a LoRA file (see lora/formats.py).

A vector count N > 1 becomes the tokens `tok`, `tok_1`, ..., `tok_{N-1}`, and prompts mentioning `tok`
are expanded to "tok tok_1 ... tok_{N-1}" before tokenising (diffusers' `maybe_convert_prompt`).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from .._runtime import jt
from ..weights import WeightsError, read_safetensors, save_safetensors, unpickle_torch_zip

TI_WEIGHT_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")


class TextualInversionError(ValueError):
    """An embedding file or token that cannot be loaded; the pipeline is left unchanged."""


def _find_file(path: str, weight_name: Optional[str]) -> str:
    if os.path.isdir(path):
        names = [weight_name] if weight_name else list(TI_WEIGHT_NAMES)
        for name in names:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path} has no {' or '.join(names)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"textual inversion file not found: {path}")
    return path


def read_embedding_file(path: str, weight_name: Optional[str] = None) -> (Optional[str], np.ndarray):
    """(token named in the file or None, vectors (N, D) float32) from any supported embedding file."""
    path = _find_file(path, weight_name)
    if path.endswith(".safetensors"):
        data = read_safetensors(path)[0]
    else:
        try:
            data = unpickle_torch_zip(path, what="embedding file")
        except WeightsError:
            raise
        except Exception as e:  # refused globals and odd pickles: never run them
            raise TextualInversionError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    token, vectors = parse_embedding_dict(data, path)
    if token is None and "emb_params" in data:
        token = os.path.splitext(os.path.basename(path))[0]
    return token, vectors


def parse_embedding_dict(data, source: str = "embedding") -> (Optional[str], np.ndarray):
    """The formats' dicts -> (token or None, (N, D) float32). An array alone has no token."""
    if isinstance(data, np.ndarray):
        token, vec = None, data
    elif not isinstance(data, dict) or not data:
        raise TextualInversionError(f"{source}: expected a dict of embeddings, got {type(data).__name__}")
    elif "string_to_param" in data:                                   # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise TextualInversionError(f"{source}: string_to_param must hold exactly one tensor")
        vec = next(iter(params.values()))
        token = data.get("name") if isinstance(data.get("name"), str) else None
    elif "emb_params" in data:                                        # A1111 .safetensors
        token, vec = None, data["emb_params"]
    elif "clip_l" in data or "clip_g" in data:
        raise TextualInversionError(f"{source}: an SDXL embedding (clip_l / clip_g); this pipeline has one "
                                    "text encoder")
    elif len(data) == 1:                                              # diffusers {token: vec}
        token, vec = next(iter(data.items()))
    else:
        raise TextualInversionError(f"{source}: not an embedding file: expected one {{token: vector}} entry, "
                                    f"'string_to_param' or 'emb_params'; found keys {sorted(map(str, data))[:6]}")
    if hasattr(vec, "numpy") and not isinstance(vec, np.ndarray):
        vec = vec.detach().cpu().numpy() if hasattr(vec, "detach") else vec.numpy()
    if not isinstance(vec, np.ndarray) or vec.dtype.kind != "f" or vec.ndim not in (1, 2) or vec.size == 0:
        raise TextualInversionError(f"{source}: the embedding must be a (D,) or (N, D) float array, "
                                    f"got {getattr(vec, 'shape', type(vec).__name__)}")
    vec = vec.astype(np.float32).reshape(-1, vec.shape[-1])
    if not np.isfinite(vec).all():
        raise TextualInversionError(f"{source}: the embedding holds NaN or inf")
    return token, vec


def multi_vector_tokens(token: str, n: int) -> List[str]:
    """The tokens of an N-vector embedding: token, token_1, ..., token_{N-1} (diffusers' naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def save_textual_inversion(embeddings: Dict[str, np.ndarray], path: str, format: str = "diffusers") -> str:
    """Write one embedding: "diffusers" -> `{token: (N, D)}` safetensors, "a1111" -> `{"emb_params": (N, D)}`
    (A1111 takes the token from the file name). Atomic. Returns the path."""
    if len(embeddings) != 1:
        raise ValueError(f"one embedding per file, got {len(embeddings)}")
    (token, vec), = embeddings.items()
    vec = np.asarray(vec, dtype=np.float32)
    if os.path.isdir(path) or not os.path.splitext(path)[1]:
        path = os.path.join(path, TI_WEIGHT_NAMES[0] if format == "diffusers" else f"{token}.safetensors")
    if format == "diffusers":
        save_safetensors({token: vec}, path)
    elif format == "a1111":
        save_safetensors({"emb_params": vec.reshape(-1, vec.shape[-1])}, path)
    else:
        raise ValueError(f"format must be 'diffusers' or 'a1111', got {format!r}")
    return path


class TextualInversionLoaderMixin:
    """`load_textual_inversion` for a pipeline with `tokenizer` and `text_encoder` (diffusers' surface)."""

    def load_textual_inversion(self, pretrained_model_name_or_path, token: Union[None, str, Sequence[str]] = None,
                               weight_name: Optional[str] = None) -> List[str]:
        """Load one or more embeddings (paths, folders, `{token: vector}` dicts or arrays with `token=`).

        Everything is checked before the tokenizer or text encoder change. Returns the tokens added.
        """
        sources = pretrained_model_name_or_path
        sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        tokens = list(token) if isinstance(token, (list, tuple)) else [token] * len(sources)
        if len(sources) == 1 and len(tokens) > 1 and isinstance(sources[0], np.ndarray):
            if sources[0].ndim != 2 or len(sources[0]) != len(tokens):   # one (n, D) array for n tokens
                raise TextualInversionError(f"{len(tokens)} tokens for an array of shape {sources[0].shape}")
            sources = list(sources[0])
        if len(tokens) != len(sources):
            raise TextualInversionError(f"{len(sources)} embeddings but {len(tokens)} tokens")
        named = [t for t in tokens if t is not None]
        if len(set(named)) < len(named):
            raise TextualInversionError(f"tokens must differ, got {tokens}")

        vocab = self.tokenizer.get_vocab()
        width = self.text_encoder.get_input_embeddings().weight.shape[-1]
        new_tokens, new_vectors = [], []
        for src, tok in zip(sources, tokens):
            if isinstance(src, (str, os.PathLike)):
                found, vec = read_embedding_file(str(src), weight_name)
                where = str(src)
            else:
                found, vec = parse_embedding_dict(src)
                where = "embedding"
            tok = tok or found
            if tok is None:
                raise TextualInversionError(f"{where}: the file names no token; pass token=...")
            if tok in vocab or tok in new_tokens:
                raise TextualInversionError(f"token {tok!r} is already in the tokenizer's vocabulary; choose "
                                            "another token (or unload the old embedding)")
            if f"{tok}_1" in vocab:
                raise TextualInversionError(f"multi-vector token {tok!r} ({tok}_1, ...) is already loaded")
            if vec.shape[-1] != width:
                raise TextualInversionError(f"{where}: embedding width {vec.shape[-1]} does not match the text "
                                            f"encoder's token width {width} (an embedding for another base model?)")
            names = multi_vector_tokens(tok, len(vec))
            clash = [t for t in names if t in vocab or t in new_tokens]
            if clash:
                raise TextualInversionError(f"tokens {clash} are already in the tokenizer's vocabulary")
            new_tokens += names
            new_vectors += list(vec)

        start = len(self.tokenizer)
        table = self.text_encoder.resize_token_embeddings(start + len(new_tokens))
        self.tokenizer.add_tokens(new_tokens)
        ids = self.tokenizer.convert_tokens_to_ids(new_tokens)
        weight = table.weight.numpy()
        weight[ids] = np.stack(new_vectors).astype(weight.dtype)
        stop = table.weight.is_stop_grad()
        table.weight = jt.array(weight)
        if stop:
            table.weight.stop_grad()
        return new_tokens

    def textual_inversion_tokens(self) -> Dict[str, List[str]]:
        """Base token -> its tokens (token, token_1, ...) for every added token that is not special."""
        added = [t for t, i in sorted(self.tokenizer.added_tokens.items(), key=lambda kv: kv[1])
                 if i not in self.tokenizer.special_ids]
        known = set(added)
        groups: Dict[str, List[str]] = {}
        for tok in added:
            base, _, suffix = tok.rpartition("_")
            if suffix.isdigit() and base in groups and f"{base}_{suffix}" in known:
                groups[base].append(tok)
            else:
                groups[tok] = [tok]
        return groups

    def textual_inversion_embeddings(self) -> Dict[str, np.ndarray]:
        """Base token -> its current vectors (N, D): what `save_textual_inversion` or a LoRA bundle writes."""
        weight = self.text_encoder.get_input_embeddings().weight.numpy()
        return {base: weight[self.tokenizer.convert_tokens_to_ids(toks)].astype(np.float32)
                for base, toks in self.textual_inversion_tokens().items()}

    def maybe_convert_prompt(self, prompt: Union[str, List[str]]):
        """Expand each multi-vector token to "tok tok_1 ... tok_{N-1}" (diffusers' `maybe_convert_prompt`)."""
        if isinstance(prompt, list):
            return [self.maybe_convert_prompt(p) for p in prompt]
        for base, toks in self.textual_inversion_tokens().items():
            if len(toks) > 1 and base in prompt:
                prompt = prompt.replace(base, " ".join(toks))
        return prompt
