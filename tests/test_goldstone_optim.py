"""GoldstoneGD (goldstone_cli/optim/goldstone.py): validation, exactness of gauge steps, rotation of
the base optimizer's state, convergence on a dense dynamic MF problem, state_dict and schedulers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from goldstone_cli.optim import Coupling, GoldstoneGD
from goldstone_cli.optim import gauge as G
from goldstone_cli.optim.goldstone import transform_state_

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _MF:
    """Dense dynamic Gaussian MF with the same X for every t (paper Sec. 5.1 style):
    L = sum_t 1/2 ||X - U_t V_t^T||^2 + psi(U, V). Its minimum L* = T/2 * (rank-d SVD residual)."""

    def __init__(self, T=20, nu=20, ni=15, d=3, lam=1.0, twist=3.0, noise=0.3, seed=0, dtype=DT, device="cpu"):
        g = _rng(seed)
        X = torch.randn(nu, d, generator=g, dtype=DT) @ torch.randn(d, ni, generator=g, dtype=DT)
        X = X + 0.3 * torch.randn(nu, ni, generator=g, dtype=DT)
        Us, s, Vh = torch.linalg.svd(X)
        self.L_star = T * 0.5 * float((s[d:] ** 2).sum())
        self.lr = 0.5 / (float(s[0]) ** 2 + 4 * lam)  # stable plain GD step
        U_opt, V_opt = Us[:, :d] * s[:d].sqrt(), Vh[:d].T * s[:d].sqrt()
        # start in a Goldstone mode: the optimum twisted smoothly along t, plus noise
        A = torch.randn(d, d, generator=g, dtype=DT)
        A = (A - A.T) / torch.linalg.matrix_norm(A - A.T, 2) * twist
        R = torch.linalg.matrix_exp(torch.linspace(0, 1, T, dtype=DT)[:, None, None] * A)  # (T, d, d)
        U0 = U_opt @ R.transpose(1, 2) + noise * torch.randn(T, nu, d, generator=g, dtype=DT)  # (T, nu, d)
        V0 = V_opt @ R.transpose(1, 2) + noise * torch.randn(T, ni, d, generator=g, dtype=DT)  # (T, ni, d)
        self.X = X.to(dtype=dtype, device=device)
        self.U = U0.to(dtype=dtype, device=device).requires_grad_(True)
        self.V = V0.to(dtype=dtype, device=device).requires_grad_(True)
        self.coupling = Coupling.chain(T, lam)

    def local(self) -> torch.Tensor:
        return 0.5 * ((self.X - self.U @ self.V.transpose(1, 2)) ** 2).sum()

    def loss(self) -> torch.Tensor:
        return self.local() + self.coupling.psi([self.U, self.V])

    def gap(self) -> float:
        with torch.no_grad():
            return (float(self.loss()) - self.L_star) / self.L_star

    def invariants(self) -> tuple[torch.Tensor, ...]:
        """Rotation-invariant per-t quantities: U_t V_t^T, U_t U_t^T, V_t V_t^T."""
        U, V = self.U.detach(), self.V.detach()
        return U @ V.transpose(1, 2), U @ U.transpose(1, 2), V @ V.transpose(1, 2)


def _train(opt, mf: _MF, steps: int, tol: float | None = None) -> int:
    for s in range(steps):
        if tol is not None and mf.gap() < tol:
            return s
        opt.zero_grad()
        mf.loss().backward()
        opt.step()
    return steps


# ------------------------------------------------------------------------- validation
def test_hyperparameter_and_group_validation():
    mf = _MF(T=4, nu=5, ni=4)
    base = torch.optim.SGD([mf.U, mf.V], lr=0.1)
    c = mf.coupling
    ok = dict(base=base, groups=[[mf.U, mf.V]], coupling=c)
    GoldstoneGD(**ok)  # valid
    with pytest.raises(ValueError, match="k1 must be an integer >= 1"):
        GoldstoneGD(**ok, k1=0)
    with pytest.raises(ValueError, match="k2 must be an integer >= 1"):
        GoldstoneGD(**ok, k2=0)
    with pytest.raises(ValueError, match="valid solvers: natural, procrustes"):
        GoldstoneGD(**ok, solver="newton")
    with pytest.raises(ValueError, match="valid rotations: linear, expm, cayley"):
        GoldstoneGD(**ok, rotation="euler")
    with pytest.raises(ValueError, match="lr_scale"):
        GoldstoneGD(**ok, lr_scale=0.0)
    with pytest.raises(ValueError, match="tol"):
        GoldstoneGD(**ok, tol=-1.0)
    with pytest.raises(ValueError, match="has T=4 time steps but the coupling has T=5"):
        GoldstoneGD(base, [[mf.U, mf.V]], Coupling.chain(5, 1.0))
    W = torch.zeros(4, 3, 2, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="embedding dimension d=2 .* d=3"):
        GoldstoneGD(torch.optim.SGD([mf.U, W], lr=0.1), [[mf.U, W]], c)
    with pytest.raises(ValueError, match="not a parameter of the base optimizer"):
        GoldstoneGD(torch.optim.SGD([mf.U], lr=0.1), [[mf.U, mf.V]], c)
    with pytest.raises(ValueError, match="appears twice"):
        GoldstoneGD(base, [[mf.U], [mf.U, mf.V]], c)
    with pytest.raises(ValueError, match=r"expected \(T, N, d\)"):
        flat = torch.zeros(4, 3, dtype=DT, requires_grad=True)
        GoldstoneGD(torch.optim.SGD([flat], lr=0.1), [[flat]], c)
    with pytest.raises(ValueError, match="list of tensors"):
        GoldstoneGD(base, [mf.U, mf.V], c)
    with pytest.raises(ValueError, match="non-empty list"):
        GoldstoneGD(base, [], c)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        GoldstoneGD("sgd", [[mf.U, mf.V]], c)
    with pytest.raises(ValueError, match="already a GoldstoneGD"):
        GoldstoneGD(GoldstoneGD(**ok), [[mf.U, mf.V]], c)


# ------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kw", [
    dict(solver="procrustes"),
    dict(solver="procrustes", allow_reflections=False),
    dict(solver="natural", rotation="expm"),
    dict(solver="natural", rotation="cayley"),
])
@pytest.mark.parametrize("graph", ["chain", "cycle"])
def test_exact_gauge_steps_keep_every_local_loss_and_never_raise_psi(kw, graph):
    mf = _MF(T=8, twist=1.0, noise=0.05, seed=1)
    if graph == "cycle":
        mf.coupling = Coupling(8, list(range(8)), [(t + 1) % 8 for t in range(8)], [1.0, 2.0, 0.5, 1.0, 1.5, 1.0, 0.7, 1.2])
    opt = GoldstoneGD(torch.optim.SGD([mf.U, mf.V], lr=mf.lr), [[mf.U, mf.V]], mf.coupling, **kw)
    for _ in range(3):  # repeated gauge steps (natural keeps its gauge fields in between)
        before = mf.invariants()
        info = opt.gauge_step()
        for a, b in zip(before, mf.invariants()):
            assert float((a - b).norm() / b.norm()) < 1e-10
        assert info["psi_after"] <= info["psi_before"] * (1 + 1e-12)
    assert set(info) >= {"step", "psi_before", "psi_after", "max_angle", "seconds"}
    assert opt.num_gauge_steps == 3 and opt.gauge_seconds > 0


def test_linear_rotation_is_only_first_order():
    """The paper's update Z + Gamma Z is not orthogonal: the invariants move (slightly)."""
    mf = _MF(T=8, twist=1.0, noise=0.05, seed=1)
    opt = GoldstoneGD(torch.optim.SGD([mf.U, mf.V], lr=mf.lr), [[mf.U, mf.V]], mf.coupling, rotation="linear")
    before = mf.invariants()
    info = opt.gauge_step()
    rel = float((before[0] - mf.invariants()[0]).norm() / before[0].norm())
    assert 1e-8 < rel < 0.2
    assert info["psi_after"] < info["psi_before"]


