"""Small assertions shared by the parity tests."""
import numpy as np
import pytest


def default_set(keep, ids, cases):
    """Parametrize `cases` (named by `ids`): those named in `keep` run in the default set, the others in the slow
    set (`-m slow`, which CI runs too). Each case compiles Jittor kernels of its own: seconds each on a cold cache."""
    return [pytest.param(*(c if isinstance(c, tuple) else (c,)), id=i, marks=() if i in keep else pytest.mark.slow)
            for i, c in zip(ids, cases)]


def max_abs_diff(a, b) -> float:
    """Largest absolute difference; fails first if the shapes differ."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.abs(a - b).max())


def to_numpy(x):
    """torch tensor / jittor Var / array -> numpy float array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    elif hasattr(x, "numpy"):
        x = x.numpy()
    return np.asarray(x)


def randomize(model, seed=0):
    """Replace every parameter of a torch model: matrices ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1),
    biases ~ N(0, 0.1). Library inits leave norm biases 0 and scales 1 (and some layers zero); random
    values make sure every parameter really reaches the computation. Returns the model in eval mode."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()
