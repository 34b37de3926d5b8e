import math

import torch

from goldstone_cli.data.synthetic import make_synthetic
from goldstone_cli.models.dense_mf import DenseDynamicMF, optimal_loss


def test_synthetic_data_is_paper_sec_5_1():
    data = make_synthetic(seed=1)
    assert data.X.shape == (30, 10, 10)
    assert torch.equal(data.X[0], data.X[-1])  # the same X at every t
    s = torch.linalg.svdvals(data.X[0])
    assert s[2] > 1.0 and s[3] < 0.3  # rank 3 plus noise of variance 1e-3
    # the residual beyond rank 3 is the noise: about (n^2 - 3 (2n - 3)) * 1e-3 in expectation
    resid = float((s[3:] ** 2).sum())
    assert 0.02 < resid < 0.12
    assert torch.equal(make_synthetic(seed=1).X, data.X) and not torch.equal(make_synthetic(seed=2).X, data.X)


def test_time_dependent_data_drift_smoothly():
    data = make_synthetic(time_dependent=True, drift=0.05, seed=0)
    steps = (data.X[1:] - data.X[:-1]).flatten(1).norm(dim=1)
    assert float(steps.max()) < 0.3 * float(data.X[0].norm())  # smooth
    assert float((data.X[-1] - data.X[0]).norm()) > 2 * float(steps.mean())  # but really moving
    # the rank is still 3 at every t
    s = torch.linalg.svdvals(data.X)
    assert float(s[:, 3].max()) < 0.3


def test_gradient_matches_finite_differences():
    data = make_synthetic(T=4, n_rows=5, n_cols=4, seed=0)
    model = DenseDynamicMF(data, d=2, coupling=3.0, init_scale=0.5, seed=0)

    U0, V0 = model.U.detach().clone().requires_grad_(), model.V.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda U, V: _loss(data.X, U, V, 3.0), (U0, V0))
    # the model's autograd gradient equals the explicit one (Eq. 5 and L @ Z of Eq. 6)
    model.zero_grad()
    model.loss_terms()["total"].backward()
    with torch.no_grad():
        R = data.X - model.U @ model.V.transpose(1, 2)
        gU = -R @ model.V + model.coupling.laplacian_apply(model.U)
        gV = -R.transpose(1, 2) @ model.U + model.coupling.laplacian_apply(model.V)
    assert torch.allclose(model.U.grad, gU, atol=1e-12) and torch.allclose(model.V.grad, gV, atol=1e-12)


def _loss(X, U, V, lam):
    local = 0.5 * ((X - U @ V.transpose(1, 2)) ** 2).sum()
    psi = 0.5 * lam * (((U[1:] - U[:-1]) ** 2).sum() + ((V[1:] - V[:-1]) ** 2).sum())
    return local + psi


def test_closed_form_optimum():
    data = make_synthetic(seed=3)
    d = 3
    model = DenseDynamicMF(data, d=d, seed=0)
    U, s, Vh = torch.linalg.svd(data.X[0])
    # a minimizer: every Z_t equal to a rank-d factorization (psi = 0)
    with torch.no_grad():
        model.U.copy_((U[:, :d] * s[:d].sqrt()).expand(30, -1, -1))
        model.V.copy_((Vh[:d].T * s[:d].sqrt()).expand(30, -1, -1))
    terms = model.loss_terms()
    assert abs(terms["psi"].item()) < 1e-20
    assert math.isclose(terms["total"].item(), optimal_loss(data.X, d), rel_tol=1e-12)
    assert abs(model.evaluate()["suboptimality"]) < 1e-10
    terms["total"].backward()
    assert float(model.U.grad.abs().max()) < 1e-10 and float(model.V.grad.abs().max()) < 1e-10
    # any other point has a higher loss
    model2 = DenseDynamicMF(data, d=d, seed=1)
    assert model2.evaluate()["suboptimality"] > 0


def test_loss_is_invariant_under_per_step_rotations_except_psi():
    data = make_synthetic(T=5, seed=0)
    model = DenseDynamicMF(data, d=3, seed=0, init_scale=1.0)
    before = model.loss_terms()
    R = torch.linalg.qr(torch.randn(5, 3, 3, dtype=torch.float64))[0]  # (T, d, d) orthogonal
    with torch.no_grad():
        model.U.copy_(model.U @ R.transpose(1, 2))
        model.V.copy_(model.V @ R.transpose(1, 2))
    after = model.loss_terms()
    assert torch.allclose(before["local"], after["local"], rtol=1e-12)
    assert not torch.allclose(before["psi"], after["psi"])


def test_a_model_refuses_to_be_moved_or_cast_after_it_is_made():
    """Its data (X here; ratings, counts and pooled buffers elsewhere) are not parameters: .to() would
    leave them behind, so it is refused in one line that says how to build it on a device instead."""
    import pytest

    model = DenseDynamicMF(make_synthetic(T=3, n_rows=5, n_cols=4, seed=0), d=2, seed=0)
    for move in (lambda m: m.to(torch.float32), lambda m: m.double(), lambda m: m.cpu(), lambda m: m.half()):
        with pytest.raises(TypeError, match="make it with device= and dtype="):
            move(model)
    assert model.U.dtype == torch.float64 and model.X.dtype == torch.float64
