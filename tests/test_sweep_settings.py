"""`goldstone sweep`'s own settings: bad sweep.* overrides and --dir paths are one-line errors,
target / report metrics are checked against what the models report, a sweep written for one model
leaves its settings out for another, and a continued sweep keeps its runs' CPU thread count."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from goldstone_cli import sweep as sweep_mod
from goldstone_cli.cli import app
from goldstone_cli.config import ConfigError, compose, group_options
from goldstone_cli.io import atomic_write_json
from goldstone_cli.sweep import MANIFEST, load_sweep, make_plan, prepare, run_metrics, run_sweep
from conftest import REPO, SHARED_DATA
from test_sweep import ctrl_c_when

runner = CliRunner()
TINY = ["trainer.steps=20", "trainer.log_every=5", "trainer.eval_every=10", "trainer.checkpoint_every=10"]
SAMPLE = SHARED_DATA / "movielens" / "ml-latest-small"


def _error_line(res, *words):
    """A clean user error: exit code 2, one `error:` line with ``words``, no traceback."""
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _sweep_folder(d: Path, args=("optimizer=adam", "seed=0,1", *TINY)) -> Path:
    plan, _, _, _ = prepare(list(args))
    d.mkdir()
    atomic_write_json(d / MANIFEST, plan.manifest())
    return d


# ----------------------------------------------------------------------------- sweep.* overrides
@pytest.mark.parametrize("arg, words", [
    ("sweep.target.value=abc", ["could not be converted to Float"]),
    ("sweep.jobz=3", ["Key 'jobz' not in 'SweepConfig'", "sweep.jobs"]),
    ("sweep.target.metricc=x", ["'metricc'", "sweep.target.metric, sweep.target.value, sweep.target.mode"]),
])
def test_bad_sweep_settings_name_the_command_line_with_and_without_dir(in_tmp, arg, words):
    d = _sweep_folder(in_tmp / "sw")
    for extra in ([], ["--dir", "sw"], ["--dir", "new"]):
        line = _error_line(runner.invoke(app, ["sweep", "--dry-run", arg, *extra]), f"command line '{arg}'", *words)
        assert "conf/sweep" not in line  # the file is fine: the command line is named
    assert sorted(p.name for p in d.iterdir()) == [MANIFEST] and not (in_tmp / "new").exists()
    assert not (in_tmp / "outputs").exists()


def test_a_broken_sweep_file_is_still_named(in_tmp, monkeypatch):
    import shutil

    conf = in_tmp / "conf"
    shutil.copytree(REPO / "conf", conf)
    text = (conf / "sweep" / "default.yaml").read_text().replace("jobs: 0", "jobz: 0")
    (conf / "sweep" / "default.yaml").write_text(text)
    monkeypatch.setenv("GOLDSTONE_CONF", str(conf))
    with pytest.raises(ConfigError, match=r"^conf/sweep/default.yaml: .*jobz"):
        load_sweep("default", ["sweep.jobs=2"])


# ----------------------------------------------------------------------------- --dir
def test_dir_that_is_a_file_is_a_one_line_error(in_tmp):
    (in_tmp / "f").write_text("x")
    _error_line(runner.invoke(app, ["sweep", "--dir", "f", "--dry-run"]), "f exists and is not a folder")
    _error_line(runner.invoke(app, ["sweep", "--dir", "f", "seed=0", *TINY]), "f exists and is not a folder")
    _error_line(runner.invoke(app, ["sweep", "--dir", "f/sub", "seed=0", *TINY]), "f exists and is not a folder")
    assert (in_tmp / "f").read_text() == "x" and sorted(p.name for p in in_tmp.iterdir()) == ["f"]


# ----------------------------------------------------------------------------- target / report metric
def test_an_unknown_target_or_report_metric_is_refused_up_front(in_tmp):
    _error_line(runner.invoke(app, ["sweep", "--dry-run", "sweep.target.metric=foo"]),
                "sweep.target.metric=foo is not a metric of model dense_mf", "suboptimality", "psi")
    _error_line(runner.invoke(app, ["sweep", "--dry-run", "sweep.report.metric=foo"]), "sweep.report.metric=foo")
    # the default sweep's target (suboptimality) does not exist for drifting data
    _error_line(runner.invoke(app, ["sweep", "--dry-run", "data.time_dependent=true"]),
                "sweep.target.metric=suboptimality", "sweep.target.value=null")
    _error_line(runner.invoke(app, ["sweep", "--dry-run", "data.time_dependent=true", "sweep.target.metric=null"]),
                "does not report its target metric suboptimality")
    for ok in (["sweep.target.metric=psi"], ["data.time_dependent=true", "sweep.target.value=null"]):
        res = runner.invoke(app, ["sweep", "--dry-run", *ok])
        assert res.exit_code == 0, (ok, res.output)
    # a continued sweep checks a changed target too, and keeps its folder as it was
    d = _sweep_folder(in_tmp / "sw")
    _error_line(runner.invoke(app, ["sweep", "--dir", "sw", "--dry-run", "sweep.target.metric=foo"]),
                "sweep.target.metric=foo is not a metric of model dense_mf")
    assert runner.invoke(app, ["sweep", "--dir", "sw", "--dry-run", "sweep.target.metric=total"]).exit_code == 0
    assert sorted(p.name for p in d.iterdir()) == [MANIFEST] and not (in_tmp / "outputs").exists()


def _model_cases(request):
    cases = [["model=dense_mf"], ["model=dense_mf", "data.time_dependent=true"]]
    if (SAMPLE / "ratings.csv").is_file():
        cases.append(["model=movielens", f"data.path={SAMPLE}", "data.T=4", "model.d=3",
                      f"data.cache_dir={request.getfixturevalue('tmp_path') / 'cache'}"])
    corpus = request.getfixturevalue("tiny_corpus")
    cases += [["model=dwe", *corpus], ["model=dwe", *corpus, "model.val_mass=0.3"], ["model=dwe_map", *corpus]]
    return cases


def test_run_metrics_are_what_the_built_models_report(in_tmp, request):
    """The sweep reads the metric names from the model classes without data: they must equal what
    the built model writes to metrics.csv (train.py: BASE_COLUMNS + model.metric_names())."""
    from goldstone_cli.models import build_model

    models = set()
    for ovs in _model_cases(request):
        cfg = compose(ovs + ["trainer.progress=false"])
        model = build_model(cfg, torch.device("cpu"), torch.float64)
        names, target = run_metrics(cfg)
        assert names == ["total", "local", "psi"] + model.metric_names(), ovs
        assert target == model.target_metric, ovs
        models.add(cfg.model.name)
    assert {"dense_mf", "dwe"} <= models
    assert "ll_val" in run_metrics(compose(["model=dwe", "model.val_mass=0.3"]))[0]
    assert "suboptimality" not in run_metrics(compose(["data.time_dependent=true"]))[0]


# ----------------------------------------------------------------------------- settings for the sweep's model
def test_every_named_sweep_says_which_model_it_is_for():
    for name in group_options("sweep"):
        cfg = load_sweep(name)
        plan = make_plan(cfg)
        assert cfg.model, f"conf/sweep/{name}.yaml sets no `model:`"
        assert {str(compose(r.overrides).model.name) for r in plan.runs[:2]} == {cfg.model}, name


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"MovieLens sample not found at {SAMPLE}")
def test_the_default_sweep_leaves_its_settings_out_for_another_model(in_tmp):
    readme = ["model=movielens", "optimizer=adagrad,goldstone", "seed=0", f"data.path={SAMPLE}"]
    plan, _, _, _ = prepare(readme)
    assert plan.fixed == [] and plan.methods == {} and plan.config.description == ""
    assert plan.config.target.metric is None and plan.config.target.value is None
    assert "movielens" in plan.config.report.title and "5.1" not in plan.config.report.title
    assert "dense_mf" in plan.note and "movielens" in plan.note
    for r in plan.runs:
        assert not any(o.startswith("trainer.") for o in r.overrides), r.overrides
        cfg = compose(r.overrides)
        assert (cfg.model.name, cfg.trainer.steps, cfg.trainer.eval_every) == ("movielens", 3000, 100)
    res = runner.invoke(app, ["sweep", "--dry-run", *readme])
    assert res.exit_code == 0 and "trainer.steps=5000" not in res.output and "note:" in res.output, res.output
    # what the command line sets is kept: here a target on movielens's own metric, one method
    plan, _, _, _ = prepare(["model=movielens", "seed=0", f"data.path={SAMPLE}", "sweep.target.value=-0.6",
                             "+sweep.methods.ada=['optimizer=adagrad']", "sweep.report.title=mine"])
    assert (plan.config.target.metric, plan.config.target.value) == (None, -0.6)
    assert plan.methods == {"ada": ["optimizer=adagrad"]} and plan.config.report.title == "mine"
    # the sweep's own model (also named explicitly) keeps everything
    for args in ([], ["model=dense_mf"], ["experiment=fig2"]):
        plan, _, _, _ = prepare(args)
        assert "trainer.steps=5000" in plan.fixed and plan.config.target.metric == "suboptimality", args
        assert not plan.note
        # experiment=... replaces the methods (gd_paper is experiment=fig2_gd_paper): the file's title names them
        assert plan.config.report.title == ("Sweep default: experiment=fig2" if args == ["experiment=fig2"]
                                            else "Sec. 5.1: GD vs Goldstone-GD (dense dynamic MF, synthetic data)")
    # sweep.model=null: the settings apply whatever the model (here: the Sec. 5.1 target does not fit)
    with pytest.raises(ConfigError, match="suboptimality is not a metric of model movielens"):
        prepare(readme + ["sweep.model=null"])


@pytest.mark.parametrize("grid, commands", [
    (["model=dense_mf,movielens", "seed=0,1"], ["`goldstone sweep model=dense_mf seed=0,1`",
                                                "`goldstone sweep model=movielens seed=0,1`"]),
    (["experiment=fig2,fig3"], ["`goldstone sweep experiment=fig2`", "`goldstone sweep experiment=fig3`"]),
])
def test_a_sweep_mixing_its_own_model_with_another_is_refused_naming_two_sweeps(in_tmp, grid, commands):
    """The sweep's methods, fixed settings, target and report are one set for all runs: a command line
    that trains its own model and another one would have dropped them for every run (the dense_mf runs
    then trained 5000 -> trainer.steps' 5000 with eval_every 100, no methods, no target). It is refused
    in one line that names the two sweeps to run instead, before anything is created."""
    res = runner.invoke(app, ["sweep", "--dry-run", *grid])
    line = _error_line(res, "mixes model=dense_mf", "model=movielens", "run one sweep per model", *commands)
    assert "sweep.model=null" in line
    assert not (in_tmp / "outputs").exists()
    # the models the sweep is not written for, together: each on its own defaults (no fixed settings)
    cfg, note = sweep_mod.own_model_only(load_sweep("default"), [], ["model=movielens,dwe", "seed=0"])
    plan = make_plan(cfg, ["model=movielens,dwe", "seed=0"])
    assert plan.fixed == [] and plan.methods == {} and "left out" in note
    # sweep.model=null applies the sweep's settings to every model (the user's choice)
    grid = ["model=dense_mf,dwe", "seed=0"]
    cfg, note = sweep_mod.own_model_only(load_sweep("default", ["sweep.model=null"]), ["sweep.model=null"], grid)
    plan = make_plan(cfg, grid)
    assert not note and "trainer.steps=5000" in plan.fixed and {r.settings["model"] for r in plan.runs} == {"dense_mf", "dwe"}


# ----------------------------------------------------------------------------- threads of a continued sweep
def test_a_continued_sweep_keeps_the_thread_count_it_started_with(in_tmp, monkeypatch):
    """First start: 2 runs, 2 at a time on 4 cores: 2 threads each, recorded in sweep.json. When only
    one run is left, it still gets 2 threads (not 4), like the checkpoint it resumes from."""
    calls = []

    def fake_run_local(sweep_dir, todo, jobs, n_total, n_skipped, desc, progress=True, threads=None):
        calls.append((sorted(r.name for r, _ in todo), threads))
        return {r.name: "interrupted" for r, _ in todo}

    monkeypatch.setattr(sweep_mod, "cpu_cores", lambda: 4)
    monkeypatch.setattr(sweep_mod, "run_local", fake_run_local)
    monkeypatch.setattr("goldstone_cli.sweep_report.build_report", lambda d: None)
    args = ["optimizer=adam,gd", "seed=0", *TINY]
    run_sweep(args, sweep_dir=in_tmp / "sw", jobs=2, progress=False, echo=lambda *a: None)
    assert calls[-1] == (["optimizer-adam", "optimizer-gd"], 2)
    assert json.loads((in_tmp / "sw" / MANIFEST).read_text())["threads"] == 2
    done = in_tmp / "sw" / "optimizer-adam"
    done.mkdir()
    (done / "summary.json").write_text(json.dumps({"status": "completed"}))
    run_sweep([], sweep_dir=in_tmp / "sw", jobs=2, progress=False, echo=lambda *a: None)
    assert calls[-1] == (["optimizer-gd"], 2)
    assert json.loads((in_tmp / "sw" / MANIFEST).read_text())["threads"] == 2
    out = []
    run_sweep([], sweep_dir=in_tmp / "sw", jobs=2, dry_run=True, echo=out.append)
    assert "2 CPU threads each" in out[0]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("OMP_NUM_THREADS", None)
    return env


@pytest.mark.slow
@pytest.mark.skipif(sweep_mod.cpu_cores() < 2, reason="needs 2 cores: 2 runs at a time get 1 thread each")
def test_a_run_resumed_alone_uses_its_checkpoints_threads_and_equals_an_uninterrupted_run(in_tmp, one_thread):
    """2 runs, 2 at a time (1 thread each); the short one finishes, Ctrl-C stops the long one; the
    continued sweep has one run left and resumes it with 1 thread: no thread warning, same numbers."""
    from goldstone_cli.train import train

    steps = 4000
    common = ["optimizer=adam", "seed=0", "trainer.log_every=50", "trainer.eval_every=100",
              "trainer.checkpoint_every=500"]
    cmd = [sys.executable, "-m", "goldstone_cli", "sweep", *common, f"trainer.steps=20,{steps}", "--jobs", "2",
           "--dir", "sw"]
    proc = subprocess.Popen(cmd, cwd=in_tmp, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    d = in_tmp / "sw"
    long_run, short_run = d / f"trainer.steps-{steps}", d / "trainer.steps-20"
    m = long_run / "metrics.csv"
    ctrl_c_when(proc, lambda: (short_run / "sweep_status.json").exists() and m.exists()
                and len(m.read_text().splitlines()) > 6)
    assert json.loads((long_run / "summary.json").read_text())["status"] == "interrupted"
    res = subprocess.run([sys.executable, "-m", "goldstone_cli", "sweep", "--dir", "sw"], cwd=in_tmp, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 to resume, 0 to start" in res.stdout
    log = (long_run / "train.log").read_text()
    assert "Resuming" in log and "torch threads" not in log, log[-2000:]
    ref = train(compose([*common, f"trainer.steps={steps}", "trainer.progress=false", "run_dir=ref"]))
    drop = ["wall_time", "gauge_time"]
    pd.testing.assert_frame_equal(pd.read_csv(long_run / "metrics.csv").drop(columns=drop, errors="ignore"),
                                  pd.read_csv(ref.run_dir / "metrics.csv").drop(columns=drop, errors="ignore"),
                                  check_exact=True)


def test_the_report_says_when_no_run_reports_the_target_metric(in_tmp):
    """A sweep folder planned before the metric check (or edited): the report says why 0 runs reach it."""
    from goldstone_cli.sweep_report import build_report

    d = _sweep_folder(in_tmp / "sw", ("optimizer=adam", "seed=0", *TINY))
    m = json.loads((d / MANIFEST).read_text())
    m["target"] = {"metric": "foo", "value": 1e-4, "mode": "min"}
    atomic_write_json(d / MANIFEST, m)
    run = d / m["runs"][0]["name"]
    run.mkdir()
    (run / "metrics.csv").write_text("step,wall_time,total,local,psi,lr,suboptimality\n0,0.0,2.0,1.5,0.5,0.1,1.0\n")
    (run / "summary.json").write_text(json.dumps({"status": "completed", "model": "dense_mf"}))
    md = build_report(d).report_md.read_text()
    assert "Target: foo <= 0.0001" in md and "No run reports a metric `foo`" in md


# ----------------------------------------------------------------------------- the description states what runs
def test_the_description_and_plan_state_the_seeds_that_run(in_tmp):
    """The sweep file's description says "3 seeds": with seed=... on the command line it says how many run,
    printed, in sweep.json and in the report (also of a sweep.json written before, with the file's count)."""
    from goldstone_cli.sweep_report import build_report

    lines: list[str] = []
    run_sweep(["seed=0,1", *TINY], dry_run=True, progress=False, echo=lines.append)
    assert any(ln.startswith("sweep default: GD") and ln.endswith("2 seeds") for ln in lines), lines
    assert any("4 runs (2 methods x 2 seeds) in " in ln for ln in lines) and not any("3 seeds" in ln for ln in lines)
    described = lambda args: prepare([*args, *TINY])[0].manifest()["description"]  # noqa: E731
    assert described(["seed=0,1"]).endswith("Sec. 5.1 synthetic data, 2 seeds")
    assert described([]).endswith(", 3 seeds")  # the file's own grid: unchanged
    assert described(["sweep=fig2", "seed=7"]).endswith(", 1 seed")
    assert prepare(["sweep=fig2", "seed=7", *TINY])[0].counts() == "4 runs (4 methods x 1 seed)"
    # the command line replaces the compared methods: the file's "GD vs Goldstone-GD" is not what runs
    assert described(["optimizer=adam,gd", "seed=0"]) == ""
    # a sweep.json with the file's count: the report states the runs' count
    d = _sweep_folder(in_tmp / "sw", ("seed=0,1", *TINY))
    m = json.loads((d / MANIFEST).read_text())
    assert m["description_seeds"] == 2
    del m["description_seeds"]  # as an older version wrote it
    m["description"] = m["description"].replace("2 seeds", "3 seeds")
    atomic_write_json(d / MANIFEST, m)
    md = build_report(d).report_md.read_text()
    assert "Sec. 5.1 synthetic data, 2 seeds" in md and "3 seeds" not in md
    assert "Runs: 4 runs (2 methods x 2 seeds): 4 pending." in md, md


def test_describe_rewrites_only_the_phrase_that_states_the_files_seed_count():
    """A description's other numbers of seeds are the user's words: "planted from 5 seeds" stays when
    the seeds are the file's, and "1,000 seeds" never becomes "1,2 seeds". (Every "N seeds" was rewritten.)"""
    from goldstone_cli.sweep import describe

    assert describe("data planted from 5 seeds, 3 seeds", 3, 3) == "data planted from 5 seeds, 3 seeds"
    assert describe("data planted from 5 seeds, 3 seeds", 2, 3) == "data planted from 5 seeds, 2 seeds"
    assert describe("data planted from 5 seeds", 2, 3) == "data planted from 5 seeds (this sweep: 2 seeds)"
    assert describe("3 seeds here, 3 seeds there", 1, 3) == "3 seeds here, 3 seeds there (this sweep: 1 seed)"
    assert describe("Three seeds", 1, 3) == "1 seed"
    assert describe("1,000 seeds", 2, 3) == "1,000 seeds (this sweep: 2 seeds)"
    assert describe("", 2, 3) == ""
    # a sweep.json of an older version (no description_seeds): its one seed count made the runs'
    assert describe("GD vs GS, 3 seeds", 2, None) == "GD vs GS, 2 seeds"
    assert describe("1,000 seeds", 2, None) == "1,000 seeds"
    assert describe("5 seeds and 3 seeds", 2, None) == "5 seeds and 3 seeds"


def test_the_run_count_names_a_grid_within_each_method(in_tmp):
    """Two methods x optimizer.lr=0.1,0.2 x 2 seeds are 8 runs: the count says so (it said "8 runs (2
    methods x 2 seeds)"), in the printed plan and in the report."""
    from goldstone_cli.sweep import run_counts

    plan = prepare(["seed=0,1", "optimizer.lr=0.1,0.2", *TINY])[0]
    assert plan.counts() == "8 runs (2 methods x 2 settings of optimizer.lr x 2 seeds)"
    assert prepare(["seed=0,1", *TINY])[0].counts() == "4 runs (2 methods x 2 seeds)"
    # methods from the grid itself (no labelled methods): each setting is a method
    assert prepare(["optimizer=adam,gd", "seed=0,1", *TINY])[0].counts() == "4 runs (2 methods x 2 seeds)"
    # runs of a report where the methods have different numbers of seeds
    assert run_counts([("a", {"seed": "0"}), ("b", {"seed": "0"}), ("b", {"seed": "1"})],
                      ["seed"]) == "3 runs (2 methods x 1-2 seeds)"


# ----------------------------------------------------------------------------- mappings given whole, repeated keys
def test_a_mapping_given_whole_replaces_the_sweep_files_and_a_repeated_key_is_named(in_tmp):
    """sweep.methods={} used to be merged into the file's methods (so nothing changed): it is replaced;
    sweep.methods.LABEL=... still adds or changes one method."""
    assert load_sweep("default", ["sweep.methods={}"]).methods == {}
    assert load_sweep("default", ["sweep.methods={gs:['optimizer=goldstone']}"]).methods == {"gs": ["optimizer=goldstone"]}
    assert set(load_sweep("default", ["+sweep.methods.ada=['optimizer=adagrad']"]).methods) == {"gd_paper", "goldstone", "ada"}
    plan = make_plan(load_sweep("default", ["sweep.methods={}"]), ["seed=0"])
    assert [r.name for r in plan.runs] == ["run"] and plan.methods == {}
    _error_line(runner.invoke(app, ["sweep", "--dry-run", "sweep.methods={a:3}"]), "sweep.methods={a:3}")
    _error_line(runner.invoke(app, ["sweep", "--dry-run", "seed=0", "seed=1"]), "'seed' is given twice", "seed=A,B")


def test_a_run_ended_by_a_signal_says_which_and_a_failed_sweep_says_how_to_retry(monkeypatch, in_tmp):
    assert sweep_mod._exit_text(-9) == "killed by SIGKILL" and sweep_mod._exit_text(1) == "exit code 1"
    d = _sweep_folder(in_tmp / "sw")
    monkeypatch.setattr(sweep_mod, "run_local", lambda sweep_dir, todo, *a, **k: {todo[0][0].name: "failed",
                                                                                  todo[1][0].name: "done"})
    res = run_sweep([], sweep_dir=d, progress=False, echo=lambda *_: None)
    assert res.exit_code == 1 and "1 done, 1 failed" in res.message
    assert f"goldstone sweep --dir {d} retries the failed runs" in res.message, res.message


def test_methods_replaced_on_the_command_line_drop_the_files_title(in_tmp):
    """optimizer=... replaces the default sweep's methods (GD vs Goldstone-GD): its report was still titled
    'Sec. 5.1: GD vs Goldstone-GD' over an Adam vs Goldstone-GD comparison."""
    grid = ["optimizer=adam,goldstone", "seed=0"]
    plan, _, _, _ = prepare(grid)
    assert plan.methods == {} and plan.description == ""
    assert plan.config.report.title == "Sweep default: optimizer=adam,goldstone seed=0"
    assert plan.manifest()["report"]["title"] == plan.config.report.title
    plan, _, _, _ = prepare(grid + ["sweep.report.title=Adam vs ours", "sweep.description=our words"])
    assert plan.config.report.title == "Adam vs ours" and plan.description == "our words"
    plan, _, _, _ = prepare(["seed=0"])  # the file's methods: its own words
    assert plan.config.report.title.startswith("Sec. 5.1") and plan.description.startswith("GD (paper baseline")
