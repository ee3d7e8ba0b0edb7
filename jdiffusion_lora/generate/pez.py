"""Hard prompts for a style: PEZ (Wen et al. 2023, "Hard Prompts Made Easy: Gradient-Based Discrete
Optimization for Prompt Tuning and Discovery", Algorithm 1).

Keep K soft token vectors P. Each step: project every row of P to its nearest vocabulary embedding
(cosine), run CLIP's text tower on the projected (hard) prompt, measure the loss 1 - cos(text, image)
against the references' CLIP image features, and apply that gradient to the soft P (straight-through).
The best hard prompt seen is returned as text, ready for `generate`'s `{pez}` template field.

    clip, tok = CLIPModel.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder)
    result = optimize_prompt(clip, tok, reference_images, num_tokens=8, steps=300, seed=0)
    result.prompt, result.similarity
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from .._runtime import jt
from ..metrics.preprocess import clip_pixels


@dataclass
class PEZResult:
    prompt: str                 # the best hard prompt, as text
    token_ids: List[int]        # its tokens (before re-tokenising the text)
    similarity: float           # mean CLIP cosine of `prompt` (re-tokenised) to the references
    start_prompt: str
    start_similarity: float
    history: List[float] = field(default_factory=list)  # similarity of the projected prompt at each step


def _unit(x):
    return x / (x.sqr().sum(-1, keepdims=True).sqrt() + 1e-8)


def image_features(clip, images: Sequence) -> "jt.Var":
    """Reference images (PIL or paths) -> unit CLIP image features (N, P)."""
    size = clip.vision_config.image_size
    pixels = np.stack([clip_pixels(im, size) for im in images]).astype(np.float32)
    with jt.no_grad():
        return _unit(clip.get_image_features(jt.array(pixels))).stop_grad()


def text_similarity(clip, tokenizer, prompt: str, image_feats) -> float:
    """Mean cosine between CLIP's features of `prompt` (as text) and unit image features (N, P)."""
    ids = tokenizer([prompt], padding="max_length", max_length=clip.text_config.max_position_embeddings,
                    truncation=True)["input_ids"]
    with jt.no_grad():
        text = _unit(clip.get_text_features(ids))                   # (1, P)
    return float((text @ image_feats.transpose(1, 0)).mean().item())


def _prompt_row(tokenizer, ids: Sequence[int]) -> np.ndarray:
    """[bos, ids..., eos]: CLIP's causal mask makes padding after eos irrelevant to the pooled feature."""
    return np.array([[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]], dtype=np.int64)


def optimize_prompt(clip, tokenizer, images: Sequence, num_tokens: int = 8, steps: int = 300, lr: float = 0.1,
                    weight_decay: float = 0.1, seed: int = 0, init_prompt: Optional[str] = None,
                    progress: bool = False) -> PEZResult:
    """PEZ: the K-token hard prompt whose CLIP text feature is closest to the references' image features.

    init_prompt: start from this text's tokens (cut or filled with random tokens to K); default random
    vocabulary tokens drawn from `seed`. Deterministic for a seed. Special and added tokens are never used.
    """
    if num_tokens < 1 or num_tokens > clip.text_config.max_position_embeddings - 2:
        raise ValueError(f"num_tokens must be in [1, {clip.text_config.max_position_embeddings - 2}], got {num_tokens}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not images:
        raise ValueError("PEZ needs at least one reference image")
    rng = np.random.default_rng(seed)
    table = clip.text_model.embeddings.token_embedding.weight                   # (V, C)
    allowed = np.array([i for i in range(min(table.shape[0], len(tokenizer)))
                        if i not in tokenizer.special_ids and tokenizer.decoder.get(i) in tokenizer.encoder])
    vocab = table.numpy()[allowed].astype(np.float32)                           # (V', C)
    vocab_unit = vocab / (np.linalg.norm(vocab, axis=1, keepdims=True) + 1e-8)
    feats = image_features(clip, images)                                        # (N, P)

    if init_prompt is not None:
        start = [i for i in tokenizer.tokenize_ids(init_prompt) if i in set(allowed.tolist())][:num_tokens]
        start += list(allowed[rng.integers(0, len(allowed), num_tokens - len(start))])
    else:
        start = list(allowed[rng.integers(0, len(allowed), num_tokens)])
    soft = jt.array(table.numpy()[np.array(start)].astype(np.float32))          # (K, C), the optimised P
    optimizer = jt.optim.AdamW([soft], lr=lr, weight_decay=weight_decay)

    def project(p: np.ndarray) -> np.ndarray:
        """Nearest vocabulary token of each soft vector (cosine) -> ids (K,)."""
        p_unit = p / (np.linalg.norm(p, axis=1, keepdims=True) + 1e-8)
        return allowed[(p_unit @ vocab_unit.T).argmax(axis=1)]

    start_prompt = init_prompt if init_prompt is not None else tokenizer.decode(start)
    best_prompt, best_ids = start_prompt, [int(i) for i in start]
    best_sim = start_sim = text_similarity(clip, tokenizer, start_prompt, feats)
    best_projected, history = -np.inf, []
    for _ in tqdm(range(steps), desc="PEZ", disable=not progress):
        ids = project(soft.numpy())
        row = _prompt_row(tokenizer, ids)                                      # (1, K + 2)
        hard = jt.array(table.numpy()[ids])                                     # (K, C)
        prompt_vecs = soft + (hard - soft).stop_grad()                          # forward: hard; gradient: to soft
        ends = clip.text_model.embeddings.token_embedding(jt.array(row[:, [0, -1]])).stop_grad()  # (1, 2, C)
        embeds = jt.concat([ends[:, :1], prompt_vecs.unsqueeze(0), ends[:, 1:]], dim=1)        # (1, K + 2, C)
        text = _unit(clip.get_text_features(row, inputs_embeds=embeds))         # (1, P)
        sim = (text @ feats.transpose(1, 0)).mean()
        optimizer.step(1.0 - sim)
        history.append(float(sim.item()))
        if history[-1] > best_projected:   # a better hard prompt: keep it if its text (re-tokenised) is better too
            best_projected = history[-1]
            text_prompt = tokenizer.decode(ids)
            text_sim = text_similarity(clip, tokenizer, text_prompt, feats)
            if text_sim > best_sim:
                best_prompt, best_ids, best_sim = text_prompt, [int(i) for i in ids], text_sim
    return PEZResult(best_prompt, best_ids, best_sim, start_prompt, start_sim, history)
