"""The scoring networks, one file each (all Jittor ports loading the usual weight files):

    dinov2       DINOv2 (transformers `Dinov2Model`)                    the "dino" sub-score
    clip_vision  CLIP vision tower + projection (`CLIPModel`)           "clip_r" (with models/clip.py)
    inception    the FID Inception-v3 of pytorch-fid                     "fid"
    lpips        LPIPS v0.1 on SqueezeNet-1.1                            "lpips"
    clip_iqa     CLIP-IQA on OpenAI CLIP RN50                            "clip_iqa"
    nn_utils     eval-mode batch norm, pooling, resizing they share
    torchscript  reading TorchScript weight files without torch
"""
