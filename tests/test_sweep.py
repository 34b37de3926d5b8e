"""`goldstone sweep` and `goldstone report`: override expansion, planning, validation before any
run, real sweeps end to end (local subprocesses and a Hydra launcher plugin), resume after Ctrl-C,
an isolated failing run, and the report agreeing with each run's own files."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from goldstone_cli.cli import app
from goldstone_cli.config import ConfigError, compose, group_options
from goldstone_cli.sweep import (SweepConfig, expand, load_sweep, make_plan, plan_from_manifest, prepare,
                                 run_state, split_args, validate_plan)
from goldstone_cli.sweep_report import build_report, reach
from goldstone_cli.train import train
from conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
TINY = ["trainer.steps=60", "trainer.log_every=5", "trainer.eval_every=10", "trainer.checkpoint_every=20"]


def _values(run_dir: Path) -> pd.DataFrame:
    """A run's metrics.csv without the wall-clock columns: equal for equal computations."""
    return pd.read_csv(run_dir / "metrics.csv").drop(columns=["wall_time", "gauge_time"], errors="ignore")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ----------------------------------------------------------------------------- expansion and planning
def test_expand_hydra_grammar():
    axes = {a.key: a for a in expand(["optimizer=adam,gd", "seed=range(3)", "+x.y=choice(1,2)",
                                      "optimizer.lr=0.1", "data.path='a,b'"])}
    assert axes["optimizer"].values == ["adam", "gd"]
    assert axes["optimizer"].overrides == ["optimizer=adam", "optimizer=gd"]
    assert axes["seed"].values == ["0", "1", "2"]
    assert axes["x.y"].overrides == ["+x.y=1", "+x.y=2"]  # the +/~ prefix is kept, the key is bare
    assert axes["optimizer.lr"].values == ["0.1"]
    assert axes["data.path"].overrides == ["data.path='a,b'"]  # a quoted comma is one value
    glob = expand(["optimizer=glob(g*)"])[0]
    assert glob.values == [o for o in group_options("optimizer") if o.startswith("g")] and len(glob.values) >= 2
    assert expand(["optimizer=glob(*,exclude=[gd*,goldstone*])"])[0].values == [
        o for o in group_options("optimizer") if not o.startswith(("gd", "goldstone"))]


@pytest.mark.parametrize("bad, words", [
    ("seed=0,", "cannot parse override 'seed=0,'"),
    ("seed=interval(0,1)", "interval()"),
    ("optimizer.lr=glob(a*)", "not a config group"),
    ("optimizer=glob(zzz*)", "matches no option"),
])
def test_expand_errors_are_one_line(bad, words):
    with pytest.raises(ConfigError) as exc:
        expand([bad])
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_plan_is_the_cartesian_product_with_safe_unique_names():
    cfg = SweepConfig(name="t", overrides=["optimizer=adam,gd", "seed=0,1"], fixed=["trainer.steps=5"])
    plan = make_plan(cfg, ["optimizer.lr=0.1,0.01", "seed=7"])  # seed=7 replaces the sweep's seeds
    assert len(plan.runs) == 4
    assert plan.varying == ["optimizer", "optimizer.lr"]
    names = [r.name for r in plan.runs]
    assert len(set(names)) == 4 and all(all(c.isalnum() or c in "._-" for c in n) for n in names)
    assert names[0] == "optimizer-adam__optimizer.lr-0.1"
    r = plan.runs[0]
    assert r.overrides == ["trainer.steps=5", "optimizer=adam", "seed=7", "optimizer.lr=0.1"]
    assert r.settings == {"optimizer": "adam", "optimizer.lr": "0.1"} and r.method == "optimizer=adam,optimizer.lr=0.1"


def test_methods_are_a_grid_axis_and_the_command_line_replaces_them():
    cfg = SweepConfig(name="m", methods={"gd": ["experiment=fig2_gd_paper"], "gs": ["optimizer=goldstone", "optimizer.k1=5"]},
                      overrides=["seed=0,1,2"])
    plan = make_plan(cfg)
    assert [r.name for r in plan.runs][:4] == ["gd__seed-0", "gd__seed-1", "gd__seed-2", "gs__seed-0"]
    assert plan.runs[3].overrides == ["optimizer=goldstone", "optimizer.k1=5", "seed=0"]
    assert {r.method for r in plan.runs} == {"gd", "gs"} and plan.varying == ["method", "seed"]
    plan2 = make_plan(cfg, ["optimizer=adam,adagrad"])  # the command line now defines what is compared
    assert {r.method for r in plan2.runs} == {"adam", "adagrad"} and len(plan2.runs) == 6
    with pytest.raises(ConfigError, match="both by sweep.methods"):
        make_plan(SweepConfig(methods={"a": ["optimizer=adam"]}, overrides=["optimizer=gd,adam"]))
    with pytest.raises(ConfigError, match="appears twice"):
        make_plan(SweepConfig(overrides=["seed=0,1"], fixed=["seed=3"]))