def test_first_gauge_step_removes_a_goldstone_mode():
    # exact solver: to rounding; natural: up to the error of the second-order expansion (Eq. 14)
    for kw, reduction in ((dict(solver="procrustes"), 1e-12), (dict(solver="natural", rotation="expm", k2=50), 1e-2)):
        m = _MF(T=10, twist=2.0, noise=0.0, seed=2)  # a pure twist: psi can reach zero
        info = GoldstoneGD(torch.optim.SGD([m.U, m.V], lr=m.lr), [[m.U, m.V]], m.coupling, **kw).gauge_step()
        assert info["psi_after"] < reduction * info["psi_before"], kw
        assert info["max_angle"] > 0.3  # it really rotated


def _pinv_rotation(Z_before: torch.Tensor, Z_after: torch.Tensor) -> torch.Tensor:
    """R^T per t from Z_after = Z_before R^T (least squares; rows span R^d)."""
    return torch.linalg.lstsq(Z_before, Z_after).solution  # (T, d, d)


@pytest.mark.parametrize("base_name", ["sgd", "adam", "adamw"])
def test_base_state_rotates_with_the_parameters(base_name):
    mf = _MF(T=6, twist=1.5, noise=0.05, seed=3)
    params = [mf.U, mf.V]
    base = {"sgd": lambda: torch.optim.SGD(params, lr=1e-3, momentum=0.9),
            "adam": lambda: torch.optim.Adam(params, lr=1e-3),
            "adamw": lambda: torch.optim.AdamW(params, lr=1e-3)}[base_name]()
    opt = GoldstoneGD(base, [[mf.U, mf.V]], mf.coupling, k1=1000, solver="procrustes")
    _train(opt, mf, 5)
    key = "momentum_buffer" if base_name == "sgd" else "exp_avg"
    U0 = mf.U.detach().clone()
    buf0 = base.state[mf.U][key].clone()
    sq0 = None if base_name == "sgd" else base.state[mf.U]["exp_avg_sq"].clone()
    opt.gauge_step()
    Rt = _pinv_rotation(U0, mf.U.detach())
    torch.testing.assert_close(Rt.transpose(1, 2) @ Rt, torch.eye(3, dtype=DT).expand(6, 3, 3), atol=1e-10, rtol=0)
    assert float((Rt - torch.eye(3, dtype=DT)).abs().max()) > 0.1  # a real rotation happened
    torch.testing.assert_close(base.state[mf.U][key], buf0 @ Rt, atol=1e-12, rtol=1e-10)
    if sq0 is not None:  # per-coordinate second moments are left as they are (documented)
        assert torch.equal(base.state[mf.U]["exp_avg_sq"], sq0)


# ------------------------------------------------------------------------- convergence
_TOL = 1e-3  # relative gap (L - L*) / L*


@pytest.fixture(scope="module")
def plain_gd_gaps() -> list[float]:
    """Relative gap of plain GD after s steps, s = 0..3000, from the convergence test's start."""
    mf = _MF(noise=0.05)
    opt = torch.optim.SGD([mf.U, mf.V], lr=mf.lr)
    gaps = [mf.gap()]
    for _ in range(3000):
        opt.zero_grad()
        mf.loss().backward()
        opt.step()
        gaps.append(mf.gap())
    return gaps


