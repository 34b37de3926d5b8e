"""The eager ratings pass (GPU, float64, GOLDSTONE_NATIVE=0): dot products chunk by chunk, then the
gradient as one weighted row sum per run of equal rows (``RatingGroups``, ``F.embedding_bag``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from goldstone_cli.data.movielens import load_movielens
from goldstone_cli.models import movielens as M
from goldstone_cli.models.movielens import RatingGroups, SparseDynamicBernoulliMF, _runs, ratings_pass

SAMPLE = Path(os.environ.get("ML_SMALL") or
              Path(__file__).resolve().parents[1].parent / "shared" / "data" / "movielens" / "ml-latest-small")


def _problem(n_u=60, n_v=45, d=7, n=5000, seed=0, sort_u=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(n_u, d, generator=g, dtype=dtype)
    V = torch.randn(n_v, d, generator=g, dtype=dtype)
    ru = torch.randint(n_u, (n,), generator=g)
    if sort_u:
        ru = torch.sort(ru).values
    rv = torch.randint(n_v, (n,), generator=g)
    x = (torch.randint(2, (n,), generator=g) * 2 - 1).to(dtype)
    return U, V, ru, rv, x


def _autograd(U, V, ru, rv, x, scale):
    Ud, Vd = U.detach().double().clone().requires_grad_(), V.detach().double().clone().requires_grad_()
    nll = F.softplus(-x.double() * (Ud[ru] * Vd[rv]).sum(1)).sum()
    (scale * nll).backward()
    return float(nll.detach()), Ud.grad, Vd.grad


@pytest.mark.parametrize("chunk", [1, 3, 64, 10**6])
def test_runs_against_a_loop(chunk):
    rows = torch.tensor([4, 4, 4, 1, 1, 7, 4, 4, 9, 9, 9, 9, 9, 2])  # a row may come back later
    got = _runs(rows, chunk)
    assert got[0][0] == 0 and got[-1][1] == rows.numel()
    assert all(a[1] == b[0] for a, b in zip(got[:-1], got[1:]))  # contiguous, in order
    runs = []
    for s, e, vals, offs in got:
        assert int(offs[0]) == 0 and int(offs[-1]) < chunk  # its runs start within `chunk` of its start
        ends = offs.tolist()[1:] + [e - s]
        for v, a, b in zip(vals.tolist(), offs.tolist(), ends):
            assert b > a and rows[s + a: s + b].eq(v).all()
            runs.append((v, s + a, s + b))
    brute, i = [], 0
    while i < rows.numel():
        j = i
        while j < rows.numel() and rows[j] == rows[i]:
            j += 1
        brute.append((int(rows[i]), i, j))
        i = j
    assert runs == brute
    assert _runs(rows[:0], chunk) == []


@pytest.mark.parametrize("method", ["bags", "scatter"])
@pytest.mark.parametrize("sort_u", [True, False])
@pytest.mark.parametrize("chunk", [1 << 20, 777, 5])
def test_eager_pass_matches_autograd_in_float64(sort_u, chunk, method, monkeypatch):
    monkeypatch.setitem(M.RATINGS_GRADIENT, "cpu", method)
    U, V, ru, rv, x = _problem(sort_u=sort_u)
    scale = 1.7
    gU, gV = torch.full_like(U, 0.25), torch.full_like(V, -0.5)  # the pass adds into what is there
    nll = ratings_pass(U, V, ru, rv, x, scale, gU, gV, chunk=chunk, native=False)
    ref, rU, rV = _autograd(U, V, ru, rv, x, scale)
    assert abs(float(nll) / ref - 1) < 1e-13
    torch.testing.assert_close(gU, rU + 0.25, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gV, rV - 0.5, rtol=1e-12, atol=1e-12)
    assert float(ratings_pass(U, V, ru, rv, x, scale, None, None, chunk=chunk, native=False)) == float(nll)


def test_given_groups_are_used_only_for_their_own_ratings():
    U, V, ru, rv, x = _problem()
    groups = RatingGroups(ru, rv, 777)
    ref, rU, rV = _autograd(U, V, ru, rv, x, 1.0)
    gU, gV = torch.zeros_like(U), torch.zeros_like(V)
    ratings_pass(U, V, ru, rv, x, 1.0, gU, gV, chunk=777, native=False, groups=groups)
    torch.testing.assert_close(gU, rU, rtol=1e-12, atol=1e-12)
    assert "u_runs" in vars(groups) and "v_runs" in vars(groups)  # built on first use, then kept
    kept = groups.u_runs
    ratings_pass(U, V, ru, rv, x, 1.0, gU, gV, chunk=777, native=False, groups=groups)
    assert groups.u_runs is kept
    # other ratings (a minibatch, a changed chunk) with these groups: built afresh, still right
    half_u, half_v, half_x = ru[::2], rv[::2], x[::2]
    for args, chunk in (((half_u, half_v, half_x), 777), ((ru, rv, x), 100)):
        _, rU, rV = _autograd(U, V, *args, 1.0)
        gU, gV = torch.zeros_like(U), torch.zeros_like(V)
        ratings_pass(U, V, *args, 1.0, gU, gV, chunk=chunk, native=False, groups=groups)
        torch.testing.assert_close(gU, rU, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gV, rV, rtol=1e-12, atol=1e-12)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_eager_pass_in_float32_at_ml20m_bin_size_against_float64(device):
    """One ML-20M-like time bin: 138k users x 26.7k movies would be too big for a test, so 20k x 8k
    rows, 400k ratings (heavy-tailed rows: long runs on both sides), d=30, against float64 on the
    CPU; on a GPU too (the eager pass is the GPU's default)."""
    g = torch.Generator().manual_seed(3)
    n_u, n_v, d, n = 20_000, 8_000, 30, 400_000
    U = 0.1 * torch.randn(n_u, d, generator=g)
    V = 0.1 * torch.randn(n_v, d, generator=g)
    ru = torch.sort((torch.rand(n, generator=g) ** 3 * n_u).long()).values
    rv = (torch.rand(n, generator=g) ** 2 * n_v).long()
    x = (torch.randint(2, (n,), generator=g) * 2 - 1).float()
    on = [t.to(device) for t in (U, V, ru, rv, x)]
    gU, gV = torch.zeros_like(on[0]), torch.zeros_like(on[1])
    nll = ratings_pass(*on, 3.0, gU, gV, chunk=1 << 16, native=False)
    gU, gV = gU.cpu(), gV.cpu()
    ref, rU, rV = _autograd(U, V, ru, rv, x, 3.0)
    assert abs(float(nll) / ref - 1) < 1e-9  # float64 sum of float32 terms
    for got, want in ((gU, rU), (gV, rV)):
        err = float((got.double() - want).abs().max())
        assert err < 1e-5 * float(want.abs().max()), err


def test_eager_pass_refuses_a_bad_row():
    U, V, ru, rv, x = _problem(n=100)
    bad = rv.clone()
    bad[37] = V.shape[0]
    with pytest.raises(IndexError):
        ratings_pass(U, V, ru, bad, x, 1.0, torch.zeros_like(U), torch.zeros_like(V), native=False)


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="ml-latest-small sample not available")
def test_model_step_keeps_the_full_batch_groups(tmp_path):
    data = load_movielens(str(SAMPLE), T=12, seed=0, cache_dir=str(tmp_path), progress=False)
    model = SparseDynamicBernoulliMF(data, d=8, dtype=torch.float64)
    model.native = False
    model.loss_terms()["total"].backward()
    groups = model._train_groups
    assert "v_runs" in vars(groups)
    kept = groups.v_runs
    model.zero_grad(set_to_none=True)
    model.loss_terms()["total"].backward()
    assert model._train_groups.v_runs is kept
    # the same gradient as autograd through local_loss() + psi()
    got = (model.U.grad.clone(), model.V.grad.clone())
    model.zero_grad(set_to_none=True)
    (model.local_loss() + model.psi()).backward()
    torch.testing.assert_close(got[0], model.U.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], model.V.grad, rtol=1e-10, atol=1e-12)
