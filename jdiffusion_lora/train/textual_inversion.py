"""Textual Inversion training (Gal et al. 2022, "An Image is Worth One Word"): learn the input vectors of
new tokens, one token per style (its trigger word, so captions and prompt templates need no change),
each of `num_vectors` vectors, starting from the embedding of a word.

The text encoder's token table stays frozen; the new rows live in one trainable Var (n_tokens, D) that
`embed` splices into the looked-up token vectors. `write_back` copies them into the table (before
sampling or saving); `embeddings` gives {token: (N, D)} for a diffusers file or a LoRA's `bundle_emb`.

    ti = TokenEmbeddings.add(pipe, ["style_00", "style_01"], num_vectors=2, init_word="painting")
    hidden = text_encoder(ids, inputs_embeds=ti.embed(ids)).last_hidden_state
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from .._runtime import jt
from ..pipelines.textual_inversion import multi_vector_tokens


class TokenEmbeddings:
    """The trainable vectors of the new tokens (`vectors`, (n_tokens, D)) and their ids."""

    def __init__(self, pipe, tokens: Dict[str, List[str]]):
        self.pipe = pipe
        self.tokens = tokens                                                # base token -> [tok, tok_1, ...]
        flat = [t for group in tokens.values() for t in group]
        self.ids = np.array(pipe.tokenizer.convert_tokens_to_ids(flat), dtype=np.int64)
        table = pipe.text_encoder.get_input_embeddings().weight
        table.stop_grad()                                                    # the old vocabulary stays as it is
        self.vectors = jt.array(table.numpy()[self.ids])                     # (n_tokens, D), trained
        self.slot = np.full(table.shape[0], -1, dtype=np.int64)              # token id -> row of `vectors`
        self.slot[self.ids] = np.arange(len(self.ids))

    @classmethod
    def add(cls, pipe, tokens: Sequence[str], num_vectors: int = 1, init_word: str = "style") -> "TokenEmbeddings":
        """Add each token (with num_vectors vectors) to the pipeline, every vector initialised to the mean
        embedding of `init_word`'s tokens. Refuses tokens the tokenizer already has."""
        if num_vectors < 1:
            raise ValueError(f"num_vectors must be at least 1, got {num_vectors}")
        init_ids = pipe.tokenizer.tokenize_ids(init_word)
        if not init_word.strip() or not init_ids:
            raise ValueError(f"init word {init_word!r} has no tokens")
        table = pipe.text_encoder.get_input_embeddings().weight.numpy()
        init = table[init_ids].mean(axis=0)
        vectors = [np.repeat(init[None], num_vectors, axis=0) for _ in tokens]
        pipe.load_textual_inversion(vectors, token=list(tokens))
        return cls(pipe, {t: multi_vector_tokens(t, num_vectors) for t in tokens})

    def expand(self, texts: Sequence[str]) -> List[str]:
        """Captions with each multi-vector token written out ("tok tok_1 ...")."""
        return self.pipe.maybe_convert_prompt(list(texts))

    def parameter(self, c):
        """The optimizer entry (name, var, component, lr) of the vectors."""
        return ("textual_inversion.vectors", self.vectors, "textual_inversion", c.ti_learning_rate)

    def embed(self, input_ids) -> "jt.Var":
        """Token vectors (B, T, D) for `input_ids` (B, T): the frozen table's, with the new tokens' rows taken
        from `vectors` (so the gradient reaches them and nothing else)."""
        ids = np.asarray(input_ids.numpy() if isinstance(input_ids, jt.Var) else input_ids, dtype=np.int64)
        table = self.pipe.text_encoder.get_input_embeddings()
        base = table(jt.array(ids)).stop_grad()                              # (B, T, D)
        slots = self.slot[ids]                                               # (B, T), -1 = not a new token
        if (slots < 0).all():
            return base
        mask = jt.array((slots >= 0).astype(np.float32)[..., None])          # (B, T, 1)
        new = self.vectors[jt.array(np.maximum(slots, 0).reshape(-1))].reshape(base.shape)
        return base * (1.0 - mask) + new * mask

    def write_back(self) -> None:
        """Put the trained vectors into the text encoder's table (for sampling and saving)."""
        table = self.pipe.text_encoder.get_input_embeddings()
        weight = table.weight.numpy()
        weight[self.ids] = self.vectors.numpy()
        table.weight = jt.array(weight).stop_grad()

    def embeddings(self) -> Dict[str, np.ndarray]:
        """{base token: (N, D)} of the trained vectors."""
        values = self.vectors.numpy().astype(np.float32)
        out, k = {}, 0
        for base, group in self.tokens.items():
            out[base] = values[k:k + len(group)]
            k += len(group)
        return out
