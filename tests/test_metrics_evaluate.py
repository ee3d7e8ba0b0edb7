"""The scorer end to end on a tiny dataset with tiny random-weight networks in the published file layouts."""
import argparse
import json
import os

import numpy as np
import pytest
from PIL import Image

from clip_fixtures import write_tokenizer_folder
from helpers import max_abs_diff

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = {"00": ["Cat", "Dog", "Tree"], "01": ["Ring", "Pool", "Moon"]}


def smooth_image(r, size=64):
    low = r.random((4, 4, 3)) * 255
    img = np.kron(low, np.ones((size // 4, size // 4, 1))) + r.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    from metrics_torch_refs import TorchFIDInception, TorchLPIPSSqueeze, TorchOpenAICLIPResNet, TorchSqueezeNet11
    from metrics_torch_refs import randomize_batchnorm
    from jdiffusion_lora.models.clip_tokenizer import CLIPTokenizer

    root = tmp_path_factory.mktemp("scorer_weights")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    # facebook/dinov2-base and openai/clip-vit-large-patch14 as transformers folders (tiny)
    transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=2, image_size=28,
        patch_size=7)).save_pretrained(root / "dinov2-base")
    clip_dir = write_tokenizer_folder(str(root / "clip-vit-large-patch14"))
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=len(tok), max_position_embeddings=77, projection_dim=16,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=7, projection_dim=16)
    transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
                           ).save_pretrained(clip_dir)
    # pytorch-fid, torchvision + lpips, OpenAI RN50 files
    torch.save(randomize_batchnorm(TorchFIDInception(), gen).state_dict(),
               root / "pt_inception-2015-12-05-6726825d.pth")
    lp = TorchLPIPSSqueeze(TorchSqueezeNet11())
    with torch.no_grad():
        for i in range(7):
            getattr(lp, f"lin{i}").model[1].weight.uniform_(0, 0.1)
    torch.save(lp.backbone.state_dict(), root / "squeezenet1_1-b8a52dc0.pth")
    torch.save(lp.heads_state_dict(), root / "squeeze.pth")
    rn = TorchOpenAICLIPResNet(embed_dim=16, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8,
                               context_length=77, vocab_size=len(tok), transformer_width=64, transformer_heads=1,
                               transformer_layers=1)
    torch.save(randomize_batchnorm(rn, gen).state_dict(), root / "RN50.pt")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """references/<NN>/images/*.png + prompt.json, generated/<NN>/<prompt>.png, and a copy-of-references case."""
    r = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("data")
    for style, prompts in PROMPTS.items():
        (root / "refs" / style / "images").mkdir(parents=True)
        (root / "gen" / style).mkdir(parents=True)
        (root / "same" / style).mkdir(parents=True)
        with open(root / "refs" / style / "prompt.json", "w") as f:
            json.dump({str(i): p for i, p in enumerate(prompts)}, f)
        refs = [smooth_image(r) for _ in range(2)]
        for i, im in enumerate(refs):
            im.save(root / "refs" / style / "images" / f"object{i}.png")
            im.save(root / "same" / style / f"{prompts[i]}.png")   # generated == references
        for p in prompts:
            smooth_image(r).save(root / "gen" / style / f"{p}.png")
    return root


