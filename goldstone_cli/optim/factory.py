"""Build the optimizer and learning-rate schedule that a config asks for."""

from __future__ import annotations

from typing import Iterable

import torch
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LambdaLR

from goldstone_cli.config import choice


def decay_factor(step: int, decay_steps: float, power: float) -> float:
    """``(s_bar / (s + s_bar))^power``: the paper's decaying prefactor (Sec. 5.1, 5.3)."""
    return (decay_steps / (step + decay_steps)) ** power


def _balance_sides(cfg: DictConfig, model):
    """``optimizer.balance=true``: the model's GoldstoneGD(balance=...) signs (``model.balance_sides()``),
    which only models whose local loss sees each group only through products Z+ Z-^T define."""
    if not cfg.get("balance", False):
        return None
    sides = getattr(model, "balance_sides", None)
    if sides is None:
        raise ValueError(f"optimizer.balance=true: model {type(model).__name__} has priors or penalties on its "
                         "embeddings, so its local loss is not invariant under GL(d) (only dense_mf is); "
                         "drop optimizer.balance")
    return sides()


def build_base(name: str, params: Iterable[torch.Tensor], cfg: DictConfig) -> torch.optim.Optimizer:
    params = list(params)
    if name == "gd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if name == "adagrad":
        return _fused_if_possible(torch.optim.Adagrad, params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if name == "adam":
        return _fused_if_possible(torch.optim.Adam, params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown base optimizer '{name}'; valid: gd, adagrad, adam")


def _fused_if_possible(cls, params: list, **kw) -> torch.optim.Optimizer:
    """``cls(params, fused=True, **kw)`` (one kernel per parameter: same update, up to float rounding,
    4x faster than the for-loop version on the CPU, bench/roofline.py) where torch supports it for
    these parameters' devices and dtypes; else the default implementation."""
    if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return cls(params, fused=True, **kw)
        except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device / dtype / torch version
            pass
    return cls(params, **kw)


def build_optimizer(cfg: DictConfig, model) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """``(optimizer, scheduler)`` for ``cfg`` (the ``optimizer`` config group) and a DynamicModel.

    ``optimizer=goldstone`` wraps the base optimizer in GoldstoneGD with the model's symmetric
    groups and coupling; the schedule then acts on the base optimizer's learning rate."""
    name = cfg.name
    if name == "goldstone":
        from goldstone_cli.optim.goldstone import GoldstoneGD

        base = build_base(choice(cfg.base), model.parameters(), cfg)
        shard = getattr(model, "shard", None)  # row-sharded model (trainer.distributed): sums over all ranks' rows
        opt = GoldstoneGD(
            base,
            groups=model.symmetric_groups(),
            coupling=model.coupling,
            k1=cfg.k1,
            solver=choice(cfg.solver),
            k2=cfg.k2,
            lr_scale=cfg.lr_scale,
            keep_gauge_fields=cfg.keep_gauge_fields,
            rotation=choice(cfg.rotation),
            allow_reflections=cfg.allow_reflections,
            max_sweeps=cfg.max_sweeps,
            tol=cfg.tol,
            state_transform=choice(cfg.get("state_transform", "none")),
            process_group=shard.group if shard is not None and shard.distributed else None,
            replicated=getattr(model, "replicated_parameters", list)(),
            balance=_balance_sides(cfg, model),
        )
    else:
        opt = build_base(name, model.parameters(), cfg)
    if choice(cfg.schedule) == "decay":
        s_bar, power = float(cfg.decay_steps), float(cfg.decay_power)
        sched = LambdaLR(opt, lambda s: decay_factor(s, s_bar, power))
    else:
        sched = LambdaLR(opt, lambda s: 1.0)
    return opt, sched