def test_split_args_routes_sweep_launcher_and_grid():
    a = split_args(["sweep=fig2", "sweep.jobs=3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1"])
    assert (a.sweep, a.sweep_overrides, a.launcher, a.launcher_params, a.grid) == (
        "fig2", ["sweep.jobs=3"], "joblib", ["hydra.launcher.n_jobs=2"], ["seed=0,1"])
    for bad in ["run_dir=x", "hydra.run.dir=x", "seed"]:
        with pytest.raises(ConfigError):
            split_args([bad])


def test_named_sweeps_load_and_their_runs_validate(in_tmp):
    names = group_options("sweep")
    assert {"default", "fig2", "fig3", "dwe", "dwe_paper"} <= set(names)
    sample = SHARED_DATA / "movielens" / "ml-latest-small"
    for name in names:
        cfg = load_sweep(name)
        plan = make_plan(cfg)
        assert cfg.name == name and plan.runs
        plan.runs = [r for r in plan.runs if r.settings.get("seed", "0") == "0"]  # one run per method: fast
        try:
            validate_plan(plan, progress=False)
        except ConfigError as exc:  # run in an empty folder: only MovieLens data can be missing
            assert "goldstone data download movielens" in str(exc), exc
            if not sample.is_dir():
                continue
            plan = make_plan(cfg, [f"data.path={sample}"])
            plan.runs = [r for r in plan.runs if r.settings.get("seed", "0") == "0"]
            validate_plan(plan, progress=False)
        assert all(r.device in ("auto", "cpu", "cuda") for r in plan.runs)
    default = make_plan(load_sweep("default"))
    assert len(default.runs) == 6 and {r.method for r in default.runs} == {"gd_paper", "goldstone"}
    assert load_sweep("default", ["sweep.jobs=3"]).jobs == 3
    with pytest.raises(ConfigError, match="sweep.bogus"):
        load_sweep("default", ["sweep.bogus=1"])
    with pytest.raises(ConfigError, match="unknown sweep 'nope'"):
        load_sweep("nope")


def test_invalid_override_fails_before_anything_is_created(in_tmp):
    for args, words in [(["optimizer=adam,sgdd"], "unknown optimizer 'sgdd'"),
                        (["trainer.steps=10,-1"], "trainer.steps must be >= 0"),
                        (["optimizer=adam", "optimizer.k1=5,10"], "optimizer.k1"),
                        (["seed=0,"], "cannot parse"),
                        (["sweep=nope"], "unknown sweep 'nope'")]:
        res = runner.invoke(app, ["sweep", *args])
        assert res.exit_code == 2, (args, res.output)
        assert words in res.output, res.output
        err = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert len(err) == 1
    assert not (in_tmp / "outputs").exists()


def test_train_rejects_sweep_settings(in_tmp):
    for arg in ["sweep=fig2", "+sweep=fig2", "sweep.jobs=2"]:
        res = runner.invoke(app, ["train", arg])
        assert res.exit_code == 2 and "goldstone sweep" in res.output, res.output
    assert not (in_tmp / "outputs").exists()


def test_missing_data_fails_the_dry_run_before_any_folder(in_tmp):
    """sweep=fig3 needs MovieLens-20M under data/: --dry-run and a real start both stop with the
    download command, and nothing is created."""
    for extra in (["--dry-run"], []):
        res = runner.invoke(app, ["sweep", "sweep=fig3", *extra])
        assert res.exit_code == 2, res.output
        assert "run 'adagrad__seed-0' needs data" in res.output and "goldstone data download movielens" in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
    assert not (in_tmp / "outputs").exists() and not (in_tmp / "data").exists()
    corpus = runner.invoke(app, ["sweep", "--dry-run", "model=dwe", "optimizer=adam", "data=cooc", "data.path=nowhere",
                                 "seed=0"])
    assert corpus.exit_code == 2 and "no prepared corpus at data.path=nowhere" in corpus.output, corpus.output


