"""Sparse dynamic Bernoulli MF (paper Eqs. 6, 8, 9): gradients, metrics, training, end to end."""

import json
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from goldstone_cli.cli import app
from goldstone_cli.config import ConfigError, compose
from goldstone_cli.models.movielens import SparseDynamicBernoulliMF, auc_score, bernoulli_local_loss

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "movielens" / "ml-latest-small"
runner = CliRunner()


def planted(n=3000, n_users=12, n_items=9, T=6, d=2, seed=0, split=(0.5, 0.2, 0.3)):
    """Ratings drawn from a slowly rotating logistic MF model: a MovieLensData-like namespace."""
    rng = np.random.default_rng(seed)
    u0, v0 = rng.normal(size=(n_users, d)) * 1.5, rng.normal(size=(n_items, d)) * 1.5
    user, item, t = rng.integers(0, n_users, n), rng.integers(0, n_items, n), rng.integers(0, T, n)
    angle = 0.1 * t
    c, s = np.cos(angle), np.sin(angle)
    u = u0[user].copy()
    u[:, 0], u[:, 1] = c * u0[user, 0] - s * u0[user, 1], s * u0[user, 0] + c * u0[user, 1]
    p = 1 / (1 + np.exp(-(u * v0[item]).sum(1)))
    x = np.where(rng.random(n) < p, 1, -1).astype(np.int8)
    sp = rng.choice(3, size=n, p=split).astype(np.int8)
    return types.SimpleNamespace(user=user, item=item, t=t, x=x, split=sp, n_users=n_users, n_items=n_items, T=T)


def reference_loss(model, data, gamma):
    """Eq. 9 summed over t, written directly (dense gather, autograd everywhere)."""
    m = data.split == 0
    u = model.U[torch.as_tensor(data.t[m]), torch.as_tensor(data.user[m])]
    v = model.V[torch.as_tensor(data.t[m]), torch.as_tensor(data.item[m])]
    x = torch.as_tensor(data.x[m], dtype=model.U.dtype)
    return F.softplus(-x * (u * v).sum(1)).sum() + gamma / 2 * (model.U.pow(2).sum() + model.V.pow(2).sum())


def test_loss_and_gradient_match_direct_formula_and_finite_differences():
    data = planted(n=400, T=4)
    model = SparseDynamicBernoulliMF(data, d=3, coupling=2.0, gamma=0.7, init_scale=0.5, chunk_size=37,
                                     dtype=torch.float64)
    local = model.local_loss()
    ref = reference_loss(model, data, 0.7)
    assert local.item() == pytest.approx(ref.item(), rel=1e-12)
    gU, gV = torch.autograd.grad(local, [model.U, model.V])
    rU, rV = torch.autograd.grad(ref, [model.U, model.V])
    torch.testing.assert_close(gU, rU, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gV, rV, rtol=1e-10, atol=1e-12)

    ru, rv, x = model._splits["train"]
    U0, V0 = model.U.detach().clone().requires_grad_(), model.V.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda U, V: bernoulli_local_loss(U, V, ru, rv, x, 0.7, 1.3, 37), (U0, V0))
    # the full loss (local + psi): a central finite difference along a random direction
    terms = model.loss_terms()
    gU, gV = torch.autograd.grad(terms["total"], [model.U, model.V])
    g = torch.Generator().manual_seed(1)
    dU, dV = torch.randn(model.U.shape, generator=g, dtype=torch.float64), torch.randn(model.V.shape, generator=g, dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        def total_at(s):
            model.U.add_(s * dU)
            model.V.add_(s * dV)
            val = model.loss_terms()["total"].item()
            model.U.sub_(s * dU)
            model.V.sub_(s * dV)
            return val
        fd = (total_at(eps) - total_at(-eps)) / (2 * eps)
    assert fd == pytest.approx(float((gU * dU).sum() + (gV * dV).sum()), rel=1e-7)


def test_minibatch_likelihood_is_unbiased_and_reproducible():
    data = planted(n=600)
    full = SparseDynamicBernoulliMF(data, d=2, init_scale=0.5, dtype=torch.float64)
    mini = SparseDynamicBernoulliMF(data, d=2, init_scale=0.5, batch_size=50, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([mini.local_loss(g).detach() for _ in range(3000)])
    full_value = full.local_loss().item()
    assert draws.std() > 0  # really random
    assert draws.mean().item() == pytest.approx(full_value, rel=3 * draws.std().item() / 3000 ** 0.5 / full_value + 1e-9)
    a = mini.local_loss(torch.Generator().manual_seed(5)).item()
    b = mini.local_loss(torch.Generator().manual_seed(5)).item()
    assert a == b


def test_auc_matches_pairwise_definition_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (300,), generator=g).double()  # many ties
    pos = torch.rand(300, generator=g) < 0.4
    s_pos, s_neg = scores[pos][:, None], scores[~pos][None, :]
    pairwise = ((s_pos > s_neg).double() + 0.5 * (s_pos == s_neg).double()).mean().item()
    assert auc_score(scores, pos) == pytest.approx(pairwise, rel=1e-12)
    assert auc_score(torch.arange(4.0), torch.tensor([False, False, True, True])) == 1.0
    assert np.isnan(auc_score(torch.arange(3.0), torch.zeros(3, dtype=torch.bool)))


def test_evaluate_reports_heldout_metrics_and_bad_data_is_rejected():
    data = planted()
    model = SparseDynamicBernoulliMF(data, d=2, dtype=torch.float64)
    ev = model.evaluate()
    assert sorted(ev) == sorted(model.metric_names())
    assert set(model.metric_names()) >= {"val_ll", "val_acc", "val_auc", "test_ll", "test_acc", "test_auc"}
    m = data.split == 1
    logit = (model.U.detach()[data.t[m], data.user[m]] * model.V.detach()[data.t[m], data.item[m]]).sum(1)
    x = torch.as_tensor(data.x[m], dtype=torch.float64)
    assert ev["val_ll"] == pytest.approx(-F.softplus(-x * logit).mean().item(), rel=1e-12)
    assert ev["val_acc"] == pytest.approx(((logit > 0) == (x > 0)).double().mean().item())

    bad = planted()
    bad.x = bad.x.copy()
    bad.x[3] = 0
    with pytest.raises(ValueError, match=r"\+1 / -1"):
        SparseDynamicBernoulliMF(bad)
    bad = planted()
    bad.user = bad.user.copy()
    bad.user[0] = bad.n_users
    with pytest.raises(ValueError, match="data.user must lie in"):
        SparseDynamicBernoulliMF(bad)


def test_short_adagrad_run_lowers_validation_loss():
    data = planted(n=6000, n_users=30, n_items=20, T=5, seed=3)
    model = SparseDynamicBernoulliMF(data, d=2, coupling=10.0, gamma=1.0, init_scale=0.1, dtype=torch.float64)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.3)
    before = model.evaluate()
    for _ in range(150):
        opt.zero_grad()
        model.loss_terms()["total"].backward()
        opt.step()
    after = model.evaluate()
    assert after["val_ll"] > before["val_ll"] + 0.05
    assert after["val_auc"] > 0.7 and after["test_auc"] > 0.7


