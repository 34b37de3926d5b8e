"""The training loop: build data, model and optimizer; loop; evaluate; checkpoint; log.

Conventions (so that a resumed run reproduces an uninterrupted one row for row):

- Iteration ``s`` evaluates the loss at the parameters ``theta_s`` and then updates them to
  ``theta_{s+1}``. The metrics row for step ``s`` describes ``theta_s``; after the last update one
  more row describes the final parameters.
- A checkpoint written at step ``s`` holds ``theta_s`` and every state needed to perform
  iteration ``s`` (optimizer, schedule, minibatch generator, wall time, best metric). Resuming
  from it drops the metrics rows from ``s`` on and continues.
- ``wall_time`` counts only optimization (forward, backward, optimizer and gauge steps), not
  logging, evaluation or checkpointing.
- A gauge.csv row with step ``s`` comes from the gauge step inside iteration ``s - 1`` (the
  optimizer's ``s``-th base step), so it belongs to a checkpoint at ``s`` and is kept on resume.
- A fresh run writes a checkpoint at step 0, so even a run killed at once can be resumed; each
  checkpoint also rewrites ``snapshots.pt`` (atomically), so a kill loses no snapshot before it.
- Ctrl-C, SIGTERM (Slurm time limits, ``timeout``, ``kill``), SIGHUP and SIGUSR1 all finish the step,
  write a checkpoint, print the resume command and exit with 128 + the signal number.
  One that comes during or after the last step stops nothing: the run is complete; it writes its
  last checkpoint, summary.json and loss.png and exits with 0 (saying so). A second signal aborts.
- One process per run folder: ``run.lock`` is locked (``flock``) for the run's life.
- ``trainer.distributed=true`` (under torchrun or srun): every rank holds its rows of the model
  (goldstone_cli.distributed); rank 0 creates the run folder, holds the lock and writes metrics,
  gauge.csv, plots and summary.json; the other ranks log to ``logs/rank<r>.log``. The logged loss
  terms are summed over ranks, and every rank takes the same decisions (stop, diverged, interrupted:
  a signal to any rank stops all at the same step). Checkpoints are sharded (``last.dcp``); a run
  saved on N ranks resumes on M ranks or one process, and a one-process run on N ranks; resume takes
  the newest checkpoint of either kind that verifies. What rank 0 alone does before the first step
  (the run folder, its files) runs in ``RowShard.from_main``: an error there stops every rank, the
  others with PeerRankError (the command line prints rank 0's message once). Inside the loop, what one
  rank alone does (rank 0 writing metrics.csv, gauge.csv, snapshots.pt, summary.json) runs in
  ``LocalFailures.guard`` (goldstone_cli/distributed/failures.py): a failure is carried by the next
  step's stop-signal all-reduce (no collective of its own), every rank stops there without another
  checkpoint, rank 0 prints one line (the file, the cause, the last checkpoint, the resume command; the
  others raise PeerRankError) and the folder resumes from its last checkpoint.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from goldstone_cli import checkpoint as ckpt
from goldstone_cli.checkpoint import CheckpointError
from goldstone_cli.config import ConfigError, choice, run_names, to_yaml
from goldstone_cli.distributed.failures import LocalFailures
from goldstone_cli.distributed.shard import RowShard
from goldstone_cli.io import atomic_path, atomic_write_json, atomic_write_text, non_finite_paths
from goldstone_cli.models import build_model
from goldstone_cli.numerics import WORKSPACE
from goldstone_cli.optim.factory import build_optimizer
from goldstone_cli.runlock import RunLock, holder, in_use

BASE_COLUMNS = ["step", "wall_time", "total", "local", "psi", "lr"]
GAUGE_COLUMNS = ["gauge_steps", "gauge_time", "psi_before_gauge", "psi_after_gauge", "gauge_max_angle"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class RunResult:
    run_dir: Path
    status: str  # completed | target_reached | interrupted | diverged
    summary: dict[str, Any]
    rank: int = 0  # trainer.distributed: this process's rank (rank 0 wrote the run's files)
    late_signal: Optional[str] = None  # a stop signal during or after the last step (the run completed anyway)


# ----------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available; use trainer.device=cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def new_run_dir(cfg: DictConfig) -> Path:
    """``<output_dir>/<model option>/<YYYY-MM-DD_HH-MM-SS>_<name>``, made unique with a suffix
    (``name``: the experiment, else the optimizer, e.g. ``goldstone-adagrad-natural``)."""
    for key in ("run_dir", "output_dir"):  # a file where a folder is wanted
        if cfg.get(key) and Path(cfg[key]).exists() and not Path(cfg[key]).is_dir():
            raise ConfigError(f"{key}={cfg[key]} is a file, not a folder; give a folder (it is made if missing)")
    if cfg.run_dir:
        path = Path(cfg.run_dir)
        _check_not_a_run(path)
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    names = run_names(cfg)
    base = Path(cfg.output_dir) / names["model"] / f"{stamp}_{names['name']}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}_{n}")


def _check_not_a_run(path: Path, locked_by_us: bool = False) -> None:
    """A fresh run may not start in a folder that another process uses or that holds a resumable run."""
    pid = None if locked_by_us else holder(path)
    if pid is not None:
        raise in_use(path, pid)
    if ckpt.has_checkpoint(path):
        raise ConfigError(f"run_dir={path} already holds a run; continue it with resume={path} or pick another folder")


class MetricsWriter:
    """Appends rows to ``metrics.csv`` with a header fixed at the start of the run.

    ``resume_from_step``: keep the rows before it; None: a fresh run (an old file is replaced)."""

    def __init__(self, path: Path, columns: list[str], resume_from_step: Optional[int] = None):
        self.path, self.columns = path, columns
        if resume_from_step is not None and path.exists():
            self._truncate(resume_from_step)
        new = resume_from_step is None or not path.exists()
        self._f = open(path, "w" if new else "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=columns, extrasaction="ignore")
        if new:
            self._w.writeheader()
            self._f.flush()

    def _truncate(self, step: int) -> None:
        """Keep the rows before ``step`` (those after the checkpoint are recomputed)."""
        with open(self.path, newline="") as f:
            lines = f.read().splitlines(keepends=True)
        if lines and not lines[-1].endswith(("\n", "\r")):  # a row cut off by a failed write (a full disk)
            lines.pop()
        rows = list(csv.reader(lines))
        if not rows:
            raise ValueError(f"{self.path} is empty (no header), but the run has a checkpoint at step {step}: its "
                             f"rows were lost; restore the file, or delete it to resume without the earlier rows")
        header, body = rows[0], rows[1:]
        if header != self.columns:
            raise ValueError(f"{self.path} has columns {header}, expected {self.columns}; cannot resume into it")
        keep = []
        for n, r in enumerate(body, start=2):
            if not r:
                continue
            try:
                s = int(float(r[0]))
            except ValueError:
                raise ValueError(f"{self.path}, line {n}: step {r[0]!r} is not a number; the file was edited or "
                                 "damaged: restore it, or delete it to resume without the earlier rows") from None
            if s < step:
                keep.append(r)
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(keep)

    def write(self, row: dict[str, Any]) -> None:
        # empty field for "no value": not evaluated at this step, or NaN / inf (csv would write the
        # bare tokens nan / inf; summary.json names the non-finite final values)
        self._w.writerow({k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
                          for k, v in row.items()})
        self._f.flush()

    def close(self) -> None:
        self._f.close()


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1") if hasattr(signal, n))


class _Interrupt:
    """First Ctrl-C / SIGTERM / SIGHUP / SIGUSR1: finish the current step, checkpoint, exit cleanly.
    Second: stop at once.

    Installed from the first step until the run's files are written. After the last step
    (:meth:`finish`) a signal stops nothing: the run is complete, and its checkpoint, summary.json and
    loss.png are still written (a second signal aborts, as in the loop; every file is written atomically,
    so none is left half-written). ``hold``: where the block ends without an error, leave the handlers
    installed (the command line, which exits right after): a signal from then on only gets a note."""

    def __init__(self, hold: bool = False):
        self.requested = False  # a stop is due (a signal here, or on another rank: _agree_on_interrupt)
        self.received = False  # a signal reached THIS process (a second one aborts)
        self.signum: Optional[int] = None
        self.hold = hold
        self.finished = False  # past the last step: the run is complete
        self.held = False  # the block has ended; the handlers were left installed (``hold``)
        self.late: Optional[int] = None  # a signal during or after the last step: the run completed anyway
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: no handler, Ctrl-C raises as usual
                break
        return self

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.held:  # the run's files are written; the process is on its way out: nothing to stop or abort
            if self.late is None:
                self.late = signum
            try:  # not print(): the signal may have come in the middle of a write to stdout
                os.write(2, f"{name} received after the run ended (its files are written): exiting\n".encode())
            except OSError:
                pass
            return
        if self.received:  # the second signal here; a stop agreed with other ranks is no reason to abort
            raise KeyboardInterrupt
        self.received, self.signum = True, signum
        if self.finished:
            self.late = signum
            tqdm.write(f"{name} received after the last step: the run is complete; writing its last checkpoint, "
                       "summary.json and loss.png (send it again to abort)...")
            return
        self.requested = True
        tqdm.write(f"{name} received: finishing this step and saving a checkpoint "
                   "(send it again to abort)...")

    def finish(self) -> None:
        """The last step is done (the run completed or reached its target): a signal no longer stops it."""
        self.finished = True
        if self.received:  # it came during the last step, which the loop finished: the run completed anyway
            self.late = self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "interrupt"

    @property
    def late_name(self) -> Optional[str]:
        return signal.Signals(self.late).name if self.late else None

    def __exit__(self, exc_type, *exc):
        if self.hold and exc_type is None and self._old:
            self.held = True
            return False
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False


def _set_compile(model, on: bool) -> None:
    """``trainer.compile``: switch the model's compiled step on (models without one run eagerly)."""
    set_compile = getattr(model, "set_compile", None)
    if set_compile is not None:
        set_compile(on)
    elif on:
        tqdm.write(f"note: trainer.compile=true, but {type(model).__name__} has no compiled step; running it eagerly")