def test_a_compressed_or_headerless_ratings_file_fails_the_dry_run_in_one_line(in_tmp):
    """The data check reads a MovieLens file's first line: a gzip-compressed ratings file, or a csv
    without the four columns, stops the sweep before any folder with one line (each run failed alone)."""
    import gzip

    cases = {"gz": ("ratings.csv.gz", gzip.compress(b"userId,movieId,rating,timestamp\n1,2,4.0,964982703\n"),
                    "decompress it"),
             "header": ("ratings.csv", b"user,item,stars,time\n1,2,4.0,964982703\n", "no column userId")}
    for folder, (name, data, expected) in cases.items():
        (in_tmp / folder).mkdir()
        (in_tmp / folder / name).write_bytes(data)
        res = runner.invoke(app, ["sweep", "--dry-run", "model=movielens", "optimizer=gd,adam", f"data.path={folder}",
                                  "seed=0"])
        assert res.exit_code == 2 and expected in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
    assert not (in_tmp / "outputs").exists()


def test_continued_sweep_checks_its_data_again(in_tmp, shared_data):
    """A sweep folder whose data was moved away stops before any run is (re)started."""
    from goldstone_cli.io import atomic_write_json
    from goldstone_cli.sweep import MANIFEST, run_sweep

    copy = in_tmp / "ml"
    copy.mkdir()
    shutil.copy(shared_data / "movielens" / "ml-latest-small" / "ratings.csv", copy / "ratings.csv")
    plan, sweep_dir, _, _ = prepare(["model=movielens", "optimizer=adagrad,gd", f"data.path={copy}", "seed=0"],
                                    in_tmp / "sw")
    sweep_dir.mkdir()
    atomic_write_json(sweep_dir / MANIFEST, plan.manifest())
    (copy / "ratings.csv").unlink()
    with pytest.raises(ConfigError, match="needs data that is not there: No MovieLens ratings file"):
        run_sweep([], sweep_dir=sweep_dir, progress=False, echo=lambda *a: None)
    assert sorted(p.name for p in sweep_dir.iterdir()) == [MANIFEST]


def test_dry_run_plans_without_running(in_tmp):
    res = runner.invoke(app, ["sweep", "--dry-run", "optimizer=adam,gd", "seed=0,1", *TINY])
    assert res.exit_code == 0, res.output
    assert "4 runs" in res.output and "optimizer-adam__seed-1" in res.output
    assert not (in_tmp / "outputs").exists()


def test_launcher_configs_compose_and_validate(tmp_path):
    # the plugins are in the `test` extra: a missing one fails here instead of skipping
    import hydra_plugins.hydra_joblib_launcher  # noqa: F401
    import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from goldstone_cli.config import conf_dir
    from goldstone_cli.sweep import check_launcher, launcher_config, launcher_params

    params = launcher_params("submitit_slurm", {"partition": "gpu", "timeout_min": 600, "gpus_per_node": 1,
                                                "cpus_per_task": 8, "additional_parameters": {"mail-type": "END"}}, 4)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            _, cfg = launcher_config("submitit_slurm", params, tmp_path)
    finally:
        GlobalHydra.instance().clear()
    lc = cfg.hydra.launcher
    assert lc._target_.endswith("SlurmLauncher")
    assert (lc.partition, lc.timeout_min, lc.gpus_per_node, lc.cpus_per_task, lc.array_parallelism) == ("gpu", 600, 1, 8, 4)
    assert lc.additional_parameters["mail-type"] == "END"
    assert str(tmp_path / ".launcher") in str(cfg.hydra.sweep.dir)
    check_launcher("joblib", launcher_params("joblib", {}, 2), tmp_path)
    with pytest.raises(ConfigError, match="partitionn"):
        check_launcher("submitit_slurm", {"partitionn": "gpu"}, tmp_path)
    with pytest.raises(ConfigError, match="timeout_min"):
        check_launcher("submitit_slurm", {"timeout_min": "soon"}, tmp_path)
    with pytest.raises(ConfigError, match="--jobs"):
        check_launcher("local", {"n_jobs": 2}, tmp_path)


