"""CLIP's byte-level BPE tokenizer in pure Python, matching transformers 5.24's `CLIPTokenizer`.

transformers 5 backs `CLIPTokenizer` with the `tokenizers` library. Its pipeline, reproduced here:

1. special tokens: the bos/eos/pad/unk strings (and any other added tokens of the folder) are cut
   out of the raw text first and map straight to their ids. This includes SD-2's pad token "!":
   with transformers 5 a "!" in a prompt becomes the lone token id 0, never "!</w>".
2. normalise each remaining piece: Unicode NFC, every whitespace run -> one space, lower-case
   (character by character, so a final capital sigma becomes "σ", not "ς").
3. pre-tokenise with CLIP's pattern
   `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`,
   dropping the whitespace between matches, then GPT-2's byte-level split (which only ever splits
   the two special-token literals further, into "<|", name, "|>").
4. map each word's UTF-8 bytes to the 256 printable byte-level characters, put `</w>` on the last
   one and apply the BPE merges, lowest rank first.
5. add bos ... eos, truncate the content to `max_length - 2`, pad on the right.

Python's `re` has no `\\p{L}`, so step 3 is a small hand-written scanner over `unicodedata`
categories (L* letters, N* numbers) and the Unicode White_Space set that Oniguruma's `\\s` uses.
"""
from __future__ import annotations

import json
import os
import unicodedata
from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

# Characters Oniguruma's `\s` matches in Unicode mode: the White_Space property.
WHITESPACE = frozenset(
    [chr(c) for c in range(0x09, 0x0E)] + [" ", "\x85", "\xa0", "\u1680"]
    + [chr(c) for c in range(0x2000, 0x200B)] + ["\u2028", "\u2029", "\u202f", "\u205f", "\u3000"]
)

# Special-token literals the CLIP pattern keeps whole (GPT-2's byte-level split then cuts them in three).
_CLIP_LITERALS = ("<|startoftext|>", "<|endoftext|>")
_CONTRACTIONS = ("'re", "'ve", "'ll", "'s", "'t", "'m", "'d")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2 / CLIP table mapping each byte to a printable character (printable bytes map to themselves)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _is_letter(c: str) -> bool:
    return unicodedata.category(c)[0] == "L"


def _is_number(c: str) -> bool:
    return unicodedata.category(c)[0] == "N"


def normalize(text: str) -> str:
    """NFC, whitespace runs -> " ", lower-case per character (the `tokenizers` normaliser CLIP uses)."""
    text = unicodedata.normalize("NFC", text)
    out, in_space = [], False
    for c in text:
        if c in WHITESPACE:
            if not in_space:
                out.append(" ")
            in_space = True
        else:
            out.append(c.lower())
            in_space = False
    return "".join(out)


def pre_tokenize(text: str) -> List[str]:
    """Split normalised text into words with CLIP's pattern (then GPT-2's byte-level split)."""
    words, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        literal = next((s for s in _CLIP_LITERALS if text.startswith(s, i)), None)
        if literal is not None:
            # The CLIP pattern keeps the literal; GPT-2's split then yields "<|", "endoftext", "|>".
            words += ["<|", literal[2:-2], "|>"]
            i += len(literal)
            continue
        if c == "'":
            contraction = next((s for s in _CONTRACTIONS if text.startswith(s, i)), None)
            if contraction is not None:
                words.append(contraction)
                i += len(contraction)
                continue
        if c in WHITESPACE:
            i += 1
        elif _is_letter(c):
            j = i + 1
            while j < n and _is_letter(text[j]):
                j += 1
            words.append(text[i:j])
            i = j
        elif _is_number(c):
            words.append(c)
            i += 1
        else:  # a run of anything that is not whitespace, letter or number
            j = i + 1
            while j < n and not (text[j] in WHITESPACE or _is_letter(text[j]) or _is_number(text[j])):
                j += 1
            words.append(text[i:j])
            i = j
    return words