# ----------------------------------------------------------------------------- main entry
def train(cfg: DictConfig, run_dir: Optional[Path] = None, hold_signals: bool = False) -> RunResult:
    """Run (or, with ``run_dir`` holding a checkpoint, continue) the training that ``cfg`` describes.

    ``hold_signals``: for a process that exits once this returns (the command line): the stop-signal
    handlers stay installed after a run that ends without an error, so that a signal until the exit
    only gets a note (the default handlers would end the process with a KeyboardInterrupt traceback
    or kill it); otherwise they are restored when this returns."""
    dist_ctx, created = _join_process_group(cfg)  # None: one process
    try:
        return _train(cfg, run_dir, dist_ctx, _Interrupt(hold=hold_signals))
    finally:
        WORKSPACE.clear()  # the fused passes' pooled buffers belong to this run's model: free them
        if created:
            from goldstone_cli.distributed.env import shutdown

            shutdown()


def _train(cfg: DictConfig, run_dir: Optional[Path], dist_ctx, interrupt: "_Interrupt") -> RunResult:
    tc = cfg.trainer
    shard = RowShard.from_dist(dist_ctx)
    device = dist_ctx.device if dist_ctx is not None else resolve_device(choice(tc.device))
    dtype = resolve_dtype(choice(tc.dtype))
    resuming = run_dir is not None and ckpt.has_checkpoint(run_dir)

    if run_dir is not None and not shard.distributed and Path(run_dir).is_dir():
        pid = holder(Path(run_dir))  # in use: fail at once, before the data are loaded (the lock is taken below)
        if pid is not None:
            raise in_use(run_dir, pid)
    # data, model and optimizer first: a missing data set or a bad setting leaves no run folder behind
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device, dtype, shard=shard if shard.distributed else None)
    _set_compile(model, bool(tc.get("compile", False)))
    optimizer, scheduler = build_optimizer(cfg.optimizer, model)

    if not shard.distributed:
        run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir).acquire()  # RunLocked (a ValueError) at once if another process runs here
        try:
            return _train_locked(cfg, run_dir, resuming, device, dtype, model, optimizer, scheduler, interrupt)
        finally:
            lock.release()

    # several ranks: rank 0 makes the folder and holds the lock; the others learn the folder (or the error)
    from goldstone_cli.distributed.env import rank_log

    lock = None

    def make_folder() -> str:  # rank 0; an error is re-raised there and told to the others (PeerRankError)
        nonlocal lock
        folder = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = RunLock(folder).acquire()
            if not resuming:
                _check_not_a_run(folder, locked_by_us=True)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return str(folder)

    run_dir = Path(shard.from_main(make_folder, "start the run", nbytes=1 << 16))
    try:
        with rank_log(run_dir, shard.rank):
            return _train_locked(cfg, run_dir, resuming, device, dtype, model, optimizer, scheduler, interrupt, shard)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg: DictConfig, run_dir: Path, resuming: bool, device, dtype, model, optimizer,
                  scheduler, interrupt: "_Interrupt", shard: Optional[RowShard] = None) -> RunResult:
    tc = cfg.trainer
    shard = shard if shard is not None else RowShard.single()
    main = shard.is_main()
    ckpt_dir = run_dir / "checkpoints"
    if not resuming and not shard.distributed:
        _check_not_a_run(run_dir, locked_by_us=True)  # again, now that no other process can be writing here

    def tidy() -> None:  # rank 0
        from goldstone_cli.distributed import checkpoint as dck

        ckpt_dir.mkdir(exist_ok=True)
        for folder in (run_dir, ckpt_dir):  # left by a process killed while writing (we hold the lock)
            ckpt.remove_stale_temporaries(folder)
        dck.remove_stale(ckpt_dir)

    # rank 0 alone touches the run's files; from_main: the others wait for it and raise its error with it
    shard.from_main(tidy, "prepare the run folder")
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    has_gauge = hasattr(optimizer, "gauge_step")
    columns = BASE_COLUMNS + model.metric_names() + (GAUGE_COLUMNS if has_gauge else [])

    start, wall, best, target_step = 0, 0.0, None, None
    if resuming:
        state, path = _load_resume_state(ckpt_dir, shard, model, optimizer, device)
        _check_fits(state, path, cfg, model)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"].cpu())
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise CheckpointError(f"{path} does not fit this run's model or optimizer: "
                                  f"{_first_line(exc)}") from None
        start, wall, best = state["step"], state["wall_time"], state.get("best")
        if not shard.distributed:
            best = _best_on_disk(ckpt_dir, path, best)
        target_step = state.get("target_step")
        was = (state["config"].get("trainer") or {}).get("target") if isinstance(state["config"], dict) else None
        if target_step is not None and was != tc.target:  # another target (or none): the old one no longer stops it
            tqdm.write(f"trainer.target is {tc.target} now ({was} reached at step {target_step}): training goes on")
            target_step = None
    snapshots: dict[int, Any] = {}
    metrics, gauge_log = _NoWriter(), (_NoWriter() if has_gauge else None)  # ranks > 0 write no files

    def open_files() -> None:  # rank 0 writes the run's files
        nonlocal snapshots, metrics, gauge_log
        snapshots = _load_snapshots(run_dir, start) if resuming else {}
        metrics = MetricsWriter(run_dir / "metrics.csv", columns, resume_from_step=start if resuming else None)
        try:
            gauge_log = _GaugeLog(run_dir / "gauge.csv", start if resuming else None) if has_gauge else None
            # after the checks: a refused resume changes nothing
            atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        except BaseException:
            metrics.close()
            if gauge_log is not None:
                gauge_log.close()
            raise

    # an error here (e.g. a damaged metrics.csv) stops every rank with rank 0's message, before the first step
    shard.from_main(open_files, "open the run's files")
    if resuming:
        threads = state.get("torch_threads")
        if threads is not None and threads != torch.get_num_threads():
            tqdm.write(f"warning: the checkpoint was written with {threads} torch threads, this process uses "
                       f"{torch.get_num_threads()}: the resumed run can differ from an uninterrupted one in the last "
                       f"digits (set OMP_NUM_THREADS={threads} for a bit-exact resume)")
        tqdm.write(f"Resuming {run_dir} from step {start}")

    def state_at(step: int, gen=None, wall_at=None) -> dict[str, Any]:
        # gen, wall_at: the generator and wall time as iteration `step` found them, for a checkpoint
        # written after that step drew its minibatch (a resume draws it again)
        if gen is None:
            gen = generator.get_state()
        return {
            "step": step,
            "wall_time": wall if wall_at is None else wall_at,
            "best": best,
            "target_step": target_step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": gen,
            "config": _plain_config(cfg),
            "torch_threads": torch.get_num_threads(),
        }

    # the step of the checkpoint the next save replaces: one off the checkpoint_every schedule (an
    # interrupt's, or the last step's) is dropped rather than rotated into prev.pt, so that a run stopped
    # and resumed ends with the prev.pt of an uninterrupted one
    replaces = [start if resuming else None]

    def describe(exc: BaseException, what: str) -> str:  # the one line rank 0 prints for a failure in the loop
        who = f"rank {shard.rank} could not" if shard.distributed else "could not"
        if replaces[0] is None:
            then = f"no checkpoint was written yet: start the run again with run_dir={run_dir}"
        else:
            fix = ("free disk space or fix the run folder's permissions, then" if isinstance(exc, OSError)
                   else "once the cause is fixed,")
            then = f"last checkpoint: step {replaces[0]}; {fix} continue with: {_resume_command(shard, run_dir)}"
        stopped = "every rank stopped" if shard.distributed else "the run stopped"
        return f"{who} {what}: {type(exc).__name__}: {_first_line(exc)}; {stopped} ({then})"

    # what one rank alone does in the loop (rank 0's files) runs in failures.guard: a failure there is
    # raised on every rank together at the next all-reduce (goldstone_cli/distributed/failures.py)
    failures = LocalFailures(shard, describe)

    def checkpoint(step: int, gen=None, wall_at=None) -> None:
        """Returns only once every rank has written its part (a failure on any rank stops them all)."""
        if snapshots and main:  # first: a kill between the two leaves snapshots that the older checkpoint trims
            with failures.guard(f"write {ckpt.SNAPSHOTS} at step {step}"):
                _save_snapshots(run_dir, snapshots)
        failures.agree()  # no checkpoint after a failure on any rank: the last one stays the one to resume from
        # (one of this same step, e.g. the last step's of a completed run that is resumed, is replaced too:
        # prev.pt stays the older checkpoint, as in an uninterrupted run)
        rotate = replaces[0] is None or (replaces[0] % tc.checkpoint_every == 0 and replaces[0] != step)
        with failures.guard(f"write the checkpoint at step {step}"):  # raises on every rank alike (dck.save)
            _save_checkpoint(ckpt_dir, state_at(step, gen, wall_at), model, optimizer, shard, device, rotate)
            replaces[0] = step
        failures.agree()

    status, message, last_row = "completed", "", {}
    steps = int(tc.steps)
    target = tc.target
    snapshot_steps = _snapshot_steps(steps)
    names = run_names(cfg)
    desc = f"{names['model']}/{names['name']}"
    pbar = tqdm(total=steps, initial=start, desc=desc, unit="step",
                disable=not tc.progress or not main, dynamic_ncols=True)
    eta = _Eta(start, steps, device, eval_every=int(tc.eval_every))
    # the handlers stay from the first step until the run's files are written (a signal after the last
    # step only finishes them: _Interrupt.finish)
    with interrupt:
        try:
            step = start
            while True:
                # a signal to any rank stops every rank at this step (decided on the all-reduced flag only:
                # a signal arriving during the all-reduce is seen by every rank at the next step)
                # the same all-reduce carries the failures of the step before (failures.guard): every rank
                # raises here together, rank 0 with its message (no collective of its own every step)
                stop = (_agree_on_interrupt(interrupt, shard, failures) if shard.distributed
                        else interrupt.requested)
                if stop:
                    checkpoint(step)
                    status = "interrupted"
                    message = (f"interrupted ({interrupt.name}) at step {step}; continue with: "
                               + _resume_command(shard, run_dir)
                               + (f" (any number of ranks, or one process: goldstone train resume={run_dir} "
                                  f"trainer.distributed=false)" if shard.distributed else ""))
                    break
                # also at step 0 of a fresh run: a run killed at once is resumable (the last step's checkpoint
                # is written after the loop); written once this step's loss is known to be finite, with the
                # generator as the step found it (its minibatch is drawn again on resume)
                due = step % tc.checkpoint_every == 0 and (step != start or not resuming) and step < steps
                final = step >= steps
                # the run may end at this step (its last, or an evaluation that can reach the target): the
                # end checkpoint holds the generator before this step's draw too, so that a run continued
                # (more steps, another target) draws what an uninterrupted run draws; target_step set here: a
                # resume of a run that reached its target (the same target), which ends at this step again
                may_end = final or target_step is not None or (
                    target is not None and step % tc.eval_every == 0)
                gen_found = generator.get_state() if due or may_end else None
                wall_found = wall  # as this step found it: what a checkpoint at this step records (see below)
                t0 = time.perf_counter()
                if final:
                    with torch.no_grad():
                        terms = model.loss_terms(generator)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    terms = model.loss_terms(generator)
                if shard.distributed:  # each rank computed its share: the logged values are the sums
                    total, local_v, psi_v = _summed_terms(terms, shard)
                else:
                    total, local_v, psi_v = terms["total"].item(), None, None
                wall += time.perf_counter() - t0
                if not math.isfinite(total):
                    status = "diverged"
                    message = (f"the loss became {total} at step {step}; the last good checkpoint is "
                               f"{run_dir / 'checkpoints' / ckpt.LAST} (lower optimizer.lr, or set optimizer.clip)")
                    break
                if due:
                    checkpoint(step, gen_found, wall_found)
                lr = optimizer.param_groups[0]["lr"]

                # log and evaluate theta_s (before this iteration's update)
                if step in snapshot_steps or final:
                    snap = model.snapshot()
                    if snap is not None and main:
                        snapshots[step] = snap
                if step % tc.log_every == 0 or step % tc.eval_every == 0 or final:
                    row = {"step": step, "wall_time": round(wall, 6), "total": total,
                           "local": terms["local"].item() if local_v is None else local_v,
                           "psi": terms["psi"].item() if psi_v is None else psi_v, "lr": lr}
                    if step % tc.eval_every == 0 or final:
                        t_eval = time.perf_counter()
                        model.eval()
                        evals = model.evaluate()
                        model.train()
                        eta.add_eval(time.perf_counter() - t_eval)
                        row.update(evals)
                        with failures.guard(f"write the best checkpoint at step {step}"):  # alike on every rank
                            best = _update_best(model, evals, best, step, run_dir, shard, device)
                        if target is not None and target_step is None and _reached(model, evals, target):
                            target_step = step
                    if has_gauge:
                        row.update(_gauge_row(optimizer))
                    with failures.guard(f"write metrics.csv at step {step}"):
                        metrics.write(row)
                    last_row = row
                    pbar.set_postfix(loss=f"{total:.6g}", psi=f"{row['psi']:.3g}", refresh=False)
                if final:
                    break
                if target_step is not None:
                    status = "target_reached"
                    break

                # update theta_s -> theta_{s+1}
                t0 = time.perf_counter()
                terms["total"].backward()
                model.reduce_gradients()  # replicated parameters of a sharded model (e.g. model.items=replicated)
                if cfg.optimizer.clip is not None:
                    torch.nn.utils.clip_grad_value_(model.parameters(), cfg.optimizer.clip)
                n_gauge = getattr(optimizer, "num_gauge_steps", 0)
                try:
                    optimizer.step()
                except FloatingPointError as exc:  # e.g. a gauge step met NaN parameters (NonFiniteGaugeInput)
                    status = "diverged"
                    message = (f"{exc} in the update of step {step}; the last good checkpoint is "
                               f"{run_dir / 'checkpoints' / ckpt.LAST} (lower optimizer.lr, or set optimizer.clip)")
                    break
                scheduler.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                wall += time.perf_counter() - t0
                if gauge_log is not None and optimizer.num_gauge_steps != n_gauge:
                    with failures.guard(f"write gauge.csv at step {step + 1}"):
                        gauge_log.write(optimizer.last_gauge)
                del terms
                step += 1
                pbar.update(1)
                if main:
                    _announce_eta(eta, step, pbar, desc)
            failures.agree()  # the last steps' failures (a final row rank 0 could not write): once per run
            if status in ("completed", "target_reached"):
                interrupt.finish()  # the run is complete: a signal from here on only lets it write its files
                # the wall time as this step found it, as every checkpoint holds it: a resume from here
                # computes this step's loss (and its time) again, so it is counted once
                checkpoint(step, gen_found, wall_found)
        except BaseException:  # nothing here may hide the error on its way (a file that failed fails again on close)
            pbar.close()
            for close in (metrics.close, *((gauge_log.close,) if gauge_log is not None else ()),
                          *((lambda: _save_snapshots(run_dir, snapshots),) if snapshots and main else ())):
                try:
                    close()
                except Exception:  # noqa: BLE001
                    pass
            raise
        pbar.close()
        with failures.guard("close metrics.csv"):
            metrics.close()
        if gauge_log is not None:
            with failures.guard("close gauge.csv"):
                gauge_log.close()
        if snapshots and main:
            with failures.guard(f"write {ckpt.SNAPSHOTS}"):
                _save_snapshots(run_dir, snapshots)

        summary = {
            "status": status,
            "message": message,
            "run_dir": str(run_dir),
            "model": str(cfg.model.name),
            "optimizer": str(cfg.optimizer.name),
            "name": names["name"],  # the experiment or the optimizer: what ran
            "method": names["method"],  # the optimizer with its base and solver, e.g. goldstone-adagrad-natural
            "choices": OmegaConf.to_container(cfg.choices) if cfg.get("choices") else {},  # the config group options composed
            "seed": int(cfg.seed),
            "device": str(device),
            "dtype": str(dtype).replace("torch.", ""),
            "steps": int(step),
            "wall_time": wall,
            "final": {k: v for k, v in last_row.items() if k != "step"},
            "target": target,
            "target_metric": model.target_metric,
            "steps_to_target": target_step,
            "best": best,
        }
        if shard.distributed:
            summary["ranks"] = shard.world
        if status == "interrupted":
            summary["signal"] = interrupt.name
            summary["exit_code"] = 128 + (interrupt.signum or signal.SIGINT)
        if has_gauge:
            summary["gauge_steps"] = int(optimizer.num_gauge_steps)
            summary["gauge_time"] = float(optimizer.gauge_seconds)
            summary["gauge_overhead"] = float(optimizer.gauge_seconds / wall) if wall > 0 else None
        summary["headline"] = _headline(model, last_row)
        if status == "diverged":
            summary["diverged_at_step"] = int(step)
        bad = non_finite_paths(summary)
        if bad:  # JSON has no NaN: atomic_write_json writes null; say which values and why
            summary["non_finite"] = {"values": bad, "note": "these values were NaN or infinite; written as null"}
        if not main:  # rank 0 writes the summary and the plot; no rank leaves before it is done
            failures.agree()  # (a barrier that also stops every rank where rank 0 could not write them)
            if status == "diverged":
                raise TrainingDiverged(message)
            return RunResult(run_dir, status, summary, rank=shard.rank, late_signal=interrupt.late_name)
        with failures.guard("write summary.json"):
            atomic_write_json(run_dir / "summary.json", summary)
        try:
            from goldstone_cli.report import plot_losses

            title = f"{names['model']} / {names['name']}" + (f" ({names['method']})" if names["method"] != names["name"] else "")
            plot_losses(run_dir / "metrics.csv", run_dir / "loss.png", title=title,
                        heldout=[(m, label) for m, label in model.headline_metrics if m != "suboptimality"])
        except Exception as exc:  # a plot must never lose a finished run
            tqdm.write(f"warning: could not draw loss.png: {exc}")
        failures.agree()
        if status == "diverged":
            raise TrainingDiverged(message)
        return RunResult(run_dir, status, summary, late_signal=interrupt.late_name)


