"""What a user sees on the command line and in plots (issue 13: small things found on a fresh machine)."""

from __future__ import annotations

from typer.testing import CliRunner

from goldstone_cli.cli import app

runner = CliRunner()


def test_offline_movielens_download_prints_one_line(tmp_path):
    """No raw `UserWarning` with a source line: the unreachable checksum falls back to the pinned
    MD5 silently when the download itself fails too; the error is one line."""
    import subprocess
    import sys

    # a real process: pytest would otherwise capture the warning itself
    res = subprocess.run([sys.executable, "-m", "goldstone_cli", "data", "download", "movielens", "--variant", "ml-20m",
                          "--dest", str(tmp_path), "--base-url", "http://127.0.0.1:1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    out = res.stdout + res.stderr
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "127.0.0.1:1" in lines[0], out
    assert "Warning" not in out


def test_a_warning_is_one_plain_line(tmp_path):
    """A library warning on the command line (here: a corpus folder's sub-folder is not read) prints as
    `warning: ...`, without Python's file:line: UserWarning and the source line under it."""
    import subprocess
    import sys

    src = tmp_path / "texts"
    (src / "more").mkdir(parents=True)
    (src / "1850-a.txt").write_text("the union is strong and the nation is free " * 5)
    (src / "1900-b.txt").write_text("the nation grows and the union stands " * 5)
    res = subprocess.run([sys.executable, "-m", "goldstone_cli", "data", "prepare", "corpus", "--source", str(src),
                          "--out", str(tmp_path / "out"), "--bin-years", "50", "-q"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    warning = [line for line in res.stderr.splitlines() if "sub-folder" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: ") and "more" in warning[0], res.stderr
    assert "UserWarning" not in res.stderr and "warnings.warn" not in res.stderr, res.stderr


def test_a_library_warning_keeps_its_category_and_origin():
    """Only our own UserWarnings drop Python's decorations; a library's DeprecationWarning printed as a bare
    `warning: x`, which hid what it was and where it came from."""
    import torch

    import goldstone_cli.cli as cli
    import goldstone_cli.train as train

    lib = torch.__file__
    assert cli._format_warning("old API", DeprecationWarning, lib, 12) == \
        f"warning: DeprecationWarning: old API ({lib}:12)\n"
    assert cli._format_warning("slow", UserWarning, lib, 3) == f"warning: UserWarning: slow ({lib}:3)\n"
    assert cli._format_warning("no GPU", UserWarning, train.__file__, 40) == "warning: no GPU\n"
    assert cli._format_warning("overflow", RuntimeWarning, train.__file__, 40) == "warning: RuntimeWarning: overflow\n"


def test_plot_help_lists_only_existing_commands():
    res = runner.invoke(app, ["plot", "--help"])
    assert res.exit_code == 0
    assert "losses" not in res.output
    assert "trajectories" in res.output and "cosines" in res.output


def _fake_run(folder, optimizer: dict, seed: int, target: float, values: list[float]):
    """A run folder as `goldstone train run_dir=...` leaves it (config, metrics, summary), without training."""
    import json

    import pandas as pd
    import yaml

    folder.mkdir(parents=True)
    cfg = {"model": {"name": "dense_mf", "d": 3}, "optimizer": optimizer, "seed": seed, "run_dir": str(folder),
           "trainer": {"steps": 20, "target": target}}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    steps = [0, 10, 20][: len(values)]
    pd.DataFrame({"step": steps, "wall_time": [0.1 * s for s in steps], "total": values, "local": values,
                  "psi": [1.0] * len(steps), "lr": [0.1] * len(steps), "suboptimality": values}).to_csv(
        folder / "metrics.csv", index=False)
    (folder / "summary.json").write_text(json.dumps({"status": "completed", "model": "dense_mf", "target": target,
                                                     "target_metric": "suboptimality", "steps": steps[-1]}))


def test_report_on_plain_runs_has_readable_methods_a_legend_outside_and_a_labelled_target(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    import pandas as pd

    from goldstone_cli.sweep_report import build_report

    gd = {"name": "gd", "lr": 0.1, "clip": None}
    gs = {"name": "goldstone", "base": "gd", "solver": "procrustes", "lr": 0.1, "k1": 50}
    _fake_run(tmp_path / "a", gd, 0, 1e-2, [10.0, 1.0, 0.5])
    _fake_run(tmp_path / "b", gd, 1, 1e-2, [12.0, 2.0, 0.4])
    _fake_run(tmp_path / "c", {**gd, "lr": 0.3}, 0, 1e-2, [9.0, 0.9, 0.2])
    _fake_run(tmp_path / "d", gs, 0, 1e-2, [10.0, 1e-3, 1e-4])
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    paths = build_report(tmp_path)
    methods = dict(pd.read_csv(paths.summary_csv)[["run", "method"]].values)
    assert methods == {"a": "gd (lr=0.1)", "b": "gd (lr=0.1)", "c": "gd (lr=0.3)", "d": "goldstone-procrustes(gd)"}
    fig = figures[-1]
    assert len(fig.legends) == 1  # one legend for the whole figure ...
    assert all(ax.get_legend() is None for ax in fig.axes)  # ... and none inside a panel
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "gd (lr=0.1) (2 runs)" in labels and "target: suboptimality = 0.01" in labels
    legend_top = fig.legends[0].get_window_extent(fig.canvas.get_renderer()).y1
    assert all(ax.get_window_extent().y0 > legend_top for ax in fig.axes)  # below every panel
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("target 0.01") == 2  # the dashed line is labelled in both suboptimality panels


def test_report_links_a_log_only_where_the_run_has_one(tmp_path):
    import json

    from goldstone_cli.sweep_report import build_report

    gd = {"name": "gd", "lr": 0.1, "clip": None}
    for name in ("plain", "swept"):
        _fake_run(tmp_path / name, gd, 0, 1e-2, [10.0, 1.0])
        (tmp_path / name / "summary.json").write_text(json.dumps({"status": "interrupted", "model": "dense_mf",
                                                                  "steps": 10, "message": "interrupted"}))
    (tmp_path / "swept" / "train.log").write_text("a sweep's run log\n")  # goldstone train writes none
    text = build_report(tmp_path).report_md.read_text()
    assert "[swept/train.log](swept/train.log)" in text and "plain/train.log" not in text


def test_trajectory_plot_has_axis_labels(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    import torch

    from goldstone_cli import checkpoint as ckpt
    from goldstone_cli.report import plot_trajectories

    for name, d in (("small", 3), ("big", 5)):
        run = tmp_path / name
        run.mkdir()
        g = torch.Generator().manual_seed(0)
        snaps = {s: {"U": torch.randn(4, 3, d, generator=g, dtype=torch.float64)} for s in (0, 10)}
        ckpt.save(run / ckpt.SNAPSHOTS, {"snapshots": snaps}, kind="snapshots")  # as train.py writes it
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    plot_trajectories([tmp_path / "small", tmp_path / "big"], tmp_path / "t.png")
    axes = figures[-1].axes
    assert [a.get_xlabel() for a in axes] == ["coordinate 1"] * 2 + ["PC 1"] * 2
    assert all(a.get_ylabel() and a.get_zlabel() for a in axes)
    assert "time steps" in figures[-1]._suptitle.get_text()


def test_user_errors_on_the_command_line_are_one_line(tmp_path, monkeypatch):
    """Bad values that only training, a plot or the file system used to notice: a one-line error
    (exit 2), no traceback, no run folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    cases = [
        (["train", "model=movielens", "data=synthetic"], "model=movielens needs data=movielens"),
        (["train", "model=dwe", "data=movielens"], "model=dwe needs data=sotu or data=cooc"),
        (["train", "optimizer=goldstone", "optimizer.solver=natural", "optimizer.k2=0"], "optimizer.k2 must be >= 1"),
        (["train", "optimizer=goldstone", "optimizer.tol=-1"], "optimizer.tol must be a non-negative"),
        (["train", "optimizer=goldstone", "optimizer.solver=procrustes", "optimizer.balance=true",
          "optimizer.state_transform=isotropic"], "cannot go with optimizer.state_transform=isotropic"),
        (["train", "model=movielens", "optimizer=goldstone", "optimizer.solver=procrustes", "optimizer.balance=true"],
         "model=movielens has priors"),
        (["train", "name=../../x", "trainer.steps=2"], "becomes part of the run folder's name"),
        (["train", "name=a/b", "trainer.steps=2"], "becomes part of the run folder's name"),
        (["train", "run_dir=afile", "trainer.steps=2"], "run_dir=afile is a file, not a folder"),
        (["train", "output_dir=afile", "trainer.steps=2"], "output_dir=afile is a file, not a folder"),
        (["plot", "trajectories", str(tmp_path), "--steps", "0,abc"], "--steps must be training steps separated"),
        (["train", "--steps", "10"], "--steps is not an option: settings are Hydra overrides KEY=VALUE (did you "
                                     "mean trainer.steps=10?)"),
        (["train", "model=dwe", "--lr=0.1"], "(did you mean optimizer.lr=0.1?)"),
        (["config", "--frobnicate"], "--frobnicate is not an option"),
    ]
    for args, msg in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1, (args, r.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing made


def test_under_a_launcher_only_rank_0_prints_an_error_that_every_rank_raises(tmp_path, monkeypatch):
    """torchrun / srun start every rank with the same command: an error every rank raises alike is
    printed once (rank 0); the others exit with the same code in silence, also for rank 0's error
    told to them (PeerRankError, with rank 0's exit code); an error of one rank alone (RankError) is
    printed by that rank."""
    import goldstone_cli.train as train_module
    from goldstone_cli.distributed.errors import PeerRankError, RankError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    bad = ["train", "model=movielens", "data=synthetic"]  # refused before any rank joins the process group
    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        r = runner.invoke(app, bad)
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == lines, (rank, r.output)
    monkeypatch.setenv("RANK", "1")
    for exc, code, printed in ((PeerRankError("rank 0 could not x: OSError: y", exit_code=1), 1, False),
                               (RankError("local rank 1 has no GPU"), 2, True)):
        def fail(cfg, run_dir=None, hold_signals=False, exc=exc):
            raise exc

        monkeypatch.setattr(train_module, "train", fail)
        r = runner.invoke(app, ["train", "trainer.steps=1"])
        assert r.exit_code == code and (str(exc) in r.output) == printed, (exc, r.output)
        assert len(r.output.strip().splitlines()) == int(printed)


def test_first_guesses_that_name_something_else_get_the_right_message(tmp_path, monkeypatch):
    """Review: a comma list under `train` printed Hydra's bare 'Ambiguous value'; a folder that does not
    exist was called a run without snapshots or without a checkpoint; default keep-words that the user
    never passed were reported as '--keep-words not in the corpus'; '1 threads'."""
    import torch

    from goldstone_cli.train import _device_text

    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["train", "optimizer=goldstone,adam"])
    assert res.exit_code != 0 and "`goldstone sweep KEY=A,B`" in res.output, res.output
    res = runner.invoke(app, ["plot", "trajectories", str(tmp_path / "nope")])
    assert res.exit_code != 0 and "no such run folder" in res.output, res.output
    res = runner.invoke(app, ["train", f"resume={tmp_path / 'nope'}"])
    assert res.exit_code != 0 and "no such folder" in res.output and "no checkpoint" not in res.output, res.output
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _device_text(torch.device("cpu")) == "cpu (1 thread)"
    finally:
        torch.set_num_threads(threads)
    src = tmp_path / "texts"
    src.mkdir()
    (src / "1850-a.txt").write_text("the union is strong and the nation is free " * 5)
    (src / "1900-b.txt").write_text("the nation grows and the union stands " * 5)
    res = runner.invoke(app, ["data", "prepare", "corpus", "--source", str(src), "--out", str(tmp_path / "out"),
                              "--bin-years", "50", "-q"])
    assert res.exit_code == 0 and "the default --keep-words (Table 2's queries) not in the corpus" in res.output
    res = runner.invoke(app, ["data", "prepare", "corpus", "--source", str(src), "--out", str(tmp_path / "out2"),
                              "--bin-years", "50", "--keep-words", "union,zebra", "-q"])
    assert res.exit_code == 0 and "\n--keep-words not in the corpus (left out): zebra" in "\n" + res.output, res.output


def test_command_lists_show_one_line_summaries():
    """`goldstone --help` kept each docstring's line breaks in its command list ("dense dynamic MF on" /
    "synthetic data" on lines of their own): every command now has its first paragraph as one line."""
    import goldstone_cli.cli as cli

    apps = [cli.app, cli.data_app, cli.prepare_app, cli.download_app, cli.plot_app, cli.eval_app]
    infos = [i for a in apps for i in a.registered_commands]
    assert len(infos) >= 15
    for info in infos:
        assert info.short_help and "\n" not in info.short_help and "  " not in info.short_help, info.callback
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    assert "(dense dynamic MF on synthetic data)" in res.output, res.output  # it broke after "MF on"
