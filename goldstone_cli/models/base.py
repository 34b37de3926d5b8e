"""The interface every dynamic model implements (paper Eq. 1):

    L(Z) = sum_t l(X_t; Z_t) + psi(Z)

A model owns its parameters (tensors of shape ``(T, N_k, d)``), declares which of them rotate
together (its *symmetric groups*, DESIGN.md §2) and the coupling graph over time steps that
defines psi. The training loop and Goldstone-GD need nothing else.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from goldstone_cli.optim.coupling import Coupling


class DynamicModel(nn.Module):
    coupling: Coupling
    #: metric (from :meth:`evaluate`) that ``trainer.target`` refers to, and whether lower is better
    target_metric: Optional[str] = None
    target_lower_is_better: bool = True
    #: metric used to keep the best checkpoint (``None``: keep only the last one)
    best_metric: Optional[str] = None
    best_lower_is_better: bool = False
    #: (metric, label) pairs of the headline numbers: printed at the end of a run, drawn in loss.png
    headline_metrics: tuple[tuple[str, str], ...] = ()

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .double() / .half() would move or cast the parameters but not the data,
        # index arrays and pooled buffers a model keeps outside them (the next step would fail or mix
        # devices): a model is built on its device and dtype instead
        raise TypeError(f"{type(self).__name__} cannot be moved or cast after it is made (.to(), .cuda(), .double(), "
                        "...): its data are not parameters; make it with device= and dtype= (goldstone train: "
                        "trainer.device=cuda trainer.dtype=float64)")

    def symmetric_groups(self) -> list[list[nn.Parameter]]:
        """Lists of parameters that rotate together, each of shape (T, N_k, d)."""
        raise NotImplementedError

    def local_loss(self, generator: Optional[torch.Generator] = None) -> Tensor:
        """sum_t l(X_t; Z_t): invariant under per-time-step rotations of every group.
        A model with minibatches draws them from ``generator`` (the trainer checkpoints its state)."""
        raise NotImplementedError

    def psi(self) -> Tensor:
        """The coupling term (Eq. 3), summed over the symmetric groups."""
        total = None
        for group in self.symmetric_groups():
            p = self.coupling.psi(group)
            total = p if total is None else total + p
        if total is None:  # no symmetric groups: no coupling
            p = next(self.parameters(), None)
            return torch.zeros((), dtype=p.dtype if p is not None else torch.get_default_dtype(),
                               device=p.device if p is not None else None)
        return total

    def loss_terms(self, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        local = self.local_loss(generator)
        psi = self.psi()
        return {"total": local + psi, "local": local, "psi": psi}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Model-specific metrics (suboptimality, held-out likelihood, ...), logged at ``eval_every``."""
        return {}

    def metric_names(self) -> list[str]:
        """Column names of :meth:`evaluate`, fixed for the whole run (the metrics.csv header)."""
        return []

    # ---- row sharding (trainer.distributed, goldstone_cli.distributed) --------------------------
    def sharded_params(self) -> dict[str, int]:
        """``{parameter name: global row count}`` of the (T, N, d) parameters of which this process
        holds only its block of rows along dim 1 (``RowShard.rows``); empty: nothing is sharded.
        Checkpoints store these as DTensors with placement ``Shard(1)``."""
        return {}

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Group tensors that every rank holds in full (GoldstoneGD counts their rows once)."""
        return []

    def reduce_gradients(self) -> None:
        """Called by the trainer after ``backward()``: all-reduce the gradients of replicated
        parameters (none by default; the sharded models here shard every parameter)."""

    def snapshot(self) -> Optional[dict[str, Tensor]]:
        """Small copies of the embeddings for trajectory plots (Fig. 2); ``None`` for large models."""
        return None