@pytest.mark.parametrize("kw", [
    dict(solver="procrustes"),
    dict(solver="natural"),  # the paper's defaults: linear rotation, kept gauge fields, lr_scale=1
    dict(solver="natural", rotation="expm", keep_gauge_fields=False),
])
def test_goldstone_gd_converges_far_faster_than_plain_gd(kw, plain_gd_gaps):
    mf = _MF(noise=0.05)  # T=20 steps, a smooth twist of up to 3 rad along t plus noise
    opt = GoldstoneGD(torch.optim.SGD([mf.U, mf.V], lr=mf.lr), [[mf.U, mf.V]], mf.coupling, k1=10, **kw)
    steps = _train(opt, mf, 600, tol=_TOL)
    assert steps < 600, f"Goldstone-GD did not reach a relative gap of {_TOL}: {mf.gap()}"
    assert opt.num_gauge_steps == steps // 10
    # plain GD with the same learning rate from the same start is still far from L* after 5x the steps
    assert plain_gd_gaps[5 * steps] > 10 * _TOL
    assert plain_gd_gaps[-1] > 10 * _TOL


@pytest.mark.parametrize("solver", ["procrustes", "natural"])
def test_float32(solver):
    mf = _MF(T=8, twist=1.0, noise=0.05, seed=4, dtype=torch.float32)
    opt = GoldstoneGD(torch.optim.SGD([mf.U, mf.V], lr=mf.lr), [[mf.U, mf.V]], mf.coupling,
                      solver=solver, rotation="cayley")
    before = mf.invariants()
    info = opt.gauge_step()
    assert mf.U.dtype == torch.float32
    if solver == "natural":  # d x d work runs in float64 whatever the parameters' dtype
        assert opt.gauge_fields[0].dtype == DT
    for a, b in zip(before, mf.invariants()):
        assert float((a - b).norm() / b.norm()) < 1e-5
    assert info["psi_after"] < info["psi_before"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver", ["procrustes", "natural"])
# d > 32: on the GPU the d x d work takes gauge.polar_newton and product-only eigenvalues
@pytest.mark.parametrize("dtype, d", [(torch.float32, 3), (torch.float64, 3), (torch.float64, 40)])
def test_cuda_matches_cpu(solver, dtype, d):
    results = []
    size = dict(nu=20, ni=15) if d <= 3 else dict(nu=60, ni=50)
    for device in ("cpu", "cuda"):
        mf = _MF(T=8, d=d, twist=1.0, noise=0.05, seed=5, dtype=dtype, device=device, **size)
        opt = GoldstoneGD(torch.optim.SGD([mf.U, mf.V], lr=mf.lr, momentum=0.5), [[mf.U, mf.V]],
                          mf.coupling, k1=5, solver=solver, rotation="expm")
        _train(opt, mf, 20)
        results.append(mf.U.detach().cpu())
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(results[1], results[0], atol=tol, rtol=tol)


@pytest.mark.parametrize("solver", ["procrustes", "natural"])
def test_product_only_d_by_d_path_gives_the_same_training(solver, monkeypatch):
    """What the GPU does for d > 32 (polar factors by Newton's iteration, largest eigenvalues by
    repeated squaring), forced on the CPU: the same parameters and diagnostics as the LAPACK path."""
    runs = []
    for forced in (False, True):
        monkeypatch.setattr(G, "_loops_on_device", lambda B, forced=forced: forced and B.shape[-1] > 1)
        mf = _MF(T=8, nu=60, ni=50, d=40, twist=1.0, noise=0.05, seed=5)
        opt = GoldstoneGD(torch.optim.SGD([mf.U, mf.V], lr=mf.lr, momentum=0.5), [[mf.U, mf.V]],
                          mf.coupling, k1=5, solver=solver, rotation="expm")
        _train(opt, mf, 20)
        runs.append((mf.U.detach().clone(), opt.last_gauge))
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=1e-9, rtol=1e-9)
    for key in ("psi_before", "psi_after", "max_angle"):
        assert runs[1][1][key] == pytest.approx(runs[0][1][key], rel=1e-4, abs=1e-9), key


# ------------------------------------------------------------------------- bookkeeping
def test_gauge_step_every_k1_steps_and_closure():
    mf = _MF(T=5, nu=6, ni=4)
    opt = GoldstoneGD(torch.optim.SGD([mf.U, mf.V], lr=mf.lr), [[mf.U, mf.V]], mf.coupling, k1=3, solver="procrustes")
    assert opt.last_gauge is None

    def closure():
        opt.zero_grad()
        loss = mf.loss()
        loss.backward()
        return loss

    for s in range(1, 8):
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)
        assert opt.num_gauge_steps == s // 3
    assert opt.last_gauge["step"] == 6 and opt.base_steps == 7


def _make(kind: str, mf: _MF, **kw):
    if kind == "sgd":
        base = torch.optim.SGD([mf.U, mf.V], lr=mf.lr, momentum=0.5)
    else:
        base = torch.optim.Adam([mf.U, mf.V], lr=1e-2)
    return GoldstoneGD(base, [[mf.U, mf.V]], mf.coupling, k1=4, **kw)


@pytest.mark.parametrize("kind,kw", [
    ("sgd", dict(solver="natural")),  # kept gauge fields must round-trip
    ("sgd", dict(solver="procrustes")),
    ("adam", dict(solver="natural", rotation="expm")),
    ("adam", dict(solver="procrustes")),
])
def test_state_dict_round_trip_is_bit_exact(kind, kw):
    k = 10  # not a multiple of k1: the step counter must round-trip too
    ref = _MF(T=6, nu=8, ni=5, seed=7)
    _train(_make(kind, ref, **kw), ref, 2 * k)

    first = _MF(T=6, nu=8, ni=5, seed=7)
    opt = _make(kind, first, **kw)
    _train(opt, first, k)
    state = opt.state_dict()
    params = [first.U.detach().clone(), first.V.detach().clone()]
    if kw["solver"] == "natural":
        assert state["goldstone"]["gauge_fields"][0] is not None

    second = _MF(T=6, nu=8, ni=5, seed=7)  # new objects (same data X)
    with torch.no_grad():
        second.U.copy_(params[0])
        second.V.copy_(params[1])
    opt2 = _make(kind, second, **kw)
    opt2.load_state_dict(state)
    assert opt2.base_steps == k and opt2.num_gauge_steps == opt.num_gauge_steps
    _train(opt2, second, k)
    assert torch.equal(second.U, ref.U) and torch.equal(second.V, ref.V)


