"""GoldstoneGD.load_state_dict checks the saved settings whose change breaks the state (solver, the
symmetric groups, the rotation of kept gauge fields), lets the others change, and loads state dicts
in the older format (before ``group_shapes``, ``gauge_fallback`` or ``config`` were saved)."""

from __future__ import annotations

import copy

import pytest
import torch

from goldstone_cli.optim import Coupling, GoldstoneGD

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(seed: int = 0, d: int = 3):
    g = torch.Generator().manual_seed(seed)
    U = torch.nn.Parameter(torch.randn(5, 6, d, generator=g, dtype=DT))
    V = torch.nn.Parameter(torch.randn(5, 4, d, generator=g, dtype=DT))
    return U, V, Coupling.chain(5, 1.0)


def _opt(U, V, coupling, groups=None, **kw):
    base = torch.optim.SGD([U, V], lr=1e-2, momentum=0.5)
    return GoldstoneGD(base, [[U, V]] if groups is None else groups, coupling, k1=2, **kw)


def _run(opt, U, V, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (U @ V.transpose(1, 2)).square().sum()).backward()  # a rotation-invariant local loss
        opt.step()


def _saved(steps: int = 4, **kw):
    U, V, coupling = _params()
    opt = _opt(U, V, coupling, **kw)
    _run(opt, U, V, steps)
    return opt.state_dict()


def _assert_untouched(opt) -> None:
    """A refused load changes nothing."""
    assert opt.base_steps == 0 and opt.num_gauge_steps == 0 and opt.gauge_fields == [None]
    assert opt.base.state_dict()["state"] == {}


@pytest.mark.parametrize("saved_solver,solver", [("natural", "procrustes"), ("procrustes", "natural")])
def test_a_state_of_another_solver_is_refused_with_the_fix(saved_solver, solver):
    state = _saved(solver=saved_solver)
    U, V, coupling = _params()
    opt = _opt(U, V, coupling, solver=solver)
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(state)
    msg = str(err.value)
    assert f"saved with solver={saved_solver!r}" in msg and f"this optimizer has solver={solver!r}" in msg
    assert f"construct GoldstoneGD with solver={saved_solver!r}" in msg
    _assert_untouched(opt)
    _opt(U, V, coupling, solver=saved_solver).load_state_dict(state)  # the fix the message names


def test_kept_gauge_fields_of_another_rotation_are_refused_unless_dropped():
    state = _saved(solver="natural", rotation="cayley")
    assert state["goldstone"]["gauge_fields"][0] is not None
    U, V, coupling = _params()
    opt = _opt(U, V, coupling, solver="natural", rotation="expm")
    with pytest.raises(ValueError, match=r"saved with rotation='cayley', this optimizer has rotation='expm'.*"
                                         r"construct GoldstoneGD with rotation='cayley'.*gauge_fields"):
        opt.load_state_dict(state)
    _assert_untouched(opt)
    dropped = copy.deepcopy(state)
    dropped["goldstone"]["gauge_fields"] = [None]  # the alternative the message names
    opt.load_state_dict(dropped)
    assert opt.base_steps == 4 and opt.gauge_fields == [None]
    # without kept fields the saved state does not depend on the rotation
    opt.load_state_dict(_saved(solver="natural", rotation="cayley", keep_gauge_fields=False))
    assert opt.base_steps == 4


def test_other_symmetric_groups_are_refused():
    state = _saved(solver="procrustes")  # no gauge fields: only the saved group shapes tell
    U, V, coupling = _params()
    regrouped = _opt(U, V, coupling, groups=[[U], [V]], solver="procrustes")
    with pytest.raises(ValueError, match="saved with 1 symmetric groups.*this optimizer has 2: construct GoldstoneGD with the groups"):
        regrouped.load_state_dict(state)  # saved with one group
    fewer = _opt(U, V, coupling, groups=[[U]], solver="procrustes")
    with pytest.raises(ValueError, match=r"symmetric group 0 was saved with \(T, d, tensors\) = \(5, 3, 2\), "
                                         r"this optimizer's is \(5, 3, 1\)"):
        fewer.load_state_dict(state)
    _assert_untouched(fewer)


def test_learning_rate_like_settings_may_change_on_resume():
    """k1, k2, lr_scale, keep_gauge_fields, allow_reflections, state_transform: the constructor's values
    are used, as a learning rate set after torch.optim's load_state_dict; the resumed run is the run
    with the new settings from the loaded state."""
    state = _saved(solver="natural", lr_scale=30.0)  # dropped steps: fallback levels > 0
    assert state["goldstone"]["gauge_fallback"][0] > 0
    new = dict(solver="natural", k2=1, lr_scale=0.5, keep_gauge_fields=False, allow_reflections=False,
               state_transform="reset")
    U, V, coupling = _params()
    opt = _opt(U, V, coupling, **new)
    opt.load_state_dict(state)
    assert (opt.k2, opt.lr_scale, opt.keep_gauge_fields, opt.allow_reflections) == (1, 0.5, False, False)
    assert opt.base_steps == 4 and opt.gauge_fallback == [min(state["goldstone"]["gauge_fallback"][0], 30)]
    assert opt.state_dict()["goldstone"]["config"]["lr_scale"] == 0.5
    _run(opt, U, V, 4)
    assert opt.num_gauge_steps == 4 and opt.last_gauge["psi_after"] <= opt.last_gauge["psi_before"] * (1 + 1e-12)


@pytest.mark.parametrize("drop", [("group_shapes",), ("group_shapes", "gauge_fallback"), ("group_shapes", "config")])
def test_state_dicts_in_the_older_format_still_load_bit_exactly(drop):
    """HEAD's format had no ``group_shapes`` (older ones neither ``gauge_fallback`` nor ``config``): such
    a state dict loads and the resumed run equals the uninterrupted one."""
    kw = dict(solver="natural", rotation="cayley")
    U, V, coupling = _params()
    ref = _opt(U, V, coupling, **kw)
    _run(ref, U, V, 10)

    U1, V1, _ = _params()
    first = _opt(U1, V1, coupling, **kw)
    _run(first, U1, V1, 5)
    state = first.state_dict()
    assert state["goldstone"]["group_shapes"] == [[5, 3, 2]] and state["goldstone"]["gauge_fallback"] == [0]
    old = {"base": state["base"], "goldstone": {k: v for k, v in state["goldstone"].items() if k not in drop}}
    U2, V2 = torch.nn.Parameter(U1.detach().clone()), torch.nn.Parameter(V1.detach().clone())
    second = _opt(U2, V2, coupling, **kw)
    second.load_state_dict(old)
    _run(second, U2, V2, 5)
    assert torch.equal(U2, U) and torch.equal(V2, V)
