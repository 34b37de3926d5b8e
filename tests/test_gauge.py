"""Gauge solvers (goldstone_cli/optim/gauge.py): the expansion L'' (Eq. 14), its gradient, the
natural-gradient steps (Eqs. 16-17), and the exact Procrustes solver against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.spatial.transform import Rotation

from goldstone_cli.optim import Coupling
from goldstone_cli.optim import gauge as G

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cycle(T: int, seed: int) -> Coupling:
    w = np.random.default_rng(seed).uniform(0.3, 2.0, T)
    idx = np.arange(T)
    return Coupling(T, idx, (idx + 1) % T, w)


def _psi_np(Z: np.ndarray, src, dst, w) -> float:
    """Independent reference: 1/2 sum_e w ||Z_src - Z_dst||^2 for Z (T, N, d)."""
    return 0.5 * float(sum(we * np.sum((Z[a] - Z[b]) ** 2) for a, b, we in zip(src, dst, w)))


def _rotate(Z: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    return Z @ R.transpose(1, 2)


def _solve(c: Coupling, Z: torch.Tensor, reflections: bool, **kw):
    M, Ms = c.pair_moments(Z), c.self_moments(Z)
    return G.procrustes_solve(M, Ms, G.procrustes_plan(c), reflections, **kw)


# ------------------------------------------------------------------------- natural: Eq. 14
@pytest.mark.parametrize("graph", ["chain", "cycle"])
def test_second_order_expansion_has_third_order_error(graph):
    T, N, d = 5, 7, 3
    c = Coupling.chain(T, [1.0, 2.0, 0.5, 1.5]) if graph == "chain" else _cycle(T, 1)
    Z = torch.randn(T, N, d, generator=_rng(0), dtype=DT)
    M = c.pair_moments(Z)
    src, dst = c.edge_index()
    w = c.edge_weights()
    direction = torch.randn(T, d, d, generator=_rng(1), dtype=DT)
    errors = []
    for eps in (1e-1, 1e-2, 1e-3):
        gauge = eps * direction
        R = torch.linalg.matrix_exp(G.skew(gauge))
        exact = c.psi(_rotate(Z, R)) - c.psi(Z)  # Eq. 11 with R = expm(Gamma)
        approx = G.natural_objective(gauge, M, src, dst, w)
        errors.append(float((exact - approx).abs()))
        if eps < 0.05:
            assert abs(float(exact)) > 100 * errors[-1]  # the expansion captures the change
    # error ~ eps^3: each factor 10 in eps divides the error by ~1000
    assert 3e-4 < errors[1] / errors[0] < 3e-3
    assert 3e-4 < errors[2] / errors[1] < 3e-3


@pytest.mark.parametrize("graph", ["cycle", "chain"])  # the chain takes the slicing fast path
def test_natural_gradient_matches_autograd_and_finite_differences(graph):
    T, N, d = 6, 5, 4
    c = _cycle(T, 2) if graph == "cycle" else Coupling.chain(T, np.random.default_rng(2).uniform(0.3, 2.0, T - 1))
    Z = torch.randn(T, N, d, generator=_rng(3), dtype=DT)
    M = c.pair_moments(Z)
    src, dst = c.edge_index()
    w = c.edge_weights()
    gauge = torch.randn(T, d, d, generator=_rng(4), dtype=DT)  # not small: the formula is exact
    g = gauge.clone().requires_grad_(True)
    G.natural_objective(g, M, src, dst, w).backward()
    analytic = G.natural_gradient(gauge, M, src, dst, w)
    torch.testing.assert_close(analytic, g.grad, rtol=1e-12, atol=1e-10)
    # central finite differences along a random direction
    v = torch.randn(T, d, d, generator=_rng(5), dtype=DT)
    h = 1e-5
    fd = (G.natural_objective(gauge + h * v, M, src, dst, w) - G.natural_objective(gauge - h * v, M, src, dst, w)) / (2 * h)
    assert float(fd) == pytest.approx(float((analytic * v).sum()), rel=1e-7)


@pytest.mark.parametrize("graph", ["chain", "cycle", "star"])
def test_laplacian_pinv_matches_dense_pseudo_inverse(graph):
    T, d = 7, 3
    if graph == "chain":
        c = Coupling.chain(T, np.linspace(0.5, 2.0, T - 1))
    elif graph == "cycle":
        c = _cycle(T, 6)
    else:
        c = Coupling(T, [0] * (T - 1), list(range(1, T)), np.arange(1.0, T))
    b = torch.randn(T, d, d, generator=_rng(7), dtype=DT)
    ref = torch.einsum("ts,sij->tij", c.laplacian_pinv(), b)
    torch.testing.assert_close(G.LaplacianPinv(c)(b), ref, rtol=1e-10, atol=1e-12)
    # dense_work=0: a chain takes the O(T) recurrences even when it is small
    torch.testing.assert_close(G.LaplacianPinv(c, dense_work=0)(b), ref, rtol=1e-10, atol=1e-12)


def test_natural_learning_rate_is_eq17():
    Z = [torch.randn(4, 6, 3, generator=_rng(8), dtype=DT), torch.randn(4, 2, 3, generator=_rng(9), dtype=DT)]
    T, N, d = 4, 8, 3
    mean_sq = sum(float((z**2).sum()) for z in Z) / (T * N * d)  # <Z^2>
    sq = sum(float((z**2).sum()) for z in Z)
    assert G.natural_learning_rate(sq, d) == pytest.approx(1.0 / (T * N * mean_sq))
    assert G.natural_learning_rate(sq, d, lr_scale=0.25) == pytest.approx(0.25 / (T * N * mean_sq))
    assert G.natural_learning_rate(0.0, d) == 0.0


def _goldstone_mode(T, N, d, twist, noise, seed):
    """Aligned rows rotated by a smooth twist along t (a Goldstone mode), plus noise: (T, N, d)."""
    gen = _rng(seed)
    Z0 = torch.randn(N, d, generator=gen, dtype=DT)
    A = torch.randn(d, d, generator=gen, dtype=DT)
    A = (A - A.T) / torch.linalg.matrix_norm(A - A.T, 2) * twist
    R = torch.linalg.matrix_exp(torch.linspace(0, 1, T, dtype=DT)[:, None, None] * A)
    return Z0 @ R.transpose(1, 2) + noise * torch.randn(T, N, d, generator=gen, dtype=DT)


def test_natural_steps_lower_the_expansion_and_psi():
    T, N, d = 12, 40, 3
    c = Coupling.chain(T, 1.0)
    Z = _goldstone_mode(T, N, d, twist=0.5, noise=0.01, seed=10)
    M = c.pair_moments(Z)
    src, dst = c.edge_index()
    w = c.edge_weights()
    lr = G.natural_learning_rate(float((Z**2).sum()), d)
    pinv = G.LaplacianPinv(c)
    gauge = torch.zeros(T, d, d, dtype=DT)
    values = [float(G.natural_objective(gauge, M, src, dst, w))]
    for _ in range(10):  # k2 = 10 steps with rho' of Eq. 17
        gauge = G.natural_solve(gauge, M, src, dst, w, pinv, lr, 1)
        values.append(float(G.natural_objective(gauge, M, src, dst, w)))
    assert all(b < a for a, b in zip(values, values[1:]))  # Eq. 16 descends on L''
    R = G.rotation_from_generator(G.skew(gauge), "expm")
    psi0, psi_opt = float(c.psi(Z)), float(c.psi(_rotate(Z, _solve(c, Z, False)[0])))
    assert float(c.psi(_rotate(Z, R))) - psi_opt < 0.05 * (psi0 - psi_opt)  # near the exact minimum
    # every step is a rotation about the mean: L^+ removes the global (zero) mode
    torch.testing.assert_close(gauge.sum(0), torch.zeros(d, d, dtype=DT), atol=1e-10, rtol=0)


def test_rotation_from_generator():
    gamma = G.skew(torch.randn(5, 4, 4, generator=_rng(11), dtype=DT))
    eye = torch.eye(4, dtype=DT).expand(5, 4, 4)
    lin = G.rotation_from_generator(gamma, "linear")
    torch.testing.assert_close(lin, eye + gamma)
    for mode in ("expm", "cayley"):
        R = G.rotation_from_generator(gamma, mode)
        torch.testing.assert_close(R.transpose(1, 2) @ R, eye, atol=1e-12, rtol=0)
        assert torch.allclose(torch.linalg.det(R), torch.ones(5, dtype=DT))
    small = 1e-3 * gamma  # Cayley agrees with expm to third order
    diff = G.rotation_from_generator(small, "cayley") - torch.linalg.matrix_exp(small)
    assert float(diff.abs().max()) < 1e-8
    with pytest.raises(ValueError, match="linear, expm, cayley"):
        G.rotation_from_generator(gamma, "quaternion")


def test_cayley_of_a_runaway_generator_is_nan_not_an_error():
    """Runaway gauge fields (1e31, where L'' is indefinite) make I - Gamma/2 singular in floating point:
    the batch element is NaN (refused by the natural solver's rotation check), the others are kept."""
    huge = torch.tensor([[0., 1., 1.], [-1., 0., 1.], [-1., -1., 0.]], dtype=DT) * 1e31
    fine = G.skew(torch.randn(1, 3, 3, generator=_rng(2), dtype=DT))
    R = G.rotation_from_generator(torch.cat([huge[None], fine]), "cayley")
    assert torch.isnan(R[0]).all()
    torch.testing.assert_close(R[1:], G.rotation_from_generator(fine, "cayley"), rtol=0, atol=0)


# ------------------------------------------------------------------------- procrustes
def test_polar_factor_is_the_best_orthogonal_matrix():
    B = torch.randn(6, 3, 3, generator=_rng(12), dtype=DT)
    eye = torch.eye(3, dtype=DT)
    for refl in (True, False):
        Q = G.polar_factor(B, refl)
        torch.testing.assert_close(Q.transpose(1, 2) @ Q, eye.expand(6, 3, 3), atol=1e-12, rtol=0)
        if not refl:
            torch.testing.assert_close(torch.linalg.det(Q), torch.ones(6, dtype=DT))
        best = (Q * B).sum((1, 2))
        for s in range(50):  # no random orthogonal matrix of the same group does better
            P = torch.as_tensor(Rotation.random(6, random_state=s).as_matrix(), dtype=DT)
            if refl and s % 2:
                P = P * torch.tensor([1.0, 1.0, -1.0], dtype=DT)
            assert torch.all((P * B).sum((1, 2)) <= best + 1e-12)
    # a zero or rank-deficient matrix leaves the unconstrained directions alone
    torch.testing.assert_close(G.polar_factor(torch.zeros(2, 3, 3, dtype=DT)), eye.expand(2, 3, 3))


def test_polar_newton_matches_the_svd_polar_factor():
    """The GPU path of polar_factor (d > 32): the scaled Newton iteration gives the SVD's Q on well- and
    ill-conditioned matrices, the same objective Tr(Q^T B) on rank-deficient ones (where Q is free in the
    null directions), and reports the matrices it cannot invert."""
    g, d = _rng(14), 40
    Qa, _ = torch.linalg.qr(torch.randn(4, d, d, generator=g, dtype=DT))
    Qb, _ = torch.linalg.qr(torch.randn(4, d, d, generator=g, dtype=DT))
    well = torch.randn(6, d, d, generator=g, dtype=DT)
    ill = Qa @ torch.diag_embed(torch.logspace(0, -11, d, dtype=DT).expand(4, d)) @ Qb  # condition 1e11
    refl = well * torch.tensor([1.0] * (d - 1) + [-1.0], dtype=DT)  # some with det < 0
    Zl = torch.randn(4, d, 7, generator=g, dtype=DT)
    rank7 = Zl @ Zl.transpose(1, 2) @ Qa  # rank 7 of 40
    for B, q_tol in ((well, 1e-12), (ill, 1e-4), (refl, 1e-12), (rank7, None)):
        B = B + G._TIE_BREAK * B.flatten(-2).norm(dim=-1)[..., None, None] * torch.eye(d, dtype=DT)
        Q, ok = G.polar_newton(B)
        assert bool(ok.all())
        Q_plain, ok_plain = G.polar_newton(B, schulz=False)  # Newton all the way: the same Q
        assert bool(ok_plain.all())
        torch.testing.assert_close(Q, Q_plain, atol=1e-9 if q_tol is None else 1e-12, rtol=0)
        U, _, Vh = torch.linalg.svd(B)
        Q_svd = U @ Vh
        torch.testing.assert_close(Q.transpose(1, 2) @ Q, torch.eye(d, dtype=DT).expand_as(Q), atol=1e-12, rtol=0)
        torch.testing.assert_close((Q * B).sum((1, 2)), (Q_svd * B).sum((1, 2)), atol=1e-11, rtol=1e-13)
        if q_tol is not None:
            torch.testing.assert_close(Q, Q_svd, atol=q_tol, rtol=0)
    singular = torch.zeros(2, d, d, dtype=DT)
    singular[1] = torch.eye(d, dtype=DT)
    _, ok = G.polar_newton(singular)
    assert ok.tolist() == [False, True]


def test_polar_factor_on_the_gpu_path_falls_back_to_the_svd(monkeypatch):
    """polar_factor as a GPU with d > 32 runs it (forced here on the CPU): Newton where it converges,
    the SVD for a zero matrix (no inverse), the same Q as the SVD path for the rest."""
    B = torch.randn(3, 40, 40, generator=_rng(16), dtype=DT)
    B[1] = 0.0
    expected = G.polar_factor(B)
    monkeypatch.setattr(G, "_loops_on_device", lambda M: True)
    Q = G.polar_factor(B)
    torch.testing.assert_close(Q, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(Q[1], torch.eye(40, dtype=DT))


def test_largest_eigenvalue_from_products_matches_eigvalsh():
    g = _rng(15)
    R = torch.linalg.matrix_exp(G.skew(torch.randn(8, 40, 40, generator=g, dtype=DT) * 0.2))
    D = R - torch.eye(40, dtype=DT)
    A = torch.randn(3, 40, 40, generator=g, dtype=DT)
    for P in (D.transpose(1, 2) @ D, A @ A.transpose(1, 2), torch.zeros(2, 40, 40, dtype=DT)):
        torch.testing.assert_close(G._largest_eigenvalue_psd(P), torch.linalg.eigvalsh(P)[..., -1], rtol=1e-4, atol=1e-14)
    # a pair of equal largest eigenvalues (one rotation plane) and a near tie resolve too
    P = torch.diag(torch.tensor([3.0, 3.0, 2.9999, 1.0], dtype=DT))[None]
    torch.testing.assert_close(G._largest_eigenvalue_psd(P), torch.tensor([3.0], dtype=DT), rtol=1e-4, atol=0)


def _brute_force_min(c: Coupling, Z: torch.Tensor, reflections: bool, starts: int = 6, seed: int = 0) -> float:
    """min over R_1..R_{T-1} in SO(d) (or O(d)) of psi(RZ), R_0 = I, by multi-start BFGS."""
    T, _, d = Z.shape
    Zn = Z.numpy()
    rng = np.random.default_rng(seed)
    k = d * (d - 1) // 2
    flip = np.diag([-1.0] + [1.0] * (d - 1))

    def rot(x):
        if d == 2:
            a = x[0]
            return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        return Rotation.from_rotvec(x).as_matrix()

    best = np.inf
    for signs in itertools.product([False, True] if reflections else [False], repeat=T - 1):
        def f(x):
            Zr = [Zn[0]] + [Zn[t] @ (rot(x[(t - 1) * k:t * k]) @ (flip if signs[t - 1] else np.eye(d))).T for t in range(1, T)]
            return _psi_np(np.stack(Zr), c.src, c.dst, c.weight)

        for _ in range(starts):
            best = min(best, minimize(f, rng.uniform(-np.pi, np.pi, (T - 1) * k), method="BFGS").fun)
    return best


@pytest.mark.parametrize(
    "T,d,reflections",
    [(3, 2, False), (3, 2, True), (4, 2, False), (4, 2, True), (3, 3, False), (3, 3, True), (4, 3, False),
     pytest.param(4, 3, True, marks=pytest.mark.slow)],  # 8 sign patterns x 9 parameters: ~1 min
)
def test_procrustes_on_a_chain_reaches_the_brute_force_minimum(T, d, reflections):
    gen = _rng(100 + 10 * T + d)
    c = Coupling.chain(T, (0.5 + torch.rand(T - 1, generator=gen, dtype=DT)).tolist())
    Z = torch.randn(T, 5, d, generator=gen, dtype=DT)
    R, _ = _solve(c, Z, reflections)
    got = _psi_np(_rotate(Z, R).numpy(), c.src, c.dst, c.weight)
    assert got <= _psi_np(Z.numpy(), c.src, c.dst, c.weight)
    assert got == pytest.approx(_brute_force_min(c, Z, reflections), rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("d", [2, 3])
def test_procrustes_removes_a_reflection_only_with_o_d(d):
    T, N = 3, 8
    Z0 = torch.randn(N, d, generator=_rng(20 + d), dtype=DT)
    flip = torch.ones(d, dtype=DT)
    flip[-1] = -1.0
    Z = torch.stack([Z0, Z0 * flip, Z0 * flip])  # a reflection domain wall between t=0 and t=1
    c = Coupling.chain(T, [1.0, 0.7])
    R_o, _ = _solve(c, Z, True)
    assert float(c.psi(_rotate(Z, R_o))) < 1e-20 * float(c.psi(Z)) + 1e-20
    R_so, _ = _solve(c, Z, False)
    assert torch.allclose(torch.linalg.det(R_so), torch.ones(T, dtype=DT))
    psi_so = float(c.psi(_rotate(Z, R_so)))
    assert psi_so > 1e-3 * float(c.psi(Z))  # SO(d) cannot remove it
    assert psi_so == pytest.approx(_brute_force_min(c, Z, False), rel=1e-8)


@pytest.mark.parametrize("graph", ["triangle", "4-cycle", "square+diagonal"])
@pytest.mark.parametrize("reflections", [False, True])
def test_procrustes_sweeps_on_graphs_with_cycles_reach_the_brute_force_minimum(graph, reflections):
    edges = {"triangle": [(0, 1), (1, 2), (0, 2)], "4-cycle": [(0, 1), (1, 2), (2, 3), (0, 3)],
             "square+diagonal": [(0, 1), (1, 2), (2, 3), (0, 3), (0, 2)]}[graph]
    T = max(max(e) for e in edges) + 1
    rng = np.random.default_rng(len(edges) + 7 * reflections)
    c = Coupling(T, [a for a, _ in edges], [b for _, b in edges], rng.uniform(0.3, 2.0, len(edges)))
    assert not c.is_forest()
    Z = torch.as_tensor(rng.normal(size=(T, 6, 2)), dtype=DT)
    R, info = _solve(c, Z, reflections, tol=1e-14, max_sweeps=500)
    assert info["sweeps"] >= 1
    got = _psi_np(_rotate(Z, R).numpy(), c.src, c.dst, c.weight)
    assert got <= _psi_np(Z.numpy(), c.src, c.dst, c.weight) + 1e-12
    assert got == pytest.approx(_brute_force_min(c, Z, reflections, starts=8), rel=1e-6)


def test_procrustes_never_raises_psi_on_a_graph_already_at_its_optimum():
    c = _cycle(6, 3)
    Z = torch.randn(1, 9, 3, generator=_rng(30), dtype=DT).expand(6, 9, 3).clone()  # psi = 0
    Z = Z + 1e-9 * torch.randn(6, 9, 3, generator=_rng(31), dtype=DT)
    R, _ = _solve(c, Z, True)
    assert float(c.psi(_rotate(Z, R))) <= float(c.psi(Z)) * (1 + 1e-12)
    assert float(G.rotation_angles(R).max()) < 1e-6


def test_tree_composition_reproduces_every_edge_rotation():
    # a random tree (not a chain): each node attaches to an earlier one
    T, d = 40, 3
    rng = np.random.default_rng(40)
    parents = [int(rng.integers(0, v)) for v in range(1, T)]
    c = Coupling(T, parents, list(range(1, T)), rng.uniform(0.5, 2.0, T - 1))
    plan = G.procrustes_plan(c)
    assert plan.is_forest and plan.jumps <= int(np.ceil(np.log2(T))) + 1
    Z = torch.randn(T, 6, d, generator=_rng(41), dtype=DT)
    M = c.pair_moments(Z)
    Q = G.edge_procrustes(M, True)  # (E, d, d)
    R = G.tree_rotations(Q, plan)
    src, dst = c.edge_index()
    torch.testing.assert_close(R[src].transpose(1, 2) @ R[dst], Q, atol=1e-12, rtol=0)
    # and the full solve is the exact minimum: no single-node Procrustes update improves it
    R, _ = G.procrustes_solve(M, c.self_moments(Z), plan, True)
    Zr = _rotate(Z, R)
    for t in range(T):  # reference check, not the hot path
        B = torch.zeros(d, d, dtype=DT)
        for e in range(c.num_edges):
            a, b, we = int(src[e]), int(dst[e]), float(c.weight[e])
            if a == t:
                B += we * (Zr[b].T @ Zr[a])
            elif b == t:
                B += we * (Zr[a].T @ Zr[b])
        torch.testing.assert_close(G.polar_factor(B[None].transpose(1, 2))[0], torch.eye(d, dtype=DT), atol=1e-8, rtol=0)


def test_global_fix_moves_z_least():
    T, d = 6, 3
    c = Coupling.chain(T, 1.0)
    Z = _goldstone_mode(T, 10, d, twist=2.0, noise=0.1, seed=50)
    R, _ = _solve(c, Z, True)
    moved = float(((_rotate(Z, R) - Z) ** 2).sum())
    for s in range(30):  # any other global rotation of the solution moves Z more
        if s % 2:
            P = torch.as_tensor(Rotation.random(random_state=s).as_matrix(), dtype=DT)
        else:
            P = torch.linalg.matrix_exp(1e-2 * G.skew(torch.randn(d, d, generator=_rng(s), dtype=DT)))
        assert float(((_rotate(Z, P @ R) - Z) ** 2).sum()) >= moved - 1e-10


def test_procrustes_on_a_forest_with_an_isolated_node():
    # components {0,1,2} (chain), {3,4} and the isolated node 5
    c = Coupling(6, [0, 1, 3], [1, 2, 4], [1.0, 2.0, 0.5])
    Z = torch.randn(6, 7, 2, generator=_rng(60), dtype=DT)
    R, _ = _solve(c, Z, True)
    Zr = _rotate(Z, R)
    torch.testing.assert_close(R[5], torch.eye(2, dtype=DT))  # nothing couples it
    sub1, sub2 = Coupling.chain(3, [1.0, 2.0]), Coupling.chain(2, [0.5])
    r1, _ = _solve(sub1, Z[:3], True)
    r2, _ = _solve(sub2, Z[3:5], True)
    assert float(c.psi(Zr)) == pytest.approx(float(sub1.psi(_rotate(Z[:3], r1)) + sub2.psi(_rotate(Z[3:5], r2))), rel=1e-10)


def test_procrustes_rank_deficient_moments():
    # N = 1 < d: the moments have rank one; the solution is still orthogonal and optimal
    T, d = 5, 3
    c = Coupling.chain(T, 1.0)
    Z = torch.randn(T, 1, d, generator=_rng(70), dtype=DT)
    R, _ = _solve(c, Z, True)
    torch.testing.assert_close(R.transpose(1, 2) @ R, torch.eye(d, dtype=DT).expand(T, d, d), atol=1e-12, rtol=0)
    Zr = _rotate(Z, R)[:, 0]  # (T, d): all rotated vectors point the same way
    unit = Zr / Zr.norm(dim=1, keepdim=True)
    torch.testing.assert_close(unit, unit[:1].expand(T, d), atol=1e-10, rtol=0)
    # so psi reaches its minimum, where only the differences of the norms remain
    norms = Z[:, 0].norm(dim=1)
    assert float(c.psi(_rotate(Z, R))) == pytest.approx(0.5 * float(((norms[1:] - norms[:-1]) ** 2).sum()), rel=1e-10)


def test_rotation_angles():
    a = torch.tensor([0.3, -1.2, 3.0], dtype=DT)
    R = torch.zeros(3, 3, 3, dtype=DT)
    R[:, 0, 0], R[:, 0, 1], R[:, 1, 0], R[:, 1, 1], R[:, 2, 2] = a.cos(), -a.sin(), a.sin(), a.cos(), 1.0
    torch.testing.assert_close(G.rotation_angles(R), a.abs())
    torch.testing.assert_close(G.rotation_angles(torch.diag(torch.tensor([1.0, -1.0], dtype=DT))[None]),
                               torch.tensor([np.pi], dtype=DT))
    for scale in (1e-7, 0.5):  # small angles are resolved too: angle = max |Im eig(Gamma)|
        gen = G.skew(scale * torch.randn(2, 4, 4, generator=_rng(82), dtype=DT))
        expected = torch.linalg.eigvals(gen).imag.abs().amax(-1)
        torch.testing.assert_close(G.rotation_angles(torch.linalg.matrix_exp(gen)), expected, rtol=1e-6, atol=0)
    # the linear update I + Gamma: the angle of its orthogonal part, atan(rate)
    gamma = torch.zeros(1, 3, 3, dtype=DT)
    gamma[0, 0, 1], gamma[0, 1, 0] = -0.5, 0.5
    torch.testing.assert_close(G.rotation_angles(torch.eye(3, dtype=DT) + gamma, gamma),
                               torch.tensor([np.arctan(0.5)], dtype=DT))


def test_rotate_rows_in_place_in_chunks():
    Z = torch.randn(7, 5, 3, generator=_rng(80), dtype=DT)
    R = torch.linalg.matrix_exp(G.skew(torch.randn(7, 3, 3, generator=_rng(81), dtype=DT)))
    ref = _rotate(Z, R)
    G.rotate_rows_(Z, R, max_chunk_elems=20)  # forces several blocks
    torch.testing.assert_close(Z, ref)


# ------------------------------------------------------------------------- reflections for natural
def _with_walls(Z: torch.Tensor, walls: list[int], seed: int) -> torch.Tensor:
    """Z with a random reflection applied to every time step after each edge in ``walls``."""
    gen = _rng(seed)
    Z = Z.clone()
    for e in walls:
        u = torch.randn(Z.shape[-1], generator=gen, dtype=DT)
        u = u / u.norm()
        H = torch.eye(Z.shape[-1], dtype=DT) - 2 * torch.outer(u, u)
        Z[e + 1:] = Z[e + 1:] @ H
    return Z


def test_reflection_flips_find_planted_walls_and_lower_psi_by_the_predicted_amount():
    T, N, d = 10, 30, 3
    w = np.random.default_rng(3).uniform(0.5, 2.0, T - 1)
    c = Coupling.chain(T, w)
    Z = _with_walls(_goldstone_mode(T, N, d, twist=0.8, noise=0.02, seed=31), walls=[2, 6], seed=32)
    M = c.pair_moments(Z)
    assert G.wall_edges(M).nonzero().flatten().tolist() == [2, 6]
    A, walls = G.reflection_flips(M, G.procrustes_plan(c))
    assert walls.nonzero().flatten().tolist() == [2, 6]
    eye = torch.eye(d, dtype=DT).expand(T, d, d)
    torch.testing.assert_close(A @ A.transpose(1, 2), eye, atol=1e-12, rtol=0)  # orthogonal
    dets = torch.linalg.det(A)
    assert dets[:3].tolist() == pytest.approx([1.0] * 3) and dets[3:7].tolist() == pytest.approx([-1.0] * 4)
    assert dets[7:].tolist() == pytest.approx([1.0] * 3)  # two reflections compose to a rotation
    Z2 = _rotate(Z, A)
    assert not bool(G.wall_edges(c.pair_moments(Z2)).any())  # no wall left
    # each flip lowers its edge by -2 w lambda_min(sym M), the other edges are unchanged
    lam = torch.linalg.eigvalsh(0.5 * (M + M.transpose(1, 2)))[:, 0]
    assert float(lam[2]) < 0 and float(lam[6]) < 0
    predicted = -2 * (float(w[2] * lam[2]) + float(w[6] * lam[6]))
    src, dst = c.src, c.dst
    drop = _psi_np(Z.numpy(), src, dst, w) - _psi_np(Z2.numpy(), src, dst, w)
    assert drop == pytest.approx(predicted, rel=1e-10)
    # the flip is the best Householder reflection of its edge: random ones gain less
    u = torch.randn(4000, d, generator=_rng(33), dtype=DT)
    u = u / u.norm(dim=1, keepdim=True)
    for e in (2, 6):
        gains = torch.einsum("ij,ji->", M[e], torch.eye(d, dtype=DT)) - 2 * torch.einsum("ki,ij,kj->k", u, M[e], u)
        best = float(torch.trace(M[e]) - 2 * lam[e])
        assert float(gains.max()) <= best + 1e-12 and float(gains.max()) > best - 1e-2 * abs(best)


def test_reflection_flips_on_the_gpu_path_match_eigh(monkeypatch):
    """For d > 32 a GPU finds each wall's reflection direction from products only (forced here on
    the CPU): the same flips, the same psi drop to 1e-8, as with ``eigh``."""
    T, N, d = 8, 120, 40
    c = Coupling.chain(T, 1.0)
    Z = _with_walls(_goldstone_mode(T, N, d, twist=0.5, noise=0.05, seed=34), walls=[1, 4, 5], seed=35)
    M = c.pair_moments(Z)
    plan = G.procrustes_plan(c)
    A_exact, walls = G.reflection_flips(M, plan)
    monkeypatch.setattr(G, "_loops_on_device", lambda B: True)
    A, walls_gpu = G.reflection_flips(M, plan)
    assert walls_gpu.tolist() == walls.tolist() and walls.nonzero().flatten().tolist() == [1, 4, 5]
    torch.testing.assert_close(A.transpose(1, 2) @ A, torch.eye(d, dtype=DT).expand(T, d, d), atol=1e-12, rtol=0)
    psi = [float(c.psi(_rotate(Z, R))) for R in (A_exact, A)]
    assert psi[1] == pytest.approx(psi[0], rel=1e-8) and psi[1] < float(c.psi(Z))
    # a symmetric matrix with a clear smallest eigenvalue: the same eigenvector up to sign
    S = torch.diag(torch.tensor([2.0, -1.0, 0.5] + [1.0] * 37, dtype=DT))[None]
    u = G._smallest_eigenvector_sym(S)[0]
    assert abs(float(u[1])) == pytest.approx(1.0, abs=1e-12)


def test_reflection_flips_without_walls_or_on_a_cycle_never_raise_psi():
    T, N, d = 8, 20, 3
    Z = _goldstone_mode(T, N, d, twist=0.5, noise=0.01, seed=40)
    c = Coupling.chain(T, 1.0)
    assert G.reflection_flips(c.pair_moments(Z), G.procrustes_plan(c)) is None  # nothing to flip
    c = _cycle(T, seed=41)
    for walls in ([3], [1, 5], [0, 2, 4]):
        Zw = _with_walls(Z, walls, seed=42)
        out = G.reflection_flips(c.pair_moments(Zw), G.procrustes_plan(c))
        assert out is not None  # on a cycle an odd number of walls keeps one: psi still drops
        assert float(c.psi(_rotate(Zw, out[0]))) < float(c.psi(Zw))