# ----------------------------------------------------------------------------- distributed pieces
def _join_process_group(cfg: DictConfig):
    """``(Dist or None, whether this call created the process group)`` for ``trainer.distributed``."""
    from goldstone_cli.distributed.env import init_distributed, launch_env
    from goldstone_cli.models import supports_sharding

    import torch.distributed as dist

    tc = cfg.trainer
    try:
        launch = launch_env()
    except ValueError as exc:
        if not tc.get("distributed", False):  # a one-process run ignores stray or broken launcher variables
            return None, False
        raise ConfigError(str(exc)) from None
    if not tc.get("distributed", False):
        if launch is not None and launch.source == "torchrun" and launch.world > 1:
            raise ConfigError(f"this process is rank {launch.rank} of {launch.world} started by torchrun, but "
                              f"trainer.distributed is false, so every rank would train the whole model on its "
                              f"own; add trainer.distributed=true")
        return None, False
    if launch is None:
        raise ConfigError("trainer.distributed=true needs a launcher that starts the ranks and tells each its "
                          "rank: run `torchrun --nproc-per-node=N -m goldstone_cli train trainer.distributed=true "
                          "...`, or `srun goldstone train trainer.distributed=true ...` under Slurm (README: "
                          "Training on several GPUs or nodes); to continue a distributed run on one process, "
                          "add trainer.distributed=false")
    if launch.world > 1 and not supports_sharding(str(cfg.model.name)):
        from goldstone_cli.models import _SHARDABLE

        raise ConfigError(f"model={cfg.model.name} cannot be trained with trainer.distributed=true: it does not "
                          f"shard its rows (models that do: {', '.join(sorted(_SHARDABLE))}); drop "
                          f"trainer.distributed or start one process")
    from goldstone_cli.distributed.errors import RankError

    created = not dist.is_initialized()
    try:
        return init_distributed(choice(tc.device)), created
    except RankError:  # this rank's own (its local rank has no GPU): printed by this rank
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


