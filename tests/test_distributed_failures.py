"""trainer.distributed: a failure of one rank inside the training loop (rank 0 cannot write metrics.csv,
snapshots.pt or summary.json; a check on one rank's own data) stops every rank within seconds, with
one line printed by rank 0, a non-zero exit code on every rank and a run folder that resumes.

The file-system failures are real: RLIMIT_FSIZE on rank 0 alone (a write past it fails with EFBIG,
as on a full disk: Python ignores SIGXFSZ), or a folder where rank 0 writes a file."""

import json
import resource
import time
from pathlib import Path

import pandas as pd
import pytest

from goldstone_cli.distributed import checkpoint as dck

from test_distributed_train import MF, assert_same_run, one_process

STEPS = 400
# log_every=1: metrics.csv grows by ~155 bytes a step; a 30,000-byte limit stops rank 0 near step 190,
# far from a checkpoint step (every 50) and with snapshots.pt (11 snapshots, ~20 kB) below it
FAIL = [*MF, f"trainer.steps={STEPS}", "trainer.checkpoint_every=50"]
LIMIT = 30_000


def _cases_on_ranks(tmp: str) -> list[dict]:
    """On each of 2 ranks (run_local: in-process command lines, so a rank that fails stays alive and
    cannot let the others go by exiting): each case's exit code, this rank's output and seconds."""
    import torch.distributed as dist
    from typer.testing import CliRunner

    from goldstone_cli.cli import app

    tmp, rank = Path(tmp), dist.get_rank()
    out = []

    def cli(*args: str, limit: int = 0) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if limit and rank == 0:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        t0 = time.monotonic()
        try:
            r = CliRunner().invoke(app, ["train", "trainer.distributed=true", *args])
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        crash = r.exception if not isinstance(r.exception, SystemExit) else None
        out.append({"code": r.exit_code, "output": r.output, "crash": repr(crash) if crash else "",
                    "seconds": time.monotonic() - t0, "last": dck.step_of(run / "checkpoints" / dck.LAST)})
        dist.barrier()  # the next case starts together (and the test sees a rank that hangs here)

    run = tmp / "run"
    # 1. rank 0's metrics.csv cannot grow past LIMIT bytes (EFBIG) near step 190
    cli(*FAIL, f"run_dir={run}", limit=LIMIT)
    # 2. resumed; rank 0 cannot write summary.json at the end (a folder of that name)
    if rank == 0:
        (run / "summary.json").mkdir()
    dist.barrier()
    cli(f"resume={run}")
    # 3. the folder fixed: resumed again, it completes
    if rank == 0:
        (run / "summary.json").rmdir()
    dist.barrier()
    cli(f"resume={run}")
    # 4. a fresh run whose snapshots.pt is a folder: rank 0 fails in the step-10 checkpoint (the first
    # with snapshots to save), before the collective save the other rank is already in
    run = tmp / "snap"
    if rank == 0:
        (run / "snapshots.pt").mkdir(parents=True)
    dist.barrier()
    cli(*MF, "trainer.steps=20", f"run_dir={run}")
    # 5. a check on rank 1's own data fails (LocalFailures as the loop uses it): every rank stops at the
    # next step's stop-signal all-reduce, which carries the flag
    from goldstone_cli.distributed.failures import LocalFailures
    from goldstone_cli.distributed.shard import RowShard
    from goldstone_cli.train import _agree_on_interrupt, _Interrupt

    shard = RowShard(rank, 2, dist.group.WORLD)
    failures = LocalFailures(shard)
    calm = _agree_on_interrupt(_Interrupt(), shard, failures)  # nothing failed: no stop, no error
    with failures.guard("check its rows"):
        if rank == 1:
            raise ValueError("row 3 is NaN")
    try:
        _agree_on_interrupt(_Interrupt(), shard, failures)
        out.append({"calm": calm, "raised": None})
    except Exception as exc:  # noqa: BLE001
        out.append({"calm": calm, "raised": type(exc).__name__, "message": str(exc),
                    "code": getattr(exc, "exit_code", None), "cause": repr(exc.__cause__)})
    return out


