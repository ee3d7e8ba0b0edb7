"""Score a folder of generated images like the competition's checker, per style and overall.

Layout (see REFERENCE.md section 1):
    generated:  <gen>/<NN>/<prompt>.png          (the submission; file stem = the prompt)
    references: <root>/<NN>/images/<object>.png  (+ optional <root>/<NN>/prompt.json)

Sub-scores per style, then the mean over styles (the overall total is the formula applied to
the overall sub-scores, as the seed README prints it):
    hist      colour-histogram correlation with the style's mean reference histogram (numpy);
    dino      mean cosine similarity of DINOv2 pooled features, every generated x reference pair;
    lpips     mean LPIPS (SqueezeNet, 256 x 256, inputs in [-1, 1]) over the same pairs;
    fid       FID between the style's generated and reference InceptionV3 features (64-dim);
    clip_r    share of images whose own prompt (lower-cased stem) is in the CLIP top 5 of all
              prompts (every style's prompt.json values and generated stems; or only its own
              style's with clip_r_scope="style");
    clip_iqa  mean CLIP-IQA probability of "Good photo." over "Bad photo.".

Weights live in one folder (`--weights DIR`, or the environment variable
JDIFFUSION_SCORER_WEIGHTS), each network in the layout its usual distribution uses:
    <DIR>/<any>/config.json + model.safetensors   facebook/dinov2-base           (dino)
    <DIR>/<any>/config.json + model.safetensors   openai/clip-vit-large-patch14  (clip_r; its
                                                   vocab.json/merges.txt also serve clip_iqa)
    <DIR>/pt_inception-2015-12-05-6726825d.pth     pytorch-fid                    (fid)
    <DIR>/squeezenet1_1-b8a52dc0.pth + squeeze.pth  torchvision + lpips v0.1      (lpips)
    <DIR>/RN50.pt                                  OpenAI CLIP RN50 (piq's file)  (clip_iqa)
A metric whose weights are missing is reported as "not computed (weights not found at ...)";
the others still run.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..image_files import list_images
from . import hist as hist_metric
from .fid import fid_from_features
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_pixels, dinov2_pixels, load_rgb, unit_pixels
from .score import METRICS, total_from

ALL_METRICS = ("dino", "hist", "fid", "lpips", "clip_iqa", "clip_r")
WEIGHTS_ENV = "JDIFFUSION_SCORER_WEIGHTS"
CLIP_R_TOP_K = 5


# --------------------------------------------------------------------------- dataset discovery

def find_styles(generated: str) -> List[str]:
    """Style ids: the sub-folders of the generated folder that hold images."""
    if not os.path.isdir(generated):
        raise FileNotFoundError(f"generated folder not found: {generated}")
    return sorted(n for n in os.listdir(generated) if list_images(os.path.join(generated, n)))


def reference_images(references: str, style: str) -> List[str]:
    """<root>/<NN>/images/*.png, or <root>/<NN>/*.png when there is no images/ folder."""
    folder = os.path.join(references, style)
    return list_images(os.path.join(folder, "images")) or list_images(folder)


def style_prompts(references: str, style: str, generated_paths: Sequence[str]) -> List[str]:
    """Candidate prompts for CLIP-R: prompt.json values and the generated stems, lower-cased, unique."""
    prompts = []
    path = os.path.join(references, style, "prompt.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        prompts += [str(v) for v in (data.values() if isinstance(data, dict) else data)]
    prompts += [prompt_of(p) for p in generated_paths]
    return list(dict.fromkeys(p.lower() for p in prompts))


def prompt_of(path: str) -> str:
    """The text CLIP-R retrieves for an image: its lower-cased file stem."""
    return os.path.splitext(os.path.basename(path))[0].lower()


# --------------------------------------------------------------------------- weights discovery

def _model_folders(folder: str, model_type: str) -> List[str]:
    """Folders (folder itself and one level below) whose config.json says model_type."""
    found = []
    for d in [folder] + [os.path.join(folder, n) for n in sorted(os.listdir(folder))]:
        cfg = os.path.join(d, "config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg) as f:
                    if json.load(f).get("model_type") == model_type:
                        found.append(d)
            except (OSError, ValueError):
                continue
    return found


def locate_weights(folder: Optional[str]) -> Tuple[Dict[str, object], Dict[str, str]]:
    """({metric: path or paths}, {metric: why not found}) for the networks under `folder`."""
    from .nets.clip_iqa import find_rn50_weights
    from .nets.inception import FID_WEIGHTS_NAME, find_inception_weights
    from .nets.lpips import find_lpips_weights

    found, missing = {}, {}
    if not folder:
        for m in ("dino", "fid", "lpips", "clip_iqa", "clip_r"):
            missing[m] = f"not computed (weights not found at <no folder given: pass --weights DIR or set {WEIGHTS_ENV}>)"
        return found, missing
    if not os.path.isdir(folder):
        for m in ("dino", "fid", "lpips", "clip_iqa", "clip_r"):
            missing[m] = f"not computed (weights not found at {folder}: no such folder)"
        return found, missing
    dino = _model_folders(folder, "dinov2")
    clip = _model_folders(folder, "clip")
    inception = find_inception_weights(folder)
    lpips = find_lpips_weights(folder)
    rn50 = find_rn50_weights(folder)
    if dino:
        found["dino"] = dino[0]
    else:
        missing["dino"] = f"not computed (weights not found at {folder}/<dinov2-base>/config.json with model_type dinov2)"
    if clip:
        found["clip_r"] = clip[0]
    else:
        missing["clip_r"] = f"not computed (weights not found at {folder}/<clip-vit-large-patch14>/config.json with model_type clip)"
    if inception:
        found["fid"] = inception
    else:
        missing["fid"] = f"not computed (weights not found at {os.path.join(folder, FID_WEIGHTS_NAME)})"
    if lpips:
        found["lpips"] = lpips
    else:
        missing["lpips"] = (f"not computed (weights not found at {folder}/squeezenet1_1-b8a52dc0.pth + "
                            f"{folder}/squeeze.pth)")
    if rn50 and clip:
        found["clip_iqa"] = (rn50, clip[0])
    elif rn50:
        missing["clip_iqa"] = (f"not computed (weights not found at {folder}/<clip folder>/vocab.json: "
                               f"RN50 needs CLIP's tokenizer files)")
    else:
        missing["clip_iqa"] = f"not computed (weights not found at {os.path.join(folder, 'RN50.pt')})"
    return found, missing


# --------------------------------------------------------------------------- the scorer

def _cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """torch.nn.functional.cosine_similarity for every row pair: (N, D), (M, D) -> (N, M)."""
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    return (a @ b.T) / np.maximum(na * nb.T, 1e-8)


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _same_shape_batches(arrays: Sequence[np.ndarray], size: int) -> Iterable[Tuple[int, np.ndarray]]:
    """(start index, stacked batch) over consecutive arrays of equal shape."""
    i = 0
    while i < len(arrays):
        j = i + 1
        while j < len(arrays) and j - i < size and arrays[j].shape == arrays[i].shape:
            j += 1
        yield i, np.stack(arrays[i:j])
        i = j


class Scorer:
    """Holds the scoring networks (loaded on first use) so a trainer can score repeatedly.

    metrics: which sub-scores to compute; fid_dims: 64 (competition) or 192/768/2048;
    clip_iqa_backbone: "rn50" (CLIP-IQA's own, default) or "clip" (the CLIP folder, torchmetrics' variant);
    clip_r_scope: "all" (an image's prompt competes with the prompts of every scored style, default)
    or "style" (only with its own style's prompts).
    """

    def __init__(self, weights: Optional[str] = None, metrics: Sequence[str] = ALL_METRICS, fid_dims: int = 64,
                 batch_size: int = 8, clip_iqa_backbone: str = "rn50", clip_r_scope: str = "all",
                 log: Optional[Callable[[str], None]] = None):
        unknown = [m for m in metrics if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {list(ALL_METRICS)}")
        if clip_iqa_backbone not in ("rn50", "clip"):
            raise ValueError(f"clip_iqa_backbone must be 'rn50' or 'clip', got {clip_iqa_backbone!r}")
        if clip_r_scope not in ("all", "style"):
            raise ValueError(f"clip_r_scope must be 'all' or 'style', got {clip_r_scope!r}")
        self.clip_r_scope = clip_r_scope
        self.weights = weights if weights is not None else os.environ.get(WEIGHTS_ENV)
        self.metrics = tuple(metrics)
        self.fid_dims = fid_dims
        self.batch_size = max(1, int(batch_size))
        self.clip_iqa_backbone = clip_iqa_backbone
        self.log = log or (lambda msg: None)
        self.paths, missing = locate_weights(self.weights)
        if clip_iqa_backbone == "clip":
            if "clip_r" in self.paths:
                self.paths["clip_iqa"] = (None, self.paths["clip_r"])
                missing.pop("clip_iqa", None)
            else:
                missing["clip_iqa"] = missing.get("clip_r", "not computed (no CLIP folder)")
        self.not_computed = {m: missing[m] for m in self.metrics if m in missing}
        self._nets: Dict[str, object] = {}

    @property
    def computable(self) -> Tuple[str, ...]:
        return tuple(m for m in self.metrics if m not in self.not_computed)

    # ------------------------------------------------------------------ networks

    def _net(self, name: str):
        if name in self._nets:
            return self._nets[name]
        start = time.time()
        if name == "dino":
            from .nets.dinov2 import Dinov2Model
            net = Dinov2Model.from_pretrained(self.paths["dino"])
        elif name == "clip":
            from ..models.clip_tokenizer import CLIPTokenizer
            from .nets.clip_vision import CLIPModel
            folder = self.paths.get("clip_r") or self.paths["clip_iqa"][1]
            net = (CLIPModel.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder))
        elif name == "inception":
            from .nets.inception import FIDInceptionV3
            net = FIDInceptionV3.from_file(self.paths["fid"])
        elif name == "lpips":
            from .nets.lpips import LPIPSSqueeze
            net = LPIPSSqueeze.from_files(*self.paths["lpips"])
        elif name == "rn50":
            from ..models.clip_tokenizer import CLIPTokenizer
            from .nets.clip_iqa import CLIPIQA, OpenAICLIPResNet
            rn50, tok_folder = self.paths["clip_iqa"]
            net = CLIPIQA(OpenAICLIPResNet.from_file(rn50), CLIPTokenizer.from_pretrained(tok_folder))
        else:
            raise KeyError(name)
        self.log(f"loaded {name} in {time.time() - start:.1f}s")
        self._nets[name] = net
        return net

    def _run(self, fn, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Apply a Jittor network to numpy inputs in batches (same-shape runs) -> stacked numpy outputs."""
        from .._runtime import jt
        outs = []
        with jt.no_grad():
            for _, batch in _same_shape_batches(arrays, self.batch_size):
                outs.append(np.asarray(fn(jt.array(batch))))
        return np.concatenate(outs, axis=0)

    # ------------------------------------------------------------------ features

    def dino_features(self, images: Sequence) -> np.ndarray:
        net = self._net("dino")
        return self._run(lambda x: net(x).pooler_output.numpy(), [dinov2_pixels(im) for im in images])

    def inception_features(self, images: Sequence) -> np.ndarray:
        net = self._net("inception")
        return self._run(lambda x: net(x, dims=self.fid_dims).numpy(), [unit_pixels(im) for im in images])

    def lpips_features(self, images: Sequence) -> List[List[np.ndarray]]:
        """Per image: the 7 channel-normalised LPIPS activations at 256 x 256."""
        from .._runtime import jt
        net = self._net("lpips")
        out = []
        with jt.no_grad():
            for batch in _batches(list(images), self.batch_size):
                x = np.stack([unit_pixels(im, 256) * 2 - 1 for im in batch])
                feats = [f.numpy() for f in net.layer_features(jt.array(x))]
                out += [[f[i:i + 1] for f in feats] for i in range(len(batch))]
        return out

    def lpips_pairs(self, gen_feats, ref_feats) -> np.ndarray:
        """LPIPS of every generated x reference pair -> (N_gen, N_ref)."""
        net = self._net("lpips")
        weights = [lin.model[1].weight.numpy().reshape(-1) for lin in net.lins]       # (C_l,)
        d = np.zeros((len(gen_feats), len(ref_feats)))
        for i, g in enumerate(gen_feats):
            for j, r in enumerate(ref_feats):
                d[i, j] = sum(float(np.einsum("c,bchw->", w, (a - b) ** 2) / (a.shape[2] * a.shape[3]))
                              for w, a, b in zip(weights, g, r))
        return d

    def clip_image_features(self, images: Sequence) -> np.ndarray:
        model, _ = self._net("clip")
        size = model.vision_config.image_size
        return self._run(lambda x: model.get_image_features(x).numpy(), [clip_pixels(im, size) for im in images])

    def clip_text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Projected CLIP text features (B, P); cached per text, since every style reuses the prompt list."""
        from .._runtime import jt
        model, tokenizer = self._net("clip")
        cache = self._nets.setdefault("clip_text_cache", {})
        todo = list(dict.fromkeys(t for t in texts if t not in cache))
        with jt.no_grad():
            for batch in _batches(todo, 64):
                enc = tokenizer(list(batch), padding="max_length", truncation=True)
                feats = model.get_text_features(enc.input_ids, attention_mask=enc.attention_mask).numpy()
                cache.update(zip(batch, feats))
        return np.stack([cache[t] for t in texts])

    def clip_iqa_scores(self, images: Sequence) -> np.ndarray:
        from .nets.clip_iqa import PROMPTS, iqa_probability
        if self.clip_iqa_backbone == "clip":
            feats = self.clip_image_features(images)
            if "clip_iqa_anchors" not in self._nets:
                self._nets["clip_iqa_anchors"] = self.clip_text_features(list(PROMPTS))
            return iqa_probability(feats, self._nets["clip_iqa_anchors"], 100.0)
        iqa = self._net("rn50")
        mean = np.asarray(OPENAI_CLIP_MEAN, np.float32).reshape(3, 1, 1)
        std = np.asarray(OPENAI_CLIP_STD, np.float32).reshape(3, 1, 1)
        return self._run(iqa, [(unit_pixels(im) - mean) / std for im in images])

    # ------------------------------------------------------------------ scoring

    def score_style(self, generated: Sequence[str], references: Sequence[str],
                    prompts: Optional[Sequence[str]] = None) -> Dict[str, float]:
        """Sub-scores of one style from image paths (or PIL images); prompts: CLIP-R candidates."""
        if not generated:
            raise ValueError("no generated images")
        if not references:
            raise ValueError("no reference images")
        gen = [load_rgb(p) for p in generated]
        ref = [load_rgb(p) for p in references]
        out: Dict[str, float] = {"n_generated": len(gen), "n_references": len(ref)}
        todo = self.computable
        if "hist" in todo:
            out["hist"] = float(hist_metric.hist_scores(gen, ref).mean())
        if "dino" in todo:
            out["dino"] = float(_cosine_matrix(self.dino_features(gen), self.dino_features(ref)).mean())
        if "lpips" in todo:
            out["lpips"] = float(self.lpips_pairs(self.lpips_features(gen), self.lpips_features(ref)).mean())
        if "fid" in todo:
            if len(gen) < 2 or len(ref) < 2:
                out["fid"] = None          # a covariance needs two images on each side
            else:
                out["fid"] = fid_from_features(self.inception_features(gen), self.inception_features(ref))
        if "clip_iqa" in todo:
            out["clip_iqa"] = float(self.clip_iqa_scores(gen).mean())
        if "clip_r" in todo:
            names = [prompt_of(os.fspath(p)) if isinstance(p, (str, os.PathLike)) else None for p in generated]
            if any(n is None for n in names):
                raise ValueError("clip_r needs image paths (the file stem is the prompt)")
            candidates = list(dict.fromkeys([*(c.lower() for c in (prompts or [])), *names]))
            sims = _cosine_matrix(self.clip_image_features(gen), self.clip_text_features(candidates))  # (N, P)
            order = np.argsort(-sims, axis=1, kind="stable")[:, :CLIP_R_TOP_K]
            hits = [candidates.index(n) in order[i] for i, n in enumerate(names)]
            out["clip_r"] = float(np.mean(hits))
        out["total"] = total_from(out)
        return out

    def evaluate(self, generated: str, references: str, styles: Optional[Sequence[str]] = None,
                 style: Optional[str] = None) -> Dict[str, object]:
        """Score every style folder of `generated` against `references` (see module docstring).

        A `generated` folder holding images directly (a trainer's samples of one style) is
        scored as the style named by `style`.
        """
        generated, references = os.fspath(generated), os.fspath(references)
        if not os.path.isdir(references):
            raise FileNotFoundError(f"references folder not found: {references}")
        if list_images(generated):
            if not style:
                raise ValueError(f"{generated} holds images directly: pass style=<NN> to name their style")
            folders = {style: generated}
        else:
            found = find_styles(generated)
            if styles:
                absent = [s for s in styles if s not in found]
                if absent:
                    raise ValueError(f"style(s) {absent} have no images under {generated}")
                found = list(styles)
            folders = {s: os.path.join(generated, s) for s in found}
        if not folders:
            raise ValueError(f"no style folders with images under {generated} (expected {generated}/<NN>/<prompt>.png)")
        images = {s: list_images(folder) for s, folder in folders.items()}
        candidates = {s: style_prompts(references, s, images[s]) for s in folders}
        if self.clip_r_scope == "all":   # every prompt of every style competes
            others = [style_prompts(references, d, []) for d in sorted(os.listdir(references))
                      if d not in folders and os.path.isfile(os.path.join(references, d, "prompt.json"))]
            pooled = list(dict.fromkeys(p for group in [*candidates.values(), *others] for p in group))
            candidates = {s: pooled for s in folders}
        per_style, skipped = {}, {}
        for s in folders:
            ref = reference_images(references, s)
            if not ref:
                skipped[s] = f"no reference images under {os.path.join(references, s)}"
                self.log(f"style {s}: skipped ({skipped[s]})")
                continue
            start = time.time()
            per_style[s] = self.score_style(images[s], ref, candidates[s])
            self.log(f"style {s}: {len(images[s])} generated, {len(ref)} references, {time.time() - start:.1f}s")
        overall: Dict[str, Optional[float]] = {}
        for m in METRICS:
            values = [v[m] for v in per_style.values() if isinstance(v.get(m), float) and np.isfinite(v[m])]
            if m in self.computable and values:
                overall[m] = float(np.mean(values))
        overall["total"] = total_from(overall)
        return {
            "generated": os.path.abspath(generated), "references": os.path.abspath(references),
            "weights": os.path.abspath(self.weights) if self.weights else None,
            "fid_dims": self.fid_dims, "clip_iqa_backbone": self.clip_iqa_backbone, "clip_r_scope": self.clip_r_scope,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "overall": overall, "styles": per_style,
            "not_computed": dict(self.not_computed), "skipped_styles": skipped,
        }


def evaluate_folder(generated: str, references: str, weights: Optional[str] = None,
                    metrics: Sequence[str] = ALL_METRICS, styles: Optional[Sequence[str]] = None,
                    style: Optional[str] = None, fid_dims: int = 64, batch_size: int = 8,
                    clip_iqa_backbone: str = "rn50", clip_r_scope: str = "all", scorer: Optional[Scorer] = None,
                    log: Optional[Callable[[str], None]] = None) -> Dict[str, object]:
    """Score `<generated>/<NN>/<prompt>.png` against `<references>/<NN>/images/*.png`.

    Returns the scores dict (also what `scores.json` holds): "overall" (sub-scores and total of
    what could be computed), "styles" ({NN: sub-scores}), "not_computed" ({metric: reason}).
    A folder of one style's images (`<samples>/<prompt>.png`) is scored with `style="NN"`.
    Pass a `Scorer` to keep the networks loaded between calls (e.g. from a training loop).
    """
    scorer = scorer or Scorer(weights, metrics=metrics, fid_dims=fid_dims, batch_size=batch_size,
                              clip_iqa_backbone=clip_iqa_backbone, clip_r_scope=clip_r_scope, log=log)
    return scorer.evaluate(generated, references, styles=styles, style=style)
