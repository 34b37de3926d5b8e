"""trainer.distributed: row-sharded runs on 2 gloo ranks (torchrun, CPU) reproduce one process;
sharded checkpoints (torch.distributed.checkpoint) resume on another number of ranks; a SIGTERM to
one rank stops every rank with a resumable folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from goldstone_cli.config import ConfigError, compose, load_run_config
from goldstone_cli.distributed import checkpoint as dck
from goldstone_cli.distributed.local import free_port
from goldstone_cli.train import train

MF = ["model=dense_mf", "optimizer=goldstone", "optimizer.k1=5", "trainer.log_every=1", "trainer.eval_every=5",
      "trainer.checkpoint_every=10", "trainer.dtype=float64", "trainer.device=cpu", "trainer.progress=false",
      "data.n_rows=7", "data.n_cols=5", "data.T=6"]  # 7 and 5 rows: uneven blocks (4 + 3, 3 + 2)


def torchrun(n: int, args: list[str], cwd: Path, timeout: float = 400, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "goldstone_cli", "train", "trainer.distributed=true", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return res


def one_process(args: list[str], run_dir: Path, resume: bool = False):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's ranks (OMP_NUM_THREADS=1)
    try:
        if resume:
            return train(load_run_config(run_dir, args), run_dir=run_dir)
        return train(compose([*args, f"run_dir={run_dir}"]))
    finally:
        torch.set_num_threads(before)


def _table(path: Path, drop=("wall_time", "gauge_time", "seconds")) -> pd.DataFrame:
    return pd.read_csv(path).drop(columns=list(drop), errors="ignore")


def assert_same_run(a: Path, b: Path, rtol: float = 1e-10) -> None:
    """metrics.csv and gauge.csv of two runs agree to float64 rounding (times aside)."""
    for name in ("metrics.csv", "gauge.csv"):
        if not (a / name).exists():
            assert not (b / name).exists()
            continue
        A, B = _table(a / name), _table(b / name)
        assert list(A.columns) == list(B.columns) and A.shape == B.shape, (name, A.shape, B.shape)
        assert len(A) > 1
        np.testing.assert_allclose(A.to_numpy(float), B.to_numpy(float), rtol=rtol, atol=1e-13, err_msg=name)


def _ok(res) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def two_ranks_match_one_process(args: list[str], tmp_path: Path, steps: int, stop: int,
                                same=assert_same_run) -> tuple[Path, Path]:
    """``args`` for ``steps`` steps on one process and on 2 ranks give the same files (``same``); a
    2-rank run stopped at ``stop`` and resumed on one process too. Returns the (one, two) run folders."""
    one, two, a = tmp_path / "one", tmp_path / "two", tmp_path / "two_then_one"
    one_process([*args, f"trainer.steps={steps}"], one)
    _ok(torchrun(2, [*args, f"trainer.steps={steps}", f"run_dir={two}"], tmp_path))
    same(one, two)
    _ok(torchrun(2, [*args, f"trainer.steps={stop}", f"run_dir={a}"], tmp_path))
    one_process([f"trainer.steps={steps}", "trainer.distributed=false"], a, resume=True)
    same(one, a)
    return one, two


# ---- fast: validation ---------------------------------------------------------------------------
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture
def no_launcher(monkeypatch):
    for k in _LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_distributed_without_launcher_is_a_clear_error(in_tmp, no_launcher):
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node=N -m goldstone_cli train"):
        train(compose([*MF, "trainer.distributed=true", "trainer.steps=2"]))
    assert not (in_tmp / "outputs").exists()


def test_model_without_sharding_is_refused_before_joining(in_tmp, no_launcher):
    import goldstone_cli.models as models

    no_launcher.setattr(models, "_SHARDABLE", models._SHARDABLE - {"dwe"})  # every built-in model shards now
    no_launcher.setenv("RANK", "0")
    no_launcher.setenv("WORLD_SIZE", "2")
    no_launcher.setenv("MASTER_ADDR", "127.0.0.1")
    no_launcher.setenv("MASTER_PORT", "1")
    with pytest.raises(ConfigError, match="model=dwe cannot be trained with trainer.distributed=true"):
        train(compose(["model=dwe", "data=sotu", "trainer.distributed=true"]))


def test_torchrun_without_distributed_is_refused(in_tmp, no_launcher):
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        no_launcher.setenv(k, v)
    with pytest.raises(ConfigError, match="add trainer.distributed=true"):
        train(compose([*MF, "trainer.steps=2"]))


def test_python_m_goldstone_cli_runs():
    res = subprocess.run([sys.executable, "-m", "goldstone_cli", "train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "Train one model" in res.stdout


# ---- fast: errors on 2 ranks (run_local: one spawn for every case) ---------------------------------
def _corrupt(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _cli_on_ranks(tmp: str) -> list[dict]:
    """On each of 2 ranks, the `goldstone train` command lines of test_errors_on_two_ranks... in turn:
    each case's exit code and what the command printed (this rank's)."""
    import torch.distributed as dist
    from typer.testing import CliRunner

    from goldstone_cli.cli import app

    tmp, rank = Path(tmp), dist.get_rank()
    out = []

    def cli(*args: str) -> None:
        r = CliRunner().invoke(app, ["train", "trainer.distributed=true", *args])
        crash = r.exception if not isinstance(r.exception, SystemExit) else None
        out.append({"code": r.exit_code, "output": r.output, "crash": repr(crash) if crash else ""})

    # 1. a setting every rank refuses alike (GoldstoneGD: balance with a process group)
    cli(*MF, "optimizer.solver=procrustes", "optimizer.balance=true", f"run_dir={tmp / 'balance'}")
    # 2. rank 0 cannot load the data (RowShard.from_main): the others hear of it
    cli("model=movielens", "data=movielens", f"data.path={tmp / 'nowhere'}", f"run_dir={tmp / 'nodata'}")
    # 3. a one-process run continued on 2 ranks (last.dcp at 5, last.pt at 4 kept); last.dcp then damaged
    run = tmp / "run"
    cli(f"resume={run}", "trainer.steps=5")
    if rank == 0:
        _corrupt(next((run / "checkpoints" / "last.dcp").glob("*.distcp")))
    dist.barrier()
    # 4. resumed from the good last.pt (step 4), the damaged last.dcp set aside
    cli(f"resume={run}", "trainer.steps=7")
    # 5. rank 0 fails after the run folder is known (a damaged metrics.csv): every rank stops there
    if rank == 0:
        lines = (run / "metrics.csv").read_text().splitlines()
        lines[2] = "x" + lines[2][1:]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    dist.barrier()
    cli(f"resume={run}", "trainer.steps=9")
    return out


@pytest.mark.slow  # 10-20 s on 2 shared cores: two spawned ranks, five command lines
def test_errors_on_two_ranks_are_printed_once_and_stop_every_rank(tmp_path):
    """2 gloo ranks running `goldstone train` (in-process CLI, run_local): an error every rank raises,
    or rank 0's data error, is printed once, by rank 0, and every rank exits with 2; a damaged newer
    last.dcp next to a good last.pt is passed over with a warning (and kept as last.dcp.corrupt); a
    failure on rank 0 after the run folder is known (a damaged metrics.csv on resume) stops rank 1
    too, before its first step, instead of leaving it in a collective until gloo's connection drops."""
    from goldstone_cli.distributed.local import run_local

    run = tmp_path / "run"
    one_process([*MF, "trainer.steps=4", "trainer.checkpoint_every=100"], run)
    res = run_local(_cli_on_ranks, 2, str(tmp_path), timeout_s=240)
    (bal0, nodata0, cont0, past0, bad0), (bal1, nodata1, cont1, past1, bad1) = res
    for r in (*res[0], *res[1]):
        assert not r["crash"], r
    # 1. a setting: rank 0 prints one line naming the settings, rank 1 nothing; both exit 2
    assert bal0["code"] == bal1["code"] == 2
    assert bal0["output"].startswith("error: balance is not supported") and len(bal0["output"].splitlines()) == 1
    assert "optimizer.balance=false" in bal0["output"] and "trainer.distributed=false" in bal0["output"]
    assert bal1["output"] == ""
    # 2. rank 0's data error: printed there only; rank 1 exits with the same code, silently
    assert nodata0["code"] == nodata1["code"] == 2
    assert nodata0["output"].startswith("error: No MovieLens data at") and nodata1["output"] == ""
    assert not (tmp_path / "balance").exists() and not (tmp_path / "nodata").exists()
    # 3 / 4. resume past the damaged last.dcp: from last.pt, with a warning on rank 0
    assert cont0["code"] == cont1["code"] == 0, cont0["output"]
    assert past0["code"] == past1["code"] == 0, past0["output"] + past1["output"]
    assert "warning: the sharded checkpoint does not load" in past0["output"] and "is corrupt" in past0["output"]
    assert f"Resuming {run} from step 4" in past0["output"] and "completed: 7 steps" in past0["output"]
    assert (run / "checkpoints" / "last.dcp.corrupt").is_dir() and dck.step_of(run / "checkpoints" / "last.dcp") == 7
    # 5. rank 0's error after the run folder is known: printed there; rank 1 stops too (exit 2, no crash)
    assert bad0["code"] == bad1["code"] == 2, (bad0, bad1)
    assert "line 3: step 'x' is not a number" in bad0["output"] and bad1["output"] == ""
    assert json.loads((run / "summary.json").read_text())["steps"] == 7  # nothing ran