def test_deepcopy_gives_an_independent_identical_optimizer():
    import copy

    a = _MF(T=6, nu=8, ni=5, seed=8)
    opt = _make("sgd", a, solver="natural")
    _train(opt, a, 6)
    b, twin = copy.deepcopy((a, opt))  # parameters, base state and gauge fields copied together
    assert twin.groups[0][0] is b.U and twin.base.param_groups[0]["params"][0] is b.U
    _train(opt, a, 6)
    _train(twin, b, 6)
    assert torch.equal(a.U, b.U) and a.U is not b.U
    assert twin.num_gauge_steps == opt.num_gauge_steps == 3


def test_load_state_dict_rejects_plain_optimizer_state():
    mf = _MF(T=4, nu=5, ni=4)
    opt = _make("sgd", mf)
    with pytest.raises(ValueError, match="not a GoldstoneGD state dict"):
        opt.load_state_dict(opt.base.state_dict())


def test_lambda_lr_changes_the_base_learning_rate():
    mf = _MF(T=4, nu=5, ni=4)
    base = torch.optim.SGD([mf.U, mf.V], lr=0.1)
    opt = GoldstoneGD(base, [[mf.U, mf.V]], mf.coupling, k1=1000)  # no gauge step in this test
    assert opt.param_groups is base.param_groups and opt.state is base.state
    sched = LambdaLR(opt, lambda s: 0.5**s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" warning
        for s in range(1, 4):
            opt.zero_grad()
            mf.loss().backward()
            opt.step()
            sched.step()
            assert base.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**s)
    # the learning rate really drives the base steps
    U0 = mf.U.detach().clone()
    opt.zero_grad()
    mf.loss().backward()
    expected = U0 - base.param_groups[0]["lr"] * mf.U.grad
    opt.step()
    torch.testing.assert_close(mf.U.detach(), expected)
    assert sched.get_last_lr() == [pytest.approx(0.1 * 0.5**3)]
    # the scheduler keeps working after a load_state_dict of the wrapper
    opt.load_state_dict(opt.state_dict())
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)


@pytest.mark.parametrize("rotation", ["expm", "linear"])
def test_natural_over_o_d_removes_a_reflection_wall_that_so_d_keeps(rotation):
    """A twist plus a mirror image after t=4: the natural gradient (so(d)) cannot undo the mirror;
    with allow_reflections the gauge step flips it exactly first, then rotates."""
    results = {}
    for reflections in (False, True):
        mf = _MF(T=10, twist=1.0, noise=0.0, seed=4)
        with torch.no_grad():
            for Z in (mf.U, mf.V):
                Z[5:, :, 0] *= -1  # reflection domain wall between t=4 and t=5
        opt = GoldstoneGD(torch.optim.SGD([mf.U, mf.V], lr=mf.lr), [[mf.U, mf.V]], mf.coupling, solver="natural",
                          rotation=rotation, k2=50, allow_reflections=reflections)
        before = mf.invariants()
        info = opt.gauge_step()
        results[reflections] = info
        if rotation == "expm":  # an exact step: local losses unchanged
            for a, b in zip(before, mf.invariants()):
                assert float((a - b).norm() / b.norm()) < 1e-10
        M = mf.coupling.pair_moments([mf.U.detach(), mf.V.detach()])
        assert bool(G.wall_edges(M).any()) == (not reflections)
    assert results[True]["groups"][0]["flips"] == 1 and results[False]["groups"][0]["flips"] == 0
    assert results[True]["max_angle"] == pytest.approx(torch.pi)
    assert results[True]["psi_after"] < 0.05 * results[True]["psi_before"]
    assert results[False]["psi_after"] > 0.2 * results[False]["psi_before"]  # the wall stays


@pytest.mark.parametrize("rotation", ["expm", "cayley"])
def test_natural_with_a_too_large_step_backtracks_instead_of_raising_psi(rotation):
    """Far from alignment L'' (Eq. 14) is a poor model and rho' (Eq. 17) times a large lr_scale
    overshoots; an exact natural gauge step then halves its generator until psi does not rise."""
    mf = _MF(T=12, twist=3.0, noise=0.6, seed=5)
    opt = GoldstoneGD(torch.optim.SGD([mf.U, mf.V], lr=mf.lr), [[mf.U, mf.V]], mf.coupling, solver="natural",
                      rotation=rotation, lr_scale=30.0, keep_gauge_fields=True)
    backtracked = 0
    for _ in range(4):
        before = mf.invariants()
        info = opt.gauge_step()
        backtracked += info["groups"][0]["backtracks"]
        assert info["psi_after"] <= info["psi_before"] * (1 + 1e-12)
        for a, b in zip(before, mf.invariants()):
            assert float((a - b).norm() / b.norm()) < 1e-10
    assert backtracked > 0  # the step really was too large


