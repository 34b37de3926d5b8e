"""Dynamic models and the registry that builds them from a config."""

from __future__ import annotations

from typing import Callable

import torch
from omegaconf import DictConfig

from goldstone_cli.models.base import DynamicModel

_BUILDERS: dict[str, Callable[..., DynamicModel]] = {}


def register(name: str):
    """Decorator: register ``builder(cfg, device, dtype) -> DynamicModel`` under ``model.name``."""

    def deco(fn):
        _BUILDERS[name] = fn
        return fn

    return deco


@register("dense_mf")
def _build_dense_mf(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> DynamicModel:
    from goldstone_cli.data.synthetic import make_synthetic
    from goldstone_cli.models.dense_mf import DenseDynamicMF

    if cfg.data.name != "synthetic":
        raise ValueError(f"model=dense_mf needs data=synthetic, got data={cfg.data.name}")
    d = cfg.data
    data = make_synthetic(d.n_rows, d.n_cols, d.rank, d.noise_var, d.T, d.time_dependent, d.drift, d.seed)
    m = cfg.model
    return DenseDynamicMF(data, d=m.d, coupling=m.coupling, init_scale=m.init_scale, seed=cfg.seed,
                          dtype=dtype, device=device)


def build_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> DynamicModel:
    name = cfg.model.name
    if name not in _BUILDERS:
        raise ValueError(f"unknown model '{name}'; registered: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name](cfg, device, dtype)


__all__ = ["DynamicModel", "build_model", "register"]
