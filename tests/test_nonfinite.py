"""NaN and inf never crash a run or reach its files (issue 12): a non-finite gauge-step input ends
the run as "diverged"; summary.json is strict JSON and metrics.csv holds no nan / inf tokens.
Also: files written atomically follow the user's umask."""

import csv
import json
import math
import os
import stat

import pytest
import torch
from typer.testing import CliRunner

from goldstone_cli.cli import app
from goldstone_cli.config import compose
from goldstone_cli.io import atomic_write_json, atomic_write_text, current_umask, json_safe, non_finite_paths
from goldstone_cli.models.dense_mf import DenseDynamicMF
from goldstone_cli.optim import Coupling, GoldstoneGD, NonFiniteGaugeInput
from goldstone_cli.train import TrainingDiverged, train

runner = CliRunner()
FAST = ["trainer.progress=false", "trainer.log_every=1", "trainer.eval_every=2"]


def _strict_json(text: str):
    def no_constant(name):
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=no_constant)


def _no_bare_nonfinite(path) -> None:
    with open(path, newline="") as f:
        for row in csv.reader(f):
            for v in row:
                assert v.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity"), (path, row)


# ----------------------------------------------------------------------------- the gauge step
@pytest.mark.parametrize("solver", ["procrustes", "natural"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_parameters_into_gauge_step_raise(solver, bad):
    Z = torch.nn.Parameter(torch.randn(5, 7, 3, dtype=torch.float64))
    opt = GoldstoneGD(torch.optim.SGD([Z], lr=0.1), [[Z]], Coupling.chain(5, 1.0), k1=1, solver=solver)
    with torch.no_grad():
        Z[2, 3, 1] = bad
    with pytest.raises(NonFiniteGaugeInput, match="not finite"):
        opt.gauge_step()
    assert isinstance(NonFiniteGaugeInput("x"), FloatingPointError)  # what the training loop catches


@pytest.mark.parametrize("solver", ["procrustes", "natural"])
def test_overflowing_pair_moments_raise(solver):
    """Finite parameters whose products overflow (what optimizer.lr=1e6 produced): no LinAlgError."""
    Z = torch.nn.Parameter(torch.full((4, 6, 2), 1e150, dtype=torch.float64))
    opt = GoldstoneGD(torch.optim.SGD([Z], lr=0.1), [[Z]], Coupling.chain(4, 1.0), k1=1, solver=solver)
    with pytest.raises(NonFiniteGaugeInput, match="overflow"):
        opt.gauge_step()


@pytest.mark.parametrize("solver", ["procrustes", "natural"])
def test_huge_learning_rate_with_gauge_steps_ends_as_diverged(in_tmp, solver):
    """`goldstone train optimizer.lr=1e6 optimizer.k1=1` was a LinAlgError traceback."""
    res = runner.invoke(app, ["train", "optimizer.lr=1e6", "optimizer.k1=1", f"optimizer.solver={solver}",
                              "trainer.steps=30", "run_dir=run", *FAST])
    assert res.exit_code == 3, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output and "lower optimizer.lr" in res.output
    summary = _strict_json((in_tmp / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and isinstance(summary["diverged_at_step"], int)
    _no_bare_nonfinite(in_tmp / "run" / "metrics.csv")
    _no_bare_nonfinite(in_tmp / "run" / "gauge.csv")


# ----------------------------------------------------------------------------- summary.json, metrics.csv
def test_nan_metric_is_null_in_summary_and_empty_in_metrics(in_tmp, monkeypatch):
    monkeypatch.setattr(DenseDynamicMF, "evaluate", lambda self: {"suboptimality": float("nan")})
    result = train(compose(["optimizer=gd", "trainer.steps=4", "run_dir=run", *FAST]))
    assert result.status == "completed"
    text = (in_tmp / "run" / "summary.json").read_text()
    summary = _strict_json(text)
    assert summary["final"]["suboptimality"] is None
    assert summary["non_finite"]["values"] == {"final.suboptimality": "nan"}
    assert "NaN or infinite" in summary["non_finite"]["note"]
    _no_bare_nonfinite(in_tmp / "run" / "metrics.csv")
    with open(in_tmp / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["suboptimality"] for r in rows] == ["", "", "", "", ""] and rows[-1]["total"] != ""


def test_loss_divergence_summary_is_strict_json(in_tmp):
    with pytest.raises(TrainingDiverged):
        train(compose(["optimizer=gd", "optimizer.lr=5.0", "trainer.steps=200", "run_dir=run", *FAST]))
    summary = _strict_json((in_tmp / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == summary["steps"] > 0


def test_atomic_write_json_is_strict(tmp_path):
    obj = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -math.inf}], "d": "nan is fine in a string", "e": 2}
    atomic_write_json(tmp_path / "x.json", obj)
    back = _strict_json((tmp_path / "x.json").read_text())
    assert back == {"a": None, "b": [1.0, None, {"c": None}], "d": "nan is fine in a string", "e": 2}
    assert json_safe(obj)["b"][1] is None
    assert non_finite_paths(obj) == {"a": "nan", "b[1]": "inf", "b[2].c": "-inf"}


# ----------------------------------------------------------------------------- umask
@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(m):
        os.umask(m)

    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600), (0o027, 0o640)])
