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
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from goldstone_cli import checkpoint as ckpt
from goldstone_cli.config import ConfigError, choice, run_names, to_yaml
from goldstone_cli.io import atomic_path, atomic_write_json, atomic_write_text
from goldstone_cli.models import build_model
from goldstone_cli.optim.factory import build_optimizer

BASE_COLUMNS = ["step", "wall_time", "total", "local", "psi", "lr"]
GAUGE_COLUMNS = ["gauge_steps", "gauge_time", "psi_before_gauge", "psi_after_gauge", "gauge_max_angle"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class RunResult:
    run_dir: Path
    status: str  # completed | target_reached | interrupted | diverged
    summary: dict[str, Any]


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
    if cfg.run_dir:
        path = Path(cfg.run_dir)
        if (path / "metrics.csv").exists():
            raise ConfigError(f"run_dir={path} already holds a run; continue it with resume={path} or pick another folder")
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


class MetricsWriter:
    """Appends rows to ``metrics.csv`` with a header fixed at the start of the run."""

    def __init__(self, path: Path, columns: list[str], resume_from_step: Optional[int] = None):
        self.path, self.columns = path, columns
        if resume_from_step is not None and path.exists():
            self._truncate(resume_from_step)
        new = not path.exists()
        self._f = open(path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=columns, extrasaction="ignore")
        if new:
            self._w.writeheader()
            self._f.flush()

    def _truncate(self, step: int) -> None:
        """Keep the rows before ``step`` (those after the checkpoint are recomputed)."""
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        header, body = rows[0], rows[1:]
        if header != self.columns:
            raise ValueError(f"{self.path} has columns {header}, expected {self.columns}; cannot resume into it")
        keep = [r for r in body if r and int(float(r[0])) < step]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(keep)

    def write(self, row: dict[str, Any]) -> None:
        self._w.writerow({k: ("" if v is None else v) for k, v in row.items()})
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class _Interrupt:
    """First Ctrl-C: finish the current step, checkpoint, exit cleanly. Second: stop at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: no handler, Ctrl-C raises as usual
            self._old = None
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Interrupt received: finishing this step and saving a checkpoint (Ctrl-C again to abort)...")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# ----------------------------------------------------------------------------- main entry
def train(cfg: DictConfig, run_dir: Optional[Path] = None) -> RunResult:
    """Run (or, with ``run_dir`` holding a checkpoint, continue) the training that ``cfg`` describes."""
    tc = cfg.trainer
    device = resolve_device(choice(tc.device))
    dtype = resolve_dtype(choice(tc.dtype))
    resuming = run_dir is not None and (Path(run_dir) / "checkpoints" / ckpt.LAST).exists()

    # data, model and optimizer first: a missing data set or a bad setting leaves no run folder behind
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device, dtype)
    optimizer, scheduler = build_optimizer(cfg.optimizer, model)

    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    has_gauge = hasattr(optimizer, "gauge_step")
    columns = BASE_COLUMNS + model.metric_names() + (GAUGE_COLUMNS if has_gauge else [])

    start, wall, best, target_step = 0, 0.0, None, None
    if resuming:
        state = ckpt.load(run_dir / "checkpoints" / ckpt.LAST, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"].cpu())
        start, wall, best = state["step"], state["wall_time"], state.get("best")
        target_step = state.get("target_step")
        tqdm.write(f"Resuming {run_dir} from step {start}")
    metrics = MetricsWriter(run_dir / "metrics.csv", columns, resume_from_step=start if resuming else None)
    gauge_log = _GaugeLog(run_dir / "gauge.csv", start if resuming else None) if has_gauge else None

    def state_at(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "wall_time": wall,
            "best": best,
            "target_step": target_step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }

    status, message, last_row = "completed", "", {}
    steps = int(tc.steps)
    target = tc.target
    snapshots: dict[int, Any] = _load_snapshots(run_dir) if resuming else {}
    snapshot_steps = _snapshot_steps(steps)
    names = run_names(cfg)
    pbar = tqdm(total=steps, initial=start, desc=f"{names['model']}/{names['name']}", unit="step",
                disable=not tc.progress, dynamic_ncols=True)
    try:
        with _Interrupt() as interrupt:
            step = start
            while True:
                if interrupt.requested:
                    ckpt.save(run_dir / "checkpoints" / ckpt.LAST, state_at(step))
                    status = "interrupted"
                    message = f"interrupted at step {step}; continue with: goldstone train resume={run_dir}"
                    break
                if step % tc.checkpoint_every == 0 and step != start:
                    ckpt.save(run_dir / "checkpoints" / ckpt.LAST, state_at(step))
                final = step >= steps
                t0 = time.perf_counter()
                if final:
                    with torch.no_grad():
                        terms = model.loss_terms(generator)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    terms = model.loss_terms(generator)
                total = terms["total"].item()
                wall += time.perf_counter() - t0
                if not math.isfinite(total):
                    status = "diverged"
                    message = (f"the loss became {total} at step {step}; the last good checkpoint is "
                               f"{run_dir / 'checkpoints' / ckpt.LAST} (lower optimizer.lr, or set optimizer.clip)")
                    break
                lr = optimizer.param_groups[0]["lr"]

                # log and evaluate theta_s (before this iteration's update)
                if step in snapshot_steps or final:
                    snap = model.snapshot()
                    if snap is not None:
                        snapshots[step] = snap
                if step % tc.log_every == 0 or step % tc.eval_every == 0 or final:
                    row = {"step": step, "wall_time": round(wall, 6), "total": total,
                           "local": terms["local"].item(), "psi": terms["psi"].item(), "lr": lr}
                    if step % tc.eval_every == 0 or final:
                        model.eval()
                        evals = model.evaluate()
                        model.train()
                        row.update(evals)
                        best = _update_best(model, evals, best, step, run_dir)
                        if target is not None and target_step is None and _reached(model, evals, target):
                            target_step = step
                    if has_gauge:
                        row.update(_gauge_row(optimizer))
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
                if cfg.optimizer.clip is not None:
                    torch.nn.utils.clip_grad_value_(model.parameters(), cfg.optimizer.clip)
                n_gauge = getattr(optimizer, "num_gauge_steps", 0)
                optimizer.step()
                scheduler.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                wall += time.perf_counter() - t0
                if gauge_log is not None and optimizer.num_gauge_steps != n_gauge:
                    gauge_log.write(optimizer.last_gauge)
                del terms
                step += 1
                pbar.update(1)
            if status in ("completed", "target_reached"):
                ckpt.save(run_dir / "checkpoints" / ckpt.LAST, state_at(step))
    finally:
        pbar.close()
        metrics.close()
        if gauge_log is not None:
            gauge_log.close()
        if snapshots:
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
    if has_gauge:
        summary["gauge_steps"] = int(optimizer.num_gauge_steps)
        summary["gauge_time"] = float(optimizer.gauge_seconds)
        summary["gauge_overhead"] = float(optimizer.gauge_seconds / wall) if wall > 0 else None
    atomic_write_json(run_dir / "summary.json", summary)
    try:
        from goldstone_cli.report import plot_losses

        title = f"{names['model']} / {names['name']}" + (f" ({names['method']})" if names["method"] != names["name"] else "")
        plot_losses(run_dir / "metrics.csv", run_dir / "loss.png", title=title)
    except Exception as exc:  # a plot must never lose a finished run
        tqdm.write(f"warning: could not draw loss.png: {exc}")
    if status == "diverged":
        raise TrainingDiverged(message)
    return RunResult(run_dir, status, summary)


# ----------------------------------------------------------------------------- small pieces
def _reached(model, evals: dict[str, float], target: float) -> bool:
    name = model.target_metric
    if name is None or name not in evals:
        return False
    v = evals[name]
    return v <= target if model.target_lower_is_better else v >= target


def _update_best(model, evals: dict[str, float], best, step: int, run_dir: Path):
    name = model.best_metric
    if name is None or name not in evals or not math.isfinite(evals[name]):
        return best
    v = evals[name]
    better = best is None or (v < best["value"] if model.best_lower_is_better else v > best["value"])
    if better:
        best = {"metric": name, "value": v, "step": step}
        ckpt.save(run_dir / "checkpoints" / ckpt.BEST, {"step": step, "metric": name, "value": v,
                                                         "model": model.state_dict()})
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
    the natural solver also the reflection walls it flipped and the halvings of its step)."""

    COLUMNS = ["step", "psi_before", "psi_after", "max_angle", "seconds", "flips", "backtracks"]

    def __init__(self, path: Path, resume_from_step: Optional[int]):
        self._w = MetricsWriter(path, self.COLUMNS, resume_from_step=resume_from_step)

    def write(self, diag: Optional[dict[str, Any]]) -> None:
        if diag:
            self._w.write({k: diag.get(k) for k in self.COLUMNS})

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
    with atomic_path(run_dir / "snapshots.pt") as tmp:
        torch.save(snapshots, tmp)


def _load_snapshots(run_dir: Path) -> dict[int, Any]:
    path = run_dir / "snapshots.pt"
    return torch.load(path, weights_only=False) if path.exists() else {}