def test_default_gauge_step_never_raises_psi_on_a_random_chain_with_walls():
    """A user's first guess, GoldstoneGD(base, groups, coupling) (natural solver, reflection flips):
    its default rotation is exact (expm with the psi check), so no gauge step raises psi. With the
    paper's linear update the same random chain with reflection walls went from psi 314 to 1235."""
    g = _rng(3)
    T, N, d = 12, 9, 4
    Z = torch.randn(T, N, d, generator=g, dtype=DT)
    Z[T // 2:, :, 0] *= -1  # a reflection domain wall
    U = torch.nn.Parameter(Z.clone())
    coupling = Coupling.chain(T, 2.0)
    opt = GoldstoneGD(torch.optim.SGD([U], lr=1e-3), groups=[[U]], coupling=coupling)
    for _ in range(4):
        before = float(coupling.psi(U))
        info = opt.gauge_step()
        assert info["psi_after"] <= before * (1 + 1e-12), (before, info["psi_after"])
        assert float(coupling.psi(U)) == pytest.approx(info["psi_after"], rel=1e-10)
    assert float(coupling.psi(U)) < 0.9 * float(coupling.psi(Z))  # rotations of independent random steps: psi falls


@pytest.mark.parametrize("rotation", ["expm", "cayley"])
@pytest.mark.parametrize("seed,k2,lr_scale", [(3, 50, 1.0), (15, 10, 5.0), (4, 200, 1.0)])
def test_natural_step_with_runaway_fields_changes_nothing_or_lowers_psi(rotation, seed, k2, lr_scale):
    """From a random start L'' (Eq. 14) is indefinite and k2 steps of Eq. 16 can send the gauge fields
    to 1e10-1e18: their exponential (or Cayley transform) is then not orthogonal in floating point, or
    not finite, and (*) no longer gives psi's change. Such a rotation is refused like one that raises
    psi: the local loss stays, psi never rises, nothing becomes NaN, over several gauge steps."""
    torch.manual_seed(seed)
    T, N, d = (2, 6, 3) if k2 != 200 else (5, 6, 3)
    U = torch.nn.Parameter(torch.randn(T, N, d, dtype=DT))
    V = torch.nn.Parameter(torch.randn(T, 5, d, dtype=DT))
    opt = GoldstoneGD(torch.optim.SGD([U, V], lr=0.0), [[U, V]], Coupling.chain(T, 2.0), k1=1, solver="natural",
                      k2=k2, lr_scale=lr_scale, rotation=rotation)
    for _ in range(4):
        P0 = (U @ V.transpose(1, 2)).detach().clone()
        info = opt.gauge_step()
        assert info["psi_after"] <= info["psi_before"] * (1 + 1e-12)
        P = (U @ V.transpose(1, 2)).detach()
        assert torch.isfinite(P).all() and float((P - P0).abs().max()) <= 1e-10 * float(P0.abs().max())


def _stuck_pair(seed: int = 2):
    """T=2, d=2, chain weight 1.5, independent random U, V: far from alignment L'' (Eq. 14) is
    indefinite, and k2=50 natural steps from zero fields run so far that none of the 10 halvings of
    the generator lowers psi (psi 29.98; the SO(2) minimum is 17.40, reached with k2=10 or
    lr_scale=0.25). Before the fallback every later gauge step repeated that dropped step."""
    g = _rng(seed)
    U = torch.nn.Parameter(torch.randn(2, 6, 2, generator=g, dtype=DT))
    V = torch.nn.Parameter(torch.randn(2, 5, 2, generator=g, dtype=DT))
    return U, V, Coupling.chain(2, 1.5)


def _pair_invariants(U, V) -> tuple[torch.Tensor, ...]:
    U, V = U.detach(), V.detach()
    return U @ V.transpose(1, 2), U @ U.transpose(1, 2), V @ V.transpose(1, 2)


def _so_d_minimum(U, V, coupling) -> float:
    """min over per-time-step rotations of psi (exact: procrustes over SO(d))."""
    U, V = U.detach().clone().requires_grad_(), V.detach().clone().requires_grad_()
    opt = GoldstoneGD(torch.optim.SGD([U, V], lr=0.0), [[U, V]], coupling, solver="procrustes", allow_reflections=False)
    return opt.gauge_step()["psi_after"]


def test_fallback_levels_shorten_k2_then_rho():
    from goldstone_cli.optim.goldstone import MAX_FALLBACK_LR_HALVINGS, fallback_step, max_fallback_level

    assert [fallback_step(50, s) for s in range(8)] == [
        (50, 1.0), (25, 1.0), (12, 1.0), (6, 1.0), (3, 1.0), (1, 1.0), (1, 0.5), (1, 0.25)]
    assert fallback_step(1, 0) == (1, 1.0) and fallback_step(1, 2) == (1, 0.25)
    assert fallback_step(10, 3) == (1, 1.0) and fallback_step(10, 4) == (1, 0.5)
    assert max_fallback_level(50) == 5 + MAX_FALLBACK_LR_HALVINGS


@pytest.mark.parametrize("rotation,keep", [("expm", True), ("expm", False), ("cayley", False), ("cayley", True)])
def test_natural_recovers_after_a_gauge_step_whose_halvings_all_fail(rotation, keep):
    """The dropped step (rotate nothing, reset the fields) must not repeat for ever: the next gauge
    step takes k2 // 2 natural steps (``fallback`` 1 in ``last_gauge``), and the solver reaches the
    SO(d) minimum; every step keeps U V^T, U U^T, V V^T and never raises psi."""
    U, V, coupling = _stuck_pair()
    psi_min = _so_d_minimum(U, V, coupling)
    opt = GoldstoneGD(torch.optim.SGD([U, V], lr=0.0), [[U, V]], coupling, k1=1, solver="natural", k2=50,
                      lr_scale=1.0, allow_reflections=False, rotation=rotation, keep_gauge_fields=keep)
    infos = []
    for _ in range(12):
        before = _pair_invariants(U, V)
        info = opt.gauge_step()
        infos.append(info)
        after = _pair_invariants(U, V)
        for a, b in zip(before, after):
            assert float((a - b).norm() / b.norm()) < 1e-10
        assert info["psi_after"] <= info["psi_before"] * (1 + 1e-12)
        assert float(coupling.psi([U.detach(), V.detach()])) == pytest.approx(info["psi_after"], rel=1e-10)
    assert psi_min == pytest.approx(17.3986, abs=1e-4) and infos[0]["psi_before"] == pytest.approx(29.9755, abs=1e-4)
    assert infos[-1]["psi_after"] == pytest.approx(psi_min, rel=1e-8)  # before the fallback: 29.9755 for ever
    first, second = infos[0], infos[1]
    assert first["rejected"] == 1 and first["backtracks"] == 10 and first["fallback"] == 0
    assert first["psi_after"] == first["psi_before"]  # the dropped step rotated nothing
    assert second["fallback"] == 1 and second["groups"][0]["k2"] == 25 and second["rejected"] == 0
    assert second["psi_after"] < 0.99 * second["psi_before"]  # the shorter solve moves at once
    assert infos[-1]["fallback"] == 0 and opt.gauge_fallback == [0]  # back to the configured k2


def test_natural_with_a_far_too_large_lr_scale_still_converges_by_falling_back():
    """lr_scale=30 on the MF problem: every configured gauge step is dropped (before the fallback
    psi stayed at its Goldstone-mode value); the fallback takes shorter solves, returns towards the
    configured one after each accepted step, and training reaches the psi of lr_scale=1."""
    runs = {}
    for lr_scale in (1.0, 30.0):
        mf = _MF(T=8, seed=5)
        opt = GoldstoneGD(torch.optim.SGD([mf.U, mf.V], lr=mf.lr, momentum=0.5), [[mf.U, mf.V]], mf.coupling,
                          k1=10, solver="natural", lr_scale=lr_scale)
        levels = []
        for _ in range(30):
            _train(opt, mf, 10)  # ends with a gauge step
            info = opt.last_gauge
            levels.append(info.get("fallback"))
            assert info["psi_after"] <= info["psi_before"] * (1 + 1e-12)
        runs[lr_scale] = (float(mf.coupling.psi([mf.U.detach(), mf.V.detach()])), levels)
    psi_ok, levels_ok = runs[1.0]
    psi_big, levels_big = runs[30.0]
    assert psi_big < 1.2 * psi_ok
    assert set(levels_ok) == {0}
    assert max(levels_big) >= 2 and any(b < a for a, b in zip(levels_big, levels_big[1:]))  # down and back up


def test_state_dict_round_trip_across_the_fallback_is_bit_exact():
    """The fallback level is optimizer state: a resume in the middle of a fallback (level 2 after two
    dropped steps) continues exactly as the uninterrupted run; an older state dict without it loads
    at level 0."""
    def make(mf):
        return _make("sgd", mf, solver="natural", lr_scale=30.0)

    k = 10  # gauge steps at 4 and 8 were both dropped: the next one runs at level 2
    ref = _MF(T=6, nu=8, ni=5, seed=7)
    opt_ref = make(ref)
    _train(opt_ref, ref, k)
    assert opt_ref.gauge_fallback == [2] and opt_ref.last_gauge["rejected"] == 1
    _train(opt_ref, ref, 3 * k)

    first = _MF(T=6, nu=8, ni=5, seed=7)
    opt = make(first)
    _train(opt, first, k)
    state = opt.state_dict()
    assert state["goldstone"]["gauge_fallback"] == [2]
    second = _MF(T=6, nu=8, ni=5, seed=7)
    with torch.no_grad():
        second.U.copy_(first.U)
        second.V.copy_(first.V)
    opt2 = make(second)
    opt2.load_state_dict(state)
    assert opt2.gauge_fallback == [2]
    _train(opt2, second, 3 * k)
    assert torch.equal(second.U, ref.U) and torch.equal(second.V, ref.V)
    assert opt2.gauge_fallback == opt_ref.gauge_fallback

    old = {"base": state["base"], "goldstone": {k_: v for k_, v in state["goldstone"].items() if k_ != "gauge_fallback"}}
    opt2.load_state_dict(old)
    assert opt2.gauge_fallback == [0]
    bad = {"base": state["base"], "goldstone": {**state["goldstone"], "gauge_fallback": [1, 2]}}
    with pytest.raises(ValueError, match="gauge_fallback"):
        opt2.load_state_dict(bad)


def _stall_pair_opt(U, V, coupling, allow_reflections=False):
    return GoldstoneGD(torch.optim.SGD([U, V], lr=0.0), [[U, V]], coupling, k1=1, solver="natural", k2=50,
                       lr_scale=1.0, allow_reflections=allow_reflections, rotation="cayley", keep_gauge_fields=True)


@pytest.mark.parametrize("seed", [2, 12, 14, 21])
def test_cayley_with_kept_fields_restarts_runaway_fields_instead_of_stalling(seed):
    """Kept gauge fields on an indefinite L'' (Eq. 14): the k2 steps of Eq. 16 grow them x1e8 per gauge
    step, and the Cayley transform of such a generator is (nearly) the same rotation by pi at every
    time step: psi does not move, yet the step passed the psi check. Before the restart, seed 2 stayed
    at psi 29.144 (minimum 17.399) while the fields grew 7e8, 8e16, ... 1e49 up to overflow (~40 gauge
    steps), and seeds 12, 14 and 21 had not reached the minimum after 60; now such a step is dropped and
    the fields restart from zero. Every step keeps U V^T, U U^T and V V^T, never raises psi, and the
    fields stay finite."""
    U, V, coupling = _stuck_pair(seed)
    psi_min = _so_d_minimum(U, V, coupling)
    opt = _stall_pair_opt(U, V, coupling)
    restarted = 0
    for _ in range(30):  # converged after 9 (seed 2) to 21 (seed 12) gauge steps
        before = _pair_invariants(U, V)
        info = opt.gauge_step()
        restarted += info["groups"][0].get("restarted", 0) + info["groups"][0].get("saturated", 0)
        for a, b in zip(before, _pair_invariants(U, V)):
            assert float((a - b).norm() / b.norm()) < 1e-10
        assert info["psi_after"] <= info["psi_before"] * (1 + 1e-12)
        assert bool(torch.isfinite(opt.gauge_fields[0]).all())
        if info["groups"][0].get("restarted"):  # dropped: nothing rotated, fields at zero
            assert info["rejected"] == 1 and info["psi_after"] == info["psi_before"]
            assert not bool(opt.gauge_fields[0].any())
        if info["groups"][0].get("saturated"):  # applied, then the fields start from zero
            assert info["rejected"] == 0 and not bool(opt.gauge_fields[0].any())
    assert info["psi_after"] == pytest.approx(psi_min, rel=1e-8)  # before: 29.144 for seed 2 (stalled)
    assert restarted >= 1
    assert float(torch.linalg.matrix_norm(opt.gauge_fields[0]).max()) < 1e-3  # converged fields are small


@pytest.mark.parametrize("seed,keep,k2", [(2, True, 10), (0, True, 10), (24, True, 10), (32, True, 10),
                                         (109, False, 50)])
def test_cayley_in_three_dimensions_reaches_the_minimum(seed, keep, k2):
    """d=3: saturated kept fields (a Cayley generator of norm 1e5, R near a rotation by pi) still lowered
    psi by 1e-18 to 1e-6 of Eq. 14's promise at every gauge step, so no restart: seed 2 stayed at psi 76.58
    for 100 gauge steps against the minimum 43.34 (10 of 60 random chains with d=3 stalled so); without
    kept fields, k2=50 steps from zero saturated the same way (seed 109: psi 64.36 against 33.82). The
    rotation of a saturated step is applied, the fields start again from zero and the next solve is
    shorter; psi never rises."""
    g = torch.Generator().manual_seed(seed)  # random chains: T in 2..4, d=3 for these seeds, weight 0.2..3.2
    T, d = int(torch.randint(2, 5, (1,), generator=g)), int(torch.randint(2, 4, (1,), generator=g))
    w = float(torch.rand(1, generator=g) * 3 + 0.2)
    U0, V0 = torch.randn(T, 6, d, generator=g, dtype=DT), torch.randn(T, 5, d, generator=g, dtype=DT)
    assert d == 3
    coupling = Coupling.chain(T, w)
    Um, Vm = torch.nn.Parameter(U0.clone()), torch.nn.Parameter(V0.clone())
    exact = GoldstoneGD(torch.optim.SGD([Um, Vm], lr=0.0), [[Um, Vm]], coupling, solver="procrustes",
                        allow_reflections=False)
    psi_min = min(exact.gauge_step()["psi_after"] for _ in range(300))  # block sweeps to the SO(3) minimum
    U, V = torch.nn.Parameter(U0.clone()), torch.nn.Parameter(V0.clone())
    opt = GoldstoneGD(torch.optim.SGD([U, V], lr=0.0), [[U, V]], coupling, k1=1, solver="natural", k2=k2,
                      lr_scale=1.0, rotation="cayley", keep_gauge_fields=keep, allow_reflections=False)
    saturated = 0
    for _ in range(50):  # 9 to 13 gauge steps now with kept fields, 37 without
        before = _pair_invariants(U, V)
        info = opt.gauge_step()
        saturated += info["groups"][0].get("saturated", 0)
        for a, b in zip(before, _pair_invariants(U, V)):
            assert float((a - b).norm() / b.norm()) < 1e-10
        assert info["psi_after"] <= info["psi_before"] * (1 + 1e-12)
    assert info["psi_after"] == pytest.approx(psi_min, rel=1e-8)
    assert saturated >= 1


def test_cayley_kept_field_restart_round_trips_through_the_state_dict():
    """The restart adds no state (fields at zero, one fallback level up): a resume right after it
    continues bit for bit."""
    U, V, coupling = _stuck_pair(2)
    U0, V0 = U.detach().clone(), V.detach().clone()
    ref = _stall_pair_opt(U, V, coupling)
    infos = [ref.gauge_step() for _ in range(12)]
    k = next(i for i, info in enumerate(infos)
             if info["groups"][0].get("restarted") or info["groups"][0].get("saturated")) + 1
    U2, V2 = torch.nn.Parameter(U0.clone()), torch.nn.Parameter(V0.clone())
    first = _stall_pair_opt(U2, V2, coupling)
    for _ in range(k):
        first.gauge_step()
    state = first.state_dict()
    U3, V3 = torch.nn.Parameter(U2.detach().clone()), torch.nn.Parameter(V2.detach().clone())
    second = _stall_pair_opt(U3, V3, coupling)
    second.load_state_dict(state)
    assert second.gauge_fallback == first.gauge_fallback == [1]
    for _ in range(12 - k):
        second.gauge_step()
    assert torch.equal(U3, U) and torch.equal(V3, V)
    assert torch.equal(second.gauge_fields[0], ref.gauge_fields[0]) and second.gauge_fallback == ref.gauge_fallback


def test_a_rotation_orthogonal_only_to_4e_10_is_refused():
    """The natural solver's rotation check is tight enough that an accepted rotation keeps U V^T to
    1e-10 of its size: R^T R - I of 4e-10 (expm of a generator of norm ~1e5) is not a rotation."""
    from goldstone_cli.optim.goldstone import _orthogonal

    R = torch.linalg.matrix_exp(G.skew(torch.randn(4, 3, 3, generator=_rng(5), dtype=DT)))
    assert _orthogonal(R)
    assert not _orthogonal(R * (1 + 2e-10)) and _orthogonal(R * (1 + 1e-13))  # R^T R - I: 4e-10, 2e-13
    R[1] = float("nan")
    assert not _orthogonal(R)


@pytest.mark.parametrize("solver", ["procrustes", "natural"])
def test_non_contiguous_group_tensor_trains_like_a_contiguous_one(solver):
    """A parameter with other strides (here V made as a transposed view, as torch.optim allows) is
    rotated like its contiguous twin (it was refused: a gauge step rotated through a flat view)."""
    runs = []
    for contiguous in (True, False):
        mf = _MF(T=6, nu=8, ni=5, seed=9)
        if not contiguous:
            V = mf.V.detach().transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (ni d, 1, d)
            assert not V.is_contiguous()
            mf.V = V.requires_grad_(True)
        base = torch.optim.Adam([mf.U, mf.V], lr=1e-2)
        opt = GoldstoneGD(base, [[mf.U, mf.V]], mf.coupling, k1=3, solver=solver)
        _train(opt, mf, 9)
        assert opt.num_gauge_steps == 3 and mf.V.is_contiguous() == contiguous
        runs.append((mf.U.detach().clone(), mf.V.detach().clone(), base.state[mf.V]["exp_avg"].clone(), opt.last_gauge))
    for a, b in zip(runs[0][:3], runs[1][:3]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert runs[1][3]["psi_after"] == pytest.approx(runs[0][3]["psi_after"], rel=1e-12)


def test_model_without_symmetric_groups_has_zero_psi():
    from goldstone_cli.models.base import DynamicModel

    class Static(DynamicModel):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, dtype=DT))
            self.coupling = Coupling.chain(1, 1.0)

        def symmetric_groups(self):
            return []

        def local_loss(self, generator=None):
            return (self.w ** 2).sum()

    m = Static()
    terms = m.loss_terms()
    assert float(terms["psi"]) == 0.0 and terms["psi"].dtype == DT
    terms["total"].backward()
    torch.testing.assert_close(m.w.grad, 2 * m.w.detach())


