"""DINOv2 (models/dinov2.py) against transformers' Dinov2Model on tiny random-weight configs."""
import numpy as np
import pytest

from helpers import max_abs_diff

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# DINOv2 (a scoring network) compiles kernels no default test needs (cold-cache time): slow set, which CI runs.
pytestmark = pytest.mark.slow


def tiny_reference(swiglu=False):
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                       image_size=28, patch_size=7, layerscale_value=0.5, use_swiglu_ffn=swiglu)
    model = transformers.Dinov2Model(config).eval()
    with torch.no_grad():   # make every parameter matter (layer scales, norms, biases are constant at init)
        for name, p in model.named_parameters():
            if "mask_token" not in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov2_matches_transformers(tmp_path, rng, swiglu):
    from jdiffusion_lora._runtime import jt
    from jdiffusion_lora.metrics.nets.dinov2 import Dinov2Model

    ref = tiny_reference(swiglu)
    ref.save_pretrained(tmp_path)
    ours = Dinov2Model.from_pretrained(str(tmp_path))
    # 28: the learned 4 x 4 grid; 42: bicubic up to 6 x 6; 21 x 35: non-square 3 x 5; 14: down to 2 x 2
    for h, w in [(28, 28), (42, 42), (21, 35), (14, 14)]:
        x = rng.normal(size=(2, 3, h, w)).astype(np.float32)
        with torch.no_grad():
            out = ref(pixel_values=torch.tensor(x))
        got = ours(jt.array(x))
        assert max_abs_diff(got.last_hidden_state.numpy(), out.last_hidden_state.numpy()) <= 1e-4, (h, w)
        assert max_abs_diff(got.pooler_output.numpy(), out.pooler_output.numpy()) <= 1e-4, (h, w)


def test_dinov2_loads_transformers5_in_memory_names(tmp_path, rng):
    """save_pretrained writes the published names (attention.attention.query, mlp.weights_in); a raw
    transformers-5 state dict (attention.q_proj, mlp.gate_proj / mlp.up_proj) loads as well."""
    from jdiffusion_lora._runtime import jt
    from jdiffusion_lora.metrics.nets.dinov2 import Dinov2Model
    from jdiffusion_lora.weights import save_safetensors

    ref = tiny_reference(swiglu=True)
    ref.config.save_pretrained(tmp_path)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert any(".attention.q_proj." in k for k in state) and any(".mlp.gate_proj." in k for k in state)
    save_safetensors(state, str(tmp_path / "model.safetensors"))
    ours = Dinov2Model.from_pretrained(str(tmp_path))
    x = rng.normal(size=(1, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        expected = ref(pixel_values=torch.tensor(x)).pooler_output.numpy()
    assert max_abs_diff(ours(jt.array(x)).pooler_output.numpy(), expected) <= 1e-4
