"""Sharded Dynamic Word Embeddings (goldstone_cli/models/dwe_sharded.py, issue 17): on one process
it is DynamicWordEmbeddings; on 2 gloo ranks it gives the 1-process trajectory (losses, parameters,
metrics) to 1e-10 relative in float64 for 50 steps with gauge steps, MAP and variational."""

from __future__ import annotations

import math

import pytest
import torch

from goldstone_cli.distributed.shard import RowShard
from goldstone_cli.models.dwe import DynamicWordEmbeddings, planted_corpus
from goldstone_cli.models.dwe_sharded import ShardedDynamicWordEmbeddings
from goldstone_cli.optim import GoldstoneGD

DT = torch.float64
STEPS = 50
CASES = {
    # uneven V (41 -> 21 + 20), minibatches of words and contexts, held-out steps, mass and validation
    "map": dict(inference="map", batch_words=17, batch_contexts=13, solver="procrustes"),
    "variational": dict(inference="variational", batch_words=17, batch_contexts=13, solver="natural"),
    "variational_full_batch": dict(inference="variational", batch_words=0, batch_contexts=0, solver="procrustes"),
}


def _corpus():
    return planted_corpus(V=41, T=6, n_clusters=4, seed=3)


def _kwargs(case: dict) -> dict:
    return dict(d=3, inference=case["inference"], D=0.01, batch_words=case["batch_words"],
                batch_contexts=case["batch_contexts"], test_steps=0.2, test_mass=0.1, val_mass=0.1,
                split_seed=1, seed=2, dtype=DT)


def train(model, shard: RowShard | None, solver: str) -> dict:
    """50 steps of Adam + Goldstone-GD (a gauge step every 10) as the trainer takes them; returns
    the per-step loss shares, the final local parameters and the metrics."""
    group = shard.group if shard is not None and shard.distributed else None
    opt = GoldstoneGD(torch.optim.Adam(model.parameters(), lr=0.02), groups=model.symmetric_groups(),
                      coupling=model.coupling, k1=10, solver=solver, rotation="expm", process_group=group)
    gen = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        terms = model.loss_terms(gen)
        terms["total"].backward()
        model.reduce_gradients()
        opt.step()
        losses.append([float(terms["local"].detach()), float(terms["psi"].detach())])
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "metrics": model.evaluate(), "gauge_steps": opt.num_gauge_steps,
            "psi": [opt.last_gauge["psi_before"], opt.last_gauge["psi_after"]]}