_FAILED = 1024.0  # above every signal number


def _agree_on_interrupt(interrupt: "_Interrupt", shard: RowShard, failures: Optional[LocalFailures] = None) -> bool:
    """Whether any rank got a stop signal before this all-reduce (the same answer on every rank);
    if so every rank records it (the signal: the largest number). With ``failures``, the same
    all-reduce tells whether any rank failed since (:meth:`LocalFailures.raise_if`: every rank raises)."""
    requested, signum = interrupt.requested, interrupt.signum  # read once: the handler may run at any time
    # one number (gloo's all-reduce of two floats takes twice as long as of one): the signal, plus
    # _FAILED where this rank failed; the maximum is >= _FAILED where any rank did (the signal is then moot)
    code = (float(signum or 0) if requested else 0.0) + (_FAILED * failures.flag() if failures is not None else 0.0)
    agreed = int(shard.all_reduce_max_(torch.tensor([code], device=shard.device or torch.device("cpu"))).item())
    if failures is not None:
        failures.raise_if(float(agreed >= _FAILED))  # a failure wins over a signal: no checkpoint after it
    if agreed:
        interrupt.requested, interrupt.signum = True, agreed
    return bool(agreed)


def _resume_command(shard: RowShard, run_dir: Path) -> str:
    if shard.distributed:
        return f"torchrun --nproc-per-node={shard.world} -m goldstone_cli train resume={run_dir}"
    return f"goldstone train resume={run_dir}"


