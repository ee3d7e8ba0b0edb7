"""CLIP-IQA: OpenAI CLIP ResNet in Jittor against a PyTorch reference, TorchScript and state-dict loading."""
import copy
import warnings

import numpy as np
import pytest

from clip_fixtures import write_tokenizer_folder
from helpers import max_abs_diff

torch = pytest.importorskip("torch")

# CLIP-IQA's ResNet compiles kernels no default test needs (cold-cache time): slow set, which CI runs.
pytestmark = pytest.mark.slow

CONFIG = dict(embed_dim=32, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=8, context_length=16,
              transformer_width=64, transformer_heads=1, transformer_layers=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from metrics_torch_refs import TorchOpenAICLIPResNet, randomize_batchnorm
    from jdiffusion_lora.models.clip_tokenizer import CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip_iqa")
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_folder(str(folder / "tokenizer")))
    torch.manual_seed(0)
    ref = TorchOpenAICLIPResNet(vocab_size=len(tokenizer), **CONFIG)
    randomize_batchnorm(ref, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    # OpenAI ships a TorchScript archive (fp16 weights); open_clip a plain state dict
    ref.half().float()                      # weights exactly representable in fp16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # tracer chatter
        scripted = torch.jit.trace(copy.deepcopy(ref), (torch.zeros(1, 3, 64, 64), torch.zeros(2, 16, dtype=torch.long)))
    scripted.half().save(str(folder / "RN50.pt"))
    torch.save(ref.state_dict(), str(folder / "plain_state.pt"))
    return ref, tokenizer, folder


@pytest.mark.parametrize("source", ["RN50.pt", "plain_state.pt"])
def test_openai_resnet_matches_torch(setup, rng, source):
    from jdiffusion_lora._runtime import jt
    from jdiffusion_lora.metrics.nets.clip_iqa import OpenAICLIPResNet, find_rn50_weights, openai_token_ids

    ref, tokenizer, folder = setup
    if source == "RN50.pt":
        assert find_rn50_weights(str(folder)) == str(folder / "RN50.pt")
    ours = OpenAICLIPResNet.from_file(str(folder / source))
    # the CLIP-IQA setting: any resolution (here 96 x 64, not the 64 x 64 of the positional table)
    x = rng.normal(size=(2, 3, 96, 64)).astype(np.float32)
    ids = openai_token_ids(tokenizer, ["Good photo.", "Bad photo.", "a photo of the dog"], 16)
    assert ids[0, 0] == tokenizer.bos_token_id and ids[0].argmax() > 1 and ids[0, -1] == 0
    with torch.no_grad():
        img = ref.encode_image(torch.tensor(x)).numpy()
        txt = ref.encode_text(torch.tensor(ids)).numpy()
    assert max_abs_diff(ours.encode_image(jt.array(x)).numpy(), img) <= 1e-4 * max(1, np.abs(img).max())
    assert max_abs_diff(ours.encode_text(ids).numpy(), txt) <= 1e-4 * max(1, np.abs(txt).max())


def test_clip_iqa_probability_matches_piq_formula(setup, rng):
    from jdiffusion_lora._runtime import jt
    from jdiffusion_lora.metrics.nets.clip_iqa import CLIPIQA, OpenAICLIPResNet, openai_token_ids

    ref, tokenizer, folder = setup
    iqa = CLIPIQA(OpenAICLIPResNet.from_file(str(folder / "plain_state.pt")), tokenizer)
    x = rng.normal(size=(3, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():   # piq.CLIPIQA.forward after normalisation
        anchors = ref.encode_text(torch.tensor(openai_token_ids(tokenizer, ["Good photo.", "Bad photo."], 16)))
        anchors = anchors / anchors.norm(dim=-1, keepdim=True)
        feats = ref.encode_image(torch.tensor(x))
        feats = feats / feats.norm(dim=-1, keepdim=True)
        expected = (ref.logit_scale.exp() * feats @ anchors.t()).softmax(dim=-1)[:, 0].numpy()
    got = iqa(jt.array(x))
    assert got.shape == (3,)
    assert max_abs_diff(got, expected) <= 1e-5