def test_cli_launcher_settings_are_validated_before_anything(in_tmp):
    import hydra_plugins.hydra_submitit_launcher  # noqa: F401  (in the `test` extra: never skipped)
    res = runner.invoke(app, ["sweep", "--dry-run", "seed=0,1", "hydra/launcher=submitit_slurm",
                              "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=120"])
    assert res.exit_code == 0, res.output
    assert "launcher submitit_slurm" in res.output
    res = runner.invoke(app, ["sweep", "seed=0,1", "hydra/launcher=submitit_slurm", "hydra.launcher.partitio=gpu"])
    assert res.exit_code == 2 and "partitio" in res.output
    res = runner.invoke(app, ["sweep", "seed=0,1", "hydra/launcher=pbs"])
    assert res.exit_code == 2 and "unknown hydra/launcher 'pbs'" in res.output
    assert not (in_tmp / "outputs").exists()


def test_another_plan_is_refused_in_an_existing_sweep_folder(in_tmp):
    plan, _, _, _ = prepare(["optimizer=adam", "seed=0,1", *TINY])
    d = in_tmp / "sw"
    d.mkdir()
    (d / "sweep.json").write_text(json.dumps(plan.manifest()))
    same, _, exists, _ = prepare([], d)
    assert exists and [r.overrides for r in same.runs] == [r.overrides for r in plan.runs]
    res = runner.invoke(app, ["sweep", "--dir", str(d), "optimizer=adam", "seed=0,1,2", *TINY])
    assert res.exit_code == 2 and "different sweep plan" in res.output and f"--dir {d}" in res.output
    assert sorted(p.name for p in d.iterdir()) == ["sweep.json"]
    (in_tmp / "other").mkdir()
    (in_tmp / "other" / "x.txt").write_text("x")
    res = runner.invoke(app, ["sweep", "--dir", str(in_tmp / "other"), "seed=0"])
    assert res.exit_code == 2 and "not a sweep folder" in res.output
    assert plan_from_manifest(json.loads((d / "sweep.json").read_text())).runs[0].name == plan.runs[0].name


# ----------------------------------------------------------------------------- real sweeps
def _check_report_agrees(sweep_dir: Path, n_runs: int, target: float):
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert len(summary) == n_runs
    for _, row in summary.iterrows():
        run = sweep_dir / row["run"]
        metrics = pd.read_csv(run / "metrics.csv")
        s = json.loads((run / "summary.json").read_text())
        assert row["status"] == s["status"]
        assert row["steps"] == s["steps"] == metrics["step"].iloc[-1]
        for col in ("total", "psi", "suboptimality"):
            assert row[f"final_{col}"] == pytest.approx(metrics[col].dropna().iloc[-1], rel=1e-12)
            assert row[f"final_{col}"] == pytest.approx(s["final"][col], rel=1e-12)
        hit = metrics.dropna(subset=["suboptimality"])
        hit = hit[hit["suboptimality"] <= target]
        assert row["steps_to_target"] == hit["step"].iloc[0] and row["time_to_target"] == hit["wall_time"].iloc[0]
    return summary


