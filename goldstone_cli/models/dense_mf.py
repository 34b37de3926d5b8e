"""Model 1: dense dynamic Gaussian matrix factorization (paper Eqs. 4-7, DESIGN.md §4.1).

    l(X_t; Z_t) = 1/2 ||X_t - U_t V_t^T||_F^2        (Eq. 5 up to the constant of -log N)
    psi(Z) = lambda/2 sum_t sum_i ||z_t+1,i - z_t,i||^2   over all rows of U and V (Eq. 6)

Rows of ``U`` (T, n_rows, d) and ``V`` (T, n_cols, d) are embedding vectors; ``Z_t = (U_t, V_t)``
rotates as one group. For time-independent data the optimum is known: every Z_t equal to a best
rank-d factorization, ``L* = T/2 sum_{k>d} s_k(X)^2``; :meth:`evaluate` reports ``L - L*``.

Row sharding (``shard``, trainer.distributed): each rank holds its block of the rows of U, of V and
of X; the loss of its X rows needs all of V, gathered every step (``RowShard.gather_rows``, whose
backward reduce-scatters V's gradient). ``local_loss`` and ``psi`` are this rank's share.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from goldstone_cli.data.synthetic import SyntheticData
from goldstone_cli.distributed.shard import RowShard
from goldstone_cli.models.base import DynamicModel
from goldstone_cli.numerics import sum_squares
from goldstone_cli.optim.coupling import Coupling


def optimal_loss(X: Tensor, d: int) -> float:
    """``L*`` for the same X at every time step: T times half the rank-d truncated SVD residual."""
    s = torch.linalg.svdvals(X[0].to(torch.float64))
    return float(X.shape[0] * 0.5 * (s[d:] ** 2).sum())


class DenseDynamicMF(DynamicModel):
    target_metric = "suboptimality"
    target_lower_is_better = True
    headline_metrics = (("suboptimality", "L - L*"),)

    def __init__(self, data: SyntheticData, d: int = 3, coupling: float = 10.0, init_scale: float = 0.1,
                 seed: int = 0, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
                 shard: Optional[RowShard] = None):
        super().__init__()
        T, n_rows, n_cols = data.X.shape
        self.shard = shard if shard is not None else RowShard.single()
        self.n_rows, self.n_cols = n_rows, n_cols
        g = torch.Generator().manual_seed(seed)
        # initialized in float64 on the CPU, then cast: the same seed gives the same start everywhere;
        # a rank keeps its rows of the global draw, so the start does not depend on the rank count
        U = init_scale * torch.randn(T, n_rows, d, generator=g, dtype=torch.float64)
        V = init_scale * torch.randn(T, n_cols, d, generator=g, dtype=torch.float64)
        # contiguous: a copy of the block, so the full tensors are freed (one process: no copy)
        self.U = nn.Parameter(self.shard.take(U).to(device, dtype).contiguous())  # (T, rows of this rank, d)
        self.V = nn.Parameter(self.shard.take(V).to(device, dtype).contiguous())  # (T, columns of this rank, d)
        self.X = self.shard.take(data.X).to(device, dtype).contiguous()  # (T, rows of this rank, n_cols)
        self.coupling = Coupling.chain(T, coupling)  # Eq. 7
        self.L_star: Optional[float] = None if data.time_dependent else optimal_loss(data.X, d)

    def symmetric_groups(self) -> list[list[nn.Parameter]]:
        return [[self.U, self.V]]

    def balance_sides(self) -> list[list[int]]:
        """GoldstoneGD(balance=...): the local loss sees U, V only through U_t V_t^T (Eq. 5), so it is
        invariant under U_t -> U_t A_t, V_t -> V_t A_t^{-T} for any invertible A_t."""
        return [[1, -1]]

    def sharded_params(self) -> dict[str, int]:
        return {"U": self.n_rows, "V": self.n_cols} if self.shard.distributed else {}

    def local_loss(self, generator: Optional[torch.Generator] = None) -> Tensor:
        V = self.shard.gather_rows(self.V, self.n_cols)  # (T, n_cols, d); self.V itself on one process
        residual = self.X - torch.bmm(self.U, V.transpose(1, 2))  # (T, n_rows, n_cols)
        return (0.5 * sum_squares(residual)).to(residual.dtype)  # accumulated in float64

    def metric_names(self) -> list[str]:
        return ["suboptimality"] if self.L_star is not None else []

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.L_star is None:
            return {}
        total = self.loss_terms()["total"].to(torch.float64).reshape(1)
        total = float(self.shard.all_reduce_sum_(total))  # every rank's share summed
        return {"suboptimality": total - self.L_star}

    def snapshot(self) -> dict[str, Tensor]:
        U = self.shard.all_gather_rows(self.U.detach(), self.n_rows)
        V = self.shard.all_gather_rows(self.V.detach(), self.n_cols)
        return {"U": U.cpu().clone(), "V": V.cpu().clone()}
