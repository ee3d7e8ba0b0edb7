"""CLIP image tower and two-tower CLIP (models/clip_vision.py) against transformers on tiny random configs."""
import numpy as np
import pytest

from helpers import max_abs_diff

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# The scorer's CLIP towers compile kernels no default test needs (cold-cache time): slow set, which CI runs.
pytestmark = pytest.mark.slow

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=7, projection_dim=16)
TEXT = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
            max_position_embeddings=16, projection_dim=16, bos_token_id=97, eos_token_id=98, pad_token_id=0)


def perturbed(model):
    torch.manual_seed(1)
    with torch.no_grad():   # layer norms start at 1/0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vision_models_match_transformers(tmp_path, rng, act):
    from jdiffusion_lora._runtime import jt
    from jdiffusion_lora.metrics.nets.clip_vision import CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_act=act, **VISION)
    x = rng.normal(size=(2, 3, 28, 28)).astype(np.float32)
    for ref_cls, our_cls in [(transformers.CLIPVisionModel, CLIPVisionModel),
                             (transformers.CLIPVisionModelWithProjection, CLIPVisionModelWithProjection)]:
        ref = perturbed(ref_cls(config))
        folder = tmp_path / ref_cls.__name__
        ref.save_pretrained(folder)
        ours = our_cls.from_pretrained(str(folder))
        with torch.no_grad():
            out = ref(pixel_values=torch.tensor(x))
        got = ours(jt.array(x))
        assert max_abs_diff(got.last_hidden_state.numpy(), out.last_hidden_state.numpy()) <= 1e-4
        if our_cls is CLIPVisionModel:
            assert max_abs_diff(got.pooler_output.numpy(), out.pooler_output.numpy()) <= 1e-4
        else:
            assert max_abs_diff(got.image_embeds.numpy(), out.image_embeds.numpy()) <= 1e-4


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    from jdiffusion_lora.metrics.nets.clip_vision import CLIPModel
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    ref = perturbed(transformers.CLIPModel(config))
    folder = tmp_path_factory.mktemp("clip")
    ref.save_pretrained(folder)
    return ref, CLIPModel.from_pretrained(str(folder)), folder


def test_clip_model_features_match_transformers(clip_pair, rng):
    from jdiffusion_lora._runtime import jt
    ref, ours, _ = clip_pair
    x = rng.normal(size=(3, 3, 28, 28)).astype(np.float32)
    ids = np.array([[97, 5, 6, 7, 98, 0, 0], [97, 10, 98, 0, 0, 0, 0], [97, 3, 4, 5, 6, 7, 98]], np.int64)
    with torch.no_grad():
        img = ref.get_image_features(pixel_values=torch.tensor(x))
        txt = ref.get_text_features(input_ids=torch.tensor(ids))
    img = getattr(img, "pooler_output", img).numpy()
    txt = getattr(txt, "pooler_output", txt).numpy()
    assert max_abs_diff(ours.get_image_features(jt.array(x)).numpy(), img) <= 1e-4
    assert max_abs_diff(ours.get_text_features(ids).numpy(), txt) <= 1e-4
    assert float(ours.logit_scale.numpy().reshape(-1)[0]) == pytest.approx(float(ref.logit_scale.detach()), abs=1e-6)
    assert all(k.startswith(("text_model.", "vision_model.", "text_projection", "visual_projection", "logit_scale"))
               for k in ours.state_dict())


def test_vision_model_loads_from_full_clip_folder(clip_pair, rng):
    from jdiffusion_lora._runtime import jt
    from jdiffusion_lora.metrics.nets.clip_vision import CLIPVisionModelWithProjection
    ref, _, folder = clip_pair
    ours = CLIPVisionModelWithProjection.from_pretrained(str(folder))
    x = rng.normal(size=(1, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        img = ref.get_image_features(pixel_values=torch.tensor(x))
    img = getattr(img, "pooler_output", img).numpy()
    assert max_abs_diff(ours(jt.array(x)).image_embeds.numpy(), img) <= 1e-4
