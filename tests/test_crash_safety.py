"""Every way a run can stop leaves it resumable, and the resumed run writes exactly the files of an
uninterrupted one; checkpoints that are damaged, crafted or from another config are refused in one line.

Fast tests run in-process (signals sent to the test process itself, handled by the training loop);
the ``slow`` ones start real ``python -m goldstone_cli train`` processes and kill them."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from goldstone_cli import checkpoint as ckpt
from goldstone_cli.cli import app
from goldstone_cli.config import compose
from goldstone_cli.models.dense_mf import DenseDynamicMF
from goldstone_cli.runlock import RunLock, holder
from goldstone_cli.train import train

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
# the default optimizer (Goldstone-GD, procrustes gauge steps every k1 = 50 GD steps) on smaller data
SMALL = ["data.T=10", "trainer.progress=false", "trainer.log_every=5", "trainer.eval_every=10"]
WALL_CLOCK = {"wall_time", "gauge_time", "gauge_overhead", "gauge_seconds", "seconds", "message", "run_dir",
              "signal", "exit_code"}


# ----------------------------------------------------------------------------- comparing two runs' files
def _leaves(obj, prefix=""):
    """(path, value) of every leaf of nested dicts/lists, skipping wall-clock entries and run folders."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if str(k) not in WALL_CLOCK:
                yield from _leaves(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def _assert_same_tree(a, b, what):
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    assert la.keys() == lb.keys(), (what, sorted(set(la) ^ set(lb))[:5])
    for k in la:
        x, y = la[k], lb[k]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), (what, k)
        else:
            assert x == y, (what, k, x, y)


def assert_same_outputs(full: Path, resumed: Path) -> None:
    """Every file a run writes, compared: metrics.csv, gauge.csv, snapshots.pt, summary.json and the
    checkpoints' contents bit for bit, apart from wall-clock times and the run folder's own name."""
    for name, drop in (("metrics.csv", ["wall_time", "gauge_time"]), ("gauge.csv", ["seconds"])):
        if (full / name).exists() or (resumed / name).exists():
            a = pd.read_csv(full / name).drop(columns=drop, errors="ignore")
            b = pd.read_csv(resumed / name).drop(columns=drop, errors="ignore")
            pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
    sa = ckpt.load(full / "snapshots.pt", kind="snapshots")["snapshots"]
    sb = ckpt.load(resumed / "snapshots.pt", kind="snapshots")["snapshots"]
    assert list(sa) == list(sb) and len(sa) > 2
    _assert_same_tree(sa, sb, "snapshots.pt")
    _assert_same_tree(json.loads((full / "summary.json").read_text()),
                      json.loads((resumed / "summary.json").read_text()), "summary.json")
    ca, cb = (yaml.safe_load((d / "config.yaml").read_text()) for d in (full, resumed))
    ca.pop("run_dir"), cb.pop("run_dir")
    assert ca == cb
    for name in (ckpt.LAST, ckpt.PREV, ckpt.BEST):
        pa, pb = full / "checkpoints" / name, resumed / "checkpoints" / name
        assert pa.exists() == pb.exists(), name
        if pa.exists():
            a, b = ckpt.load(pa, kind=None), ckpt.load(pb, kind=None)
            for c in (a, b):
                c.pop("config")["run_dir"]  # compared above (config.yaml)
            _assert_same_tree(a, b, name)


def _run(args, run_dir, steps):
    return train(compose([*args, f"trainer.steps={steps}", f"run_dir={run_dir}"]))


# ----------------------------------------------------------------------------- signals (in-process)
def _signal_at_call(monkeypatch, n: int, sig: int):
    calls = {"n": 0}
    original = DenseDynamicMF.local_loss

    def local_loss(self, generator=None):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), sig)  # as if Slurm / `kill` / a closed terminal sent it mid-run
        return original(self, generator)

    monkeypatch.setattr(DenseDynamicMF, "local_loss", local_loss)
    return original


