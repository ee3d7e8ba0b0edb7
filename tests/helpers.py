"""Small assertions shared by the parity tests."""
import numpy as np


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