def test_model_option_selects_paper_settings():
    cfg = compose(["model=movielens"])
    assert (cfg.model.d, cfg.model.coupling, cfg.model.gamma, cfg.data.T) == (30, 10.0, 1.0, 100)
    assert cfg.model.batch_size is None and list(cfg.data.split) == [0.5, 0.2, 0.3]
    o = cfg.optimizer
    assert (o.name, o.base.value, o.lr, o.k1, o.k2) == ("goldstone", "adagrad", 1.0, 100, 10)
    assert cfg.trainer.dtype.value == "float32"
    base = compose(["model=movielens", "optimizer=adagrad"]).optimizer
    assert (base.name, base.lr, base.schedule.value) == ("adagrad", 1.0, "constant")
    assert compose(["model=movielens", "optimizer=adagrad", "optimizer.lr=0.5"]).optimizer.lr == 0.5
    assert compose(["experiment=fig3_adagrad"]).optimizer.lr == 1.0
    assert compose(["model=movielens", "trainer.dtype=float64"]).trainer.dtype.value == "float64"
    with pytest.raises(ConfigError, match="data.split"):
        compose(["model=movielens", "data.split=[0.5,0.6,0.3]"])
    with pytest.raises(ConfigError, match="model.batch_size"):
        compose(["model=movielens", "model.batch_size=0"])


def test_missing_data_gives_an_error_that_says_where(in_tmp):
    res = runner.invoke(app, ["train", "model=movielens", "data.path=nowhere/ml-20m", "trainer.steps=1"])
    # the CLI's own one-line error (exit code 2), not an uncaught exception with a traceback
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines[0].startswith("error:") and sum(ln.startswith("error:") for ln in lines) == 1, res.output
    assert "nowhere" in lines[0] and "goldstone data download movielens" in res.output  # the command: own line


def _sample() -> Path:
    if not (SAMPLE / "ratings.csv").is_file():
        pytest.skip(f"MovieLens sample not found at {SAMPLE} (the checkout's ../shared/data)")
    return SAMPLE


@pytest.mark.slow  # about 20 s each on 2 cores (parse + cache the 100k-rating sample, 20 steps)
@pytest.mark.parametrize("optimizer", ["adagrad", "goldstone"])
def test_cli_train_on_real_sample_writes_heldout_metrics(in_tmp, optimizer):
    sample = _sample()
    small = ["data.T=10", "model.d=4", "trainer.steps=20", "trainer.eval_every=10", "trainer.log_every=5",
             "trainer.progress=false", f"data.cache_dir={in_tmp / 'cache'}"]
    extra = ["optimizer.k1=5"] if optimizer.startswith("goldstone") else []
    res = runner.invoke(app, ["train", "model=movielens", f"data.path={sample}", f"optimizer={optimizer}",
                              *small, *extra])
    assert res.exit_code == 0, res.output + repr(res.exception)
    run = next((in_tmp / "outputs" / "movielens").iterdir())
    df = pd.read_csv(run / "metrics.csv")
    for col in ("val_ll", "val_acc", "val_auc", "test_ll", "test_acc", "test_auc"):
        assert df[col].notna().sum() == 3, col  # steps 0, 10, 20
    ev = df.dropna(subset=["val_auc"])
    assert ev["val_ll"].iloc[-1] > ev["val_ll"].iloc[0]
    assert ev["test_auc"].iloc[-1] > 0.52
    assert (run / "checkpoints" / "best.pt").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["metric"] == "val_ll"
    assert summary["final"]["test_auc"] == pytest.approx(ev["test_auc"].iloc[-1])
    if optimizer.startswith("goldstone"):
        assert summary["gauge_steps"] == 4