@pytest.mark.slow
def test_two_methods_two_seeds_end_to_end_and_rerun_skips(in_tmp):
    # target chosen so that some but not all evaluations reach it: steps/time to target are real numbers
    args = ["sweep", "optimizer=adam,gd", "seed=0,1", *TINY, "sweep.target.value=7000", "--jobs", "2",
            "--dir", "sw"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    d = in_tmp / "sw"
    assert "4 done" in res.output and "report: sw/report.md" in res.output
    names = ["optimizer-adam__seed-0", "optimizer-adam__seed-1", "optimizer-gd__seed-0", "optimizer-gd__seed-1"]
    for n in names:
        for f in ("config.yaml", "metrics.csv", "summary.json", "train.log", "checkpoints/last.pt"):
            assert (d / n / f).is_file(), (n, f)
        assert json.loads((d / n / "summary.json").read_text())["status"] == "completed"
        cfg = yaml.safe_load((d / n / "config.yaml").read_text())
        assert cfg["optimizer"]["name"] == ("adam" if "adam" in n else "gd") and cfg["seed"] == int(n[-1])
        assert cfg["trainer"]["steps"] == 60 and cfg["trainer"]["progress"] is False
    summary = _check_report_agrees(d, 4, 7000.0)
    assert set(summary["method"]) == {"adam", "gd"} and set(summary["seed"]) == {0, 1}
    assert summary["steps_to_target"].notna().all() and (summary["steps_to_target"] > 0).all()
    md = (d / "report.md").read_text()
    assert "| adam | 2 | 2 completed |" in md and "| gd | 2 | 2 completed |" in md
    assert "suboptimality <= 7000" in md and "![dense_mf" in md
    png = d / "plots" / "dense_mf.png"
    assert png.is_file() and png.stat().st_size > 20_000
    # the report is a pure function of the run folders
    before = (d / "summary.csv").read_text()
    (d / "summary.csv").unlink()
    res = runner.invoke(app, ["report", str(d)])
    assert res.exit_code == 0 and str(d / "report.md") in res.output
    assert (d / "summary.csv").read_text() == before
    # a plain folder of run folders (no sweep.json): the settings that differ between configs vary
    plain = in_tmp / "plain"
    for n in names:
        shutil.copytree(d / n, plain / n)
    paths = build_report(plain)
    flat = pd.read_csv(paths.summary_csv)
    assert len(flat) == 4 and flat["method"].nunique() == 2 and set(flat["seed"]) == {0, 1}
    assert (flat.sort_values("run")["final_total"].to_numpy() == summary.sort_values("run")["final_total"].to_numpy()).all()
    # re-invoking the finished sweep runs nothing
    stamps = {n: (d / n / "summary.json").stat().st_mtime_ns for n in names}
    res = runner.invoke(app, ["sweep", "--dir", "sw"])
    assert res.exit_code == 0 and "4 finished (skipped)" in res.output and "4 skipped" in res.output
    assert stamps == {n: (d / n / "summary.json").stat().st_mtime_ns for n in names}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the failing run asks for CUDA, which exists here")
def test_a_failing_run_is_reported_without_stopping_the_others(in_tmp):
    res = runner.invoke(app, ["sweep", "optimizer=adam", "seed=0", "trainer.device=cpu,cuda", *TINY, "--jobs", "2", "--dir", "sw"])
    assert res.exit_code == 1, res.output
    d = in_tmp / "sw"
    ok, bad = d / "trainer.device-cpu", d / "trainer.device-cuda"
    assert json.loads((ok / "summary.json").read_text())["status"] == "completed"
    assert "run trainer.device-cuda failed" in res.output and "no CUDA device" in res.output  # its log tail
    assert "1 done, 1 failed" in res.output
    assert json.loads((bad / "sweep_status.json").read_text())["outcome"] == "failed"
    summary = pd.read_csv(d / "summary.csv").set_index("run")
    assert summary.loc["trainer.device-cuda", "status"] == "failed"
    assert summary.loc["trainer.device-cpu", "status"] == "completed"
    assert "Runs that did not finish" in (d / "report.md").read_text()
    assert run_state(bad) == "fresh" and run_state(ok) == "skip"


def ctrl_c_when(proc: subprocess.Popen, ready, timeout: float = 240) -> str:
    """Wait (at most ``timeout`` s) until ``ready()``, with ``proc`` still running; Ctrl-C it; its output
    once it has exited with 130."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 130, out
    return out


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_and_re_invoking_resumes_it(in_tmp, one_thread):
    steps = 4000  # long enough to be interrupted mid-run on a busy 2-core machine
    cmd = [sys.executable, "-m", "goldstone_cli", "sweep", "optimizer=adam", "seed=0,1,2", f"trainer.steps={steps}",
           "trainer.log_every=50", "trainer.eval_every=100", "trainer.checkpoint_every=1000", "--jobs", "2",
           "--dir", "sw"]
    proc = subprocess.Popen(cmd, cwd=in_tmp, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    d = in_tmp / "sw"
    first = [d / "seed-0" / "metrics.csv", d / "seed-1" / "metrics.csv"]
    out = ctrl_c_when(proc, lambda: all(p.exists() and len(p.read_text().splitlines()) > 3 for p in first))
    assert "resume with: goldstone sweep --dir sw" in out
    for n in ("seed-0", "seed-1"):
        s = json.loads((d / n / "summary.json").read_text())
        assert s["status"] == "interrupted" and 0 < s["steps"] < steps
        assert (d / n / "checkpoints" / "last.pt").is_file() and run_state(d / n) == "resume"
    assert not (d / "seed-2").exists()  # never launched
    assert "not started" in out

    res = runner.invoke(app, ["sweep", "--dir", "sw"])
    assert res.exit_code == 0, res.output
    assert "2 to resume, 1 to start" in res.output
    for n in ("seed-0", "seed-1", "seed-2"):
        m = pd.read_csv(d / n / "metrics.csv")
        assert m["step"].is_unique and m["step"].is_monotonic_increasing and m["step"].iloc[-1] == steps
        assert json.loads((d / n / "summary.json").read_text())["status"] == "completed"
    assert "Resuming" in (d / "seed-0" / "train.log").read_text()
    assert len(pd.read_csv(d / "summary.csv")) == 3
    # the values, not only the steps: every run equals an uninterrupted run (the sweep's runs use one
    # thread each here, 2 cores / 2 jobs; so do these)
    for n in ("seed-0", "seed-1", "seed-2"):
        ref = train(compose(["optimizer=adam", f"seed={n[-1]}", f"trainer.steps={steps}", "trainer.log_every=50",
                             "trainer.eval_every=100", "trainer.checkpoint_every=1000", "trainer.progress=false",
                             f"run_dir=ref-{n}"]))
        pd.testing.assert_frame_equal(_values(d / n), _values(ref.run_dir), check_exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_hydra_launcher_plugins_run_the_plan(in_tmp, launcher, one_thread):
    import hydra_plugins.hydra_joblib_launcher  # noqa: F401  (both in the `test` extra: never skipped)
    import hydra_plugins.hydra_submitit_launcher  # noqa: F401

    extra = ["hydra.launcher.timeout_min=30"] if launcher == "submitit_local" else []
    res = runner.invoke(app, ["sweep", "optimizer=adam", "seed=0,1", *TINY, "sweep.target.value=1e9",
                              f"hydra/launcher={launcher}", *extra, "--jobs", "2", "--dir", "sw"])
    assert res.exit_code == 0, res.output
    d = in_tmp / "sw"
    _check_report_agrees(d, 2, 1e9)
    assert json.loads((d / "sweep.json").read_text())["launcher"]["name"] == launcher
    assert "run_dir=" in (d / "seed-0" / "train.log").read_text()
    for n in ("seed-0", "seed-1"):  # the plugin's runs are the same runs the local runner makes
        ref = train(compose(["optimizer=adam", f"seed={n[-1]}", *TINY, "trainer.progress=false", f"run_dir=ref-{n}"]))
        pd.testing.assert_frame_equal(_values(d / n), _values(ref.run_dir))
    if launcher == "submitit_local":
        assert list((d / ".launcher").glob("**/*_log.out")), "submitit keeps its job logs under .launcher/"


def test_reach_finds_the_first_evaluation_at_the_target():
    df = pd.DataFrame({"step": [0, 5, 10, 15, 20], "wall_time": [0.0, 0.1, 0.2, 0.3, 0.4],
                       "m": [5.0, None, 2.0, None, 0.5]})
    assert reach(df, "m", 2.0) == (10.0, 0.2)
    assert all(math.isnan(x) for x in reach(df, "m", 0.1))  # never reached
    assert reach(df, "m", 4.0, mode="max") == (0.0, 0.0)
    assert all(math.isnan(x) for x in reach(df, "missing", 1.0))


@pytest.mark.slow
def test_a_sweep_killed_with_sigkill_leaves_its_runs_running_and_a_rerun_does_not_start_them_twice(in_tmp):
    cmd = [sys.executable, "-m", "goldstone_cli", "sweep", "optimizer=adam", "seed=0", "trainer.steps=10000000,20",
           "trainer.log_every=50", "trainer.eval_every=100", "trainer.checkpoint_every=200", "--jobs", "1", "--dir", "sw"]
    proc = subprocess.Popen(cmd, cwd=in_tmp, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    d = in_tmp / "sw"
    long_run = d / "trainer.steps-10000000"
    child = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            m = long_run / "metrics.csv"
            if m.exists() and len(m.read_text().splitlines()) > 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None and (long_run / "run.lock").exists(), (proc.poll(), sorted(os.listdir(d)))
        proc.kill()  # SIGKILL: the sweep cannot forward anything; its run (own session) keeps going
        proc.communicate(timeout=60)
        child = int((long_run / "run.lock").read_text())
        os.kill(child, 0)  # still alive
        res = runner.invoke(app, ["sweep", "--dir", "sw"])
        assert res.exit_code == 75, res.output
        assert f"run trainer.steps-10000000 is still running in process {child}" in res.output
        assert json.loads((d / "trainer.steps-20" / "summary.json").read_text())["status"] == "completed"
        assert "Resuming" not in (long_run / "train.log").read_text()  # no second process was started there
        os.kill(child, signal.SIGTERM)  # the orphan stops like any run: checkpoint, exit 143
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        child = None
        assert json.loads((long_run / "summary.json").read_text())["status"] == "interrupted"
        assert run_state(long_run) == "resume"
    finally:
        if proc.poll() is None:
            proc.kill()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