def _summed_terms(terms: dict[str, torch.Tensor], shard: RowShard) -> tuple[float, float, float]:
    """``total``, ``local``, ``psi`` summed over ranks (float64): the one-process values."""
    v = torch.stack([terms[k].detach().to(torch.float64).reshape(()) for k in ("total", "local", "psi")])
    a, b, c = shard.all_reduce_sum_(v).tolist()
    return a, b, c


class _NoWriter:
    """Ranks other than 0 write no metrics."""

    def write(self, row) -> None:
        pass

    def close(self) -> None:
        pass


def _pt_step(ckpt_dir: Path) -> int:
    """The step of the newest one-process checkpoint that reads and verifies (``last.pt``, else
    ``prev.pt``; a sharded one is not looked at); -1 if none does."""
    for name in (ckpt.LAST, ckpt.PREV):
        try:
            return int(ckpt.load(ckpt_dir / name, kind="last")["step"])
        except (CheckpointError, FileNotFoundError, KeyError, TypeError, ValueError):
            continue
    return -1


def _load_resume_state(ckpt_dir: Path, shard: RowShard, model, optimizer, device) -> tuple[dict[str, Any], Path]:
    """The newest checkpoint that verifies, for this rank: a sharded ``last.dcp`` / ``prev.dcp`` (any
    rank count) or a one-process ``last.pt`` / ``prev.pt`` (split into this rank's rows). Where both
    kinds are there, rank 0 orders them by step (a sharded one's as its meta.pt says: its files are
    verified when it is loaded); a kind that does not load on every rank is reported in a warning and
    the other kind is tried. Sharded checkpoints passed over for a one-process one are set aside as
    ``*.dcp.corrupt`` (the next save would otherwise keep them as the checkpoint to fall back to)."""
    from goldstone_cli.distributed import checkpoint as dck

    def survey() -> dict[str, Any]:  # rank 0: the kinds there are, newest first
        has_pt = (ckpt_dir / ckpt.LAST).is_file() or (ckpt_dir / ckpt.PREV).is_file()
        if not dck.has_checkpoint(ckpt_dir):
            return {"order": ["pt"], "pt_ok": True}
        if not has_pt:
            return {"order": ["dcp"], "pt_ok": False}
        steps = [dck.step_of(ckpt_dir / name) for name in (dck.LAST, dck.PREV)]
        dcp_step = max((s for s in steps if s is not None), default=-1)
        pt_step = _pt_step(ckpt_dir)
        return {"order": ["dcp", "pt"] if dcp_step >= pt_step else ["pt", "dcp"], "pt_ok": pt_step >= 0}

    plan = shard.from_main(survey, "look for the run's checkpoints")
    kinds = {"dcp": "sharded", "pt": "one-process"}
    problems: list[str] = []
    for i, kind in enumerate(plan["order"]):
        try:
            if kind == "dcp":
                return dck.load_latest(ckpt_dir, shard, device, warn=tqdm.write, quarantine=True)
            if problems and plan["pt_ok"]:  # the sharded ones failed and rank 0 read a good last.pt / prev.pt
                kept = shard.from_main(lambda: dck.set_aside(ckpt_dir), "set the damaged sharded checkpoints aside")
                if shard.is_main() and kept:
                    tqdm.write(f"the sharded checkpoint is kept as {', '.join(kept)} (not resumed from)")
            return _load_one_process_state(ckpt_dir, shard, model, optimizer)
        except CheckpointError as exc:
            problems.append(str(exc))
            if i + 1 < len(plan["order"]) and shard.is_main():
                other = plan["order"][i + 1]
                tqdm.write(f"warning: the {kinds[kind]} checkpoint does not load ({exc}); trying the "
                           f"{kinds[other]} one")
    raise CheckpointError("; ".join(problems))


