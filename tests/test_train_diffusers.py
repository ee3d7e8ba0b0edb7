"""A LoRA trained here loads in diffusers (PyTorch) and gives the same outputs as here."""
import numpy as np
import pytest
import torch

import jdiffusion_lora  # noqa: F401  (configures Jittor first)
from jdiffusion_lora._runtime import jt
from jdiffusion_lora.train.trainer import Trainer

from helpers import max_abs_diff
from sd_fixtures import build_diffusers_pipeline
from test_lora_diffusers import transformers_peft_allowed
from train_fixtures import config

TOL = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_trained_lora_loads_in_diffusers_with_the_same_output(tmp_path, fmt):
    model = tmp_path / "model"
    ref = build_diffusers_pipeline(str(model), prediction_type="v_prediction")
    # diffusers 0.42 cannot load a kohya file whose text-encoder LoRA lacks out_proj (its converter
    # then fails to recognise the keys it produced), so the kohya case adds out_proj.
    text_targets = ["q_proj", "k_proj", "v_proj"] + (["out_proj"] if fmt == "kohya" else [])
    c = config(tmp_path, base_model=str(model), max_train_steps=4, learning_rate=3e-2, rank=2,
               unet_targets=["to_q", "to_k", "to_v", "to_out.0"], text_encoder_targets=text_targets,
               save_formats=[fmt], lora_alpha=3.0)
    trainer = Trainer(c, printer=lambda s: None)
    result = trainer.run()
    assert trainer.prediction_type == "v_prediction"
    lora_file = result.lora_files[0]
    with transformers_peft_allowed():
        ref.load_lora_weights(lora_file)
    ours = trainer.pipe
    ours.unet.eval()
    ours.text_encoder.eval()

    ids = ours.tokenizer(["style_00,purple,lineart,a cat"], padding="max_length", max_length=77)["input_ids"]
    with torch.no_grad():
        ctx_ref = ref.text_encoder(torch.from_numpy(ids))[0].numpy()
    with jt.no_grad():
        ctx = ours.text_encoder(jt.array(ids)).last_hidden_state.numpy()
    assert max_abs_diff(ctx, ctx_ref) <= TOL

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 16, 16), dtype=np.float32)
    for t in (10, 500, 990):
        with torch.no_grad():
            out_ref = ref.unet(torch.from_numpy(x), t, torch.from_numpy(ctx_ref)).sample.numpy()
        with jt.no_grad():
            out = ours.unet(jt.array(x), t, jt.array(ctx_ref)).sample.numpy()
        assert max_abs_diff(out, out_ref) <= TOL, t

    # the LoRA really changed the model (the comparison above is not of two untouched models)
    with torch.no_grad():
        ref.unet.disable_adapters()
        base = ref.unet(torch.from_numpy(x), 500, torch.from_numpy(ctx_ref)).sample.numpy()
        ref.unet.enable_adapters()
    with jt.no_grad():
        out = ours.unet(jt.array(x), 500, jt.array(ctx_ref)).sample.numpy()
    assert max_abs_diff(out, base) > 100 * TOL
