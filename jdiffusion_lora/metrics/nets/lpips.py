"""LPIPS (Zhang et al. 2018, v0.1) with the SqueezeNet-1.1 backbone, in Jittor (the "lpips" sub-score).

    lpips(x0, x1) = sum over 7 layers l of mean_hw( w_l . (f0_l - f1_l)^2 )

where f_l are the backbone activations scaled to unit length over channels and w_l >= 0 are
the learned per-channel weights (a 1x1 convolution without bias). Inputs are RGB in [-1, 1];
the competition resizes both images to 256 x 256 and averages over all generated x reference
pairs of a style.

Weights, as distributed:
- backbone: torchvision's `squeezenet1_1-b8a52dc0.pth` (keys `features.0.weight`, `features.3.squeeze.weight`, ...);
- linear heads: the lpips package's `weights/v0.1/squeeze.pth` (keys `lin0.model.1.weight` ... `lin6`);
- or one state dict of the whole lpips.LPIPS module (`net.slice1.0.weight`, ..., `lin0.model.1.weight`).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..._runtime import jt
from ...weights import WeightsError, load_weights
from .nn_utils import max_pool

nn = jt.nn

SQUEEZENET_WEIGHTS_NAME = "squeezenet1_1-b8a52dc0.pth"
LPIPS_HEADS_NAME = "squeeze.pth"
# lpips.pretrained_networks.squeezenet: the 7 slices end after these features indices.
SLICE_ENDS = (2, 5, 8, 10, 11, 12, 13)
CHANNELS = (64, 128, 256, 384, 384, 512, 512)
# lpips.ScalingLayer: ImageNet-style normalisation of [-1, 1] inputs.
SHIFT = np.array([-0.030, -0.088, -0.188], dtype=np.float32)
SCALE = np.array([0.458, 0.448, 0.450], dtype=np.float32)


class Fire(nn.Module):
    """SqueezeNet fire module: 1x1 squeeze -> [1x1 expand, 3x3 expand] concatenated, all ReLU."""

    def __init__(self, cin: int, squeeze: int, expand1x1: int, expand3x3: int):
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)

    def execute(self, x):
        x = nn.relu(self.squeeze(x))
        return jt.concat([nn.relu(self.expand1x1(x)), nn.relu(self.expand3x3(x))], dim=1)


class ReLU(nn.Module):
    def execute(self, x):
        return nn.relu(x)


class MaxPoolCeil(nn.Module):
    """nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)."""

    def execute(self, x):
        return max_pool(x, 3, 2, ceil_mode=True)


class NetLinLayer(nn.Module):
    """lpips.NetLinLayer: dropout (inactive at eval) + 1x1 conv to one channel, no bias."""

    def __init__(self, channels: int):
        self.model = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(channels, 1, 1, bias=False))

    def execute(self, x):
        return self.model[1](x)


class LPIPSSqueeze(nn.Module):
    """LPIPS v0.1 on SqueezeNet 1.1. Parameters: `features.*` (torchvision names) and `lins.N.model.1.weight`."""

    def __init__(self):
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2), ReLU(), MaxPoolCeil(),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), MaxPoolCeil(),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), MaxPoolCeil(),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
        )
        self.lins = nn.ModuleList([NetLinLayer(c) for c in CHANNELS])

    def layer_features(self, images) -> List:
        """images (B, 3, H, W) in [-1, 1] -> 7 channel-normalised activations (B, C_l, H_l, W_l)."""
        x = (images.float32() - jt.array(SHIFT).reshape(1, 3, 1, 1)) / jt.array(SCALE).reshape(1, 3, 1, 1)
        feats, start = [], 0
        for end in SLICE_ENDS:
            for i in range(start, end):
                x = self.features[i](x)
            start = end
            norm = jt.sqrt((x * x).sum(dim=1, keepdims=True))
            feats.append(x / (norm + 1e-10))
        return feats

    def distance_from_features(self, feats0: Sequence, feats1: Sequence):
        """LPIPS between (B, ...) feature lists (or broadcastable ones) -> (B,)."""
        total = 0
        for lin, f0, f1 in zip(self.lins, feats0, feats1):
            total = total + lin((f0 - f1) ** 2).mean(dims=(1, 2, 3))
        return total

    def execute(self, in0, in1):
        """lpips.LPIPS(net="squeeze")(in0, in1) for inputs in [-1, 1] -> (B,)."""
        return self.distance_from_features(self.layer_features(in0), self.layer_features(in1))

    # ------------------------------------------------------------------ weights

    @staticmethod
    def convert_state_dict(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """torchvision / lpips names -> ours; drops the ImageNet classifier and lpips' scaling constants."""
        out = {}
        for key, value in state.items():
            if key.startswith(("classifier.", "scaling_layer.")):
                continue
            if key.startswith("net.slice"):                     # whole LPIPS module: net.slice2.3.squeeze.weight
                key = "features." + key.split(".", 2)[2]
            elif key.startswith("lin") and key[3].isdigit():     # lin0.model.1.weight
                key = "lins." + key[3:]
            out[key] = value
        return out

    def load_numpy_state_dict(self, state: Dict[str, np.ndarray], source: str = "state dict") -> None:
        state = self.convert_state_dict(state)
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        bad = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
        if missing or unexpected or bad:
            raise WeightsError(f"{source}: not SqueezeNet-1.1 LPIPS weights ({len(missing)} missing e.g. {missing[:3]}, "
                               f"{len(unexpected)} unexpected e.g. {unexpected[:3]}, shape mismatch {bad[:3]})")
        for k, var in own.items():
            var.assign(jt.array(np.asarray(state[k], dtype=np.float32)))

    @classmethod
    def from_files(cls, *paths: str) -> "LPIPSSqueeze":
        """Load from the backbone + heads files, or from one file holding both."""
        state: Dict[str, np.ndarray] = {}
        for p in paths:
            state.update(load_weights(p))
        model = cls()
        model.load_numpy_state_dict(state, source=" + ".join(paths))
        model.eval()
        return model


def find_lpips_weights(folder: Optional[str]) -> Optional[Tuple[str, ...]]:
    """(backbone, heads) files in `folder` or `folder/lpips/`, or (single full-LPIPS file,), or None.

    Looked for: `squeezenet1_1-b8a52dc0.pth` (or any `squeezenet1_1*`) and `squeeze.pth`
    (also under `weights/v0.1/` as in the lpips package), or `lpips_squeeze.pth`/`.safetensors`.
    """
    if not folder or not os.path.isdir(folder):
        return None
    dirs = [folder, os.path.join(folder, "lpips"), os.path.join(folder, "lpips", "weights", "v0.1"),
            os.path.join(folder, "weights", "v0.1")]
    dirs = [d for d in dirs if os.path.isdir(d)]
    for d in dirs:
        for name in ("lpips_squeeze.pth", "lpips_squeeze.safetensors"):
            if os.path.isfile(os.path.join(d, name)):
                return (os.path.join(d, name),)
    backbone = heads = None
    for d in dirs:
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if backbone is None and name.startswith("squeezenet1_1") and os.path.isfile(path):
                backbone = path
            if heads is None and name in (LPIPS_HEADS_NAME, "squeeze.safetensors") and os.path.isfile(path):
                heads = path
    return (backbone, heads) if backbone and heads else None