@pytest.mark.slow  # 30-60 s on 2 shared cores: two spawned ranks, four command lines of up to 400 steps
def test_a_failure_of_rank_0_inside_the_loop_stops_every_rank_at_once_and_the_run_resumes(tmp_path):
    from goldstone_cli.distributed.local import run_local

    one = tmp_path / "one"
    one_process(FAIL, one)
    # without the fix rank 1 waits in a collective until the process group's timeout (120 s in run_local)
    res = run_local(_cases_on_ranks, 2, str(tmp_path), timeout_s=100)
    (full0, summ0, ok0, snap0, own0), (full1, summ1, ok1, snap1, own1) = res
    for r in (*res[0][:4], *res[1][:4]):
        assert not r["crash"], r
    run = tmp_path / "run"
    # 1. metrics.csv: one line on rank 0 naming the file, the cause and the resume command; rank 1 silent
    assert full0["code"] == full1["code"] == 2, (full0, full1)
    assert len(full0["output"].splitlines()) == 1, full0["output"]
    msg = full0["output"]
    assert msg.startswith("error: rank 0 could not write metrics.csv at step ") and "File too large" in msg, msg
    assert f"resume={run}" in msg and "torchrun --nproc-per-node=2" in msg, msg
    assert full1["output"] == ""
    assert abs(full0["seconds"] - full1["seconds"]) < 15, (full0["seconds"], full1["seconds"])
    failed_at = int(msg.split("at step ")[1].split()[0].rstrip(":"))
    assert 100 < failed_at < STEPS and full0["last"] == full1["last"] == failed_at // 50 * 50, (msg, full0)
    assert f"last checkpoint: step {failed_at // 50 * 50}" in msg, msg
    # 2. summary.json: every rank stops after the final checkpoint, one line on rank 0
    assert summ0["code"] == summ1["code"] == 2, (summ0, summ1)
    errors = [ln for ln in summ0["output"].splitlines() if ln.startswith("error")]  # (stderr and stdout mixed)
    assert len(errors) == 1 and errors[0].startswith("error: rank 0 could not write summary.json: IsADirectoryError")
    assert "last checkpoint: step 400" in errors[0], errors
    assert f"Resuming {run} from step {failed_at // 50 * 50}" in summ0["output"]
    assert summ1["output"] == "" and abs(summ0["seconds"] - summ1["seconds"]) < 15
    # 3. completed, and the same numbers as one uninterrupted process
    assert ok0["code"] == ok1["code"] == 0, ok0["output"]
    assert "completed: 400 steps" in ok0["output"]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert_same_run(one, run)
    assert list(pd.read_csv(run / "metrics.csv")["step"]) == list(range(STEPS + 1))
    # 4. snapshots.pt: rank 0 fails in the step-10 checkpoint, rank 1 stops too (it waited in dck.save);
    # no checkpoint is written after the failure: step 0's is the last
    assert snap0["code"] == snap1["code"] == 2, (snap0, snap1)
    assert snap0["output"].startswith("error: rank 0 could not write snapshots.pt at step 10"), snap0["output"]
    assert "last checkpoint: step 0;" in snap0["output"] and snap0["last"] == snap1["last"] == 0
    assert len(snap0["output"].splitlines()) == 1 and snap1["output"] == ""
    # 5. rank 1's own failure: rank 0 raises PeerRankError with rank 1's message (the CLI prints it there),
    # rank 1 its own TrainingStopped (silent there), both with the same exit code
    assert own0["calm"] is False and own1["calm"] is False
    assert own0["raised"] == "PeerRankError" and own1["raised"] == "TrainingStopped", (own0, own1)
    assert own0["message"] == own1["message"] == "rank 1 could not check its rows: ValueError: row 3 is NaN"
    assert own0["code"] == 2 and own1["cause"] == "ValueError('row 3 is NaN')"


def test_one_process_a_file_that_cannot_be_written_at_the_end_is_one_line_and_the_run_resumes(tmp_path):
    """One process: rank 0's summary.json cannot be written (a folder of that name): TrainingStopped
    (one line: the file, the cause, the last checkpoint, the resume command) after the final checkpoint,
    which resumes to the same numbers once the folder is gone."""
    from goldstone_cli.distributed.errors import TrainingStopped
    from goldstone_cli.runlock import holder

    args = [*MF, "trainer.steps=20"]
    one = tmp_path / "one"
    one_process(args, one)
    run = tmp_path / "run"
    (run / "summary.json").mkdir(parents=True)
    with pytest.raises(TrainingStopped) as info:
        one_process(args, run)
    msg = str(info.value)
    assert msg.startswith("could not write summary.json: IsADirectoryError") and "\n" not in msg, msg
    assert f"last checkpoint: step 20; free disk space or fix the run folder's permissions, then continue with: " \
           f"goldstone train resume={run}" in msg, msg
    assert isinstance(info.value.__cause__, IsADirectoryError)
    assert holder(run) is None  # the lock is released
    (run / "summary.json").rmdir()
    result = one_process([], run, resume=True)
    assert result.status == "completed" and json.loads((run / "summary.json").read_text())["steps"] == 20
    assert_same_run(one, run)


def test_resume_drops_a_metrics_row_cut_off_by_a_failed_write(tmp_path):
    """A full disk cuts the last row of metrics.csv; its first field can read as an early step ("19" of
    "190,..."): resume drops the cut row instead of keeping it among the rows before the checkpoint."""
    from goldstone_cli.train import MetricsWriter

    path = tmp_path / "metrics.csv"
    path.write_text("step,total\r\n0,1.5\r\n10,1.25\r\n19")  # the row of step 190, cut after "19"
    MetricsWriter(path, ["step", "total"], resume_from_step=150).close()
    assert path.read_text().splitlines() == ["step,total", "0,1.5", "10,1.25"]