def test_atomic_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    assert current_umask() == mask
    assert current_umask() == mask  # reading it does not change it
    atomic_write_text(tmp_path / "f.txt", "x")
    assert stat.S_IMODE(os.stat(tmp_path / "f.txt").st_mode) == mode
    atomic_write_text(tmp_path / "f.txt", "y")  # replacing an existing file: the same rule
    assert stat.S_IMODE(os.stat(tmp_path / "f.txt").st_mode) == mode


def test_run_files_are_readable_by_the_group_under_umask_022(in_tmp, umask):
    umask(0o022)
    train(compose(["optimizer=gd", "trainer.steps=3", "run_dir=run", *FAST]))
    run = in_tmp / "run"
    for name in ("config.yaml", "summary.json", "metrics.csv", "checkpoints/last.pt", "snapshots.pt"):
        assert stat.S_IMODE(os.stat(run / name).st_mode) == 0o644, name


# ----------------------------------------------------------------------------- abandoned temporary files
def test_only_temporaries_of_writers_that_no_longer_run_on_this_host_are_removed(tmp_path):
    import subprocess
    import sys

    from goldstone_cli import io

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = io._host()
    try:
        names = {
            "dead": f".cache.npz.{host}.{dead.pid}.ab_cd123.npz.tmp",
            "dead_no_suffix": f".last.pt.{host}.{dead.pid}.a1b2c3d4.tmp",
            "live": f".cache.npz.{host}.{live.pid}.ab_cd123.npz.tmp",
            "mine": f".cache.npz.{host}.{os.getpid()}.ab_cd123.npz.tmp",
            "other_host": f".cache.npz.{host}x.{dead.pid}.ab_cd123.npz.tmp",
            "other_form": f".cache.npz.{dead.pid}.tmp",
            "not_hidden": f"cache.npz.{host}.{dead.pid}.ab_cd123.npz.tmp",
        }
        for n in names.values():
            (tmp_path / n).write_bytes(b"x")
        (tmp_path / f".dir.{host}.{dead.pid}.ab_cd123.tmp").mkdir()  # folders are not atomic_path's
        removed = io.remove_abandoned_temporaries(tmp_path)
        assert sorted(p.name for p in removed) == sorted([names["dead"], names["dead_no_suffix"]])
        left = {p.name for p in tmp_path.iterdir()}
        assert left == set(names.values()) - {names["dead"], names["dead_no_suffix"]} | {
            f".dir.{host}.{dead.pid}.ab_cd123.tmp"}
    finally:
        live.kill()
        live.wait()
    assert io.remove_abandoned_temporaries(tmp_path / "missing") == []
    # atomic_path's own names are of the form judged above
    with io.atomic_path(tmp_path / "f.npz", suffix=".npz") as tmp:
        assert io._TEMP.match(tmp.name) and f".{host}.{os.getpid()}." in tmp.name
