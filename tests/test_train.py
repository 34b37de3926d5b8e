"""End-to-end runs of `goldstone train` on the Sec. 5.1 problem (small step counts)."""

import json
import os
import signal

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from goldstone_cli.cli import app
from goldstone_cli.config import compose
from goldstone_cli.models.dense_mf import DenseDynamicMF
from goldstone_cli.train import TrainingDiverged, train

runner = CliRunner()
FAST = ["trainer.progress=false", "trainer.log_every=5", "trainer.eval_every=10"]


def _metrics(run_dir):
    return pd.read_csv(run_dir / "metrics.csv").drop(columns=["wall_time", "gauge_time"], errors="ignore")


def test_cli_train_writes_every_output(in_tmp):
    res = runner.invoke(app, ["train", "trainer.steps=40", *FAST])
    assert res.exit_code == 0, res.output
    runs = list((in_tmp / "outputs" / "dense_mf").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert str(run.relative_to(in_tmp)) in res.output
    for name in ("config.yaml", "metrics.csv", "gauge.csv", "summary.json", "loss.png", "snapshots.pt",
                 "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    df = pd.read_csv(run / "metrics.csv")
    assert list(df.columns[:6]) == ["step", "wall_time", "total", "local", "psi", "lr"]
    assert df["step"].iloc[0] == 0 and df["step"].iloc[-1] == 40
    assert (df["total"] - df["local"] - df["psi"]).abs().max() < 1e-9
    assert df["suboptimality"].notna().sum() == 5  # eval at 0, 10, 20, 30, 40
    assert df["total"].iloc[-1] < df["total"].iloc[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40
    # the default optimizer is Goldstone-GD: k1=50 > 40 steps, so no gauge step yet; k1=10 gives four
    assert summary["gauge_steps"] == 0
    res = runner.invoke(app, ["train", "trainer.steps=40", "optimizer.k1=10", *FAST])
    run2 = next(r for r in (in_tmp / "outputs" / "dense_mf").iterdir() if r != run)
    gauge = pd.read_csv(run2 / "gauge.csv")
    assert list(gauge["step"]) == [10, 20, 30, 40] and (gauge["psi_after"] <= gauge["psi_before"]).all()
    assert gauge[["flips", "rejected", "fallback"]].isna().all().all()  # procrustes: natural-only columns stay empty
    res = runner.invoke(app, ["train", "trainer.steps=20", "optimizer.k1=10", "optimizer.solver=natural",
                              "run_dir=natural", *FAST])
    assert res.exit_code == 0, res.output
    gauge = pd.read_csv(in_tmp / "natural" / "gauge.csv")
    assert list(gauge["step"]) == [10, 20] and (gauge["flips"] >= 0).all() and (gauge["backtracks"] >= 0).all()
    assert gauge["rejected"].isin([0, 1]).all() and (gauge["fallback"] >= 0).all()
    assert (gauge["psi_after"] <= gauge["psi_before"]).all()
    assert summary["final"]["suboptimality"] == pytest.approx(df["suboptimality"].iloc[-1])


def test_a_gauge_csv_of_an_older_run_is_resumed_with_its_own_columns(in_tmp):
    """gauge.csv written before `rejected` / `fallback` were logged: a resume keeps its header and rows
    instead of refusing the run (the header is fixed at a run's start)."""
    args = ["trainer.steps=20", "optimizer.k1=10", "optimizer.solver=natural", "trainer.checkpoint_every=10",
            "run_dir=old", *FAST]
    res = runner.invoke(app, ["train", *args])
    assert res.exit_code == 0, res.output
    path = in_tmp / "old" / "gauge.csv"
    whole = pd.read_csv(path)
    whole[whole["step"] <= 10].drop(columns=["rejected", "fallback"]).to_csv(path, index=False)  # the old layout
    (in_tmp / "old" / "checkpoints" / "last.pt").unlink()  # resume from step 10 (prev.pt)
    (in_tmp / "old" / "checkpoints" / "prev.pt").rename(in_tmp / "old" / "checkpoints" / "last.pt")
    res = runner.invoke(app, ["train", "resume=old", "trainer.steps=20"])
    assert res.exit_code == 0, res.output
    again = pd.read_csv(path)
    assert list(again.columns) == ["step", "psi_before", "psi_after", "max_angle", "seconds", "flips", "backtracks"]
    pd.testing.assert_frame_equal(again.drop(columns="seconds"),
                                  whole.drop(columns=["seconds", "rejected", "fallback"]))


def test_cfg_prints_config_without_running(in_tmp):
    res = runner.invoke(app, ["train", "--cfg", "optimizer=adam", "data.T=7"])
    assert res.exit_code == 0, res.output
    assert "name: adam" in res.output and "T: 7" in res.output
    assert not (in_tmp / "outputs").exists()
    res2 = runner.invoke(app, ["config", "optimizer=adam", "data.T=7"])
    assert res2.output == res.output


def test_cli_bad_override_fails_before_work(in_tmp):
    res = runner.invoke(app, ["train", "optimizer=sgdd"])
    assert res.exit_code == 2
    assert "valid choices" in res.output and "adam" in res.output
    assert not (in_tmp / "outputs").exists()


def test_same_seed_same_metrics_different_seed_differs(in_tmp):
    runs = [train(compose(["trainer.steps=30", f"seed={s}", *FAST])).run_dir for s in (0, 0, 1)]
    a, b, c = (_metrics(r) for r in runs)
    pd.testing.assert_frame_equal(a, b)
    assert not a["total"].equals(c["total"])


@pytest.mark.parametrize("optimizer", ["experiment=fig2_gd_paper", "optimizer=adam", "optimizer=adagrad"])
def test_resume_equals_uninterrupted(in_tmp, optimizer):
    common = [optimizer, "trainer.checkpoint_every=10", *FAST]
    full = train(compose(["trainer.steps=40", *common])).run_dir
    part = train(compose(["trainer.steps=25", *common])).run_dir
    res = runner.invoke(app, ["train", f"resume={part}", "trainer.steps=40"])
    assert res.exit_code == 0, res.output
    pd.testing.assert_frame_equal(_metrics(full), _metrics(part))
    a, b = torch.load(full / "checkpoints/last.pt", weights_only=True), torch.load(part / "checkpoints/last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_ctrl_c_saves_checkpoint_and_resumes_identically(in_tmp, monkeypatch):
    common = ["trainer.checkpoint_every=1000", *FAST]
    full = train(compose(["trainer.steps=40", *common])).run_dir
    calls = {"n": 0}
    original = DenseDynamicMF.local_loss

    def local_loss_with_ctrl_c(self, generator=None):
        calls["n"] += 1
        if calls["n"] == 17:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C mid-run
        return original(self, generator)

    monkeypatch.setattr(DenseDynamicMF, "local_loss", local_loss_with_ctrl_c)
    result = train(compose(["trainer.steps=40", *common]))
    monkeypatch.setattr(DenseDynamicMF, "local_loss", original)
    assert result.status == "interrupted" and "resume=" in result.summary["message"]
    ckpt = torch.load(result.run_dir / "checkpoints/last.pt", weights_only=True)
    assert 0 < ckpt["step"] == result.summary["steps"] < 40  # the step in flight finished, then the checkpoint
    res = runner.invoke(app, ["train", f"resume={result.run_dir}"])
    assert res.exit_code == 0, res.output
    pd.testing.assert_frame_equal(_metrics(full), _metrics(result.run_dir))


def test_nan_stops_with_clear_message_and_keeps_good_checkpoint(in_tmp):
    cfg = compose(["optimizer=gd", "optimizer.lr=5.0", "trainer.steps=200", "trainer.checkpoint_every=2", *FAST])
    with pytest.raises(TrainingDiverged, match="lower optimizer.lr"):
        train(cfg)
    run = next((in_tmp / "outputs" / "dense_mf").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged"
    state = torch.load(run / "checkpoints/last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    res = runner.invoke(app, ["train", "optimizer=gd", "optimizer.lr=5.0", "trainer.steps=200", *FAST])
    assert res.exit_code == 3 and "became" in res.output


def test_divergence_at_a_checkpoint_step_keeps_the_last_good_checkpoint(in_tmp):
    """The loss becomes inf at step 8, where a checkpoint is due: last.pt must be the one of step 4 (its
    loss finite), not the parameters whose loss is not (resuming from them diverged at once)."""
    cfg = compose(["trainer.steps=3000", "trainer.checkpoint_every=4", "data.n_rows=200", "data.n_cols=200",
                   "data.T=60", "run_dir=div", *FAST])
    with pytest.raises(TrainingDiverged, match="became inf at step 8"):
        train(cfg)
    state = torch.load(in_tmp / "div/checkpoints/last.pt", weights_only=True)
    assert state["step"] == 4
    res = runner.invoke(app, ["train", "resume=div", "trainer.steps=6"])  # from step 4: finite up to step 6
    assert res.exit_code == 0, res.output


def test_a_changed_target_on_resume_replaces_the_reached_one(in_tmp):
    """A run stopped at its target continues with trainer.target=null (or another target) and more
    steps; with the same target it stops again at once."""
    r = train(compose(["optimizer=adam", "optimizer.lr=0.05", "trainer.eval_every=1", "run_dir=t1",
                       "trainer.progress=false", "trainer.steps=3000", "trainer.target=1000"]))
    assert r.status == "target_reached" and r.summary["steps"] < 3000
    reached = r.summary["steps"]

    def resume(*args):
        res = runner.invoke(app, ["train", "resume=t1", *args])
        assert res.exit_code == 0, res.output
        return json.loads((in_tmp / "t1" / "summary.json").read_text())

    again = resume("trainer.steps=3000", "trainer.target=1000")
    assert again["status"] == "target_reached" and again["steps_to_target"] == reached == again["steps"]
    on = resume(f"trainer.steps={reached + 20}", "trainer.target=null")
    assert on["status"] == "completed" and on["steps"] == reached + 20 and on["steps_to_target"] is None
    stricter = resume(f"trainer.steps={reached + 40}", "trainer.target=1e-30")
    assert stricter["status"] == "completed" and stricter["steps_to_target"] is None


def test_a_run_continued_after_its_target_draws_the_minibatches_of_an_uninterrupted_run(in_tmp, tiny_corpus):
    """The end checkpoint of a run stopped at its target holds the generator as the target's step found
    it: continued with trainer.target=null, the run draws the minibatches (and so logs the losses) of a
    run that never had a target, also after a resume with the same target. (It held the generator after
    that step's draw: the resumed run's rows from the target step on differed.)"""
    args = ["model=dwe_map", *tiny_corpus, "model.batch_words=40", "model.batch_contexts=40",
            "trainer.progress=false", "trainer.log_every=1", "trainer.eval_every=3",
            "trainer.checkpoint_every=1000", "trainer.steps=12"]
    ref = train(compose([*args, "run_dir=ref"]))
    assert ref.status == "completed"
    ll = pd.read_csv(in_tmp / "ref" / "metrics.csv").set_index("step")["ll_test"]
    target = float(ll.loc[6] - 1e-9 * abs(ll.loc[6]))
    first = train(compose([*args, "run_dir=t", f"trainer.target={target!r}"]))
    assert first.status == "target_reached" and 0 < first.summary["steps"] <= 6
    # resumed with the same target first: it stops again at once, and its end checkpoint must still hold
    # the generator as the target's step found it (it held the one after that step's draw)
    res = runner.invoke(app, ["train", "resume=t", f"trainer.target={target!r}"])
    assert res.exit_code == 0, res.output
    assert json.loads((in_tmp / "t" / "summary.json").read_text())["status"] == "target_reached"
    res = runner.invoke(app, ["train", "resume=t", "trainer.target=null"])
    assert res.exit_code == 0, res.output
    pd.testing.assert_frame_equal(_metrics(in_tmp / "t"), _metrics(in_tmp / "ref"))


def test_best_checkpoint_written_after_the_last_checkpoint_is_kept_on_resume(in_tmp):
    """A kill after an evaluation wrote best.pt but before the next checkpoint: the resumed run takes
    best.pt's record, so that summary.json and best.pt agree however far it then runs."""
    import shutil

    from conftest import SHARED_DATA

    sample = SHARED_DATA / "movielens" / "ml-latest-small"
    if not sample.is_dir():
        pytest.skip("ml-latest-small sample not available")
    over = ["model=movielens", f"data.path={sample}", f"data.cache_dir={in_tmp / 'cache'}", "data.T=5", "model.d=4",
            "trainer.eval_every=10", "trainer.checkpoint_every=50", "model.batch_size=2000", "optimizer=adagrad",
            "optimizer.lr=3", "trainer.progress=false"]
    train(compose([*over, "trainer.steps=10", "run_dir=bb"]))
    ck = in_tmp / "bb" / "checkpoints"
    saved = in_tmp / "saved"
    saved.mkdir()
    for name in ("last.pt", "prev.pt"):
        if (ck / name).exists():
            shutil.copy2(ck / name, saved / name)
    res = runner.invoke(app, ["train", "resume=bb", "trainer.steps=40"])
    assert res.exit_code == 0, res.output
    later = torch.load(ck / "best.pt", weights_only=True)["step"]
    assert later > 10  # a later evaluation was the best: best.pt was written after step 10's checkpoint
    for name in ("last.pt", "prev.pt"):  # as if killed right after that evaluation
        (ck / name).unlink(missing_ok=True)
        if (saved / name).exists():
            shutil.copy2(saved / name, ck / name)  # (keeps the older modification time)
    res = runner.invoke(app, ["train", "resume=bb", "trainer.steps=20"])
    assert res.exit_code == 0, res.output
    summary = json.loads((in_tmp / "bb" / "summary.json").read_text())
    assert summary["best"]["step"] == torch.load(ck / "best.pt", weights_only=True)["step"] == later


def test_float32_and_time_dependent_data_run(in_tmp):
    r = train(compose(["trainer.steps=20", "trainer.dtype=float32", "data.time_dependent=true", *FAST]))
    df = pd.read_csv(r.run_dir / "metrics.csv")
    assert "suboptimality" not in df.columns  # no closed form for drifting data
    assert r.summary["dtype"] == "float32" and df["total"].iloc[-1] < df["total"].iloc[0]


def test_target_stops_early(in_tmp):
    r = train(compose(["optimizer=adam", "optimizer.lr=0.05", "trainer.steps=3000", "trainer.target=1000",
                       "trainer.eval_every=1", "trainer.progress=false"]))
    assert r.status == "target_reached"
    assert r.summary["steps_to_target"] == r.summary["steps"] < 3000
    df = pd.read_csv(r.run_dir / "metrics.csv")
    assert df["suboptimality"].dropna().iloc[-1] <= 1000 < df["suboptimality"].dropna().iloc[-2]


def test_resume_of_missing_run_is_a_clear_error(in_tmp):
    res = runner.invoke(app, ["train", "resume=outputs/nothing"])
    assert res.exit_code == 2 and "resume=outputs/nothing: no such folder" in res.output
    (in_tmp / "outputs" / "empty").mkdir(parents=True)  # a folder without a checkpoint
    res = runner.invoke(app, ["train", "resume=outputs/empty"])
    assert res.exit_code == 2 and "no checkpoint" in res.output


def test_bad_data_fails_cleanly_without_a_run_folder(in_tmp):
    res = runner.invoke(app, ["train", "model=movielens", "data.path=nowhere/ml-20m", "trainer.steps=1"])
    assert res.exit_code == 2 and "nowhere" in res.output and "goldstone data download movielens" in res.output
    assert not (in_tmp / "outputs").exists()


# ----------------------------------------------------------------------------- issue 13: ETA, end-of-run line
def test_eta_is_announced_once_after_the_first_steps():
    from goldstone_cli.train import _Eta

    now = [100.0]
    eta = _Eta(start=0, steps=2000, device=torch.device("cpu"), eval_every=100, clock=lambda: now[0])
    now[0] += 30.0  # the evaluation at step 0 took 30 s: it must not count as step time
    eta.add_eval(30.0)
    now[0] += 3.0
    assert eta.check(4) is None  # too few steps and too little time
    now[0] += 9.0  # 12 s for 5 steps: 2.4 s per step
    msg = eta.check(5)
    # 2,000 steps x 2.4 s + 21 evaluations (steps 0, 100, ..., 2000) x 30 s = 80 + 10.5 min = 1.5 h
    assert msg.startswith("about 1.5 h for 2,000 steps on cpu (") and "2.40 s per step" in msg, msg
    assert "30.0 s per evaluation" in msg
    assert eta.total_seconds(5) == pytest.approx(2000 * 2.4 + 21 * 30.0)
    assert eta.check(6) is None  # once only
    slow = _Eta(start=10, steps=12, device=torch.device("cpu"), clock=lambda: now[0])
    now[0] += 61.0  # one step of a minute is enough
    assert "about 2 min for the remaining 2 steps" in slow.check(11)


def test_end_of_run_line_has_the_headline_numbers_and_the_folder(in_tmp):
    res = runner.invoke(app, ["train", "trainer.steps=30", "optimizer.k1=10", *FAST])
    assert res.exit_code == 0, res.output
    run = next((in_tmp / "outputs" / "dense_mf").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    lines = res.output.strip().splitlines()
    assert lines[-2].startswith("completed: 30 steps in ") and "L - L* " in lines[-2]
    assert f"gauge steps {100 * summary['gauge_overhead']:.1f}% of the time (3 gauge steps)" in lines[-2]
    assert lines[-1] == f"outputs in {run.relative_to(in_tmp)}"
    assert summary["headline"]["L - L*"] == pytest.approx(summary["final"]["suboptimality"])


# ----------------------------------------------------------------------------- wall time across resumes
class _Ticks:
    """train.py's clock, advancing 1 s per reading: every timed section (a step's loss, its update)
    adds exactly 1 s to wall_time, so a run of N steps has 2 N + 1 s of optimization however it was
    stopped and resumed, and a checkpoint at step s holds the 2 s of the steps before it."""

    def __init__(self):
        self.t = 0.0

    def perf_counter(self) -> float:
        self.t += 1.0
        return self.t


def test_optimization_time_is_counted_once_across_stops_and_resumes(in_tmp, monkeypatch):
    """A resumed run's wall time is the time before the stop plus the time after: a completed run
    resumed at its last step (the sweep does so when summary.json is damaged), a run continued with
    more steps, one stopped by Ctrl-C and one killed (the last periodic checkpoint) all end with the
    uninterrupted run's 61 s for 30 steps, and its wall_time column. (The last step's checkpoint held the
    time after that step's loss, which the resume computes and times again: 62 s, 63 s on a second resume.)"""
    import shutil
    import types

    import goldstone_cli.train as train_module
    from goldstone_cli import checkpoint as ckpt

    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=_Ticks().perf_counter))
    common = ["trainer.checkpoint_every=10", *FAST]

    def wall(run):
        return json.loads((run / "summary.json").read_text())["wall_time"]

    def walls(run):
        return pd.read_csv(run / "metrics.csv")[["step", "wall_time"]]

    full = train(compose(["trainer.steps=30", "run_dir=full", *common])).run_dir
    assert wall(full) == 61.0
    assert list(walls(full)["wall_time"]) == [2.0 * s + 1 for s in walls(full)["step"]]
    for name, step in ((ckpt.LAST, 30), (ckpt.PREV, 20)):  # a checkpoint at s: the wall time as step s found it
        state = ckpt.load(full / "checkpoints" / name)
        assert (state["step"], state["wall_time"]) == (step, 2.0 * step), name

    def resume(run, *args):
        res = runner.invoke(app, ["train", f"resume={run}", *args])
        assert res.exit_code == 0, res.output
        assert wall(run) == 61.0, (run, wall(run))
        pd.testing.assert_frame_equal(walls(full), walls(run))
        assert _metrics(full).equals(_metrics(run))

    # (a) a completed run resumed at its last step, twice, with summary.json damaged before the first
    again = in_tmp / "again"
    shutil.copytree(full, again)
    (again / "summary.json").write_text("\x00garbage{")
    resume(again)
    resume(again)
    assert ckpt.load(again / "checkpoints" / ckpt.PREV)["step"] == 20  # kept, as in the uninterrupted run (was 30)
    # a run continued with more steps from its last step's checkpoint
    part = train(compose(["trainer.steps=25", "run_dir=part", *common])).run_dir
    resume(part, "trainer.steps=30")
    # (b) Ctrl-C in the middle of the run; (c) a kill (no checkpoint of its own: the last periodic one stays)
    original = DenseDynamicMF.local_loss

    def stop_at(n, stop):
        calls = {"n": 0}

        def local_loss(self, generator=None):
            calls["n"] += 1
            if calls["n"] == n:
                stop()
            return original(self, generator)

        monkeypatch.setattr(DenseDynamicMF, "local_loss", local_loss)

    def kill():
        raise RuntimeError("killed")  # as a SIGKILL would, in the middle of a step

    stop_at(17, lambda: os.kill(os.getpid(), signal.SIGINT))
    stopped = train(compose(["trainer.steps=30", "run_dir=stopped", *common]))
    assert stopped.status == "interrupted" and 0 < stopped.summary["steps"] < 30
    stop_at(24, kill)
    with pytest.raises(RuntimeError, match="killed"):
        train(compose(["trainer.steps=30", "run_dir=killed", *common]))
    monkeypatch.setattr(DenseDynamicMF, "local_loss", original)
    assert ckpt.load(in_tmp / "killed" / "checkpoints" / ckpt.LAST)["step"] in (10, 20)
    resume(stopped.run_dir)
    resume(in_tmp / "killed")
