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


@register("movielens")
def _build_movielens(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> DynamicModel:
    from goldstone_cli.data.movielens import load_movielens
    from goldstone_cli.models.movielens import SparseDynamicBernoulliMF

    if cfg.data.name != "movielens":
        raise ValueError(f"model=movielens needs data=movielens, got data={cfg.data.name}")
    d = cfg.data
    data = load_movielens(d.path, T=d.T, seed=d.seed, split_fractions=tuple(d.split), cache_dir=d.cache_dir,
                          use_cache=d.use_cache, progress=bool(cfg.trainer.progress),
                          time_range=None if d.get("time_range") is None else list(d.time_range))
    m = cfg.model
    return SparseDynamicBernoulliMF(data, d=m.d, coupling=m.coupling, gamma=m.gamma, init_scale=m.init_scale,
                                    batch_size=m.batch_size, chunk_size=m.chunk_size, seed=cfg.seed,
                                    dtype=dtype, device=device)


@register("dwe")
def _build_dwe(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> DynamicModel:
    from goldstone_cli.models.dwe import DynamicWordEmbeddings, load_word_counts

    if cfg.data.name not in ("sotu", "cooc"):
        raise ValueError(f"model=dwe needs a co-occurrence corpus (data=sotu or data=cooc), got data={cfg.data.name}")
    wc = load_word_counts(cfg.data, progress=bool(cfg.trainer.progress))
    m = cfg.model
    return DynamicWordEmbeddings(
        wc, d=m.d, inference=m.inference, D=m.D, sigma0=m.sigma0, neg_ratio=m.neg_ratio, neg_exponent=m.neg_exponent,
        coupled=m.coupled, batch_words=m.batch_words, batch_contexts=m.batch_contexts, init_mean_std=m.init_mean_std,
        init_std=m.init_std, test_steps=m.test_steps, test_mass=m.test_mass, split_seed=m.split_seed,
        eval_chunk=m.eval_chunk, seed=cfg.seed, dtype=dtype, device=device)


def build_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> DynamicModel:
    name = cfg.model.name
    if name not in _BUILDERS:
        raise ValueError(f"unknown model '{name}'; registered: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name](cfg, device, dtype)


__all__ = ["DynamicModel", "build_model", "register"]
