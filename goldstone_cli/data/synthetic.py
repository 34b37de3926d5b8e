"""The paper's Sec. 5.1 artificial data: ``X = Ub^T Vb + noise``.

``Ub, Vb`` (rank x n) have standard normal entries, the noise has variance ``noise_var``. With
``time_dependent=False`` (the paper) every time step sees the same X, so the optimum of the dense
dynamic MF is known in closed form. With ``time_dependent=True`` the true item factors rotate by
``drift`` radians per step in a random plane of the factor space, ``X_t = Ub^T R_t Vb + noise_t``
(rotating both factors together would leave X unchanged), as real users' tastes drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SyntheticData:
    X: Tensor  # (T, n_rows, n_cols) float64
    time_dependent: bool

    @property
    def T(self) -> int:
        return self.X.shape[0]


def make_synthetic(n_rows: int = 10, n_cols: int = 10, rank: int = 3, noise_var: float = 1e-3,
                   T: int = 30, time_dependent: bool = False, drift: float = 0.05, seed: int = 0) -> SyntheticData:
    g = torch.Generator().manual_seed(seed)
    Ub = torch.randn(rank, n_rows, generator=g, dtype=torch.float64)  # (rank, n_rows)
    Vb = torch.randn(rank, n_cols, generator=g, dtype=torch.float64)  # (rank, n_cols)
    std = math.sqrt(noise_var)
    if not time_dependent:
        X = Ub.T @ Vb + std * torch.randn(n_rows, n_cols, generator=g, dtype=torch.float64)
        return SyntheticData(X.expand(T, n_rows, n_cols).clone(), False)
    # a random plane (orthonormal a, b) in factor space; R_t rotates it by t * drift
    if rank < 2:
        raise ValueError("time-dependent synthetic data need rank >= 2 (a rotation needs a plane)")
    q, _ = torch.linalg.qr(torch.randn(rank, 2, generator=g, dtype=torch.float64))
    a, b = q[:, 0], q[:, 1]
    theta = drift * torch.arange(T, dtype=torch.float64)  # (T,)
    P = torch.outer(a, a) + torch.outer(b, b)
    J = torch.outer(b, a) - torch.outer(a, b)
    eye = torch.eye(rank, dtype=torch.float64)
    R = eye + (torch.cos(theta) - 1)[:, None, None] * P + torch.sin(theta)[:, None, None] * J  # (T, rank, rank)
    X = Ub.T @ (R @ Vb)  # (T, n_rows, n_cols)
    X = X + std * torch.randn(T, n_rows, n_cols, generator=g, dtype=torch.float64)
    return SyntheticData(X, True)