def _load_one_process_state(ckpt_dir: Path, shard: RowShard, model, optimizer) -> tuple[dict[str, Any], Path]:
    """``last.pt`` (else ``prev.pt``), this rank's rows of it; on several ranks every rank reads the
    file and all agree that it verified (else every rank raises CheckpointError)."""
    from goldstone_cli.distributed import checkpoint as dck

    problem, state, path = None, None, None
    try:
        state, path = ckpt.load_latest(ckpt_dir, warn=tqdm.write, quarantine=shard.is_main())
    except (CheckpointError, FileNotFoundError) as exc:
        if not shard.distributed:
            raise
        problem = str(exc)
    if not shard.distributed:
        return state, path
    read = shard.all_gather_json({"problem": problem, "path": None if path is None else path.name})
    problems = [r["problem"] for r in read if r["problem"] is not None]
    if problems:
        raise CheckpointError(problems[0])
    if len({r["path"] for r in read}) > 1:
        raise CheckpointError(f"the ranks read different checkpoints in {ckpt_dir} "
                              f"({', '.join(str(r['path']) for r in read)}); resume again")
    return dck.take_rows(state, dck.sharded_paths(state, model, optimizer, full=True), shard), path


def _save_checkpoint(ckpt_dir: Path, state: dict[str, Any], model, optimizer, shard: RowShard, device,
                     rotate: bool = True) -> None:
    """``last.dcp`` (sharded, every rank) or ``last.pt`` (one process); ``rotate``: the one it replaces
    becomes the previous checkpoint (else it is dropped). A checkpoint of the other kind, left by an
    earlier leg of the run on another rank count, is removed once this kind has a previous checkpoint
    to fall back to."""
    from goldstone_cli.distributed import checkpoint as dck

    if shard.distributed:
        dck.save(ckpt_dir, state, dck.sharded_paths(state, model, optimizer), shard, device, rotate=rotate)
        if shard.is_main() and (ckpt_dir / dck.PREV / dck.META).is_file():
            for name in (ckpt.LAST, ckpt.PREV):
                (ckpt_dir / name).unlink(missing_ok=True)
    else:
        ckpt.save_last(ckpt_dir, state, rotate=rotate)
        if (ckpt_dir / ckpt.PREV).is_file():
            dck.remove(ckpt_dir)


