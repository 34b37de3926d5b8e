"""float32 reductions over millions of numbers accumulate in float64 (issue 12, Numerics).

Sizes are realistic: 2e6 rows of d=30 (ML-20M has 16.5M rows of U and V together at T=100). The
float64 references are computed chunk by chunk so the tests stay well under 2 GB."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from goldstone_cli.numerics import batched_gram, row_sum_squares, sum_squares, sum_squares_value
from goldstone_cli.optim.coupling import Coupling

ROWS = 2_000_000


def _ref_sum_sq(x: torch.Tensor, chunk: int = 1 << 22) -> float:
    """Exact-enough sum of squares: float64 chunks, added with math.fsum."""
    flat = x.reshape(-1)
    return math.fsum(float(flat[s:s + chunk].double().square().sum()) for s in range(0, flat.numel(), chunk))


@pytest.fixture(scope="module")
def big():
    """(T=2, N=2e6, d=30) float32 normal entries (480 MB) and float64 references computed once."""
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(2, ROWS, 30, generator=g)
    per_t = [_ref_sum_sq(Z[t]) for t in range(2)]
    diff = _ref_sum_sq(Z[1] - Z[0])
    k = 8  # pair moments of the first k columns, float64 chunks of rows
    gram = sum(Z[0, s:s + (1 << 20), :k].double().T @ Z[1, s:s + (1 << 20), :k].double() for s in range(0, ROWS, 1 << 20))
    return SimpleNamespace(Z=Z, per_t=per_t, total=math.fsum(per_t), diff=diff, k=k, gram=gram)


def test_sum_squares_float32_is_accurate_at_2e6_rows(big):
    ref = big.total
    assert abs(float(sum_squares_value(big.Z)) - ref) <= 1e-6 * ref
    # the reduction this replaces: a float32 vector_norm over the whole tensor is percent-level off
    naive = float(torch.linalg.vector_norm(big.Z)) ** 2
    assert abs(naive - ref) > 1e-4 * ref


def test_row_sum_squares_matches_per_row_float64(big):
    got = row_sum_squares(big.Z.flatten(1))  # (2,): one row of N d numbers per time step
    assert got.dtype == torch.float64 and got.shape == (2,)
    for t in range(2):
        assert abs(float(got[t]) - big.per_t[t]) <= 1e-6 * big.per_t[t]
    # lengths that are not a multiple of the block, and a 1-element tail
    x = torch.randn(4, 3 * 1024 + 1, dtype=torch.float64)
    assert torch.allclose(row_sum_squares(x), x.square().sum(1), rtol=1e-13)
    assert torch.allclose(sum_squares_value(x[:, :7]), x[:, :7].square().sum(), rtol=1e-13)


def test_psi_float32_agrees_with_float64_at_2e6_rows(big):
    """Coupling.psi (Eq. 3) of a float32 tensor: within 1e-6 of the float64 value (was 0.94% low)."""
    got = float(Coupling.chain(2, 10.0).psi_value(big.Z))
    ref = 0.5 * 10.0 * big.diff
    assert abs(got - ref) <= 1e-6 * ref


def test_pair_moments_float32_agree_with_float64_at_2e6_rows(big):
    """M_tt' (Eq. 15) summed over 2e6 rows: within 2e-6 of the largest entry (one float32 bmm: 3.3e-5).
    Independent zero-mean rows make every entry a sum with cancellation (|M| ~ sqrt(N)), the
    hardest case; the diagonal of M_tt (~ N) is checked to 1e-6."""
    M = Coupling.chain(2, 1.0).pair_moments(big.Z[:, :, :big.k], torch.float64)  # (1, k, k)
    assert float((M[0] - big.gram).abs().max()) <= 2e-6 * float(big.gram.abs().max())
    Ms = Coupling.chain(2, 1.0).self_moments(big.Z[:, :, :big.k], torch.float64)  # (2, k, k)
    for t in range(2):
        assert abs(float(Ms[t].trace()) - _ref_sum_sq(big.Z[t, :, :big.k])) <= 1e-6 * float(Ms[t].trace())


@pytest.mark.slow  # a full gauge step on 2e6 rows: ~10 s on a busy 2-core machine
def test_natural_gauge_learning_rate_uses_a_float64_sum_at_2e6_rows(big):
    """Eq. 17: rho' = d / sum ||z||^2 over the group; the sum over 2e6 rows is accumulated in float64."""
    from goldstone_cli.optim.goldstone import GoldstoneGD

    Z = torch.nn.Parameter(big.Z.clone())
    opt = GoldstoneGD(torch.optim.SGD([Z], lr=0.0), [[Z]], Coupling.chain(2, 1.0), k1=1, solver="natural",
                      k2=1, rotation="expm", allow_reflections=False)
    opt.gauge_step()
    lr = opt.last_gauge["groups"][0]["lr"]
    ref = 30 / big.total
    assert abs(lr - ref) <= 1e-6 * ref


