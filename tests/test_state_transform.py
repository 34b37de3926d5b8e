"""GoldstoneGD(state_transform=...): how the base optimizer's state is carried through a gauge
rotation (issue 15). Brute force for the diagonal map, exact equivariance where it must hold
(signed permutations; isotropic second moments), exactness of the gauge step with every transform,
state_dict round trip, config."""

from __future__ import annotations

import pytest
import torch

from goldstone_cli.optim import Coupling, GoldstoneGD
from goldstone_cli.optim import gauge as G
from goldstone_cli.optim.goldstone import STATE_TRANSFORMS, transform_state_

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _orthogonal(T: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(T, d, d, generator=g, dtype=DT))
    return Q


def _signed_permutations(T: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    P = torch.zeros(T, d, d, dtype=DT)
    for t in range(T):  # test set-up only
        perm = torch.randperm(d, generator=g)
        signs = torch.randint(0, 2, (d,), generator=g).to(DT) * 2 - 1
        P[t, torch.arange(d), perm] = signs
    return P


class _Problem:
    """Three tensors of different N in one group, the same X, Y at every t, an uneven ring."""

    def __init__(self, T=6, d=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        B = torch.randn(7, d, generator=g, dtype=DT)
        self.X = B @ torch.randn(d, 5, generator=g, dtype=DT) + 0.1 * torch.randn(7, 5, generator=g, dtype=DT)
        self.Y = B @ torch.randn(d, 4, generator=g, dtype=DT) + 0.1 * torch.randn(7, 4, generator=g, dtype=DT)
        self.params = [torch.nn.Parameter(0.5 * torch.randn(T, n, d, generator=g, dtype=DT)) for n in (7, 5, 4)]
        A = torch.zeros(T, T, dtype=DT)
        w = 1 + 9 * torch.rand(T, generator=g, dtype=DT)
        for t in range(T):
            A[t, (t + 1) % T] = A[(t + 1) % T, t] = w[t]
        self.coupling = Coupling.from_adjacency(A)

    def local(self) -> torch.Tensor:
        U, V, W = self.params
        return 0.5 * (((self.X - U @ V.transpose(1, 2)) ** 2).sum() + ((self.Y - U @ W.transpose(1, 2)) ** 2).sum())

    def local_per_t(self) -> torch.Tensor:
        U, V, W = (p.detach() for p in self.params)
        return 0.5 * (((self.X - U @ V.transpose(1, 2)) ** 2).sum((1, 2)) + ((self.Y - U @ W.transpose(1, 2)) ** 2).sum((1, 2)))

    def loss(self) -> torch.Tensor:
        return self.local() + self.coupling.psi(self.params)


BASES = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05, initial_accumulator_value=0.1),
    "rmsprop_centered": lambda p: torch.optim.RMSprop(p, lr=0.003, momentum=0.5, centered=True),
}


def _steps(opt, prob, n, with_psi=True):
    for _ in range(n):
        opt.zero_grad()
        (prob.loss() if with_psi else prob.local()).backward()
        opt.step()


