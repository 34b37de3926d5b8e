"""Dynamic Word Embeddings: the O(T) sampler and moments, ELBO terms against finite differences and
dense formulas, the skip-gram likelihood, minibatch scaling, held-out splits and evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conftest import assert_float64_loss_terms, sym_counts as _sym_counts
from goldstone_cli.models.dwe import (
    DynamicWordEmbeddings,
    WordCounts,
    chain_moments,
    choose_test_steps,
    expected_neg_log_prior_var,
    heldout_loglik,
    linear_recurrence_loop,
    linear_scan,
    neg_entropy,
    prior_precision,
    sample_chain,
    skipgram_block,
    split_counts,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _wc(V=12, T=5, seed=0, years=None) -> WordCounts:
    years = np.arange(1800, 1800 + 10 * T, 10) if years is None else years
    return WordCounts(vocab=[f"w{i}" for i in range(V)], years=years, counts=_sym_counts(V, T, seed=seed))


def _bidiag_dense(raw: np.ndarray, off: np.ndarray) -> np.ndarray:
    b = np.log1p(np.exp(raw))
    B = np.diag(b)
    B[np.arange(1, len(b)), np.arange(len(b) - 1)] = off
    return B


# ----------------------------------------------------------------------------- scan
@pytest.mark.parametrize("T", [1, 2, 3, 7, 16, 33])
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan_matches_loop(T, reverse):
    g = torch.Generator().manual_seed(T)
    a = torch.randn(T - 1, 4, 3, generator=g, dtype=F64)
    c = torch.randn(T, 4, 3, generator=g, dtype=F64)
    torch.testing.assert_close(linear_scan(a, c, reverse=reverse), linear_recurrence_loop(a, c, reverse=reverse))


def test_linear_scan_gradcheck():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 3, generator=g, dtype=F64, requires_grad=True)
    c = torch.randn(9, 3, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: linear_scan(a, c), (a, c))
    assert torch.autograd.gradcheck(lambda a, c: linear_scan(a, c, reverse=True), (a, c))


# ----------------------------------------------------------------------------- sampler and moments
def test_sampler_covariance_is_inverse_precision():
    """x = B^{-T} eps is linear in eps: feeding the T unit vectors gives the map M exactly, and
    M M^T must equal (B B^T)^{-1}; the O(T) moments must equal its diagonals."""
    T = 9
    rng = np.random.default_rng(0)
    raw, off = rng.normal(size=T), rng.normal(size=T - 1)
    raw_t = torch.as_tensor(raw)[:, None].expand(T, T).contiguous()  # T identical chains
    off_t = torch.as_tensor(off)[:, None].expand(T - 1, T).contiguous()
    M = sample_chain(torch.zeros(T, T, dtype=F64), raw_t, off_t, torch.eye(T, dtype=F64)).numpy()
    B = _bidiag_dense(raw, off)
    cov = np.linalg.inv(B @ B.T)
    np.testing.assert_allclose(M @ M.T, cov, rtol=1e-10, atol=1e-12)
    var, cross = chain_moments(torch.as_tensor(raw), torch.as_tensor(off))
    np.testing.assert_allclose(var.numpy(), np.diag(cov), rtol=1e-10)
    np.testing.assert_allclose(cross.numpy(), np.diag(cov, 1), rtol=1e-10, atol=1e-14)


def test_sampler_monte_carlo_covariance():
    T, n = 6, 200_000
    rng = np.random.default_rng(1)
    raw, off = rng.normal(size=T), 0.5 * rng.normal(size=T - 1)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(T, n, generator=g, dtype=F64)
    x = sample_chain(torch.zeros(T, n, dtype=F64), torch.as_tensor(raw)[:, None].expand(T, n),
                     torch.as_tensor(off)[:, None].expand(T - 1, n), eps).numpy()
    B = _bidiag_dense(raw, off)
    cov = np.linalg.inv(B @ B.T)
    np.testing.assert_allclose(np.cov(x), cov, atol=0.03 * np.abs(cov).max())


def test_expected_log_prior_and_entropy_match_dense_formulas():
    """-E_q[log p] (variance part) = 1/2 tr(Pi Sigma); -H = -1/2 log det Sigma + const."""
    T = 7
    rng = np.random.default_rng(2)
    raw, off = rng.normal(size=T), rng.normal(size=T - 1)
    w, inv_var0 = rng.uniform(0.5, 3.0, size=T - 1), 0.7
    B = _bidiag_dense(raw, off)
    Sigma = np.linalg.inv(B @ B.T)
    expect = 0.5 * np.trace(prior_precision(w, inv_var0) @ Sigma)
    got = expected_neg_log_prior_var(torch.as_tensor(raw), torch.as_tensor(off), torch.as_tensor(w), inv_var0)
    assert float(got) == pytest.approx(expect, rel=1e-10)
    _, logdet_sigma = np.linalg.slogdet(Sigma)
    assert float(neg_entropy(torch.as_tensor(raw))) == pytest.approx(-0.5 * logdet_sigma, rel=1e-10)


def test_elbo_terms_gradcheck():
    """Prior (covariance part), entropy and likelihood against finite differences."""
    g = torch.Generator().manual_seed(3)
    T, N = 5, 3
    raw = torch.randn(T, N, 2, generator=g, dtype=F64, requires_grad=True)
    off = torch.randn(T - 1, N, 2, generator=g, dtype=F64, requires_grad=True)
    w = torch.rand(T - 1, generator=g, dtype=F64) + 0.5
    assert torch.autograd.gradcheck(lambda r, o: expected_neg_log_prior_var(r, o, w, 0.8), (raw, off))
    assert torch.autograd.gradcheck(neg_entropy, (raw,))
    eps = torch.randn(T, N, 2, generator=g, dtype=F64)
    mu = torch.randn(T, N, 2, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, r, o: sample_chain(m, r, o, eps), (mu, raw, off))
    # likelihood of a block
    X = torch.randn(T, 4, 3, generator=g, dtype=F64, requires_grad=True)
    c_rows = torch.rand(T, 4, generator=g, dtype=F64)
    cneg = torch.rand(T, 3, generator=g, dtype=F64)
    pt, pp, pq = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 0]), torch.tensor([2, 0, 1])
    pn = torch.tensor([2.0, 1.0, 5.0], dtype=F64)
    assert torch.autograd.gradcheck(lambda X: skipgram_block(X, c_rows, cneg, 1.3, pt, pp, pq, pn), (X,))


@pytest.mark.parametrize("inference", ["variational", "map"])
def test_model_gradient_against_finite_differences(inference):
    """The whole minibatch -ELBO estimate (same batch and noise every call) against central finite
    differences along random directions in the full parameter space."""
    wc = _wc(V=8, T=4)
    model = DynamicWordEmbeddings(wc, d=2, inference=inference, batch_words=5, batch_contexts=6, dtype=F64,
                                  test_mass=0.2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))

    def f() -> torch.Tensor:
        return model.loss_terms(torch.Generator().manual_seed(7))["total"]

    model.zero_grad()
    f().backward()
    params = list(model.parameters())
    grads = [p.grad.clone() for p in params]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        dirs = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
        h = 1e-5
        with torch.no_grad():
            for p, v in zip(params, dirs):
                p.add_(h * v)
            up = float(f())
            for p, v in zip(params, dirs):
                p.add_(-2 * h * v)
            down = float(f())
            for p, v in zip(params, dirs):
                p.add_(h * v)
        fd = (up - down) / (2 * h)
        an = sum(float((gr * v).sum()) for gr, v in zip(grads, dirs))
        assert fd == pytest.approx(an, rel=1e-6, abs=1e-6)


# ----------------------------------------------------------------------------- likelihood and prior
def _dense_loglik(U, Vm, n_pos, r=1.0, e=0.75):
    c = n_pos.sum(1)
    cneg = c ** e / (c ** e).sum()
    n_neg = r * np.outer(c, cneg)
    X = U @ Vm.T
    ls = lambda x: -np.logaddexp(0, -x)  # log sigmoid
    return (n_pos * ls(X) + n_neg * ls(-X)).sum(), (n_pos.sum() + n_neg.sum())


def test_map_full_batch_loss_is_negative_log_joint():
    wc = _wc(V=10, T=4)
    model = DynamicWordEmbeddings(wc, d=3, inference="map", batch_words=0, batch_contexts=0, dtype=F64,
                                  test_steps=0.0, test_mass=0.0, D=0.05, sigma0=1.5)
    U, Vm = model.U.detach().numpy(), model.V_.detach().numpy()
    ll = sum(_dense_loglik(U[t], Vm[t], wc.counts[t].toarray())[0] for t in range(wc.T))
    w = 1.0 / (0.05 * np.diff(wc.years))
    Pi = prior_precision(w, 1 / 1.5 ** 2)
    _, logdet = np.linalg.slogdet(Pi)
    chains = np.concatenate([U.reshape(wc.T, -1), Vm.reshape(wc.T, -1)], axis=1)  # (T, chains)
    log_prior = (-0.5 * np.einsum("tc,ts,sc->", chains, Pi, chains)
                 + chains.shape[1] * (0.5 * logdet - 0.5 * wc.T * np.log(2 * np.pi)))
    terms = model.loss_terms()
    assert float(terms["total"].detach()) == pytest.approx(-(ll + log_prior), rel=1e-10)
    # psi is exactly the chain coupling of the point estimates
    psi = 0.5 * sum(w[t] * ((chains[t + 1] - chains[t]) ** 2).sum() for t in range(wc.T - 1))
    assert float(terms["psi"].detach()) == pytest.approx(psi, rel=1e-10)


@pytest.mark.parametrize("inference", ["variational", "map"])
def test_float32_loss_terms_are_reported_in_float64(inference, monkeypatch):
    """The loss terms of a float32 model (what metrics.csv, the progress bar and trainer.target see)
    are float64 sums kept in float64: a float64 model with the same parameters, data and draws gives
    them to 1e-9 of the loss or better. Here the loss is about 1e7 (millions of terms); rounded to
    float32, as they were, total and psi were off by 1e-8 to 1e-7 of it (the paper's loss, about
    -1e9: about 100)."""
    import goldstone_cli.models.dwe as dwe

    def same_noise(shape, generator, like, native=True):  # both models: the same (float64) draws
        return torch.randn(shape, generator=generator, dtype=F64).to(like.dtype)

    monkeypatch.setattr(dwe, "_pooled_randn", same_noise)
    V, T = 400, 12
    wc = WordCounts(vocab=[f"w{i}" for i in range(V)], years=np.arange(1800, 1800 + T),
                    counts=_sym_counts(V, T, density=0.05, seed=1))
    kw = dict(d=64, inference=inference, batch_words=200, batch_contexts=200, seed=3, test_steps=0.0, test_mass=0.0)
    m32, m64 = DynamicWordEmbeddings(wc, **kw), DynamicWordEmbeddings(wc, dtype=F64, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (name, p32), p64 in zip(m32.named_parameters(), m64.parameters()):
            if name.startswith(("raw", "off")):  # spread the posterior widths (no one rounding shared by all)
                p32.add_(0.3 * torch.randn(p32.shape, generator=g))
            p64.copy_(p32)  # the float32 parameters, exactly
    assert_float64_loss_terms(m32, m64)  # the training step's passes (with gradients), as the trainer logs them
    for s in range(3):
        got = m32.loss_terms(torch.Generator().manual_seed(s))
        local = m32.local_loss(torch.Generator().manual_seed(s)).detach()  # the same terms without psi's pass
        assert local.dtype == F64 and float(local) == pytest.approx(float(got["local"]), rel=1e-10)


def test_minibatch_estimate_is_unbiased():
    """Averaged over every possible block of P words and Q contexts, the scaled block likelihood
    equals the full likelihood (exact enumeration, no sampling noise)."""
    import itertools

    V, P, Q = 7, 3, 4
    wc = _wc(V=V, T=3)
    model = DynamicWordEmbeddings(wc, d=3, inference="map", dtype=F64, test_steps=0.0, test_mass=0.0)
    all_idx = torch.arange(V)
    with torch.no_grad():
        full = float(model.block_loglik(model.U, model.V_, all_idx, all_idx))
        vals = [float(model.block_loglik(model.U[:, list(r)], model.V_[:, list(c)], torch.tensor(r), torch.tensor(c)))
                for r in itertools.combinations(range(V), P) for c in itertools.combinations(range(V), Q)]
    assert (V / P) * (V / Q) * np.mean(vals) == pytest.approx(full, rel=1e-12)
    U, Vm = model.U.detach().numpy(), model.V_.detach().numpy()
    assert full == pytest.approx(sum(_dense_loglik(U[t], Vm[t], wc.counts[t].toarray())[0] for t in range(3)), rel=1e-12)


def test_variational_elbo_monte_carlo_matches_exact_prior_part():
    """With no data (all counts zero), -ELBO has a closed form: KL(q || prior). The estimate must equal it."""
    T, V, d = 4, 3, 2
    wc = WordCounts(vocab=["a", "b", "c"], years=[1800, 1810, 1830, 1840], counts=[sp.csr_matrix((V, V))] * T)
    model = DynamicWordEmbeddings(wc, d=d, batch_words=0, batch_contexts=0, dtype=F64, test_steps=0, test_mass=0,
                                  D=0.02, sigma0=2.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.raw_U.normal_(generator=g)
        model.off_U.normal_(generator=g)
        total = float(model.loss_terms()["total"])
    w = 1.0 / (0.02 * np.diff(wc.years))
    Pi = prior_precision(w, 0.25)
    kl = 0.0
    for name in ("U", "V"):
        mu = getattr(model, f"mu_{name}").detach().numpy()
        raw = getattr(model, f"raw_{name}").detach().numpy()
        off = getattr(model, f"off_{name}").detach().numpy()
        for i in range(V):
            for k in range(d):
                B = _bidiag_dense(raw[:, i, k], off[:, i, k])
                S = np.linalg.inv(B @ B.T)
                m = mu[:, i, k]
                kl += 0.5 * (np.trace(Pi @ S) + m @ Pi @ m - T - np.linalg.slogdet(Pi)[1] - np.linalg.slogdet(S)[1])
    assert total == pytest.approx(kl, rel=1e-9)


# ----------------------------------------------------------------------------- split and evaluation
def test_choose_test_steps_interior_and_spread():
    steps = choose_test_steps(24, 0.1)
    assert len(steps) == 2 and 0 not in steps and 23 not in steps
    assert choose_test_steps(2, 0.5) == [] and choose_test_steps(10, 0.0) == []


def test_split_conserves_counts_and_symmetry():
    wc = _wc(V=15, T=6)
    s = split_counts(wc, 0.2, 0.3, seed=0)
    assert s.test_steps == choose_test_steps(6, 0.2)
    for t in range(wc.T):
        if t in s.test_steps:
            assert s.train[t].nnz == 0 and s.heldout_mass[t] is None
            continue
        tr, te = s.train[t], s.heldout_mass[t]
        np.testing.assert_allclose((tr + te).toarray(), wc.counts[t].toarray())
        assert abs(te - te.T).max() == 0 and te.data.min() >= 0 and tr.data.min() >= 0
    frac = sum(m.sum() for m in s.heldout_mass if m is not None) / sum(
        wc.counts[t].sum() for t in range(wc.T) if t not in s.test_steps)
    assert 0.2 < frac < 0.4


def test_split_rejects_fractional_counts_for_mass():
    wc = _wc(V=6, T=3)
    wc.counts[1] = wc.counts[1] * 0.5
    with pytest.raises(ValueError, match="integer counts"):
        split_counts(wc, 0.0, 0.1, seed=0)


def test_heldout_loglik_matches_dense():
    rng = np.random.default_rng(4)
    V, d = 13, 3
    U, Vm = rng.normal(size=(V, d)), rng.normal(size=(V, d))
    m = _sym_counts(V, 1, seed=5)[0]
    ll, n = heldout_loglik(torch.as_tensor(U), torch.as_tensor(Vm), m, 1.0, 0.75, chunk=7)
    ll_ref, n_ref = _dense_loglik(U, Vm, m.toarray())
    assert ll == pytest.approx(ll_ref, rel=1e-10) and n == pytest.approx(n_ref, rel=1e-12)


def test_bad_word_counts():
    with pytest.raises(ValueError, match="increasing"):
        WordCounts(vocab=["a"], years=[1800, 1800], counts=[sp.csr_matrix((1, 1))] * 2)
    with pytest.raises(ValueError, match="shape"):
        WordCounts(vocab=["a", "b"], years=[1800, 1801], counts=[sp.csr_matrix((1, 1))] * 2)
    with pytest.raises(ValueError, match="duplicate"):
        WordCounts(vocab=["a", "a"], years=[1800, 1801], counts=[sp.csr_matrix((2, 2))] * 2)


def test_uncoupled_model_has_no_psi():
    model = DynamicWordEmbeddings(_wc(), d=2, coupled=False, dtype=F64)
    assert model.coupling.num_edges == 0 and float(model.psi().detach()) == 0.0


@pytest.mark.parametrize("inference", ["variational", "map"])
def test_training_improves_heldout_likelihood(inference):
    """A few hundred Adam steps on a small planted corpus raise the held-out log-likelihood."""
    from goldstone_cli.models.dwe import planted_corpus

    wc = planted_corpus(V=40, T=6, seed=0)
    model = DynamicWordEmbeddings(wc, d=4, inference=inference, batch_words=20, batch_contexts=40, dtype=F64,
                                  test_steps=0.2, test_mass=0.1, D=0.01)
    before = model.evaluate()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        opt.zero_grad()
        model.loss_terms(g)["total"].backward()
        opt.step()
    after = model.evaluate()
    assert after["ll_test_mass"] > before["ll_test_mass"] + 0.01
    assert after["ll_test_steps"] > before["ll_test_steps"] + 0.01


# ----------------------------------------------------------------------------- issue 13: validation set, best.pt
def test_validation_split_leaves_the_test_sets_unchanged_and_conserves_counts():
    wc = _wc(V=15, T=6)
    plain = split_counts(wc, 0.2, 0.3, seed=0)
    s = split_counts(wc, 0.2, 0.3, seed=0, val_mass_fraction=0.25)
    assert s.test_steps == plain.test_steps
    for t in range(wc.T):
        if t in s.test_steps:
            assert s.val_mass[t] is None
            continue
        assert (s.heldout_mass[t] != plain.heldout_mass[t]).nnz == 0  # same test mass with or without validation
        v = s.val_mass[t]
        np.testing.assert_allclose((s.train[t] + v).toarray(), plain.train[t].toarray())
        assert abs(v - v.T).max() == 0 and (v.nnz == 0 or v.data.min() > 0)
    frac = sum(m.sum() for m in s.val_mass if m is not None) / sum(m.sum() for m in plain.train)
    assert 0.15 < frac < 0.35


def test_float32_heldout_loglik_accumulates_in_float64():
    """ll_test / ll_val / ll_train of float32 embeddings: the negatives' sums over all V contexts
    add float32 partials of at most 1,024 contexts in float64 (one float32 product over the 5,000
    contexts here was off by 1.1e-8 relative, the whole likelihood by 5.8e-9; now about 1e-10)."""
    V, d = 5000, 100
    rng = np.random.default_rng(0)
    A = sp.random(V, V, density=0.01, random_state=rng, data_rvs=lambda n: rng.integers(1, 50, n)).tocsr()
    A = (A + A.T).tocsr()
    g = torch.Generator().manual_seed(0)
    U, W = 0.3 * torch.randn(V, d, generator=g), 0.3 * torch.randn(V, d, generator=g)  # float32
    got, n = heldout_loglik(U, W, A, 1.0, 0.75)
    want, n64 = heldout_loglik(U.double(), W.double(), A, 1.0, 0.75)
    assert n == n64 and got == pytest.approx(want, rel=1e-9)


def test_heldout_loglik_many_equals_one_at_a_time():
    from goldstone_cli.models.dwe import heldout_loglik_many

    rng = np.random.default_rng(1)
    V, d = 11, 3
    U, Vm = (torch.as_tensor(rng.normal(size=(V, d))) for _ in range(2))
    mats = _sym_counts(V, 3, seed=2)
    many = heldout_loglik_many(U, Vm, mats, 1.0, 0.75, chunk=5)
    for m, (ll, n) in zip(mats, many):
        ll1, n1 = heldout_loglik(U, Vm, m, 1.0, 0.75, chunk=5)
        assert ll == pytest.approx(ll1, rel=1e-12) and n == n1


def test_dwe_keeps_best_checkpoint_on_validation_likelihood(tmp_path):
    from goldstone_cli import checkpoint as ckpt
    from goldstone_cli.models.dwe import planted_corpus
    from goldstone_cli.train import train

    from goldstone_cli.config import compose

    wc = planted_corpus(V=24, T=5, n_clusters=3, seed=1)
    model = DynamicWordEmbeddings(wc, d=3, inference="map", batch_words=0, batch_contexts=0, dtype=F64,
                                  test_steps=0.2, test_mass=0.1, val_mass=0.1)
    assert model.best_metric == model.target_metric == "ll_val" and "ll_val" in model.metric_names()
    ev = model.evaluate()
    assert -0.8 < ev["ll_val"] < 0 and set(model.metric_names()) == set(ev)
    no_val = DynamicWordEmbeddings(wc, d=3, inference="map", dtype=F64)
    assert no_val.best_metric is None and no_val.target_metric == "ll_test"  # no validation set

    # through the trainer: best.pt holds the step with the highest ll_val of metrics.csv
    import goldstone_cli.models as models

    cfg = compose(["model=dwe", "data=cooc", "data.path=unused", "model.inference=map", "model.d=3",
                   "trainer.steps=40", "trainer.eval_every=10", "trainer.progress=false", "trainer.dtype=float64",
                   f"run_dir={tmp_path / 'run'}", "model.val_mass=0.1"])
    built = DynamicWordEmbeddings(wc, d=3, inference="map", batch_words=12, batch_contexts=0, dtype=F64,
                                  test_steps=0.2, test_mass=0.1, val_mass=0.1)
    orig = models._BUILDERS["dwe"]
    models._BUILDERS["dwe"] = lambda *a: built
    try:
        result = train(cfg)
    finally:
        models._BUILDERS["dwe"] = orig
    from goldstone_cli.numerics import WORKSPACE

    assert not WORKSPACE.storages  # the run's pooled buffers (mean terms, dense gradients) were let go
    import pandas as pd

    df = pd.read_csv(tmp_path / "run" / "metrics.csv").dropna(subset=["ll_val"])
    best = df.loc[df["ll_val"].idxmax()]
    saved = ckpt.load(tmp_path / "run" / "checkpoints" / ckpt.BEST)
    assert saved["metric"] == "ll_val" and saved["step"] == int(best["step"])
    assert result.summary["best"]["value"] == pytest.approx(best["ll_val"])
    assert result.summary["target_metric"] == "ll_val"  # trainer.target never stops on a test set either
    assert "held-out LL/point" in result.summary["headline"]
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "run" / "loss.png").shape[1] == 12 * 120  # the held-out panel beside the loss


def test_a_checkpoint_of_other_held_out_steps_inference_or_coupling_is_refused():
    wc = _wc()
    a = DynamicWordEmbeddings(wc, d=3, inference="variational", dtype=F64, test_steps=0.2)
    state = a.state_dict()
    DynamicWordEmbeddings(wc, d=3, inference="variational", dtype=F64, test_steps=0.2).load_state_dict(state)
    for kw, what in (({"test_steps": 0.6}, "held-out steps"), ({"coupled": False}, "coupling")):
        b = DynamicWordEmbeddings(wc, d=3, inference="variational", dtype=F64, **{"test_steps": 0.2, **kw})
        with pytest.raises(ValueError, match=what):
            b.load_state_dict(state)
    extra = next(k for k in state if k.endswith("_extra_state"))
    with pytest.raises(ValueError, match="model.inference"):
        DynamicWordEmbeddings(wc, d=3, inference="map", dtype=F64, test_steps=0.2).set_extra_state(state[extra])
    old = dict(state[extra])
    for key in ("train_mask", "inference", "coupled"):  # a checkpoint older than these keys still loads
        old.pop(key)
    a.set_extra_state(old)
