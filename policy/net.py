"""The policy network in torch, as a flat parameter vector, and its numpy export.

One shared MLP scores every device slot (features from decolla.allocators.learned.SlotFeatures);
parameters are flat so a whole ES population is a [P, D] tensor and is
evaluated at once with batched matmuls.
"""
from __future__ import annotations

import numpy as np
import torch

from decolla.allocators.learned import FEATURE_VERSION, N_FEATURES

NAMES = ("w0", "b0", "w1", "b1", "w2", "b2")


def shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the slot scorer."""
    return {"w0": (N_FEATURES, hidden), "b0": (hidden,), "w1": (hidden, hidden), "b1": (hidden,),
            "w2": (hidden, 1), "b2": (1,)}


def n_params(hidden: int) -> int:
    return sum(int(np.prod(s)) for s in shapes(hidden).values())


def init_params(hidden: int, seed: int) -> torch.Tensor:
    """Flat initial parameters (scaled normal weights, zero biases)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for name, shp in shapes(hidden).items():
        if name.startswith("w"):
            parts.append(torch.randn(shp, generator=g) / np.sqrt(shp[0]))
        else:
            parts.append(torch.zeros(shp))
    return torch.cat([p.reshape(-1) for p in parts])


def unflatten(theta: torch.Tensor, hidden: int) -> dict[str, torch.Tensor]:
    """[P, D] flat parameters -> dict of [P, *shape] tensors (views)."""
    out, i = {}, 0
    for name, shp in shapes(hidden).items():
        n = int(np.prod(shp))
        out[name] = theta[:, i:i + n].reshape((theta.shape[0],) + shp)
        i += n
    return out


def scores(theta: torch.Tensor, feats: torch.Tensor, hidden: int) -> torch.Tensor:
    """Slot scores [P, N, M] for features [P, N, M, F] under each member's parameters [P, D]."""
    p = unflatten(theta, hidden)
    P, N, M, F = feats.shape
    x = feats.reshape(P, N * M, F)
    h = torch.tanh(torch.baddbmm(p["b0"][:, None, :], x, p["w0"]))
    h = torch.tanh(torch.baddbmm(p["b1"][:, None, :], h, p["w1"]))
    s = torch.baddbmm(p["b2"][:, None, :], h, p["w2"])
    return s.reshape(P, N, M)


def export_npz(theta: torch.Tensor, hidden: int, m_c: int, path, **meta) -> None:
    """Write the policy for decolla.allocators.LearnedAllocator."""
    p = unflatten(theta.detach().reshape(1, -1).double(), hidden)
    arrays = {k: v[0].cpu().numpy() for k, v in p.items()}
    np.savez(path, m_c=np.int64(m_c), feature_version=np.int64(FEATURE_VERSION),
             hidden=np.int64(hidden), **arrays,
             **{f"meta_{k}": np.asarray(v) for k, v in meta.items()})


def load_npz(path) -> tuple[torch.Tensor, int, int]:
    """Flat parameters, hidden size and M_c of an exported policy."""
    with np.load(path) as z:
        hidden = int(z["hidden"])
        theta = torch.cat([torch.from_numpy(z[k]).float().reshape(-1) for k in NAMES])
        return theta, hidden, int(z["m_c"])