def test_resume_passes_over_a_damaged_newer_sharded_checkpoint_for_a_good_last_pt(tmp_path, capsys):
    """A run continued on several ranks and back (last.pt at step 4, a newer last.dcp at step 9 whose
    files do not verify): resume warns and continues from last.pt instead of refusing to start, and
    the damaged folder is kept as last.dcp.corrupt (the next save must not keep it as prev.dcp)."""
    import torch.distributed as dist

    from goldstone_cli.distributed.shard import RowShard

    run = tmp_path / "run"
    one_process([*MF, "trainer.steps=4", "trainer.checkpoint_every=100"], run)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        state = {"step": 9, "model": {"U": torch.zeros(2, 7, 3, dtype=torch.float64)}}
        dck.save(run / "checkpoints", state, {("model", "U"): 7}, RowShard(0, 1, dist.group.WORLD), torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    _corrupt(next((run / "checkpoints" / "last.dcp").glob("*.distcp")))
    capsys.readouterr()
    result = one_process(["trainer.steps=6"], run, resume=True)
    out = capsys.readouterr().out
    assert result.status == "completed" and result.summary["steps"] == 6
    assert "warning: the sharded checkpoint does not load" in out and "is corrupt" in out, out
    assert f"Resuming {run} from step 4" in out and "kept as last.dcp.corrupt" in out
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.dcp.corrupt" in names and "last.dcp" not in names and "last.pt" in names, names


def test_the_end_of_run_lines_name_the_best_checkpoint_written(tmp_path):
    """format_result names best.dcp for a distributed run (it wrote no best.pt), best.pt for one
    process, and the newer of the two where a run continued on another number of ranks left both."""
    import os

    from goldstone_cli.train import RunResult, format_result

    summary = {"steps": 10, "wall_time": 1.0, "best": {"metric": "val_ll", "value": -0.5, "step": 5}}
    (tmp_path / "checkpoints" / "best.dcp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "best.dcp" / "meta.pt").write_bytes(b"")
    assert "(checkpoints/best.dcp)" in format_result(RunResult(tmp_path, "completed", {**summary, "ranks": 2}))
    assert "(checkpoints/best.pt)" in format_result(RunResult(tmp_path / "x", "completed", summary))
    (tmp_path / "checkpoints" / "best.pt").write_bytes(b"")
    os.utime(tmp_path / "checkpoints" / "best.dcp" / "meta.pt", ns=(1, 1))  # the one-process leg's is newer
    assert "(checkpoints/best.pt)" in format_result(RunResult(tmp_path, "completed", {**summary, "ranks": 2}))


# ---- slow: 2 ranks == 1 process, resume across rank counts ---------------------------------------
@pytest.mark.slow
def test_dense_mf_two_ranks_match_one_process_and_resume_across_rank_counts(tmp_path):
    one = tmp_path / "one"
    one_process([*MF, "trainer.steps=50"], one)
    gauge = pd.read_csv(one / "gauge.csv")
    assert len(gauge) >= 5  # gauge steps inside the 50 compared steps

    two = tmp_path / "two"
    res = torchrun(2, [*MF, "trainer.steps=50", f"run_dir={two}"], tmp_path)
    _ok(res)
    assert "completed: 50 steps" in res.stdout and res.stdout.count("completed:") == 1  # rank 0 reports
    assert (two / "logs" / "rank1.log").is_file()
    assert (two / "checkpoints" / "last.dcp" / "meta.pt").is_file()
    assert not (two / "checkpoints" / "last.pt").exists()
    summary = json.loads((two / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["status"] == "completed"
    assert_same_run(one, two)

    # 2 ranks -> 1 process: 30 steps on 2 ranks, the rest on one process
    a = tmp_path / "two_then_one"
    _ok(torchrun(2, [*MF, "trainer.steps=30", f"run_dir={a}"], tmp_path))
    one_process(["trainer.steps=50", "trainer.distributed=false"], a, resume=True)
    assert (a / "checkpoints" / "last.pt").is_file()
    assert_same_run(one, a)

    # 1 process -> 2 ranks
    b = tmp_path / "one_then_two"
    one_process([*MF, "trainer.steps=30"], b)
    res = torchrun(2, [f"resume={b}", "trainer.steps=50"], tmp_path)
    _ok(res)
    assert "Resuming" in res.stdout
    assert_same_run(one, b)


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_all_with_a_resumable_folder(tmp_path):
    args = [*MF, "trainer.steps=1500", "trainer.log_every=10", "trainer.eval_every=50",
            "trainer.checkpoint_every=100000"]
    one = tmp_path / "one"
    one_process(args, one)
    run = tmp_path / "run"
    proc = torchrun(2, [*args, f"run_dir={run}"], tmp_path, wait=False)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait until the run is well under way
            if (run / "metrics.csv").is_file() and len((run / "metrics.csv").read_text().splitlines()) > 20:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 2
        ranks = {int(dict(line.split("=", 1) for line in Path(f"/proc/{c}/environ").read_text().split("\0")
                          if "=" in line)["RANK"]): int(c) for c in children}
        os.kill(ranks[1], signal.SIGTERM)  # rank 1 only
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM", out[-2000:]
    stopped = summary["steps"]
    assert 0 < stopped < 1500
    assert (run / "checkpoints" / "last.dcp" / "meta.pt").is_file()
    log1 = (run / "logs" / "rank1.log").read_text()
    assert "SIGTERM received" in log1
    res = torchrun(2, [f"resume={run}"], tmp_path)
    _ok(res)
    assert f"Resuming {run} from step {stopped}" in res.stdout
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert_same_run(one, run)


@pytest.mark.slow
def test_movielens_two_ranks_match_one_process(tmp_path, shared_data):
    """ml-latest-small, users and items sharded, minibatches drawn globally, AdaGrad + natural gauge
    steps: 2 ranks == 1 process for 50 steps; a 2-rank run resumed on one process too."""
    ml = [f"data.path={shared_data / 'movielens' / 'ml-latest-small'}", f"data.cache_dir={tmp_path / 'cache'}",
          "model=movielens", "data.T=5", "model.d=4", "model.batch_size=20000", "optimizer=goldstone",
          "optimizer.k1=10", "trainer.dtype=float64", "trainer.device=cpu", "trainer.log_every=1",
          "trainer.eval_every=10", "trainer.checkpoint_every=20", "trainer.progress=false"]
    one, two = two_ranks_match_one_process(ml, tmp_path, steps=50, stop=30)
    assert len(pd.read_csv(one / "gauge.csv")) >= 4
    assert (two / "checkpoints" / "best.dcp" / "meta.pt").is_file()


@pytest.mark.slow
def test_movielens_replicated_items_two_ranks_match_one_process_and_resume(tmp_path, shared_data):
    """model.items=replicated (every rank holds all items, their gradient all-reduced): 2 ranks ==
    1 process for 50 steps with gauge steps; a replicated run stopped at step 30 resumes on 3 ranks
    and on one process with the same numbers; changing the layout on resume is refused."""
    ml = [f"data.path={shared_data / 'movielens' / 'ml-latest-small'}", f"data.cache_dir={tmp_path / 'cache'}",
          "model=movielens", "data.T=5", "model.d=4", "model.batch_size=20000", "optimizer=goldstone",
          "optimizer.k1=10", "trainer.dtype=float64", "trainer.device=cpu", "trainer.log_every=1",
          "trainer.eval_every=10", "trainer.checkpoint_every=10", "trainer.progress=false"]
    one = tmp_path / "one"
    one_process([*ml, "trainer.steps=50"], one)
    two = tmp_path / "two"
    _ok(torchrun(2, [*ml, "model.items=replicated", "trainer.steps=50", f"run_dir={two}"], tmp_path))
    assert_same_run(one, two)
    a = tmp_path / "two_then_three"
    _ok(torchrun(2, [*ml, "model.items=replicated", "trainer.steps=30", f"run_dir={a}"], tmp_path))
    b = tmp_path / "two_then_one"
    import shutil

    shutil.copytree(a, b)
    res = torchrun(2, [f"resume={a}", "trainer.steps=50", "model.items=sharded"], tmp_path)
    assert res.returncode != 0 and "model.items is 'replicated' there, 'sharded' now" in res.stdout + res.stderr
    _ok(torchrun(3, [f"resume={a}", "trainer.steps=50"], tmp_path))
    assert_same_run(one, a)
    one_process(["trainer.steps=50", "trainer.distributed=false"], b, resume=True)
    assert_same_run(one, b)


def readme_torchrun_commands() -> list[str]:
    from conftest import REPO

    text = (REPO / "README.md").read_text()
    section = text.split("## Training on several GPUs or nodes", 1)[1].split("\n## ", 1)[0]
    return [ln.strip() for ln in section.splitlines() if ln.strip().startswith("torchrun ")]


def test_readme_has_torchrun_commands():
    cmds = readme_torchrun_commands()
    assert len(cmds) == 3 and all("-m goldstone_cli train" in c for c in cmds)


@pytest.mark.slow
def test_readme_torchrun_commands_run(tmp_path, shared_data):
    """The README's torchrun lines, on 2 CPU ranks and a few steps (MovieLens on the sample data)."""
    import shlex

    small = ["trainer.steps=4", "trainer.eval_every=2", "trainer.log_every=1", "trainer.progress=false",
             "trainer.device=cpu"]
    run = None
    for cmd in readme_torchrun_commands():
        cmd = cmd.replace("<MovieLens copy>", shlex.quote(str(shared_data / "movielens" / "ml-latest-small")))
        cmd = cmd.replace("outputs/dense_mf/<run>", shlex.quote(str(run)))
        args = shlex.split(cmd)
        assert not any("<" in a for a in args), cmd
        train_args = args[args.index("train") + 1:]
        train_args = [a for a in train_args if a != "trainer.distributed=true" and not a.startswith("trainer.device")]
        if any(a.startswith("resume=") for a in train_args):
            train_args += ["trainer.steps=6"]
        else:
            train_args += small
            if "model=movielens" in train_args:
                train_args += ["data.T=4", "model.d=3", f"data.cache_dir={tmp_path / 'cache'}"]
            else:
                run = tmp_path / "readme_run"
                train_args.append(f"run_dir={run}")
        res = torchrun(2, train_args, tmp_path)
        _ok(res)
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


@pytest.mark.slow
def test_sweep_runs_each_run_on_two_submitit_local_tasks(in_tmp):
    """hydra/launcher=submitit_local with tasks_per_node=2: each run is one 2-rank distributed run."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    res = subprocess.run([sys.executable, "-m", "goldstone_cli", "sweep", "model=dense_mf", "optimizer=gd", "seed=0",
                          "trainer.distributed=true", "trainer.device=cpu", "trainer.steps=10",
                          "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = [p for p in (in_tmp / "outputs" / "sweeps").glob("*/*") if (p / "summary.json").is_file()]
    assert len(runs) == 1
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["ranks"] == 2
    assert (runs[0] / "train.rank1.log").is_file() and (runs[0] / "logs" / "rank1.log").is_file()
    assert (runs[0] / "checkpoints" / "last.dcp" / "meta.pt").is_file()


@pytest.fixture(scope="module")
def tiny_sotu(tmp_path_factory):
    """Six State of the Union texts 40 years apart, prepared (as tests/test_compose.py's tiny corpus)."""
    from conftest import prepare_tiny_sotu

    root = tmp_path_factory.mktemp("sotu")
    texts, _ = prepare_tiny_sotu(root)
    return ["model=dwe", "data=sotu", f"data.path={root / 'prepared'}", f"data.source={texts}", "data.bin_years=40",
            "data.vocab_size=150", "data.keep_words=[]", "model.d=3"]


@pytest.mark.slow
def test_dwe_variational_two_ranks_match_one_process_through_the_trainer(tmp_path, tiny_sotu):
    """17a's sharded DWE under this trainer: minibatches and variational samples drawn globally, gauge
    steps, DCP checkpoints; 2 ranks == 1 process, and a 2-rank run resumed on one process."""
    dwe = [*tiny_sotu, "model.inference=variational", "model.batch_words=40", "model.batch_contexts=40",
           "optimizer=goldstone", "optimizer.k1=5", "trainer.dtype=float64", "trainer.device=cpu",
           "trainer.log_every=1", "trainer.eval_every=10", "trainer.checkpoint_every=10", "trainer.progress=false"]
    two_ranks_match_one_process(dwe, tmp_path, steps=30, stop=20)


# ---- GPUs (NCCL): skipped without CUDA; bench/gpu_check.sh step dist_train runs them ------------------
def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(_gpus() < 1, reason="needs a CUDA GPU (NCCL)")
def test_nccl_rank_on_one_gpu(tmp_path):
    run = tmp_path / "run"
    args = [a for a in MF if not a.startswith("trainer.device")] + ["trainer.device=cuda", "trainer.steps=20",
                                                                    f"run_dir={run}"]
    _ok(torchrun(1, args, tmp_path))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["device"] == "cuda:0" and summary["status"] == "completed"


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA GPUs (NCCL: one rank per GPU)")
def test_nccl_ranks_match_one_cpu_process_and_resume_there(tmp_path):
    n = min(_gpus(), 4)
    one = tmp_path / "one"
    one_process([*MF, "trainer.steps=50"], one)
    gpu = [a for a in MF if not a.startswith("trainer.device")] + ["trainer.device=cuda"]
    multi = tmp_path / "multi"
    _ok(torchrun(n, [*gpu, "trainer.steps=50", f"run_dir={multi}"], tmp_path))
    assert json.loads((multi / "summary.json").read_text())["ranks"] == n
    assert_same_run(one, multi, rtol=1e-9)
    a = tmp_path / "gpus_then_cpu"
    _ok(torchrun(n, [*gpu, "trainer.steps=30", f"run_dir={a}"], tmp_path))
    one_process(["trainer.steps=50", "trainer.distributed=false", "trainer.device=cpu"], a, resume=True)
    assert_same_run(one, a, rtol=1e-9)


def test_a_stop_agreed_with_other_ranks_does_not_turn_this_ranks_first_signal_into_an_abort():
    """Rank A's signal reaches rank B through the all-reduce (requested=True on B); B's own first
    SIGTERM right after must not raise KeyboardInterrupt inside the collective checkpoint: only a
    second signal to the same process aborts."""
    import os
    import signal

    from goldstone_cli.train import _Interrupt

    with _Interrupt() as interrupt:
        interrupt.requested, interrupt.signum = True, int(signal.SIGTERM)  # what _agree_on_interrupt sets
        os.kill(os.getpid(), signal.SIGTERM)  # this rank's own first signal: recorded, no abort
        assert interrupt.received and interrupt.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)  # a second one to this process aborts


def test_one_process_run_ignores_broken_launcher_variables(monkeypatch):
    """Stray RANK / WORLD_SIZE without MASTER_ADDR: a plain (trainer.distributed=false) run trains on
    one process; trainer.distributed=true reports the broken launcher environment."""
    from goldstone_cli.config import ConfigError, compose
    from goldstone_cli.train import _join_process_group

    for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _join_process_group(compose(["model=dense_mf"])) == (None, False)
    with pytest.raises(ConfigError, match="MASTER"):
        _join_process_group(compose(["model=dense_mf", "trainer.distributed=true"]))


def test_run_saved_before_model_items_existed_resumes(tmp_path, shared_data):
    """A MovieLens checkpoint whose config has no model.items (saved before it existed) fits a
    config with the default items=sharded; any other value, or another changed setting, does not."""
    from goldstone_cli.checkpoint import CheckpointError
    from goldstone_cli.models import build_model
    from goldstone_cli.train import _check_fits, _plain_config

    cfg = compose(["model=movielens", f"data.path={shared_data / 'movielens' / 'ml-latest-small'}",
                   f"data.cache_dir={tmp_path}", "data.T=3", "model.d=2"])
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    saved = _plain_config(cfg)
    del saved["model"]["items"]
    state = {"step": 1, "wall_time": 0.0, "model": model.state_dict(), "optimizer": {}, "scheduler": None,
             "generator": None, "config": saved}
    _check_fits(state, tmp_path, cfg, model)
    for override, match in (("model.items=replicated", "model.items is 'sharded' there, 'replicated' now"),
                            ("model.gamma=2", "model.gamma is 1.0 there, 2.0 now")):
        other = compose(["model=movielens", f"data.path={shared_data / 'movielens' / 'ml-latest-small'}",
                         f"data.cache_dir={tmp_path}", "data.T=3", "model.d=2", override])
        with pytest.raises(CheckpointError, match=match):
            _check_fits(state, tmp_path, other, model)