# ----------------------------------------------------------------------------- small pieces
def _human_seconds(sec: float) -> str:
    if sec < 90:
        return f"{max(sec, 1):.0f} s"
    if sec < 90 * 60:
        return f"{sec / 60:.0f} min"
    return f"{sec / 3600:.1f} h"


def _device_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"{device.type} ({n} thread{'s' if n != 1 else ''})"


class _Eta:
    """The run's expected duration from its first steps: the time per step (everything but
    evaluation) times the steps, plus the time per evaluation times the evaluations (one every
    ``eval_every`` steps and one at the end). Ready once at least 5 steps took 10 s, or any number
    of steps a minute."""

    def __init__(self, start: int, steps: int, device: torch.device, eval_every: int = 0, clock=time.perf_counter):
        self.start, self.steps, self.device, self.clock = start, steps, device, clock
        self.eval_every = eval_every
        self.t0 = clock()
        self.eval_seconds, self.n_evals = 0.0, 0
        self.done = steps <= start

    def add_eval(self, seconds: float) -> None:
        self.eval_seconds += seconds
        self.n_evals += 1

    def _evals_left(self, step: int) -> int:
        if self.eval_every <= 0:
            return 0
        return (self.steps - 1) // self.eval_every - (step - 1) // self.eval_every + 1  # every eval_every, and the end

    def _split(self, step: int) -> tuple[float, float]:
        """(seconds so far, seconds still to come)."""
        n = max(step - self.start, 1)
        elapsed = self.clock() - self.t0
        per = max(elapsed - self.eval_seconds, 0.0) / n
        per_eval = self.eval_seconds / self.n_evals if self.n_evals else 0.0
        return elapsed, per * (self.steps - step) + per_eval * self._evals_left(step)

    def check(self, step: int) -> Optional[str]:
        """A one-line estimate the first time enough steps have run, else None."""
        if self.done:
            return None
        n, busy = step - self.start, self.clock() - self.t0 - self.eval_seconds
        if n < 1 or not (busy >= 60 or (n >= 5 and busy >= 10)):
            return None
        self.done = True
        elapsed, left = self._split(step)
        per = busy / n
        which = f"{self.steps:,} steps" if self.start == 0 else f"the remaining {self.steps - self.start:,} steps"
        per_text = f"{per:.2f} s" if per >= 0.01 else f"{per * 1000:.1f} ms"
        evals = (f", {self.eval_seconds / self.n_evals:.1f} s per evaluation" if self.n_evals and
                 self.eval_seconds / self.n_evals >= 0.1 else "")
        return (f"about {_human_seconds(elapsed + left)} for {which} on {_device_text(self.device)}: "
                f"{per_text} per step over the first {n:,}{evals}; {_human_seconds(left)} left")

    def total_seconds(self, step: int) -> float:
        return sum(self._split(step))


def _announce_eta(eta: _Eta, step: int, pbar, desc: str) -> None:
    """Print the estimate above the progress bar (also without one: sweeps log it) and show it in the bar."""
    msg = eta.check(step)
    if msg is not None:
        tqdm.write(msg)
        pbar.set_description(f"{desc} (~{_human_seconds(eta.total_seconds(step))})", refresh=False)


def _headline(model, row: dict[str, Any]) -> dict[str, float]:
    """The model's headline metrics at the end of the run, by label (``summary.json``: ``headline``)."""
    out = {}
    for metric, label in model.headline_metrics:
        v = row.get(metric)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[label] = float(v)
    return out


def format_result(result: "RunResult") -> str:
    """The end-of-run lines: status, steps and time, the headline numbers, the best checkpoint,
    the gauge steps' share of the time, and the run folder."""
    s = result.summary
    parts = [f"{result.status}: {s['steps']:,} steps in {_human_seconds(s['wall_time'])} of optimization"]
    parts += [f"{label} {v:.3g}" if abs(v) < 1e-3 or "L*" in label else f"{label} {v:.4f}"
              for label, v in (s.get("headline") or {}).items()]
    best = s.get("best")
    if best:
        parts.append(f"best {best['metric']} {best['value']:.4f} at step {best['step']:,} "
                     f"(checkpoints/{_best_file(result.run_dir, sharded=bool(s.get('ranks')))})")
    if s.get("gauge_overhead") is not None:
        n = s["gauge_steps"]
        parts.append(f"gauge steps {100 * s['gauge_overhead']:.1f}% of the time ({n:,} gauge step{'s' if n != 1 else ''})")
    return "; ".join(parts) + f"\noutputs in {result.run_dir}"


def _best_file(run_dir: Path, sharded: bool) -> str:
    """The best checkpoint a run wrote: ``best.dcp`` (several ranks) or ``best.pt`` (one process); the
    newer of the two where a run continued on another number of ranks left both."""
    d = Path(run_dir) / "checkpoints"
    found = [(p.stat().st_mtime_ns, name) for name, p in (("best.dcp", d / "best.dcp" / "meta.pt"),
                                                          ("best.pt", d / ckpt.BEST)) if p.is_file()]
    return max(found)[1] if found else ("best.dcp" if sharded else ckpt.BEST)


def _reached(model, evals: dict[str, float], target: float) -> bool:
    name = model.target_metric
    if name is None or name not in evals:
        return False
    v = evals[name]
    return v <= target if model.target_lower_is_better else v >= target


def _best_on_disk(ckpt_dir: Path, resumed_from: Path, best):
    """The best record to resume with: the checkpoint's, unless best.pt was written after that
    checkpoint (a kill between an evaluation and the next checkpoint): then best.pt's own record, so
    that summary.json and best.pt agree (the resumed run's evaluations up to that step are no better,
    as in the first pass)."""
    path = ckpt_dir / ckpt.BEST
    try:
        newer = path.stat().st_mtime_ns > resumed_from.stat().st_mtime_ns
    except OSError:
        return best
    if not newer:
        return best
    try:
        saved = ckpt.load(path, kind="best")
    except (FileNotFoundError, ckpt.CheckpointError):
        return best
    rec = {k: saved.get(k) for k in ("metric", "value", "step")}
    if (isinstance(rec["step"], int) and isinstance(rec["value"], float) and isinstance(rec["metric"], str)
            and (best is None or rec["metric"] == best.get("metric"))):
        return rec
    return best