@pytest.fixture(scope="module")
def scorer(weights_dir):
    from jdiffusion_lora.metrics.evaluate import Scorer
    return Scorer(str(weights_dir), batch_size=4, clip_r_scope="style")


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_all_metrics_computed(scorer, dataset):
    from jdiffusion_lora.metrics.score import METRICS, total_from

    scores = scorer.evaluate(dataset / "gen", dataset / "refs")
    assert scores["not_computed"] == {}
    assert sorted(scores["styles"]) == ["00", "01"]
    for style, s in scores["styles"].items():
        assert s["n_generated"] == 3 and s["n_references"] == 2
        assert -1 <= s["dino"] <= 1 and -1 <= s["hist"] <= 1 and s["lpips"] >= 0 and s["fid"] >= 0
        assert 0 <= s["clip_iqa"] <= 1
        assert s["clip_r"] == 1.0            # 3 candidate prompts of its style: always in the top 5
        assert s["total"] == pytest.approx(total_from(s))
    for m in METRICS:
        assert scores["overall"][m] == pytest.approx(np.mean([s[m] for s in scores["styles"].values()]))
    assert scores["overall"]["total"] == pytest.approx(total_from(scores["overall"]))


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_generated_equal_to_references(scorer, dataset):
    scores = scorer.evaluate(dataset / "same", dataset / "refs")
    for s in scores["styles"].values():
        # every generated x reference pair includes the non-matching pair, so only the diagonal is exact;
        # FID compares the two (identical) feature sets as wholes
        assert abs(s["fid"]) < 1e-6
    single = scorer.score_style([dataset / "same" / "00" / "Cat.png"], [dataset / "refs" / "00" / "images" / "object0.png"])
    assert single["dino"] == pytest.approx(1.0, abs=1e-5)
    assert single["hist"] == pytest.approx(1.0, abs=1e-12)
    assert abs(single["lpips"]) < 1e-6
    assert single["fid"] is None and single["total"] is None      # FID needs >= 2 images a side


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_dino_score_matches_transformers_pipeline(scorer, weights_dir, dataset):
    """The dino number equals transformers' processor + Dinov2Model pooler + torch cosine, averaged over pairs."""
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    proc = BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    model = transformers.Dinov2Model.from_pretrained(weights_dir / "dinov2-base").eval()
    gen = sorted((dataset / "gen" / "00").glob("*.png"))
    ref = sorted((dataset / "refs" / "00" / "images").glob("*.png"))

    def feats(paths):
        x = proc([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return model(pixel_values=x).pooler_output
    g, r = feats(gen), feats(ref)
    expected = torch.nn.functional.cosine_similarity(g[:, None], r[None], dim=-1).mean().item()
    got = scorer.score_style([str(p) for p in gen], [str(p) for p in ref])["dino"]
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_clip_r_over_all_prompts_matches_transformers(weights_dir, dataset):
    """clip_r with every style's prompts competing (6 here): transformers' processor, tokenizer and CLIPModel."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from jdiffusion_lora.metrics.evaluate import Scorer

    folder = weights_dir / "clip-vit-large-patch14"
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    prompts = [p.lower() for ps in PROMPTS.values() for p in ps]
    with torch.no_grad():
        t = model.get_text_features(**tok(prompts, padding=True, return_tensors="pt"))
        t = getattr(t, "pooler_output", t)
        expected = {}
        for style, ps in PROMPTS.items():
            images = [Image.open(dataset / "gen" / style / f"{p}.png").convert("RGB") for p in ps]
            v = model.get_image_features(**proc(images, return_tensors="pt"))
            v = getattr(v, "pooler_output", v)
            sims = torch.nn.functional.cosine_similarity(v[:, None], t[None], dim=-1)
            top5 = sims.argsort(dim=1, descending=True)[:, :5]
            expected[style] = np.mean([prompts.index(p.lower()) in top5[i].tolist() for i, p in enumerate(ps)])
    scores = Scorer(str(weights_dir), metrics=["clip_r"]).evaluate(dataset / "gen", dataset / "refs")
    assert scores["clip_r_scope"] == "all"
    for style in PROMPTS:
        assert scores["styles"][style]["clip_r"] == pytest.approx(expected[style])


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_lpips_pairs_match_network(scorer, dataset, rng):
    """The numpy pair loop over cached features equals running the LPIPS network on each pair."""
    from jdiffusion_lora._runtime import jt
    from jdiffusion_lora.metrics.preprocess import unit_pixels

    paths = sorted((dataset / "gen" / "01").glob("*.png"))
    refs = sorted((dataset / "refs" / "01" / "images").glob("*.png"))
    pairs = scorer.lpips_pairs(scorer.lpips_features(paths), scorer.lpips_features(refs))
    net = scorer._net("lpips")
    for i, g in enumerate(paths):
        for j, r in enumerate(refs):
            a = jt.array(unit_pixels(g, 256)[None] * 2 - 1)
            b = jt.array(unit_pixels(r, 256)[None] * 2 - 1)
            assert pairs[i, j] == pytest.approx(float(net(a, b).numpy()[0]), rel=1e-5, abs=1e-6)


def test_missing_weights_reported_not_computed(dataset, tmp_path):
    from jdiffusion_lora.metrics.evaluate import evaluate_folder
    from jdiffusion_lora.metrics.report import format_table, write_scores_json

    empty = tmp_path / "empty"
    empty.mkdir()
    scores = evaluate_folder(dataset / "gen", dataset / "refs", weights=str(empty))
    assert set(scores["not_computed"]) == {"dino", "fid", "lpips", "clip_iqa", "clip_r"}
    assert all(v.startswith("not computed (weights not found at ") for v in scores["not_computed"].values())
    assert set(scores["overall"]) == {"hist", "total"} and scores["overall"]["total"] is None
    write_scores_json(scores, str(tmp_path / "scores.json"))
    data = json.loads((tmp_path / "scores.json").read_text())
    assert data["overall"]["fid"].startswith("not computed (weights not found at ")
    assert isinstance(data["overall"]["hist"], float)
    table = format_table(scores)
    assert "not computed (weights not found at" in table and "overall" in table
    # a trainer's sample folder of one style: <samples>/<prompt>.png
    one = evaluate_folder(dataset / "gen" / "01", dataset / "refs", weights=str(empty), style="01")
    assert list(one["styles"]) == ["01"] and one["styles"]["01"]["hist"] == scores["styles"]["01"]["hist"]
    with pytest.raises(ValueError, match="style="):
        evaluate_folder(dataset / "gen" / "01", dataset / "refs", weights=str(empty))


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_cli_writes_scores_charts_and_compares(weights_dir, dataset, tmp_path, capsys):
    from jdiffusion_lora.cli import evaluate as cli_evaluate

    parser = argparse.ArgumentParser()
    cli_evaluate.add_parser(parser.add_subparsers(dest="command"))
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    for gen, out, metrics in [("gen", out_a, "dino,hist,fid,lpips,clip_iqa,clip_r"), ("same", out_b, "hist,dino")]:
        args = parser.parse_args(["evaluate", "--generated", str(dataset / gen), "--references", str(dataset / "refs"),
                                  "--weights", str(weights_dir), "--out", str(out), "--metrics", metrics])
        assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "scores.json" in printed
    data = json.loads((out_a / "scores.json").read_text())
    assert isinstance(data["overall"]["total"], float)
    for name in ("style_00.png", "style_01.png", "overview.png"):
        with Image.open(out_a / name) as im:
            assert im.size[0] > 100
    args = parser.parse_args(["evaluate", "--compare", str(out_a), str(out_b / "scores.json")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "B - A" in printed and "hist" in printed
    a_hist = data["overall"]["hist"]
    b_hist = json.loads((out_b / "scores.json").read_text())["overall"]["hist"]
    assert f"{b_hist - a_hist:+.4f}" in printed
