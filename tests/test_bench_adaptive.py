"""bench/adaptive.py: its closed-form, seed-batched loss and gradient against autograd on
``Coupling.psi``, the seeds' independence, and its Sec. 5.1 problem against bench.convergence."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO))
from bench import adaptive  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["chain", "ring", "mf30"])
def test_closed_form_loss_and_gradient_match_autograd(name):
    prob = adaptive.make_problem(name, [0, 1])
    loss = prob.losses_and_grads()
    closed = [Z.grad.clone() for Z in prob.flat_params()]
    for Z in prob.flat_params():
        Z.grad = None
    per_seed = []
    for group in prob.params:
        local = sum(0.5 * ((X - group[a] @ group[c].transpose(1, 2)) ** 2).sum() for a, c, X in prob.blocks)
        per_seed.append(local + prob.coupling.psi(group))
    torch.stack(per_seed).sum().backward()
    torch.testing.assert_close(loss, torch.stack(per_seed).detach(), rtol=1e-13, atol=0)
    for g, Z in zip(closed, prob.flat_params()):
        torch.testing.assert_close(g, Z.grad, rtol=1e-12, atol=1e-12)


def test_seeds_side_by_side_are_independent_and_match_bench_convergence():
    # Sec. 5.1, T=30, GD lr 0.02 + procrustes: bench.convergence's step counts per seed (docs/benchmarks.md)
    both = adaptive.run_one("mf30", "sgd", "procrustes", "none", 0.02, 3, 400, 1e-4)
    assert both["steps"] == [100, 132, 103]
    alone = adaptive.run_one("mf30", "sgd", "procrustes", "none", 0.02, 1, 400, 1e-4)
    assert alone["steps"] == [100]


def test_quick_run_writes_a_table(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["adaptive", "--quick", "--problems", "chain", "--bases", "adagrad",
                                      "--solvers", "procrustes", "--transforms", "rotate_diag", "--seeds", "1",
                                      "--cap", "60", "--out", str(tmp_path / "a")])
    adaptive.main()
    table = (tmp_path / "a.md").read_text()
    assert "| adagrad | procrustes | rotate_diag |" in table and (tmp_path / "a.json").is_file()


def test_balanced_solver_is_faster_for_adam_on_the_sec51_problem():
    """Sec. 5.1, T=30, seed 0, Adam lr 0.32: procrustes alone needs 316 steps (the residual is psi
    between time steps on different points of their GL(3) orbits), balanced + procrustes 191."""
    assert adaptive.make_problem("chain", [0]).sides == [1, -1, -1]
    assert adaptive.make_problem("mf30", [0]).sides == [1, -1]
    plain = adaptive.run_one("mf30", "adam", "procrustes", "none", 0.32, 1, 400, 1e-4)
    balanced = adaptive.run_one("mf30", "adam", "balanced", "none", 0.32, 1, 400, 1e-4)
    assert plain["steps"] == [316] and balanced["steps"][0] < 250 and balanced["psi_rises"] == 0
