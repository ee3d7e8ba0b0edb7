"""The Stable Diffusion models, diffusers / transformers layout and parameter names, one file per family:

    unet_2d_condition  UNet2DConditionModel          autoencoder_kl  AutoencoderKL (the VAE)
    clip               CLIPTextModel (text encoder)  clip_tokenizer  CLIPTokenizer
    layers             shared layers (attention, resnet blocks, activations, time embedding)
    modeling           ModelMixin: configs as dataclasses, from_pretrained / save_pretrained

The scoring networks (DINOv2, CLIP vision, ...) live in `jdiffusion_lora/metrics/nets/`.
"""