def test_batched_gram_small_exact_and_shape_check():
    A, B = torch.randn(3, 50, 4, dtype=torch.float64), torch.randn(3, 50, 5, dtype=torch.float64)
    assert torch.allclose(batched_gram(A, B, chunk=7), torch.einsum("tni,tnj->tij", A, B))
    assert torch.allclose(batched_gram(A.float(), B.float(), chunk=7), torch.einsum("tni,tnj->tij", A, B), atol=1e-5)
    with pytest.raises(ValueError, match="same"):
        batched_gram(A, B[:, :10])


def test_sum_squares_gradient_matches_autograd():
    x = torch.randn(5, 700, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(sum_squares, (x[:, :3, :2].detach().clone().requires_grad_(),))
    (g,) = torch.autograd.grad(sum_squares(x) * 3.0, x)
    assert torch.allclose(g, 6.0 * x)
    x32 = x.detach().float().requires_grad_()
    out = sum_squares(x32)
    assert out.dtype == torch.float64
    out.backward()
    assert x32.grad.dtype == torch.float32  # gradients stay float32


def _ratings(T: int, n_users: int, n_items: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return SimpleNamespace(
        user=rng.integers(0, n_users, n), item=rng.integers(0, n_items, n), t=rng.integers(0, T, n),
        x=np.where(rng.random(n) < 0.5, 1.0, -1.0), split=rng.choice(3, n, p=[0.5, 0.2, 0.3]),
        n_users=n_users, n_items=n_items, T=T)


def test_movielens_float32_loss_agrees_with_float64_at_2e6_rows():
    """Eq. 9's local loss (likelihood + gamma term) and psi at T (n_users + n_items) = 2e6 rows of
    d=30: float32 within 1e-6 relative of float64 (the gamma term was 2.7e-3 off at ML-20M size); the terms are
    float64 scalars whatever the parameters' dtype."""
    from goldstone_cli.models.movielens import SparseDynamicBernoulliMF

    data = _ratings(T=20, n_users=80_000, n_items=20_000, n=400_000)
    m32 = SparseDynamicBernoulliMF(data, d=30, init_scale=0.3, dtype=torch.float32)
    terms32 = m32.loss_terms()
    m64 = SparseDynamicBernoulliMF(data, d=30, init_scale=0.3, dtype=torch.float64)  # same start, in float64
    with torch.no_grad():
        terms64 = {k: float(v) for k, v in m64.loss_terms().items()}
    del m64
    for key in ("local", "psi", "total"):
        assert terms32[key].dtype == torch.float64  # reported in float64 (VALUE_DTYPE): no float32 rounding
        assert abs(terms32[key].item() - terms64[key]) <= 1e-6 * abs(terms64[key]), key
    terms32["total"].backward()  # still differentiable; gradients in float32
    assert m32.U.grad.dtype == torch.float32 and torch.isfinite(m32.U.grad).all()


def test_dense_mf_loss_is_differentiable_and_float64_accumulated():
    from goldstone_cli.data.synthetic import make_synthetic
    from goldstone_cli.models.dense_mf import DenseDynamicMF

    data = make_synthetic(T=3, n_rows=20, n_cols=15, rank=2, seed=0)
    for dtype in (torch.float32, torch.float64):
        m = DenseDynamicMF(data, d=2, dtype=dtype)
        loss = m.local_loss()
        assert loss.dtype == dtype
        ref = 0.5 * (m.X - torch.bmm(m.U, m.V.transpose(1, 2))).double().square().sum()
        assert torch.allclose(loss.double(), ref, rtol=1e-6)
        loss.backward()
        assert m.U.grad.dtype == dtype
        g_ref = torch.autograd.grad(0.5 * (m.X - torch.bmm(m.U, m.V.transpose(1, 2))).pow(2).sum(), m.U)[0]
        assert torch.allclose(m.U.grad, g_ref, rtol=1e-5, atol=1e-6)