def _update_best(model, evals: dict[str, float], best, step: int, run_dir: Path,
                 shard: Optional[RowShard] = None, device=None):
    name = model.best_metric
    if name is None or name not in evals or not math.isfinite(evals[name]):
        return best
    v = evals[name]
    better = best is None or (v < best["value"] if model.best_lower_is_better else v > best["value"])
    if better:
        best = {"metric": name, "value": float(v), "step": int(step)}
        if shard is not None and shard.distributed:  # every rank writes its rows (the same decision everywhere)
            from goldstone_cli.distributed import checkpoint as dck

            state = {**best, "model": model.state_dict()}
            dck.save(run_dir / "checkpoints", state, dck.sharded_paths(state, model, None), shard, device,
                     name=dck.BEST)
        else:
            ckpt.save(run_dir / "checkpoints" / ckpt.BEST, {**best, "model": model.state_dict()}, kind="best")
    return best


def _gauge_row(optimizer) -> dict[str, Any]:
    last = optimizer.last_gauge or {}
    return {
        "gauge_steps": optimizer.num_gauge_steps,
        "gauge_time": round(optimizer.gauge_seconds, 6),
        "psi_before_gauge": last.get("psi_before"),
        "psi_after_gauge": last.get("psi_after"),
        "gauge_max_angle": last.get("max_angle"),
    }


class _GaugeLog:
    """``gauge.csv``: one row per gauge step (psi before/after, largest rotation angle, seconds; for
    the natural solver also the reflection walls it flipped, the halvings of its step, whether the
    step was dropped (all halvings still raised psi) and the shortened solve in use: GoldstoneGD's
    ``last_gauge``)."""

    COLUMNS = ["step", "psi_before", "psi_after", "max_angle", "seconds", "flips", "backtracks", "rejected",
               "fallback"]
    OLD_COLUMNS = COLUMNS[:7]  # runs started before `rejected` / `fallback` were logged: resumed as they are

    def __init__(self, path: Path, resume_from_step: Optional[int]):
        # a row with step s was written by iteration s - 1, before a checkpoint at s: keep it (rows <= s)
        keep_before = None if resume_from_step is None else resume_from_step + 1
        columns = self.COLUMNS
        if keep_before is not None and path.exists():
            with open(path, newline="") as f:
                if next(csv.reader([f.readline()]), None) == self.OLD_COLUMNS:
                    columns = self.OLD_COLUMNS
        self.columns = columns
        self._w = MetricsWriter(path, columns, resume_from_step=keep_before)

    def write(self, diag: Optional[dict[str, Any]]) -> None:
        if diag:
            self._w.write({k: diag.get(k) for k in self.columns})

    def close(self) -> None:
        self._w.close()


def _snapshot_steps(steps: int) -> set[int]:
    """Steps at which small models keep a copy of their embeddings: 0, then log-spaced."""
    out, s = {0}, 1
    while s <= steps:
        out.update({s, 2 * s, 5 * s})
        s *= 10
    return {x for x in out if x <= steps}


def _save_snapshots(run_dir: Path, snapshots: dict[int, Any]) -> None:
    ckpt.save(run_dir / ckpt.SNAPSHOTS, {"snapshots": dict(sorted(snapshots.items()))}, kind="snapshots")


def _load_snapshots(run_dir: Path, start: int) -> dict[int, Any]:
    """The snapshots before ``start`` (later ones are taken again by the resumed run)."""
    path = run_dir / ckpt.SNAPSHOTS
    if not path.exists():
        return {}
    try:
        snaps = ckpt.load(path, kind="snapshots")["snapshots"]
    except (CheckpointError, KeyError) as exc:
        raise CheckpointError(f"{exc}; delete {path} to resume without the snapshots before step {start}") from None
    return {int(s): v for s, v in snaps.items() if int(s) < start}


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain containers (enums as their names): nothing a checkpoint cannot hold."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


# settings that a resumed run may change: where the data are and how much is computed at once
_RESUME_MAY_CHANGE = {"data.path", "data.cache_dir", "data.use_cache", "data.verify", "data.source",
                      "model.chunk_size", "model.eval_chunk"}
# settings added after runs were saved: a saved config without one had this value
_ADDED_LATER = {"model.items": "sharded"}


def _flat(d: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}"))
    return out


def _check_fits(state: dict[str, Any], path: Path, cfg: DictConfig, model) -> None:
    """One line naming every setting or model tensor in which the checkpoint and the run differ."""
    ckpt.fits(state, ["step", "wall_time", "model", "optimizer", "scheduler", "generator", "config"], path)
    saved = state["config"] if isinstance(state["config"], dict) else {}
    now = _plain_config(cfg)
    diffs = []
    for section in ("model", "data", "optimizer", "seed", "trainer"):
        a, b = _flat(saved.get(section), section), _flat(now.get(section), section)
        if section == "trainer":  # of the trainer settings only the number type changes the numbers
            a, b = {k: v for k, v in a.items() if k == "trainer.dtype"}, {k: v for k, v in b.items() if k == "trainer.dtype"}
        if section == "model" and a:
            a = {**{k: v for k, v in _ADDED_LATER.items() if k.startswith("model.") and k in b}, **a}
        for k in sorted(set(a) | set(b)):
            if k not in _RESUME_MAY_CHANGE and a.get(k, "(unset)") != b.get(k, "(unset)"):
                diffs.append(f"{k} is {a.get(k, '(unset)')!r} there, {b.get(k, '(unset)')!r} now")
    if diffs:
        raise CheckpointError(f"{path} does not fit the config: {'; '.join(diffs)}; resume with the run's own "
                              "settings (only trainer.* other than trainer.dtype may change), or start a new run")
    mine, theirs = model.state_dict(), state["model"]
    if not isinstance(theirs, dict):
        raise CheckpointError(f"{path}: 'model' is not a state dict")
    bad = [f"{k} missing" for k in mine if k not in theirs] + [f"{k} unexpected" for k in theirs if k not in mine]
    bad += [f"{k} has shape {tuple(theirs[k].shape)} there, {tuple(v.shape)} now" for k, v in mine.items()
            if isinstance(v, torch.Tensor) and isinstance(theirs.get(k), torch.Tensor) and theirs[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path} does not fit the model: {'; '.join(bad[:6])}"
                              + (f" (and {len(bad) - 6} more)" if len(bad) > 6 else ""))