def test_state_dict_hooks_run_as_in_torch_optim():
    """register_state_dict_pre_hook / _post_hook and register_load_state_dict_pre_hook / _post_hook
    work on the wrapper as on any torch.optim optimizer (a post hook may return a new dict)."""
    U = torch.nn.Parameter(torch.randn(3, 4, 2, dtype=DT))
    opt = GoldstoneGD(torch.optim.SGD([U], lr=0.1), [[U]], Coupling.chain(3, 1.0), k1=2)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    sd = opt.state_dict()
    assert calls == ["pre"] and sd["extra"] == 1
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    opt.load_state_dict(sd)  # the pre hook drops the key this wrapper would refuse
    assert calls == ["pre", "post"]


@pytest.mark.parametrize("balance", [None, [[1, -1]]])
def test_asgd_parameter_average_is_rotated_with_the_parameters(balance):
    """ASGD's ``ax`` (the running average of the parameter, the model a user takes at the end) is
    rotated (and balanced) with the parameter: before t0 it is a copy of the parameter, and it must
    still be one after a gauge step (it stayed in the old gauge: U_ax V_ax^T mixed time steps)."""
    mf = _MF(T=6, twist=1.5, noise=0.05, seed=3)
    with torch.no_grad():  # unbalanced (U^T U != V^T V): the balanced candidate wins
        mf.U.mul_(2.0)
        mf.V.mul_(0.5)
    base = torch.optim.ASGD([mf.U, mf.V], lr=1e-4)  # t0 = 1e6: ax = the parameter after every step
    opt = GoldstoneGD(base, [[mf.U, mf.V]], mf.coupling, k1=1000, solver="procrustes", balance=balance)
    _train(opt, mf, 3)
    for Z in (mf.U, mf.V):
        assert torch.equal(base.state[Z]["ax"], Z.detach())
    info = opt.gauge_step()
    assert info["max_angle"] > 0.1
    if balance is not None:
        assert info["groups"][0]["balanced"] > 0
    for Z in (mf.U, mf.V):
        torch.testing.assert_close(base.state[Z]["ax"], Z.detach(), rtol=1e-12, atol=1e-12)