def _token_content(value) -> Optional[str]:
    """A special token from a config file: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class BatchEncoding(dict):
    """`{"input_ids": (B, L) int64, "attention_mask": (B, L) int64}`, also readable as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CLIPTokenizer:
    """CLIP BPE tokenizer; `from_pretrained` reads a diffusers `tokenizer/` folder."""

    def __init__(self, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]],
                 bos_token: str = "<|startoftext|>", eos_token: str = "<|endoftext|>",
                 pad_token: str = "<|endoftext|>", unk_token: str = "<|endoftext|>",
                 model_max_length: int = 77, added_tokens: Optional[Dict[str, int]] = None,
                 normalized_tokens: Iterable[str] = ()):
        """`added_tokens`: extra token -> id cut out of the text before BPE (the four special tokens
        are always added). Those in `normalized_tokens` are matched after normalisation (so also in
        upper case), the others in the raw text, as the `normalized` flag of `tokenizers` does."""
        self.encoder = dict(vocab)  # token -> id
        self.bpe_ranks = {tuple(m): r for r, m in enumerate(merges)}
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.model_max_length = int(model_max_length)
        self.added_tokens: Dict[str, int] = dict(added_tokens or {})
        for tok in (bos_token, eos_token, pad_token, unk_token):
            if tok not in self.added_tokens:
                if tok not in self.encoder:
                    raise ValueError(f"special token {tok!r} is not in the vocabulary")
                self.added_tokens[tok] = self.encoder[tok]
        self.special_ids = frozenset(self.added_tokens.values())
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.decoder.update({i: t for t, i in self.added_tokens.items()})
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._cache: Dict[str, List[int]] = {}
        self._normalized_set = set(normalized_tokens)
        self._index_added()

    def _index_added(self) -> None:
        """Matching tables of the added tokens. A normalised token is matched by its normalised content
        (so "<Style>" also matches "<style>" and "<STYLE>"), as `tokenizers` does. Longest first, so that
        a token containing another one wins (leftmost-longest match)."""
        self._match: Dict[str, int] = {}
        raw, norm = [], []
        for tok, i in self.added_tokens.items():
            key = normalize(tok) if tok in self._normalized_set else tok
            (norm if tok in self._normalized_set else raw).append(key)
            self._match[key] = i
        self._raw_added = sorted(raw, key=len, reverse=True)
        self._normalized_added = sorted(norm, key=len, reverse=True)

    def get_vocab(self) -> Dict[str, int]:
        """Every token -> id, added ones included (transformers' `get_vocab`)."""
        return {**self.encoder, **self.added_tokens}

    def add_tokens(self, tokens: Union[str, Sequence[str]]) -> int:
        """Add new normal (not special) tokens, as transformers' `add_tokens`: ids from len(self) on,
        matched in the normalised text before BPE. Tokens already known are skipped; returns how many were added."""
        added = 0
        for tok in [tokens] if isinstance(tokens, str) else list(tokens):
            if not tok or tok in self.get_vocab():
                continue
            i = len(self)
            self.added_tokens[tok] = i
            self.decoder[i] = tok
            self._normalized_set.add(tok)
            added += 1
        self._index_added()
        self._cache.clear()
        return added

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]):
        vocab = self.get_vocab()
        if isinstance(tokens, str):
            return vocab.get(tokens, self.unk_token_id)
        return [vocab.get(t, self.unk_token_id) for t in tokens]

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, folder: str, subfolder: Optional[str] = None) -> "CLIPTokenizer":
        """Read vocab.json + merges.txt (or a transformers-5 tokenizer.json) and the special tokens.

        Special tokens come from tokenizer_config.json, overridden by special_tokens_map.json
        (as transformers does); missing ones take CLIP's defaults. `folder` may be `org/name` in the
        local HuggingFace cache.
        """
        from ..hub import resolve_model
        folder = resolve_model(folder)
        if subfolder:
            folder = os.path.join(folder, subfolder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(folder, "special_tokens_map.json"))
        vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        # Added tokens as content -> (id, normalized). Listed ones (tokenizer.json, `added_tokens_decoder`)
        # keep their flags; a named special token not listed is added with the flag of its config
        # entry (a plain string means not normalised), the last of bos, eos, unk, pad winning.
        listed: Dict[str, Tuple[int, bool]] = {}
        if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
            vocab = _read_json(vocab_path)
            with open(merges_path, encoding="utf-8") as f:
                lines = f.read().split("\n")
            merges = [tuple(line.rstrip("\r").split(" ")) for line in lines
                      if line.strip() and not line.startswith("#version")]
        elif os.path.isfile(os.path.join(folder, "tokenizer.json")):
            data = _read_json(os.path.join(folder, "tokenizer.json"))
            model = data["model"]
            if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
                raise ValueError(f"{folder}/tokenizer.json is not a CLIP BPE tokenizer")
            vocab = model["vocab"]
            merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
            listed = {t["content"]: (t["id"], bool(t.get("normalized"))) for t in data.get("added_tokens", [])}
        else:
            raise FileNotFoundError(f"{folder} has neither vocab.json + merges.txt nor tokenizer.json")
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"{merges_path}: malformed merge line {' '.join(bad[0])!r}")
        decoder_entries = config.get("added_tokens_decoder") or {}
        for idx, tok in sorted(decoder_entries.items(), key=lambda kv: int(kv[0])):
            content = _token_content(tok)
            listed.setdefault(content, (int(idx), isinstance(tok, dict) and bool(tok.get("normalized"))))
        # transformers reads special_tokens_map.json only when the config has no added_tokens_decoder.
        source = dict(config) if decoder_entries else {**config, **special_map}
        tokens, named = {}, {}
        for name, default in (("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>"),
                              ("unk_token", "<|endoftext|>"), ("pad_token", "<|endoftext|>")):
            value = source.get(name)
            value = default if value is None else value
            tokens[name] = _token_content(value)
            named[tokens[name]] = isinstance(value, dict) and bool(value.get("normalized"))
        for extra in source.get("additional_special_tokens") or []:
            named.setdefault(_token_content(extra), isinstance(extra, dict) and bool(extra.get("normalized")))
        added = {t: flag for t, flag in listed.items()}
        for content, normalized in named.items():
            if content not in added:
                if content not in vocab:
                    raise ValueError(f"{folder}: special token {content!r} is not in vocab")
                added[content] = (vocab[content], normalized)
        max_len = config.get("model_max_length", 77)
        if not isinstance(max_len, int) or max_len > 100_000:  # transformers' "very large" placeholder
            max_len = 77
        all_vocab = {**vocab, **{t: i for t, (i, _) in added.items()}}
        return cls(all_vocab, merges, model_max_length=max_len,
                   added_tokens={t: i for t, (i, _) in added.items()},
                   normalized_tokens=[t for t, (_, norm) in added.items() if norm], **tokens)

    def save_pretrained(self, folder: str) -> None:
        """Write vocab.json, merges.txt and tokenizer_config.json (transformers reads them back)."""
        from ..weights import atomic_write_bytes

        os.makedirs(folder, exist_ok=True)
        merges = sorted(self.bpe_ranks, key=self.bpe_ranks.get)
        normalized = self._normalized_set
        config = {
            "model_max_length": self.model_max_length, "do_lower_case": True,
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "pad_token": self.pad_token, "unk_token": self.unk_token,
            "added_tokens_decoder": {str(i): {"content": t, "normalized": t in normalized,
                                              "special": i in self.special_ids,
                                              "lstrip": False, "rstrip": False, "single_word": False}
                                     for t, i in sorted(self.added_tokens.items(), key=lambda kv: kv[1])},
            "tokenizer_class": "CLIPTokenizer",
        }
        files = {
            "vocab.json": json.dumps(self.encoder, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        }
        for name, text in files.items():
            atomic_write_bytes(os.path.join(folder, name), [text.encode("utf-8")])

    # ------------------------------------------------------------------ ids of special tokens

    @property
    def bos_token_id(self) -> int:
        return self.added_tokens[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self.added_tokens[self.eos_token]

    @property
    def pad_token_id(self) -> int:
        return self.added_tokens[self.pad_token]

    @property
    def unk_token_id(self) -> int:
        return self.added_tokens[self.unk_token]

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def __len__(self) -> int:
        return len(self.decoder)

    # ------------------------------------------------------------------ encoding

    def _bpe(self, word: str) -> List[int]:
        """BPE ids of one pre-tokenised word (already in byte-level characters)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        unk = self.unk_token_id
        ids = [self.encoder.get(s, unk) for s in symbols]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def _split_added(self, text: str, tokens: List[str]) -> List[Union[str, int]]:
        """Cut `tokens` out of `text` (leftmost, longest first): a list of text pieces and token ids."""
        if not tokens:
            return [text]
        out: List[Union[str, int]] = []
        start = i = 0
        while i < len(text):
            tok = next((t for t in tokens if text.startswith(t, i)), None)
            if tok is None:
                i += 1
                continue
            if i > start:
                out.append(text[start:i])
            out.append(self._match[tok])
            i += len(tok)
            start = i
        if start < len(text):
            out.append(text[start:])
        return out

    def tokenize_ids(self, text: str) -> List[int]:
        """Ids of `text` without bos/eos, truncation or padding."""
        ids: List[int] = []
        for raw_piece in self._split_added(text, self._raw_added):
            if isinstance(raw_piece, int):
                ids.append(raw_piece)
                continue
            for piece in self._split_added(normalize(raw_piece), self._normalized_added):
                if isinstance(piece, int):
                    ids.append(piece)
                    continue
                for word in pre_tokenize(piece):
                    ids += self._bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8")))
        return ids

    def encode(self, text: str, add_special_tokens: bool = True, truncation: bool = False,
               max_length: Optional[int] = None) -> List[int]:
        """Token ids of one text: [bos] + BPE ids + [eos]; no padding, no truncation unless asked."""
        ids = self.tokenize_ids(text)
        n_special = 2 if add_special_tokens else 0
        if truncation:
            limit = self.model_max_length if max_length is None else max_length
            ids = ids[: max(limit - n_special, 0)]
        if add_special_tokens:
            ids = [self.bos_token_id] + ids + [self.eos_token_id]
        return ids

    def __call__(self, text: Union[str, Iterable[str]], padding: Union[str, bool] = "max_length",
                 max_length: Optional[int] = None, truncation: bool = True,
                 add_special_tokens: bool = True, return_tensors: Optional[str] = None) -> BatchEncoding:
        """Tokenise a prompt or a list of prompts into `(B, L)` int64 `input_ids` and `attention_mask`.

        padding: "max_length" (pad to `max_length`, default `model_max_length`), "longest"/True
        (pad to the longest in the batch) or False/"do_not_pad" (lengths must then agree).
        return_tensors: None or "np" (NumPy arrays, always: `jt.array(...)` takes them as they are); "pt" and
        "tf" are refused with a message, as there is no PyTorch or TensorFlow at run time.
        """
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors={return_tensors!r} is not available: this tokenizer returns NumPy "
                             "arrays (return_tensors='np' or None); pass them to jt.array(...) for Jittor")
        texts = [text] if isinstance(text, str) else list(text)
        max_length = self.model_max_length if max_length is None else int(max_length)
        rows = [self.encode(t, add_special_tokens, truncation, max_length) for t in texts]
        if padding in ("max_length",):
            length = max([max_length] + [len(r) for r in rows])
        elif padding in (True, "longest"):
            length = max([len(r) for r in rows] + [0])
        elif padding in (False, "do_not_pad", None):
            lengths = {len(r) for r in rows}
            if len(lengths) > 1:
                raise ValueError("prompts of different lengths need padding; use padding='max_length' or 'longest'")
            length = lengths.pop() if lengths else 0
        else:
            raise ValueError(f"padding must be 'max_length', 'longest', True or False, got {padding!r}")
        input_ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), length), dtype=np.int64)
        for b, row in enumerate(rows):
            input_ids[b, : len(row)] = row
            attention_mask[b, : len(row)] = 1
        return BatchEncoding(input_ids=input_ids, attention_mask=attention_mask)

    # ------------------------------------------------------------------ decoding

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> List[str]:
        return [self.decoder[int(i)] for i in ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`: bytes joined back, each `</w>` becomes a space, ends stripped (as transformers)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)] if not isinstance(ids, list) else [int(i) for i in ids]
        tokens = [self.decoder[i] for i in ids if not (skip_special_tokens and i in self.special_ids)]
        text = "".join(tokens)
        raw = bytearray()
        for c in text:
            if c in self.byte_decoder:
                raw.append(self.byte_decoder[c])
            else:  # not a byte-level character (only possible in added tokens): keep it as UTF-8
                raw += c.encode("utf-8")
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> List[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]