# ----------------------------------------------------------------------------- float64 loss terms
def _float32_and_float64(batch_size=None, n=400_000):
    """A float32 model and a float64 one with exactly its parameters (d=8, 200k training ratings)."""
    data = planted(n=n, n_users=300, n_items=200, T=8, seed=2)
    kw = dict(d=8, coupling=10.0, gamma=1.0, init_scale=0.5, batch_size=batch_size, seed=1)
    m32, m64 = SparseDynamicBernoulliMF(data, **kw), SparseDynamicBernoulliMF(data, dtype=torch.float64, **kw)
    with torch.no_grad():
        m64.U.copy_(m32.U)
        m64.V.copy_(m32.V)
    return m32, m64


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("batch_size", [None, 100_000])
def test_float32_loss_terms_are_reported_in_float64(batch_size):
    """The loss terms of a float32 model (what metrics.csv and trainer.target see; loss_terms is the
    fused pass, local_loss() + psi() the other one) are float64 sums kept in float64: a float64 model
    with the same parameters gives them to 1e-9 of the loss (about 1e-10 here). Rounded to float32,
    as they were, they were off by 4e-9 to 4e-8 of it."""
    m32, m64 = _float32_and_float64(batch_size)
    for s in range(2):
        fused = {k: v.detach() for k, v in m32.loss_terms(torch.Generator().manual_seed(s)).items()}
        local, psi = m32.local_loss(torch.Generator().manual_seed(s)).detach(), m32.psi().detach()
        with torch.no_grad():
            want = m64.loss_terms(torch.Generator().manual_seed(s))
        scale = abs(float(want["total"]))
        for got in (fused, {"total": local + psi, "local": local, "psi": psi}):
            for key in ("total", "local", "psi"):
                assert got[key].dtype == torch.float64, key
                assert abs(float(got[key]) - float(want[key])) <= 1e-9 * scale, (key, s)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("batch_size", [None, 100_000])
def test_float64_loss_terms_leave_the_float32_gradients_bit_for_bit(native, batch_size):
    """Reporting the terms in float64 changes no gradient: the model with float32 terms
    (VALUE_DTYPE = float32: what it computed before) gives the same gradients bit for bit, for the
    fused pass (also with local and psi weighted differently) and local_loss() + psi(), through the
    native C loops and through PyTorch's."""
    m32, _ = _float32_and_float64(batch_size, n=60_000)
    m32.native = native

    def grads(model, how, s):
        model.zero_grad()
        gen = torch.Generator().manual_seed(s)
        if how == "split":
            terms = {"local": model.local_loss(gen), "psi": model.psi()}
        else:
            terms = model.loss_terms(gen)
        w = (0.3, 1.7) if how == "weighted" else (1.0, 1.0)
        (w[0] * terms["local"] + w[1] * terms["psi"]).backward()
        return terms["local"].dtype, model.U.grad.clone(), model.V.grad.clone()

    for how in ("fused", "weighted", "split"):
        for s in range(2):
            new = grads(m32, how, s)
            m32.VALUE_DTYPE = torch.float32  # the instance only
            old = grads(m32, how, s)
            del m32.VALUE_DTYPE
            assert new[0] == torch.float64 and old[0] == torch.float32
            assert torch.equal(new[1], old[1]) and torch.equal(new[2], old[2]), (how, s)


def test_heldout_metrics_accumulate_in_float64_at_ml20m_sizes():
    """binary_metrics of 3M float32 logits (ML-20M's test split holds 6M ratings): the
    log-likelihood is a float64 sum (the float64 sum of the same float32 terms, exactly), the
    accuracy and the AUC exact counts and ranks (those of the float64 logits)."""
    from goldstone_cli.models.movielens import binary_metrics

    g = torch.Generator().manual_seed(0)
    n = 3_000_000
    logit = 2.0 * torch.randn(n, generator=g)
    x = torch.where(torch.rand(n, generator=g) < torch.sigmoid(logit), 1.0, -1.0)
    got, want = binary_metrics(logit, x), binary_metrics(logit.double(), x.double())
    terms = F.softplus(-x * logit).double()  # the float32 terms, summed in float64
    assert got["ll"] == pytest.approx(-float(terms.sum()) / n, rel=1e-14)
    assert got["ll"] == pytest.approx(want["ll"], rel=1e-9)  # the terms' own float32 rounding: 3e-10
    assert got["acc"] == want["acc"] and got["auc"] == want["auc"]