# ------------------------------------------------------------------------- the diagonal map
def test_rotate_diag_is_the_diagonal_of_the_rotated_preconditioner():
    T, N, d = 4, 5, 6
    v = torch.rand(T, N, d, dtype=DT, generator=torch.Generator().manual_seed(1))
    R = _orthogonal(T, d, 2)
    st = {"exp_avg_sq": v.clone()}
    transform_state_(st, v, R, "rotate_diag")
    brute = torch.diagonal(R[:, None] @ torch.diag_embed(v) @ R[:, None].transpose(-1, -2), dim1=-2, dim2=-1)
    torch.testing.assert_close(st["exp_avg_sq"], brute, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(st["exp_avg_sq"].sum(-1), v.sum(-1), rtol=1e-12, atol=0)  # Tr S kept
    # an isotropic second moment (S = c I per row) is left exactly as it is by any rotation
    iso = v.mean(-1, keepdim=True).expand_as(v).clone()
    st = {"sum": iso.clone()}
    transform_state_(st, iso, R, "rotate_diag")
    torch.testing.assert_close(st["sum"], iso, rtol=1e-13, atol=0)
    # a signed permutation permutes the coordinates exactly
    P = _signed_permutations(T, d, 3)
    st = {"exp_avg_sq": v.clone()}
    transform_state_(st, v, P, "rotate_diag")
    assert torch.equal(st["exp_avg_sq"], v @ (P * P).transpose(1, 2))
    assert torch.equal(st["exp_avg_sq"].sort(-1).values, v.sort(-1).values)


@pytest.mark.parametrize("base", ["adam", "adamw_amsgrad", "adagrad", "rmsprop_centered"])
def test_signed_permutation_of_a_trained_state_continues_exactly(base):
    """Local loss only (invariant under every orthogonal R): rotating parameters and state by a
    signed permutation and continuing must give the rotated trajectory, with ``rotate_diag`` (and
    ``isotropic`` only where the moments are isotropic), not with ``none``."""
    P = _signed_permutations(6, 3, 5)
    out = {}
    for mode in ("rotate_diag", "none"):
        a, b = _Problem(seed=4), _Problem(seed=4)
        opt_a, opt_b = BASES[base](a.params), BASES[base](b.params)
        _steps(opt_a, a, 20, with_psi=False)
        _steps(opt_b, b, 20, with_psi=False)
        with torch.no_grad():
            for Z in b.params:
                G.rotate_rows_(Z, P)
                transform_state_(opt_b.state[Z], Z, P, mode, opt_b.param_groups[0])
        _steps(opt_a, a, 20, with_psi=False)
        _steps(opt_b, b, 20, with_psi=False)
        out[mode] = max(float((Zb.detach() - Za.detach() @ P.transpose(1, 2)).abs().max())
                        for Za, Zb in zip(a.params, b.params))
    assert out["rotate_diag"] < 1e-12
    assert out["none"] > 1e-6  # the test can fail: leaving v in the old coordinates is not exact


@pytest.mark.parametrize("mode", ["none", "rotate_diag", "isotropic"])
def test_first_moment_rotates_and_an_isotropic_second_moment_is_kept_under_any_rotation(mode):
    """A trained Adam state, its second moments made isotropic (S = c I per row): under any rotation
    the first moment becomes R m and the second moment stays (exactly the rotated S)."""
    R = _orthogonal(6, 3, 7)
    prob = _Problem(seed=8)
    opt = torch.optim.Adam(prob.params, lr=0.01)
    _steps(opt, prob, 10, with_psi=False)
    with torch.no_grad():
        for Z in prob.params:
            st = opt.state[Z]
            st["exp_avg_sq"].copy_(st["exp_avg_sq"].mean(-1, keepdim=True).expand_as(Z))
            m, v = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
            G.rotate_rows_(Z, R)
            transform_state_(st, Z, R, mode)
            torch.testing.assert_close(st["exp_avg"], m @ R.transpose(1, 2), rtol=1e-13, atol=1e-16)
            torch.testing.assert_close(st["exp_avg_sq"], v, rtol=1e-13, atol=0)


def _assert_second_moments_valid(opt, prob) -> None:
    """The base state after a gauge step: second moments non-negative, AMSGrad's maximum above the
    moment, centered RMSprop's variance non-negative."""
    for Z in prob.params:
        st = opt.base.state[Z]
        for key in ("exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg"):
            if key in st:
                assert bool((st[key] >= 0).all())
        if "max_exp_avg_sq" in st:
            assert bool((st["max_exp_avg_sq"] >= st["exp_avg_sq"] * (1 - 1e-12)).all())
        if "grad_avg" in st:  # centered RMSprop: the variance stays non-negative
            assert bool((st["square_avg"] - st["grad_avg"] ** 2 >= 0).all())


# ------------------------------------------------------------------------- inside GoldstoneGD
@pytest.mark.parametrize("transform", STATE_TRANSFORMS)
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("solver", ["procrustes", "natural"])
def test_gauge_step_with_every_transform_keeps_local_losses_and_never_raises_psi(transform, base, solver):
    prob = _Problem(seed=11)
    opt = GoldstoneGD(BASES[base](prob.params), [prob.params], prob.coupling, k1=5, solver=solver,
                      rotation="expm", state_transform=transform)
    for _ in range(4):
        _steps(opt.base, prob, 5)  # base steps only, then one explicit gauge step
        before, psi0 = prob.local_per_t(), float(prob.coupling.psi_value(prob.params))
        info = opt.gauge_step()
        torch.testing.assert_close(prob.local_per_t(), before, rtol=1e-12, atol=1e-10)
        assert info["psi_after"] <= psi0 * (1 + 1e-12)
        _assert_second_moments_valid(opt, prob)
    _steps(opt, prob, 10)
    assert all(torch.isfinite(Z).all() for Z in prob.params)


def test_reset_starts_the_base_state_afresh():
    prob = _Problem(seed=12)
    opt = GoldstoneGD(torch.optim.Adagrad(prob.params, lr=0.05, initial_accumulator_value=0.1), [prob.params],
                      prob.coupling, k1=1000, solver="procrustes", state_transform="reset")
    _steps(opt, prob, 5)
    opt.gauge_step()
    for Z in prob.params:
        st = opt.base.state[Z]
        assert len(st) == 0  # AdaGrad makes it again (step 0, sum 0.1) at its next step
    fresh = _Problem(seed=12)
    with torch.no_grad():
        for Z, Zf in zip(prob.params, fresh.params):
            Zf.copy_(Z)
    ref = torch.optim.Adagrad(fresh.params, lr=0.05, initial_accumulator_value=0.1)
    _steps(opt.base, prob, 3)
    _steps(ref, fresh, 3)
    assert all(torch.equal(Z, Zf) for Z, Zf in zip(prob.params, fresh.params))  # = a new AdaGrad


@pytest.mark.parametrize("transform", ["rotate_diag", "isotropic"])
def test_state_dict_round_trip_with_a_state_transform_is_bit_exact(transform):
    def make(prob):
        return GoldstoneGD(torch.optim.Adam(prob.params, lr=0.01, amsgrad=True), [prob.params], prob.coupling,
                           k1=4, solver="procrustes", state_transform=transform)

    ref = _Problem(seed=13)
    _steps(make(ref), ref, 14)
    first = _Problem(seed=13)
    opt = make(first)
    _steps(opt, first, 7)
    state = opt.state_dict()
    assert state["goldstone"]["config"]["state_transform"] == transform
    second = _Problem(seed=13)
    with torch.no_grad():
        for Z, Z1 in zip(second.params, first.params):
            Z.copy_(Z1)
    opt2 = make(second)
    opt2.load_state_dict(state)
    _steps(opt2, second, 7)
    assert all(torch.equal(Z, Zr) for Z, Zr in zip(second.params, ref.params))


def test_unknown_state_transform_is_rejected():
    prob = _Problem()
    with pytest.raises(ValueError, match="unknown state_transform 'diag'.*rotate_diag"):
        GoldstoneGD(torch.optim.Adam(prob.params), [prob.params], prob.coupling, state_transform="diag")


def test_config_key_reaches_the_optimizer():
    from goldstone_cli.config import compose
    from goldstone_cli.data.synthetic import make_synthetic
    from goldstone_cli.models.dense_mf import DenseDynamicMF
    from goldstone_cli.optim.factory import build_optimizer

    model = DenseDynamicMF(make_synthetic(T=5, seed=0), d=3)
    for value in ("rotate_diag", "reset"):
        cfg = compose(["optimizer=goldstone", "optimizer.base=adam", f"optimizer.state_transform={value}"])
        opt, _ = build_optimizer(cfg.optimizer, model)
        assert opt.state_transform == value


# ------------------------------------------------------------------------- balance (GL(d) per time step)
from goldstone_cli.optim.goldstone import balancing  # noqa: E402


def _spd(T: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(T, d, d, generator=g, dtype=DT)
    return B @ B.transpose(1, 2) + 0.1 * torch.eye(d, dtype=DT)


def test_balancing_solves_APA_equals_AinvQAinv_and_skips_singular_steps():
    P, Q = _spd(5, 4, 1), _spd(5, 4, 2)
    P[3] = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=DT))  # singular: left alone
    Q[4, 0, 0] = float("nan")  # not finite: left alone
    A, A_inv, ok = balancing(P, Q)
    assert ok.tolist() == [True, True, True, False, False]
    eye = torch.eye(4, dtype=DT).expand(5, 4, 4)
    torch.testing.assert_close(A @ A_inv, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(A, A.transpose(1, 2), rtol=0, atol=1e-13)
    assert bool((torch.linalg.eigvalsh(A) > 0).all())
    lhs, rhs = A @ P @ A, A_inv @ Q @ A_inv
    torch.testing.assert_close(lhs[:3], rhs[:3], rtol=1e-10, atol=1e-10)
    assert torch.equal(A[3:], eye[3:]) and torch.equal(A_inv[3:], eye[3:])


class _GLProblem:
    """T=2 (one edge): time step 1 is time step 0 moved along its GL(d) orbit, U -> U G, V -> V G^{-T}
    (the same products U V^T, U W^T): one balanced gauge step aligns them exactly, a rotation cannot."""

    def __init__(self, seed=0, d=3):
        g = torch.Generator().manual_seed(seed)
        U0, V0, W0 = (torch.randn(n, d, generator=g, dtype=DT) for n in (7, 5, 4))
        Gm = torch.eye(d, dtype=DT) + 0.4 * torch.randn(d, d, generator=g, dtype=DT)
        Gi = torch.linalg.inv(Gm).T
        self.params = [torch.nn.Parameter(torch.stack([U0, U0 @ Gm])),
                       torch.nn.Parameter(torch.stack([V0, V0 @ Gi])),
                       torch.nn.Parameter(torch.stack([W0, W0 @ Gi]))]
        self.X, self.Y = U0 @ V0.T + 0.1, U0 @ W0.T - 0.1  # products not at their optimum: gradients != 0
        self.coupling = Coupling.chain(2, 1.0)

    def local(self) -> torch.Tensor:
        U, V, W = self.params
        return 0.5 * (((self.X - U @ V.transpose(1, 2)) ** 2).sum() + ((self.Y - U @ W.transpose(1, 2)) ** 2).sum())


def test_balanced_gauge_step_aligns_time_steps_on_one_GL_orbit():
    out = {}
    for balance in (None, [[1, -1, -1]]):
        prob = _GLProblem(seed=3)
        opt = GoldstoneGD(torch.optim.SGD(prob.params, lr=0.0), [prob.params], prob.coupling, k1=1,
                          solver="procrustes", balance=balance)
        local0 = float(prob.local().detach())
        info = opt.gauge_step()
        torch.testing.assert_close(float(prob.local().detach()), local0, rtol=1e-12, atol=0)
        out[balance is None] = (info["psi_before"], info["psi_after"], info["groups"][0].get("balanced"))
    psi0, psi_rot, flag = out[True]
    assert flag is None and psi_rot > 1e-2 * psi0  # a rotation alone cannot undo a shear (the test can fail)
    psi0_b, psi_bal, n_bal = out[False]
    assert psi0_b == psi0 and n_bal == 2 and psi_bal < 1e-20 + 1e-12 * psi0  # aligned to rounding


@pytest.mark.parametrize("transform", [t for t in STATE_TRANSFORMS if t != "isotropic"])  # isotropic: refused
def test_balanced_step_maps_first_moments_like_gradients(transform):
    """A first moment equal to the local loss's gradient before the balanced gauge step equals the
    gradient at the balanced and rotated point after it (gradients map by B^{-1} when Z maps by B)."""
    prob = _GLProblem(seed=5)
    opt = GoldstoneGD(torch.optim.Adam(prob.params, lr=1e-3), [prob.params], prob.coupling, k1=1,
                      solver="procrustes", balance=[[1, -1, -1]], state_transform=transform)
    prob.local().backward()
    opt.base.step()  # creates the state
    for Z in prob.params:
        Z.grad = None
    prob.local().backward()
    for Z in prob.params:
        opt.base.state[Z]["exp_avg"].copy_(Z.grad)
    info = opt.gauge_step()
    assert info["groups"][0]["balanced"] == 2
    for Z in prob.params:
        Z.grad = None
    prob.local().backward()
    for Z in prob.params:
        st = opt.base.state[Z]
        if transform == "reset":
            assert len(st) == 0  # made afresh at the next step
            continue
        else:
            torch.testing.assert_close(st["exp_avg"], Z.grad, rtol=1e-9, atol=1e-10)
        for key in ("exp_avg_sq",):
            assert bool((st[key] >= 0).all()) and bool(torch.isfinite(st[key]).all())


@pytest.mark.parametrize("transform", ["none", "rotate_diag"])
@pytest.mark.parametrize("base", list(BASES))
def test_balanced_gauge_step_keeps_local_losses_and_never_raises_psi(transform, base):
    prob = _Problem(seed=11)
    opt = GoldstoneGD(BASES[base](prob.params), [prob.params], prob.coupling, k1=5, solver="procrustes",
                      state_transform=transform, balance=[[1, -1, -1]])
    used = 0
    for _ in range(6):
        _steps(opt.base, prob, 5)
        before, psi0 = prob.local_per_t(), float(prob.coupling.psi_value(prob.params))
        info = opt.gauge_step()
        used += info["groups"][0]["balanced"]
        torch.testing.assert_close(prob.local_per_t(), before, rtol=1e-11, atol=1e-10)
        assert info["psi_after"] <= psi0 * (1 + 1e-12)
        _assert_second_moments_valid(opt, prob)
    assert used > 0  # the balanced candidate won at least once (the path is exercised)
    _steps(opt, prob, 10)
    assert all(torch.isfinite(Z).all() for Z in prob.params)


def test_bad_balance_arguments_are_rejected():
    prob = _Problem()
    base = torch.optim.Adam(prob.params)
    for bad, msg in [([1, -1, -1], "one entry per symmetric group"), ([[1, -1]], r"balance\[0\] must give"),
                     ([[1, 1, 1]], "both signs"), ([[1, -2, -1]], r"balance\[0\]"), ([[True, -1, -1]], r"balance\[0\]")]:
        with pytest.raises(ValueError, match=msg):
            GoldstoneGD(base, [prob.params], prob.coupling, solver="procrustes", balance=bad)
    with pytest.raises(ValueError, match="balance needs solver='procrustes'"):
        GoldstoneGD(base, [prob.params], prob.coupling, solver="natural", balance=[[1, -1, -1]])
    opt = GoldstoneGD(base, [prob.params], prob.coupling, solver="natural", balance=[None])
    assert opt.state_dict()["goldstone"]["config"]["balance"] is None
    with pytest.raises(ValueError, match="isotropic"):  # the balancing map is not orthogonal
        GoldstoneGD(base, [prob.params], prob.coupling, solver="procrustes", balance=[[1, -1, -1]],
                    state_transform="isotropic")


def test_config_balance_reaches_the_optimizer_and_is_refused_where_it_is_not_exact():
    from goldstone_cli.config import ConfigError, compose
    from goldstone_cli.data.synthetic import make_synthetic
    from goldstone_cli.models.dense_mf import DenseDynamicMF
    from goldstone_cli.optim.factory import build_optimizer

    model = DenseDynamicMF(make_synthetic(T=5, seed=0), d=3)
    cfg = compose(["optimizer=goldstone", "optimizer.base=adam", "optimizer.balance=true"])
    assert build_optimizer(cfg.optimizer, model)[0].balance == [(1, -1)]
    assert build_optimizer(compose(["optimizer=goldstone"]).optimizer, model)[0].balance == [None]

    class WithPrior(DenseDynamicMF):  # a model that does not declare the GL(d) invariance
        balance_sides = None

    with pytest.raises(ValueError, match="not invariant under GL"):
        build_optimizer(cfg.optimizer, WithPrior(make_synthetic(T=5, seed=0), d=3))
    with pytest.raises(ConfigError, match="optimizer.balance=true needs optimizer.solver=procrustes"):
        compose(["optimizer=goldstone", "optimizer.solver=natural", "optimizer.balance=true"])


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Rprop(p, lr=0.01),
    lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, dampening=0.5),
    lambda p: torch.optim.NAdam(p, lr=0.01),
    lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.3),
    lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
], ids=["rprop", "sgd_dampening", "nadam", "adagrad", "amsgrad"])
def test_reset_state_equals_a_freshly_made_base_optimizer(make):
    """state_transform="reset": the steps after a gauge step equal those of a base optimizer made
    right after it (Rprop's step sizes back at lr, SGD's first momentum step undamped, NAdam's
    mu_product and AdaGrad's initial sum restarted)."""
    runs = []
    for fresh in (False, True):
        prob = _Problem(seed=2)
        opt = GoldstoneGD(make(prob.params), [prob.params], prob.coupling, k1=1000, solver="procrustes",
                          state_transform="reset")
        _steps(opt.base, prob, 5)
        opt.gauge_step()
        base = make(prob.params) if fresh else opt.base
        _steps(base, prob, 3)
        runs.append([Z.detach().clone() for Z in prob.params])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