def _run_rank(name: str) -> dict:
    """One rank of the 2-process run (called by run_local after init_distributed)."""
    import torch.distributed as dist

    shard = RowShard(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    case = CASES[name]
    model = ShardedDynamicWordEmbeddings(_corpus(), shard=shard, **_kwargs(case))
    return train(model, shard, case["solver"])


def _write_corpus(out) -> None:
    """The planted corpus as a prepared corpus folder (data=cooc)."""
    import numpy as np

    from goldstone_cli.data.cooc import CoocWriter

    wc = _corpus()
    with CoocWriter(out, wc.vocab, np.ones(wc.V, dtype=np.int64)) as w:
        for t, m in enumerate(wc.counts):
            w.add_step(wc.step_label(t), int(wc.years[t]), int(wc.year_end[t]), m.astype(np.int64), 100)
        w.finish({"kind": "test"})


def _cfg(path, inference: str = "variational"):
    from omegaconf import OmegaConf

    model = dict(name="dwe", inference=inference, d=3, D=0.01, sigma0=1.0, neg_ratio=1.0, neg_exponent=0.75,
                 coupled=True, batch_words=17, batch_contexts=13, init_mean_std=0.1, init_std=0.1, test_steps=0.2,
                 test_mass=0.1, split_seed=1, val_mass=0.1, eval_chunk=1 << 22)
    return OmegaConf.create({"data": {"name": "cooc", "path": str(path), "source": None}, "model": model,
                             "trainer": {"progress": False}, "seed": 2})


def _built_by_registry(path) -> dict:
    """trainer.distributed's builder: build_model(cfg, shard=...) on a prepared folder; one step."""
    import torch.distributed as dist

    from goldstone_cli.models import build_model

    shard = RowShard(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    model = build_model(_cfg(path), torch.device("cpu"), DT, shard=shard)
    assert isinstance(model, ShardedDynamicWordEmbeddings)
    loss = model.loss_terms(torch.Generator().manual_seed(5))["total"]
    return {"loss": float(loss.detach()), "metrics": model.evaluate(), "rows": model.means()[0].shape[1],
            "bytes_read": model.data_bytes_read}


def _run_all_ranks(path) -> dict:
    out = {name: _run_rank(name) for name in CASES}
    out["registry"] = _built_by_registry(path)
    return out


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["map", "variational"])
def test_one_process_sharded_model_is_dwe(name):
    """RowShard.single(): the same initialization, data split, minibatches, losses, gauge steps and
    metrics as DynamicWordEmbeddings (to rounding: the evaluation sums in another order)."""
    case = CASES[name]
    ref = train(DynamicWordEmbeddings(_corpus(), **_kwargs(case)), None, case["solver"])
    got = train(ShardedDynamicWordEmbeddings(_corpus(), **_kwargs(case)), None, case["solver"])
    assert _rel(torch.tensor(got["losses"], dtype=DT), torch.tensor(ref["losses"], dtype=DT)) < 1e-12
    for n, p in ref["params"].items():
        assert _rel(got["params"][n], p) < 1e-12, n
    assert set(got["metrics"]) == set(ref["metrics"])
    for k, v in ref["metrics"].items():
        assert math.isclose(got["metrics"][k], v, rel_tol=1e-10), (k, got["metrics"][k], v)
    assert got["gauge_steps"] == STEPS // 10


@pytest.mark.usefixtures("one_thread")
def test_sharded_builder_reads_the_prepared_folder_like_dwe(tmp_path):
    """build_sharded_dwe (one rank) on a prepared folder: the model, data split and metrics of
    the one-process builder (load_word_counts + DynamicWordEmbeddings) on the same folder."""
    from goldstone_cli.models import build_model
    from goldstone_cli.models.dwe_sharded import build_sharded_dwe

    _write_corpus(tmp_path / "c")
    cfg = _cfg(tmp_path / "c")
    ref = build_model(cfg, torch.device("cpu"), DT)
    got = build_sharded_dwe(cfg, torch.device("cpu"), DT, RowShard.single())
    assert isinstance(ref, DynamicWordEmbeddings) and isinstance(got, ShardedDynamicWordEmbeddings)
    for (n, p), (m, q) in zip(ref.named_parameters(), got.named_parameters()):
        assert n == m and torch.equal(p, q)
    a = ref.loss_terms(torch.Generator().manual_seed(5))["total"]
    b = got.loss_terms(torch.Generator().manual_seed(5))["total"]
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-12)
    mr, mg = ref.evaluate(), got.evaluate()
    assert mr.keys() == mg.keys() and all(math.isclose(mr[k], mg[k], rel_tol=1e-10) for k in mr)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    path = tmp_path_factory.mktemp("dwe_corpus") / "c"
    _write_corpus(path)
    return path


