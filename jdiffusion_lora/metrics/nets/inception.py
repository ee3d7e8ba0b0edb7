"""The FID Inception-v3 (pytorch-fid's `InceptionV3` with `use_fid_inception=True`) in Jittor.

This is the TensorFlow FID network ported by pytorch-fid: torchvision's Inception-v3 layout
(parameter names `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, ...) with
the FID-specific changes: average pools that exclude padding in the A, C and E_1 blocks, a max
pool in the last E block, and 1008 output classes (the `fc` layer is not needed here).

Weights: `pt_inception-2015-12-05-6726825d.pth`, the file pytorch-fid downloads.

Features: the image in [0, 1] is resized to 299 x 299 (bilinear), scaled to [-1, 1] and run up
to the block of the wanted size, then averaged over space:
    64: first max pool, 192: second max pool, 768: before Mixed_7a, 2048: final average pool.
The competition uses the 64-dim features.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np

from ..._runtime import jt
from ...weights import WeightsError, load_weights
from .nn_utils import BatchNorm2d, avg_pool_exclude_pad, drop_num_batches_tracked, max_pool, resize_bilinear

nn = jt.nn

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
BLOCK_INDEX_BY_DIM = {64: 0, 192: 1, 768: 2, 2048: 3}


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> relu."""

    def __init__(self, cin: int, cout: int, kernel_size, stride: int = 1, padding=0):
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = BatchNorm2d(cout, eps=0.001)

    def execute(self, x):
        return nn.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    """Mixed_5b/c/d (35 x 35). Pool branch: 3x3 average excluding padding."""

    def __init__(self, cin: int, pool_features: int):
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def execute(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_exclude_pad(x, 3, 1))
        return jt.concat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a: 35 -> 17 reduction."""

    def __init__(self, cin: int):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def execute(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jt.concat([b3, bd, max_pool(x, 3, 2)], dim=1)


class InceptionC(nn.Module):
    """Mixed_6b..e (17 x 17): factorised 7x7 convolutions."""

    def __init__(self, cin: int, channels_7x7: int):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def execute(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(avg_pool_exclude_pad(x, 3, 1))
        return jt.concat([b1, b7, bd, bp], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a: 17 -> 8 reduction."""

    def __init__(self, cin: int):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def execute(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jt.concat([b3, b7, max_pool(x, 3, 2)], dim=1)


class InceptionE(nn.Module):
    """Mixed_7b / Mixed_7c (8 x 8). FID variant: Mixed_7b pools by average excluding padding,
    Mixed_7c by 3x3 max pool (a quirk of the TensorFlow graph)."""

    def __init__(self, cin: int, pool: str):
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def execute(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jt.concat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jt.concat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)
        pooled = avg_pool_exclude_pad(x, 3, 1) if self.pool == "avg" else max_pool(x, 3, 1, padding=1)
        return jt.concat([b1, b3, bd, self.branch_pool(pooled)], dim=1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3; `features(images, dims)` gives the pooled activations."""

    def __init__(self):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")

    def blocks(self):
        """pytorch-fid's four blocks, each ending where a feature size is read."""
        return [
            [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, lambda x: max_pool(x, 3, 2)],
            [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, lambda x: max_pool(x, 3, 2)],
            [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
             self.Mixed_6d, self.Mixed_6e],
            [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c],
        ]

    def execute(self, images, dims: int = 2048, resize_input: bool = True):
        """images: (B, 3, H, W) in [0, 1] -> (B, dims) spatially averaged activations."""
        if dims not in BLOCK_INDEX_BY_DIM:
            raise ValueError(f"dims must be one of {sorted(BLOCK_INDEX_BY_DIM)}, got {dims}")
        x = images.float32()
        if resize_input:
            x = resize_bilinear(x, 299, 299)
        x = 2 * x - 1
        for block in self.blocks()[: BLOCK_INDEX_BY_DIM[dims] + 1]:
            for layer in block:
                x = layer(x)
        return x.mean(dims=(2, 3))                                          # (B, dims)

    # ------------------------------------------------------------------ weights

    def load_numpy_state_dict(self, state: Dict[str, np.ndarray], source: str = "state dict") -> None:
        state = {k: v for k, v in drop_num_batches_tracked(state).items() if not k.startswith(("fc.", "AuxLogits."))}
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        bad = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
        if missing or unexpected or bad:
            raise WeightsError(f"{source}: not an FID Inception checkpoint ({len(missing)} missing e.g. "
                               f"{missing[:3]}, {len(unexpected)} unexpected e.g. {unexpected[:3]}, "
                               f"shape mismatch {bad[:3]})")
        for k, var in own.items():
            var.assign(jt.array(np.asarray(state[k], dtype=np.float32)))

    @classmethod
    def from_file(cls, path: str) -> "FIDInceptionV3":
        """Load `pt_inception-2015-12-05-6726825d.pth` (or the same state dict as .safetensors)."""
        model = cls()
        model.load_numpy_state_dict(load_weights(path), source=path)
        model.eval()
        return model


def find_inception_weights(folder: Optional[str]) -> Optional[str]:
    """The FID Inception file in `folder` (pytorch-fid's name, or `inception/` / any `pt_inception*`)."""
    if not folder or not os.path.isdir(folder):
        return None
    for name in (FID_WEIGHTS_NAME, "pt_inception.pth", "pt_inception.safetensors"):
        for sub in ("", "inception"):
            path = os.path.join(folder, sub, name)
            if os.path.isfile(path):
                return path
    for sub in ("", "inception"):
        d = os.path.join(folder, sub)
        if os.path.isdir(d):
            for name in sorted(os.listdir(d)):
                if name.startswith("pt_inception") and name.endswith((".pth", ".pt", ".safetensors")):
                    return os.path.join(d, name)
    return None