def test_sighup_and_sigusr1_stop_like_ctrl_c(in_tmp, monkeypatch):
    for sig in (signal.SIGHUP, signal.SIGUSR1):
        original = _signal_at_call(monkeypatch, 12, sig)
        res = runner.invoke(app, ["train", *SMALL, "trainer.steps=40", f"run_dir={sig}"])
        monkeypatch.setattr(DenseDynamicMF, "local_loss", original)
        assert res.exit_code == 128 + sig, res.output
        assert f"{signal.Signals(sig).name} received" in res.output and f"goldstone train resume={sig}" in res.output
        assert 0 < ckpt.load(in_tmp / str(sig) / "checkpoints" / "last.pt")["step"] < 40


@pytest.mark.parametrize("every", [1000, 40])  # the interrupt before the first periodic checkpoint, or between two
def test_sigterm_checkpoints_prints_the_resume_command_and_resumes_identically(in_tmp, monkeypatch, every):
    sig = signal.SIGTERM
    args = [*SMALL, f"trainer.checkpoint_every={every}"]
    full = _run(args, "full", 120).run_dir
    original = _signal_at_call(monkeypatch, 58, sig)
    res = runner.invoke(app, ["train", *args, "trainer.steps=120", "run_dir=part"])
    monkeypatch.setattr(DenseDynamicMF, "local_loss", original)
    assert res.exit_code == 128 + sig, res.output
    assert f"{signal.Signals(sig).name} received" in res.output and "goldstone train resume=part" in res.output
    state = ckpt.load(in_tmp / "part" / "checkpoints" / "last.pt")
    assert 50 < state["step"] < 120  # the step in flight finished (after the gauge step at 50), then the checkpoint
    summary = json.loads((in_tmp / "part" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == signal.Signals(sig).name
    res = runner.invoke(app, ["train", "resume=part"])
    assert res.exit_code == 0, res.output
    # the interrupt's off-schedule checkpoint is not kept as prev.pt: the uninterrupted run's is
    assert ckpt.load(in_tmp / "part" / "checkpoints" / "prev.pt")["step"] == (80 if every == 40 else 0)
    assert_same_outputs(full, in_tmp / "part")


def test_gauge_csv_keeps_the_row_of_the_checkpoint_step_on_resume(in_tmp):
    r = _run(SMALL, "r", 100).run_dir
    assert list(pd.read_csv(r / "gauge.csv")["step"]) == [50, 100]
    res = runner.invoke(app, ["train", "resume=r", "trainer.steps=200"])
    assert res.exit_code == 0, res.output
    assert list(pd.read_csv(r / "gauge.csv")["step"]) == [50, 100, 150, 200]  # was 50, 150, 200
    assert_same_outputs(_run(SMALL, "full", 200).run_dir, r)


def test_a_fresh_run_checkpoints_at_step_0_and_snapshots_with_every_checkpoint(in_tmp, monkeypatch):
    original = _signal_at_call(monkeypatch, 1, signal.SIGTERM)  # during the very first step
    r = _run([*SMALL, "trainer.checkpoint_every=1000"], "r", 60)
    monkeypatch.setattr(DenseDynamicMF, "local_loss", original)
    assert r.status == "interrupted" and r.summary["steps"] == 1
    assert ckpt.load(r.run_dir / "checkpoints" / "prev.pt")["step"] == 0  # the step-0 checkpoint, rotated
    assert list(ckpt.load(r.run_dir / "snapshots.pt", kind="snapshots")["snapshots"]) == [0]  # 1 is taken after


# ----------------------------------------------------------------------------- damaged checkpoints
def _flip_a_tensor_bit(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor's bytes (not in the zip's structure)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    h = info.header_offset
    start = h + 30 + int.from_bytes(raw[h + 26:h + 28], "little") + int.from_bytes(raw[h + 28:h + 30], "little")
    raw[start + info.file_size // 2] ^= 0x10
    path.write_bytes(raw)


def test_a_bit_flip_in_last_pt_is_detected_and_the_previous_checkpoint_resumes(in_tmp):
    args = [*SMALL, "trainer.checkpoint_every=20"]
    full = _run(args, "full", 80).run_dir
    r = _run(args, "r", 60).run_dir  # checkpoints at 0, 20, 40, 60: last = 60, prev = 40
    last = r / "checkpoints" / "last.pt"
    before = torch.load(last, weights_only=True)
    _flip_a_tensor_bit(last)
    after = torch.load(last, weights_only=True)  # torch itself reads the flipped file without complaint
    changed = [k for (k, x), (_, y) in zip(_leaves(before), _leaves(after))
               if isinstance(x, torch.Tensor) and not torch.equal(x, y)]
    assert len(changed) == 1, changed
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.load(last)
    res = runner.invoke(app, ["train", "resume=r", "trainer.steps=80"])
    assert res.exit_code == 0, res.output
    assert "last.pt is corrupt" in res.output and "prev.pt (step 40)" in res.output
    assert (r / "checkpoints" / "last.pt.corrupt").is_file()
    assert_same_outputs(full, r)
    # both damaged: one line that names both files
    for name in ("last.pt", "prev.pt"):
        _flip_a_tensor_bit(r / "checkpoints" / name)
    res = runner.invoke(app, ["train", "resume=r", "trainer.steps=90"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    err = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(err) == 1 and "last.pt" in err[0] and "prev.pt" in err[0], res.output


def _one_line_error(res, *words):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_a_checkpoint_that_does_not_fit_the_config_is_one_line(in_tmp):
    r = _run(SMALL, "r", 20).run_dir
    _one_line_error(runner.invoke(app, ["train", "resume=r", "model.d=4"]), "does not fit", "model.d is 3 there, 4 now")
    _one_line_error(runner.invoke(app, ["train", "resume=r", "data.T=40"]), "data.T is 10 there, 40 now")
    _one_line_error(runner.invoke(app, ["train", "resume=r", "optimizer.lr=0.5", "seed=3"]),
                    "optimizer.lr is 0.02 there, 0.5 now", "seed is 0 there, 3 now")
    # another run's checkpoint (another optimizer) copied into the folder
    other = _run([*SMALL, "optimizer=adam"], "other", 10).run_dir
    saved = (r / "checkpoints" / "last.pt").read_bytes()
    shutil.copy(other / "checkpoints" / "last.pt", r / "checkpoints" / "last.pt")
    _one_line_error(runner.invoke(app, ["train", "resume=r"]), "optimizer.name is 'adam' there, 'goldstone' now")
    # a best.pt (model weights only) copied over last.pt
    ckpt.save(r / "checkpoints" / "last.pt", {"step": 10, "metric": "x", "value": 1.0, "model": {}}, kind="best")
    (r / "checkpoints" / "prev.pt").unlink()
    _one_line_error(runner.invoke(app, ["train", "resume=r"]), "'best' file", "best.pt copied over last.pt")
    # a checkpoint without the optimizer's state
    state = torch.load(other / "checkpoints" / "last.pt", weights_only=True)
    state = {k: v for k, v in state.items() if k not in ("optimizer", "format", "version", "kind", "checksum")}
    ckpt.save_last(r / "checkpoints", state)
    _one_line_error(runner.invoke(app, ["train", "resume=r"]), "lacks the key(s) optimizer")
    # a model tensor of another shape (a hand-made checkpoint with this run's config)
    (r / "checkpoints" / "last.pt").write_bytes(saved)
    state = ckpt.load(r / "checkpoints" / "last.pt")
    state["model"]["U"] = state["model"]["U"][:, :5]
    ckpt.save_last(r / "checkpoints", state)
    _one_line_error(runner.invoke(app, ["train", "resume=r"]), "does not fit the model", "U has shape (10, 5, 3) there")


def test_bad_run_files_are_one_line_errors(in_tmp):
    r = _run(SMALL, "r", 20).run_dir
    good = (r / "config.yaml").read_text()
    for text, words in [("", "is empty"), ("model: [unclosed\n", "not a valid run config"),
                        ("- a\n- b\n", "is empty"), ("seed: 1\n", "lacks the section(s) model, data")]:
        (r / "config.yaml").write_text(text)
        _one_line_error(runner.invoke(app, ["train", "resume=r"]), "config.yaml", words)
    (r / "config.yaml").write_text(good)
    (r / "metrics.csv").write_text("")
    _one_line_error(runner.invoke(app, ["train", "resume=r"]), "metrics.csv is empty", "delete it")
    (r / "metrics.csv").unlink()
    res = runner.invoke(app, ["train", "resume=r", "trainer.steps=30"])  # resumes without the earlier rows
    assert res.exit_code == 0 and pd.read_csv(r / "metrics.csv")["step"].iloc[0] == 20, res.output


def test_a_run_killed_before_its_first_checkpoint_can_be_started_again(in_tmp):
    r = in_tmp / "r"
    r.mkdir()
    (r / "config.yaml").write_text("seed: 0\n")
    (r / "metrics.csv").write_text("step,wall_time\n0,0.1\n")  # what an older version left behind
    res = runner.invoke(app, ["train", "resume=r"])
    assert res.exit_code == 2 and "run_dir=r" in res.output
    res = runner.invoke(app, ["train", *SMALL, "trainer.steps=20", "run_dir=r"])
    assert res.exit_code == 0, res.output
    assert pd.read_csv(r / "metrics.csv")["step"].tolist()[:2] == [0, 5]
    res = runner.invoke(app, ["train", *SMALL, "trainer.steps=20", "run_dir=r"])
    assert res.exit_code == 2 and "already holds a run" in res.output


# ----------------------------------------------------------------------------- one process per run folder
def test_a_second_process_on_a_locked_run_folder_fails_at_once(in_tmp, monkeypatch):
    r = _run(SMALL, "r", 20).run_dir
    with RunLock(r):  # as if another goldstone process were training here
        assert holder(r) == os.getpid()
        t0 = time.monotonic()
        import goldstone_cli.train as T

        with monkeypatch.context() as m:  # refused before the data are loaded and the model is built
            m.setattr(T, "build_model", lambda *a, **k: pytest.fail("the model was built for a folder in use"))
            _one_line_error(runner.invoke(app, ["train", "resume=r", "trainer.steps=40"]), "in use by another",
                            "run.lock")
        with RunLock(in_tmp / "fresh"):  # a fresh run that has not written its first checkpoint yet
            _one_line_error(runner.invoke(app, ["train", *SMALL, "run_dir=fresh"]), "in use by another")
        assert time.monotonic() - t0 < 60
        assert ckpt.load(r / "checkpoints" / "last.pt")["step"] == 20  # nothing was touched
    assert holder(r) is None
    res = runner.invoke(app, ["train", "resume=r", "trainer.steps=40"])
    assert res.exit_code == 0, res.output


def test_thread_count_is_recorded_and_stale_temporary_files_are_removed_at_the_next_start(in_tmp):
    r = _run(SMALL, "r", 20).run_dir
    assert ckpt.load(r / "checkpoints" / "last.pt")["torch_threads"] == torch.get_num_threads()
    state = ckpt.load(r / "checkpoints" / "last.pt")
    state["torch_threads"] = torch.get_num_threads() + 3
    ckpt.save_last(r / "checkpoints", state)
    stale = [r / "checkpoints" / ".last.pt.abc123.tmp", r / ".snapshots.pt.x1.tmp", r / ".metrics.csv.y.tmp"]
    for p in stale:  # as left by a process killed while writing
        p.write_bytes(b"half a checkpoint")
    res = runner.invoke(app, ["train", "resume=r", "trainer.steps=30"])
    assert res.exit_code == 0 and f"OMP_NUM_THREADS={torch.get_num_threads() + 3}" in res.output, res.output
    assert not any(p.exists() for p in stale)


# ----------------------------------------------------------------------------- real processes, real signals
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # bit-exact resume needs the same thread count
    return env


def _start(cwd: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "goldstone_cli", "train", *args], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_rows(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            last = metrics.read_text().strip().splitlines()[-1].split(",")[0]
            if last.isdigit() and int(last) >= step:
                return
        except (FileNotFoundError, IndexError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step}: {proc.poll()} {proc.stdout.read() if proc.poll() is not None else ''}")


LONG = [*SMALL, "trainer.steps=3000", "trainer.log_every=10", "trainer.eval_every=100"]


@pytest.mark.slow
def test_sigterm_to_a_real_process_checkpoints_and_the_resume_equals_the_uninterrupted_run(in_tmp):
    args = [*LONG, "trainer.checkpoint_every=500"]
    proc = _start(in_tmp, [*args, "run_dir=part"])
    _wait_for_rows(proc, in_tmp / "part" / "metrics.csv", 120)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM received" in out and "continue with: goldstone train resume=part" in out
    step = ckpt.load(in_tmp / "part" / "checkpoints" / "last.pt")["step"]
    assert 120 <= step < 3000
    full = train(compose([*args, "run_dir=full"])).run_dir
    res = runner.invoke(app, ["train", "resume=part"])
    assert res.exit_code == 0 and f"from step {step}" in res.output, res.output
    assert_same_outputs(full, in_tmp / "part")


@pytest.mark.slow
def test_sigkill_before_the_first_periodic_checkpoint_resumes_from_step_0(in_tmp):
    args = [*LONG, "trainer.checkpoint_every=100000"]
    proc = _start(in_tmp, [*args, "run_dir=part"])
    _wait_for_rows(proc, in_tmp / "part" / "metrics.csv", 100)
    proc.kill()
    proc.communicate(timeout=60)
    ck = in_tmp / "part" / "checkpoints"
    assert ckpt.load(ck / "last.pt")["step"] == 0
    (ck / ".last.pt.k1ll3d.tmp").write_bytes(b"\0" * 100)  # as left by a kill during a write
    res = runner.invoke(app, ["train", "resume=part"])
    assert res.exit_code == 0 and "from step 0" in res.output, res.output
    assert not (ck / ".last.pt.k1ll3d.tmp").exists()
    assert_same_outputs(train(compose([*args, "run_dir=full"])).run_dir, in_tmp / "part")


@pytest.mark.slow
def test_sigkill_mid_run_and_a_second_process_on_the_same_folder(in_tmp):
    # a run far too long to finish while the second process starts; after the kill it is resumed
    # with a trainer.steps just past its last checkpoint, and compared with a run of that length
    args = [*LONG, "trainer.checkpoint_every=200"]
    proc = _start(in_tmp, [*args, "trainer.steps=10000000", "run_dir=part"])
    _wait_for_rows(proc, in_tmp / "part" / "metrics.csv", 450)
    # a second process on the same folder fails at once, and leaves the first one's files alone
    t0 = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "goldstone_cli", "train", *args, "run_dir=part"], cwd=in_tmp,
                            env=_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "in use by another goldstone process" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr and time.monotonic() - t0 < 100
    _one_line_error(runner.invoke(app, ["train", "resume=part"]), "in use by another")
    proc.kill()
    proc.communicate(timeout=60)
    assert holder(in_tmp / "part") is None  # the kernel dropped the dead process's lock
    step = ckpt.load(in_tmp / "part" / "checkpoints" / "last.pt")["step"]
    assert step >= 400 and step % 200 == 0
    # snapshots.pt was written with the checkpoints, not only at the end of the run (which never came)
    snaps = ckpt.load(in_tmp / "part" / "snapshots.pt", kind="snapshots")["snapshots"]
    assert [0, 1, 2, 5, 10, 20, 50, 100, 200] == [s for s in snaps if s <= 200] and max(snaps) < step
    steps = step + 130
    res = runner.invoke(app, ["train", "resume=part", f"trainer.steps={steps}"])
    assert res.exit_code == 0 and f"from step {step}" in res.output, res.output
    assert_same_outputs(train(compose([*args, f"trainer.steps={steps}", "run_dir=full"])).run_dir, in_tmp / "part")


# ----------------------------------------------------------------------------- a signal after the last step
def test_ctrl_c_while_a_completed_run_writes_its_files_finishes_them(in_tmp, monkeypatch):
    """Ctrl-C after the last step (here while loss.png is drawn): the run is complete, so its files are
    written and the command exits with 0, saying so (it ended with a KeyboardInterrupt: exit 130,
    no loss.png, although summary.json said completed)."""
    import goldstone_cli.report as report

    draw = report.plot_losses

    def plot_with_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return draw(*args, **kwargs)

    monkeypatch.setattr(report, "plot_losses", plot_with_ctrl_c)
    res = runner.invoke(app, ["train", *SMALL, "trainer.steps=20", "run_dir=r"])
    assert res.exit_code == 0, res.output
    assert "SIGINT received after the last step: the run is complete" in res.output
    assert res.output.strip().splitlines()[-1].startswith("SIGINT received after the last step: the run completed anyway")
    assert json.loads((in_tmp / "r" / "summary.json").read_text())["status"] == "completed"
    assert (in_tmp / "r" / "loss.png").is_file() and ckpt.load(in_tmp / "r" / "checkpoints" / "last.pt")["step"] == 20
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored (not a process of its own)


# a `goldstone train` process that pauses at one moment after its last step, leaving a file to say it is there
_PAUSED = """
import atexit, os, sys, time
from pathlib import Path
mark, moment = Path(os.environ["GS_MARK"]), os.environ["GS_MOMENT"]

def pause():
    mark.write_text(moment)
    time.sleep(3)

if moment == "checkpoint":  # the last step's checkpoint
    import goldstone_cli.train as train
    save = train._save_checkpoint
    def slow_save(ckpt_dir, state, *args, **kwargs):
        if state["step"] == int(os.environ["GS_STEPS"]):
            pause()
        return save(ckpt_dir, state, *args, **kwargs)
    train._save_checkpoint = slow_save
elif moment == "plot":  # loss.png, after summary.json
    import goldstone_cli.report as report
    draw = report.plot_losses
    report.plot_losses = lambda *a, **k: (pause(), draw(*a, **k))[1]
else:  # the interpreter's exit, after the end-of-run lines
    atexit.register(pause)
from goldstone_cli.cli import main
sys.argv[0] = "goldstone"
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("moment,sig", [("checkpoint", signal.SIGINT), ("plot", signal.SIGINT),
                                        ("plot", signal.SIGTERM), ("exit", signal.SIGINT), ("exit", signal.SIGTERM)])
def test_a_real_signal_after_the_last_step_lets_the_run_finish_and_exit_0(in_tmp, moment, sig):
    """A real signal to a real process after its last step (during the last checkpoint, while loss.png
    is drawn, at the interpreter's exit): no traceback, exit 0, every file complete (it died: -2 with a
    KeyboardInterrupt traceback, -15 for SIGTERM, or 130 without loss.png)."""
    mark = in_tmp / "paused"
    env = {**_env(), "GS_MARK": str(mark), "GS_MOMENT": moment, "GS_STEPS": "20"}
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED, "train", *SMALL, "trainer.steps=20", "run_dir=r"],
                            cwd=in_tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert mark.exists(), proc.communicate()[0]
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    name = signal.Signals(sig).name
    assert proc.returncode == 0, out
    assert "Traceback" not in out and f"{name} received after" in out, out
    assert ("completed anyway" in out) == (moment != "exit"), out
    r = in_tmp / "r"
    assert json.loads((r / "summary.json").read_text())["status"] == "completed" and (r / "loss.png").is_file()
    assert ckpt.load(r / "checkpoints" / "last.pt")["step"] == 20
    assert not [f.name for d in (r, r / "checkpoints") for f in d.iterdir() if f.name.endswith(".tmp")]