@pytest.fixture(scope="module")
def two_ranks(prepared):
    from goldstone_cli.distributed.local import run_local

    return run_local(_run_all_ranks, 2, str(prepared), timeout_s=600)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_registry_builds_the_sharded_model_on_two_ranks(two_ranks, prepared):
    from goldstone_cli.models import build_model

    ref = build_model(_cfg(prepared), torch.device("cpu"), DT)
    a = float(ref.loss_terms(torch.Generator().manual_seed(5))["total"].detach())
    ranks = [r["registry"] for r in two_ranks]
    assert [r["rows"] for r in ranks] == [21, 20]
    assert all(r["bytes_read"] > 0 for r in ranks)  # each rank copied its rows out of the by-word folder
    assert ranks[0]["loss"] + ranks[1]["loss"] == pytest.approx(a, rel=1e-12)
    metrics = ref.evaluate()
    for r in ranks:
        assert all(math.isclose(r["metrics"][k], v, rel_tol=1e-10) for k, v in metrics.items())


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process(two_ranks, name):
    case = CASES[name]
    ref = train(ShardedDynamicWordEmbeddings(_corpus(), **_kwargs(case)), None, case["solver"])
    ranks = [r[name] for r in two_ranks]
    # loss shares summed over the ranks: the 1-process losses, every step
    summed = [[a[0] + b[0], a[1] + b[1]] for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    for s, (x, y) in enumerate(zip(summed, ref["losses"])):
        assert x[0] == pytest.approx(y[0], rel=1e-10) and x[1] == pytest.approx(y[1], rel=1e-10), f"step {s + 1}"
    for n, p in ref["params"].items():
        joined = torch.cat([r["params"][n] for r in ranks], dim=1)  # rows are dim 1 of every tensor
        assert [r["params"][n].shape[1] for r in ranks] == [21, 20]
        assert _rel(joined, p) < 1e-10, n
    for r in ranks:  # global metrics on every rank
        assert set(r["metrics"]) == set(ref["metrics"])
        for k, v in ref["metrics"].items():
            assert math.isclose(r["metrics"][k], v, rel_tol=1e-10), (k, r["metrics"][k], v)
        assert r["gauge_steps"] == STEPS // 10
        assert r["psi"][1] <= r["psi"][0]
    assert ranks[0]["psi"] == ranks[1]["psi"]


# ----------------------------------------------------------------------------- through the trainer
@pytest.mark.slow
def test_trainer_dwe_two_ranks_match_one_process_and_resume_on_one(tmp_path):
    """`torchrun --nproc-per-node=2 -m goldstone_cli train trainer.distributed=true model=dwe ...` on
    a prepared folder: metrics.csv and gauge.csv equal the one-process run's to 1e-10 over 40 steps
    (variational, Goldstone-GD with gauge steps); a run stopped at step 20 on 2 ranks and resumed on
    one process (sharded checkpoint -> one process) finishes with the same numbers."""
    from test_distributed_train import two_ranks_match_one_process

    def assert_same_run(a, b):
        """metrics.csv and gauge.csv agree to 1e-10, except the largest rotation angle near pi (a
        reflection): 2 asin(||R - I|| / 2) turns the rotations' 1e-16 rounding into 1e-8 there."""
        import numpy as np
        import pandas as pd

        for name, angle in (("metrics.csv", "gauge_max_angle"), ("gauge.csv", "max_angle")):
            A = pd.read_csv(a / name).drop(columns=["wall_time", "gauge_time", "seconds"], errors="ignore")
            B = pd.read_csv(b / name).drop(columns=["wall_time", "gauge_time", "seconds"], errors="ignore")
            assert list(A.columns) == list(B.columns) and A.shape == B.shape and len(A) > 1, name
            np.testing.assert_allclose(A.drop(columns=[angle]).to_numpy(float), B.drop(columns=[angle]).to_numpy(float),
                                       rtol=1e-10, atol=1e-13, err_msg=name)
            np.testing.assert_allclose(A[angle].to_numpy(float), B[angle].to_numpy(float), rtol=1e-6, err_msg=name)

    corpus = tmp_path / "corpus"
    _write_corpus(corpus)
    args = ["model=dwe", "data=cooc", f"data.path={corpus}", "model.d=3", "model.D=0.01", "model.batch_words=17",
            "model.batch_contexts=13", "model.test_steps=0.2", "model.test_mass=0.1", "model.val_mass=0.1",
            "model.split_seed=1", "optimizer=goldstone", "optimizer.k1=10", "trainer.dtype=float64",
            "trainer.device=cpu", "trainer.log_every=1", "trainer.eval_every=10", "trainer.checkpoint_every=10",
            "trainer.progress=false"]
    two_ranks_match_one_process(args, tmp_path, steps=40, stop=20, same=assert_same_run)