def test_adadelta_second_moments_follow_rotate_diag_together():
    """Adadelta keeps two per-coordinate second moments (square_avg of gradients, acc_delta of
    updates); ``rotate_diag`` must map both, so that a signed permutation of a trained state
    continues exactly (acc_delta was left in the old coordinates)."""
    T, d = 6, 3
    g = torch.Generator().manual_seed(4)
    P = torch.zeros(T, d, d, dtype=DT)
    for t in range(T):  # set-up only: a random signed permutation per time step
        P[t, torch.arange(d), torch.randperm(d, generator=g)] = torch.randint(0, 2, (d,), generator=g).to(DT) * 2 - 1
    a, b = _MF(T=T, seed=5), _MF(T=T, seed=5)
    opt_a, opt_b = (torch.optim.Adadelta([m.U, m.V], lr=0.5) for m in (a, b))

    def local_steps(opt, m, n):
        for _ in range(n):
            opt.zero_grad()
            m.local().backward()  # invariant under every orthogonal R_t
            opt.step()

    local_steps(opt_a, a, 10)
    local_steps(opt_b, b, 10)
    with torch.no_grad():
        for Z in (b.U, b.V):
            G.rotate_rows_(Z, P)
            transform_state_(opt_b.state[Z], Z, P, "rotate_diag")
    local_steps(opt_a, a, 10)
    local_steps(opt_b, b, 10)
    for Za, Zb in ((a.U, b.U), (a.V, b.V)):
        torch.testing.assert_close(Zb.detach(), Za.detach() @ P.transpose(1, 2), rtol=1e-12, atol=1e-12)
