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
from conftest import assert_float64_loss_terms

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


def _float32_shares() -> dict:
    """One rank's float32 loss terms (variational, a minibatch) and their sum over the ranks as the
    trainer forms it (train._summed_terms: a float64 all-reduce)."""
    import torch.distributed as dist

    from goldstone_cli.train import _summed_terms

    shard = RowShard(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    model = ShardedDynamicWordEmbeddings(_corpus(), shard=shard, **{**_kwargs(CASES["variational"]),
                                                                    "dtype": torch.float32})
    terms = {k: v.detach() for k, v in model.loss_terms(torch.Generator().manual_seed(5)).items()}
    return {"dtypes": [str(v.dtype) for v in terms.values()], "summed": list(_summed_terms(terms, shard))}


def _run_all_ranks(path) -> dict:
    out = {name: _run_rank(name) for name in CASES}
    out["registry"] = _built_by_registry(path)
    out["float32"] = _float32_shares()
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


@pytest.mark.parametrize("settings,refused", [
    ({"include_related": False}, r"--sotu-only \(include_related=false"),
    ({"include_related": True, "years": [1800, 1840]}, r"--years 1800-1840 "),
    ({"include_related": True, "years": None}, None),  # what a default corpus records
    ({}, None),  # neither key: read as the defaults
])
def test_sharded_builder_refuses_a_sotu_only_or_years_corpus_as_dwe_does(tmp_path, settings, refused):
    """data.source given: build_sharded_dwe compares the folder's settings as load_word_counts does,
    --sotu-only and --years included (they were not compared)."""
    import json

    from goldstone_cli.models.dwe_sharded import build_sharded_dwe

    path = tmp_path / "c"
    _write_corpus(path)
    mf = path / "manifest.json"
    m = json.loads(mf.read_text())
    m["settings"] = {"source": "sotu", "bin_years": 10, "vocab_size": 41, "rank": "relfreq", "keep_words": [], **settings}
    mf.write_text(json.dumps(m))
    cfg = _cfg(path)
    cfg.data.update({"name": "sotu", "source": "sotu", "bin_years": 10, "vocab_size": 41, "rank": "relfreq",
                     "keep_words": []})
    if refused is None:
        assert isinstance(build_sharded_dwe(cfg, torch.device("cpu"), DT, RowShard.single()), ShardedDynamicWordEmbeddings)
        return
    with pytest.raises(ValueError, match=refused + r".*`goldstone data prepare corpus --source sotu --bin-years 10 "
                                                   r"--vocab 41 --rank relfreq --keep-words '' --out "):
        build_sharded_dwe(cfg, torch.device("cpu"), DT, RowShard.single())


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


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_float32_loss_shares_sum_to_the_one_process_terms_in_float64(two_ranks):
    """Float32 parameters: each rank's terms are float64 and the trainer's sum over the ranks
    (a float64 all-reduce) is the one-process model's terms to 5e-9 (1.2e-9 here: the float32 partial
    sums of a rank's 21 of the 41 words are not those of all 41; float32 shares, as they were, put
    their own rounding, up to 6e-8 relative each, into the sum)."""
    model = ShardedDynamicWordEmbeddings(_corpus(), **{**_kwargs(CASES["variational"]), "dtype": torch.float32})
    terms = model.loss_terms(torch.Generator().manual_seed(5))
    want = [float(terms[k].detach()) for k in ("total", "local", "psi")]
    assert all(terms[k].dtype == DT for k in terms)
    for r in two_ranks:
        assert r["float32"]["dtypes"] == ["torch.float64"] * 3
        assert r["float32"]["summed"] == pytest.approx(want, rel=5e-9)


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


# ----------------------------------------------------------------------------- float64 loss terms
def _float32_pair(monkeypatch, inference: str):
    """A float32 sharded model (one rank) with spread posterior widths and the float64 model with
    the same parameters and the same (float64) noise draws."""
    import numpy as np

    import goldstone_cli.models.dwe_sharded as dwe_sharded
    from conftest import sym_counts
    from goldstone_cli.models.dwe import WordCounts

    def same_noise(shape, generator, like, native=True):  # both models: the same (float64) draws
        return torch.randn(shape, generator=generator, dtype=DT).to(like.dtype)

    monkeypatch.setattr(dwe_sharded, "_pooled_randn", same_noise)
    V, T = 400, 12
    wc = WordCounts(vocab=[f"w{i}" for i in range(V)], years=np.arange(1800, 1800 + T),
                    counts=sym_counts(V, T, density=0.05, seed=1))
    kw = dict(d=64, inference=inference, batch_words=200, batch_contexts=200, seed=3, test_steps=0.0, test_mass=0.0)
    m32 = ShardedDynamicWordEmbeddings(wc, dtype=torch.float32, **kw)
    m64 = ShardedDynamicWordEmbeddings(wc, dtype=DT, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (name, p32), p64 in zip(m32.named_parameters(), m64.parameters()):
            if name.startswith(("raw", "off")):  # spread the posterior widths (no one rounding shared by all)
                p32.add_(0.3 * torch.randn(p32.shape, generator=g))
            p64.copy_(p32)  # the float32 parameters, exactly
    return m32, m64


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("inference", ["variational", "map"])
def test_float32_sharded_loss_terms_are_reported_in_float64(inference, monkeypatch):
    """The sharded model's loss terms of float32 parameters (each rank's share; the trainer sums them
    over the ranks in float64) are float64 sums kept in float64, as DynamicWordEmbeddings' are: a
    float64 model with the same parameters and draws gives them to 5e-9 of the loss (about 1e-9 at
    worst; cast to float32, as they were, total and psi were off by 1e-8 to 1e-7 of it)."""
    m32, m64 = _float32_pair(monkeypatch, inference)
    assert_float64_loss_terms(m32, m64)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("inference", ["variational", "map"])
def test_float64_loss_terms_leave_the_float32_gradients_bit_for_bit(inference, native, monkeypatch):
    """Reporting the terms in float64 changes no gradient: the model with float32 terms
    (VALUE_DTYPE = float32: what the model computed before) gives the same gradients, bit for bit,
    through the native C loops and through PyTorch's (likelihood, chain terms, zero-mean prior, psi);
    its terms are the float64 ones rounded to float32, up to the float32 additions."""
    m32, _ = _float32_pair(monkeypatch, inference)
    m32.native = native

    def step(model, s):
        model.zero_grad()
        terms = model.loss_terms(torch.Generator().manual_seed(s))
        terms["total"].backward()
        return {k: v.detach() for k, v in terms.items()}, {n: p.grad.clone() for n, p in model.named_parameters()}

    for s in range(2):
        new_terms, new = step(m32, s)
        m32.VALUE_DTYPE = torch.float32  # the instance only
        old_terms, old = step(m32, s)
        del m32.VALUE_DTYPE
        assert all(v.dtype == DT for v in new_terms.values())
        assert all(v.dtype == torch.float32 for v in old_terms.values())
        for n, g in new.items():
            assert torch.equal(g, old[n]), (n, s)
        for k, v in new_terms.items():
            assert float(old_terms[k]) == pytest.approx(float(v), rel=1e-6), k


def test_sharded_heldout_loglik_accumulates_in_float64():
    """A rank's held-out log-likelihood of float32 embeddings (_rows_loglik): each row's sum over all
    V contexts adds float32 partials of at most 1,024 contexts in float64 (one float32 product over
    the 5,000 contexts here was off by about 1e-8 relative; now about 1e-10), as dwe.heldout_loglik."""
    import types

    import numpy as np
    import scipy.sparse as sp

    from goldstone_cli.models.dwe import heldout_loglik
    from goldstone_cli.models.dwe_split import HeldOut

    V, d = 5000, 100
    rng = np.random.default_rng(0)
    A = sp.random(V, V, density=0.01, random_state=rng, data_rvs=lambda n: rng.integers(1, 50, n)).tocsr()
    A = (A + A.T).tocsr()
    g = torch.Generator().manual_seed(0)
    U, W = 0.3 * torch.randn(V, d, generator=g), 0.3 * torch.randn(V, d, generator=g)  # float32
    one_rank = types.SimpleNamespace(start=0, stop=V, V=V, neg_ratio=1.0, neg_exponent=0.75, eval_chunk=1 << 22)
    h = HeldOut(0, A, np.asarray(A.sum(axis=1), dtype=np.float64).reshape(-1))
    got, n = ShardedDynamicWordEmbeddings._rows_loglik(one_rank, U, W, h)
    want, n64 = ShardedDynamicWordEmbeddings._rows_loglik(one_rank, U.double(), W.double(), h)
    assert n == n64 and got == pytest.approx(want, rel=1e-9)
    ref, _ = heldout_loglik(U.double(), W.double(), A, 1.0, 0.75)  # the one-process model's formula
    assert want == pytest.approx(ref, rel=1e-12)
