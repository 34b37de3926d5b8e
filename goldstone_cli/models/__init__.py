"""Dynamic models and the registry that builds them from a config."""

from __future__ import annotations

from typing import Callable

import torch
from omegaconf import DictConfig

from goldstone_cli.config import check_model_data
from goldstone_cli.models.base import DynamicModel

_BUILDERS: dict[str, Callable[..., DynamicModel]] = {}
_SHARDABLE: set[str] = set()  # builders that take ``shard=`` (row-sharded training, trainer.distributed)


def register(name: str, shardable: bool = False):
    """Decorator: register ``builder(cfg, device, dtype) -> DynamicModel`` under ``model.name``;
    ``shardable``: it also takes ``shard: RowShard`` and then builds only this rank's rows."""

    def deco(fn):
        _BUILDERS[name] = fn
        if shardable:
            _SHARDABLE.add(name)
        return fn

    return deco


@register("dense_mf", shardable=True)
def _build_dense_mf(cfg: DictConfig, device: torch.device, dtype: torch.dtype, shard=None) -> DynamicModel:
    from goldstone_cli.data.synthetic import make_synthetic
    from goldstone_cli.models.dense_mf import DenseDynamicMF

    check_model_data("dense_mf", cfg.data.name)
    d = cfg.data
    data = make_synthetic(d.n_rows, d.n_cols, d.rank, d.noise_var, d.T, d.time_dependent, d.drift, d.seed)
    m = cfg.model
    return DenseDynamicMF(data, d=m.d, coupling=m.coupling, init_scale=m.init_scale, seed=cfg.seed,
                          dtype=dtype, device=device, shard=shard)


@register("movielens", shardable=True)
def _build_movielens(cfg: DictConfig, device: torch.device, dtype: torch.dtype, shard=None) -> DynamicModel:
    from goldstone_cli.data.movielens import load_movielens
    from goldstone_cli.models.movielens import SparseDynamicBernoulliMF

    check_model_data("movielens", cfg.data.name)
    d = cfg.data

    def load():
        return load_movielens(d.path, T=d.T, seed=d.seed, split_fractions=tuple(d.split), cache_dir=d.cache_dir,
                              use_cache=d.use_cache, progress=bool(cfg.trainer.progress),
                              time_range=None if d.get("time_range") is None else list(d.time_range))

    if shard is not None and shard.distributed:  # rank 0 loads; each rank maps only its users' ratings
        from goldstone_cli.data.movielens import load_user_rows_distributed

        data = load_user_rows_distributed(shard, load)
    else:
        data = load()
        if cfg.trainer.get("memory_check", True):  # the ratings are loaded; before the (T, N, d) tensors
            from goldstone_cli.models.memory import check_movielens_fits

            check_movielens_fits(data, cfg, device, dtype)
    m = cfg.model
    return SparseDynamicBernoulliMF(data, d=m.d, coupling=m.coupling, gamma=m.gamma, init_scale=m.init_scale,
                                    batch_size=m.batch_size, chunk_size=m.chunk_size, seed=cfg.seed,
                                    dtype=dtype, device=device, shard=shard, items=m.get("items", "sharded"))


@register("dwe", shardable=True)
def _build_dwe(cfg: DictConfig, device: torch.device, dtype: torch.dtype, shard=None) -> DynamicModel:
    from goldstone_cli.models.dwe import DynamicWordEmbeddings, load_word_counts

    check_model_data("dwe", cfg.data.name)
    if shard is not None and shard.distributed:  # word and context rows sharded (issue 17)
        from goldstone_cli.models.dwe_sharded import build_sharded_dwe

        return build_sharded_dwe(cfg, device, dtype, shard)
    wc = load_word_counts(cfg.data, progress=bool(cfg.trainer.progress))
    if cfg.trainer.get("memory_check", True):  # before the (T, V, d) tensors are made
        from goldstone_cli.models.memory import check_dwe_fits

        check_dwe_fits(len(wc.vocab), len(wc.years), sum(int(c.nnz) for c in wc.counts), cfg, device, dtype)
    m = cfg.model
    return DynamicWordEmbeddings(
        wc, d=m.d, inference=m.inference, D=m.D, sigma0=m.sigma0, neg_ratio=m.neg_ratio, neg_exponent=m.neg_exponent,
        coupled=m.coupled, batch_words=m.batch_words, batch_contexts=m.batch_contexts, init_mean_std=m.init_mean_std,
        init_std=m.init_std, test_steps=m.test_steps, test_mass=m.test_mass, split_seed=m.split_seed,
        eval_chunk=m.eval_chunk, val_mass=m.get("val_mass", 0.0), seed=cfg.seed, dtype=dtype, device=device)


def supports_sharding(name: str) -> bool:
    return name in _SHARDABLE


def build_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype, shard=None) -> DynamicModel:
    """The model of ``cfg``; with ``shard`` (a ``RowShard`` of several ranks) only this rank's rows."""
    name = cfg.model.name
    if name not in _BUILDERS:
        raise ValueError(f"unknown model '{name}'; registered: {', '.join(sorted(_BUILDERS))}")
    if shard is not None and shard.distributed:
        if name not in _SHARDABLE:
            raise ValueError(f"model={name} cannot be trained with trainer.distributed=true (it does not shard "
                             f"its rows; models that do: {', '.join(sorted(_SHARDABLE))}); drop "
                             f"trainer.distributed or use one of those")
        return _BUILDERS[name](cfg, device, dtype, shard=shard)
    return _BUILDERS[name](cfg, device, dtype)


__all__ = ["DynamicModel", "build_model", "register"]
