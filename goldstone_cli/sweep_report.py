"""The comparison report of a sweep, rebuilt at any time from its run folders.

``build_report(sweep_dir)`` writes, atomically:

- ``summary.csv``: one row per run: the settings that vary across the sweep, status, steps, wall
  time, final values of every metrics.csv column, the best checkpoint's metric, steps and
  optimization time to reach the sweep's target, gauge-step count, time and overhead;
- ``report.md``: per model, a table aggregated over seeds (mean +- standard deviation), the plots,
  the runs and, for runs that failed, the end of their logs;
- ``plots/<model>.png``: loss, psi and the model's held-out / target metric against training steps
  and against wall time, one line per method (median over seeds) with a min-max band.

The plan comes from ``sweep.json``; a folder of run folders without one (e.g. runs made with
``goldstone train run_dir=...``) also works: the settings that differ between the runs' config.yaml
files are then the varying settings, and runs that differ only in ``seed`` are one method.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from goldstone_cli.io import atomic_path, atomic_write_text

# metrics.csv columns that are not model metrics (train.py: BASE_COLUMNS, GAUGE_COLUMNS)
_BASE = ["step", "wall_time", "total", "local", "psi", "lr"]
_GAUGE = ["gauge_steps", "gauge_time", "psi_before_gauge", "psi_after_gauge", "gauge_max_angle"]
_IGNORED_SETTINGS = {"run_dir", "resume", "output_dir", "trainer.progress"}


@dataclass
class RunInfo:
    name: str
    folder: Path
    method: str
    settings: dict[str, str]
    status: str  # completed | target_reached | interrupted | diverged | failed | incomplete | pending
    model: str = "?"
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: Optional[pd.DataFrame] = None
    problem: str = ""  # a damaged metrics.csv / summary.json: what is wrong and how to fix it


@dataclass
class ReportPaths:
    sweep_dir: Path
    summary_csv: Path
    report_md: Path
    plots: list[Path]


# ----------------------------------------------------------------------------- collecting
def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        d = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return d if isinstance(d, dict) else None


def _status(folder: Path, summary: Optional[dict]) -> str:
    swept = _read_json(folder / "sweep_status.json") or {}
    if swept.get("outcome") == "failed":
        return "failed"
    if summary and summary.get("status"):
        return str(summary["status"])
    if (folder / "metrics.csv").exists() or (folder / "train.log").exists():
        return "incomplete"  # still running, killed, or crashed before its first summary
    return "pending"


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else str(v)
    return out


FINISHED = ("completed", "target_reached")  # runs whose numbers the tables aggregate


def _rerun_hint(folder: Path, sweep_dir: Optional[Path]) -> str:
    if sweep_dir is None:
        return "delete the run folder and re-invoke `goldstone sweep --dir` on the sweep to train it again"
    return f"delete the run folder {folder} and re-invoke `goldstone sweep --dir {sweep_dir}` to train it again"


def _resume_hint(sweep_dir: Optional[Path]) -> str:
    where = f"`goldstone sweep --dir {sweep_dir}`" if sweep_dir is not None else "`goldstone sweep --dir` on the sweep"
    return f"{where} resumes the run from its last checkpoint, which writes it again"


def _read_metrics(path: Path) -> tuple[Optional[pd.DataFrame], str, bool]:
    """(metrics, problem, partial): metrics.csv as numbers; ``problem`` says why it cannot be trusted
    (unreadable, text where numbers belong, no step column); ``partial``: its last line was cut off
    (a run killed while writing it, or a truncated copy) and is left out."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "", False
    except OSError as exc:
        return None, f"metrics.csv cannot be read ({exc.strerror or type(exc).__name__})", False
    partial = bool(raw) and not raw.endswith(b"\n")
    if partial:
        raw = raw[: raw.rfind(b"\n") + 1]
    import io

    try:
        df = pd.read_csv(io.BytesIO(raw))
    except pd.errors.EmptyDataError:
        return None, "", partial
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        return None, f"metrics.csv cannot be parsed ({_one_line(exc)})", partial
    if "step" not in df.columns:
        return None, "metrics.csv has no step column", partial
    for c in df.columns:
        if not pd.api.types.is_numeric_dtype(df[c]):
            num = pd.to_numeric(df[c], errors="coerce")
            bad = num.isna() & df[c].notna()
            if bad.any():
                row = int(bad.to_numpy().nonzero()[0][0])
                return None, f"metrics.csv has {str(df[c].iloc[row])[:20]!r} in column {c} (data row {row + 1})", partial
            df[c] = num
    if df["step"].isna().any() or not df["step"].is_monotonic_increasing:
        return None, "metrics.csv has missing or out-of-order steps", partial
    return (df if len(df) else None), "", partial


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:120]


def _load_run(folder: Path, name: str, method: str, settings: dict[str, str],
              sweep_dir: Optional[Path] = None) -> RunInfo:
    """A run folder read back; ``problem`` names a damaged metrics.csv / summary.json and the fix (with
    the commands for ``sweep_dir`` when given). A finished run with a damaged metrics.csv is ``damaged``."""
    summary = _read_json(folder / "summary.json")
    info = RunInfo(name, folder, method, settings, _status(folder, summary), summary=summary or {})
    if summary is None and (folder / "summary.json").exists():
        info.problem = f"summary.json cannot be read (damaged); {_resume_hint(sweep_dir)}"
    df, problem, partial = _read_metrics(folder / "metrics.csv")
    info.metrics = df
    if info.status in FINISHED and not problem:  # a finished run's metrics.csv ends where its summary.json does
        steps = summary.get("steps")
        final = (summary.get("final") or {}).get("total")
        last = df.iloc[-1] if df is not None else None
        if partial:
            problem = "the last line of metrics.csv is cut off"
        elif df is None:
            problem = "metrics.csv is missing or empty"
        elif isinstance(steps, int) and int(last["step"]) != steps:
            problem = f"metrics.csv ends at step {int(last['step'])}, summary.json at step {steps}"
        elif isinstance(final, (int, float)) and "total" in df and not math.isclose(
                float(last["total"]), float(final), rel_tol=1e-9, abs_tol=0.0) and math.isfinite(final):
            problem = f"the last loss in metrics.csv ({float(last['total']):.6g}) is not summary.json's ({final:.6g})"
    if problem:
        info.problem = f"{problem}; its numbers are left out: {_rerun_hint(folder, sweep_dir)}"
        if info.status in FINISHED:
            info.status = "damaged"
        info.metrics = None  # nothing half-read is trusted
    if summary and summary.get("model"):
        info.model = str(summary["model"])
    else:
        info.model = _config_value(folder, "model", "name") or "?"
    return info


def run_problem(folder: Path, sweep_dir: Optional[Path] = None) -> str:
    """What is wrong with a run folder's metrics.csv or summary.json and how to fix it, in one line, as
    the report says it (the run is then ``damaged`` or left out there); "" when nothing is."""
    return _load_run(Path(folder), Path(folder).name, "", {}, sweep_dir).problem


def _config_value(folder: Path, *keys: str) -> Optional[str]:
    import yaml

    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        for k in keys:
            cfg = cfg[k]
        return str(cfg)
    except (FileNotFoundError, KeyError, TypeError, yaml.YAMLError, UnicodeDecodeError):
        return None


def collect(sweep_dir: str | Path) -> tuple[list[RunInfo], dict[str, Any]]:
    """The runs of a sweep folder and its manifest (synthesized when there is no sweep.json)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a folder")
    if (sweep_dir / "sweep.json").exists():
        from goldstone_cli.sweep import read_manifest, run_folder

        manifest = read_manifest(sweep_dir)  # checked: types, and run names that stay inside sweep_dir
        runs = [_load_run(run_folder(sweep_dir, r["name"]), r["name"], r["method"], dict(r["settings"]), sweep_dir)
                for r in manifest["runs"]]
        return runs, manifest
    import yaml

    inside = sweep_dir.resolve()
    folders = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / "config.yaml").is_file()
                     and (not p.is_symlink() or p.resolve().is_relative_to(inside)))  # no links out of the folder
    if not folders:
        raise FileNotFoundError(f"{sweep_dir} holds neither sweep.json nor run folders with a config.yaml")
    def config_of(p: Path) -> dict:
        try:
            cfg = yaml.safe_load((p / "config.yaml").read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ValueError(f"{p / 'config.yaml'} is not valid YAML ({type(exc).__name__}); restore it or move "
                             "the run folder out of the way") from None
        return cfg if isinstance(cfg, dict) else {}

    flat = {p.name: _flatten(config_of(p)) for p in folders}
    keys = sorted({k for f in flat.values() for k in f} - _IGNORED_SETTINGS)
    varying = [k for k in keys if len({f.get(k) for f in flat.values()}) > 1]
    runs = []
    methods = _readable_methods(flat, varying)
    for p in folders:
        settings = {k: flat[p.name].get(k, "") for k in varying}
        runs.append(_load_run(p, p.name, methods[p.name], settings))
    manifest = {"name": sweep_dir.name, "description": "", "varying": varying, "seed_keys": ["seed"],
                "target": {"metric": None, "value": None, "mode": "min"}, "report": {"title": "", "metric": None},
                "grid": [], "fixed": [], "methods": {}, "runs": []}
    return runs, manifest


def _optimizer_label(flat: dict[str, str]) -> str:
    """What ran, in a few characters: ``gd``, ``adam``, ``goldstone-procrustes(gd)``."""
    name = flat.get("optimizer.name")
    if name is None:
        return "run"
    if name == "goldstone":
        return f"goldstone-{flat.get('optimizer.solver', '?')}({flat.get('optimizer.base', '?')})"
    return name


def _readable_methods(flat: dict[str, dict[str, str]], varying: list[str]) -> dict[str, str]:
    """Method names for a folder of plain runs: the optimizer label, plus the settings that tell apart
    runs with the same label and model (leaf names, ``lr=0.3``); the seed never makes a method."""
    base = {n: (f.get("model.name", ""), _optimizer_label(f)) for n, f in flat.items()}
    out = {}
    for key in dict.fromkeys(base.values()):
        names = [n for n in flat if base[n] == key]
        keys = [k for k in varying if k != "seed" and len({flat[n].get(k) for n in names}) > 1]
        leaves = [k.rsplit(".", 1)[-1] for k in keys]
        short = {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}
        for n in names:
            extra = ", ".join(f"{short[k]}={flat[n].get(k, '')}" for k in keys)
            out[n] = f"{key[1]} ({extra})" if extra else key[1]
    return out


# ----------------------------------------------------------------------------- per-run numbers
def _last(df: pd.DataFrame, col: str) -> float:
    s = df[col].dropna() if col in df else pd.Series(dtype=float)
    return float(s.iloc[-1]) if len(s) else math.nan


def _target_of(run: RunInfo, manifest: dict) -> tuple[Optional[str], Optional[float], str]:
    t = manifest.get("target") or {}
    metric = t.get("metric") or run.summary.get("target_metric")
    value = t.get("value")
    if value is None:
        value = run.summary.get("target")  # the run's own trainer.target
    return metric, (None if value is None else float(value)), t.get("mode") or "min"


def reach(df: pd.DataFrame, metric: str, value: float, mode: str = "min") -> tuple[float, float]:
    """(step, wall_time) of the first metrics row where ``metric`` reaches ``value``; NaN if never."""
    if metric not in df:
        return math.nan, math.nan
    s = df[["step", "wall_time", metric]].dropna(subset=[metric])
    hit = s[s[metric] <= value] if mode == "min" else s[s[metric] >= value]
    if hit.empty:
        return math.nan, math.nan
    return float(hit["step"].iloc[0]), float(hit["wall_time"].iloc[0])


def summary_frame(runs: list[RunInfo], manifest: dict) -> pd.DataFrame:
    """One row per run (the content of summary.csv)."""
    setting_keys = list(dict.fromkeys(k for r in runs for k in r.settings))
    metric_cols = list(dict.fromkeys(c for r in runs if r.metrics is not None
                                     for c in r.metrics.columns if c not in _BASE + _GAUGE))
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.name, "model": r.model, "method": r.method}
        row.update({k: r.settings.get(k, "") for k in setting_keys})
        row["status"] = r.status
        df = r.metrics
        row["steps"] = int(df["step"].iloc[-1]) if df is not None else math.nan
        row["wall_time"] = _last(df, "wall_time") if df is not None else math.nan
        for c in ["total", "local", "psi"] + metric_cols:
            row[f"final_{c}"] = _last(df, c) if df is not None else math.nan
        best = r.summary.get("best") or {}
        row["best_metric"] = best.get("metric", "")
        row["best_value"] = best.get("value", math.nan)
        row["best_step"] = best.get("step", math.nan)
        metric, value, mode = _target_of(r, manifest)
        row["target_metric"] = metric or ""
        row["target_value"] = value if value is not None else math.nan
        if df is not None and metric and value is not None:
            row["steps_to_target"], row["time_to_target"] = reach(df, metric, value, mode)
        else:
            row["steps_to_target"], row["time_to_target"] = math.nan, math.nan
        g_steps = r.summary.get("gauge_steps", _last(df, "gauge_steps") if df is not None else math.nan)
        g_time = r.summary.get("gauge_time", _last(df, "gauge_time") if df is not None else math.nan)
        row["gauge_steps"] = g_steps
        row["gauge_time"] = g_time
        wall = row["wall_time"]
        row["gauge_overhead"] = r.summary.get(
            "gauge_overhead", g_time / wall if isinstance(wall, float) and wall > 0 and not math.isnan(g_time) else math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- aggregation
def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{x:.{digits}g}"


PM_DIGITS = 8  # at most this many significant digits of a mean; a spread below them is written apart


def _pm(mean: float, spread: float, sig: int = 2) -> str:
    """``mean ± spread`` as measurements are written: the spread rounded to ``sig`` significant digits
    and the mean to the same decimal place (``12.000 ± 0.034``, not ``12 ± 0.034``); numbers below 1e-3
    or from 1e6 on share a power of ten (``(1.20 ± 0.34)e-07``), taken from the mean as rounded
    (``(1.00 ± 0.10)e-03``, not ``(10.0 ± 1.0)e-04``). A mean that would need more than ``PM_DIGITS``
    digits (seeds that agree to float rounding), or an exact 0 spread, gives the mean's ``PM_DIGITS``
    significant digits and the spread on its own (``12 ± 1.0e-15``, ``12.345678 ± 0``)."""
    if not (math.isfinite(mean) and math.isfinite(spread)) or spread < 0:
        return f"{_fmt(mean)} ± {_fmt(spread, sig)}"
    if spread == 0:
        return f"{_fmt(mean, PM_DIGITS)} ± 0"
    spread = float(f"{spread:.{sig - 1}e}")  # rounded first: 0.0996 -> 0.1 has its leading digit one place up
    lead = math.floor(math.log10(spread))
    decimals = sig - 1 - lead  # decimal places of the spread's last significant digit
    if mean and math.floor(math.log10(abs(mean))) + decimals + 1 > PM_DIGITS:
        return f"{_fmt(mean, PM_DIGITS)} ± {spread:.{sig - 1}e}"
    mean = round(mean, decimals)  # 9.96e-4 ± 1e-4 -> 1.00e-3: the power of ten is the rounded mean's
    top = max(lead, math.floor(math.log10(abs(mean))) if mean else lead)
    exp = top if top < -3 or top >= 6 else 0
    places = decimals + exp  # decimal places of the spread's last significant digit after / 10**exp

    def num(x: float) -> str:
        x = round(x / 10.0 ** exp, places)
        return f"{x + 0.0 if x else 0.0:.{max(places, 0)}f}"  # + 0.0: no "-0.0"

    return f"({num(mean)} ± {num(spread)})e{exp:+03d}" if exp else f"{num(mean)} ± {num(spread)}"


def _mean_std(values: pd.Series) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return "–"
    if len(v) == 1:
        return _fmt(float(v.iloc[0]))
    return _pm(float(v.mean()), float(v.std(ddof=1)))


def aggregate(df: pd.DataFrame, model: str, metric_cols: list[str]) -> pd.DataFrame:
    """Per method of one model: runs, status counts, mean ± std over its finished runs (seeds) of the
    main numbers. Runs that did not finish (interrupted, failed, incomplete, damaged) are counted in
    ``status`` only: their last values are from another step than the others'. "reached target" is
    out of the finished and diverged runs (a diverged run is an outcome of its method)."""
    sub = df[df["model"] == model]
    out = []
    for method, g_all in sub.groupby("method", sort=False):
        statuses = g_all["status"].value_counts()
        row = {"method": method, "runs": len(g_all), "status": ", ".join(f"{n} {s}" for s, n in statuses.items())}
        g = g_all[g_all["status"].isin(FINISHED)]
        judged = g_all[g_all["status"].isin(FINISHED + ("diverged",))]
        for c in ["final_total", "final_psi"] + [f"final_{m}" for m in metric_cols]:
            if c in g and g[c].notna().any():
                row[c.replace("final_", "final ")] = _mean_std(g[c])
        if g["best_metric"].astype(str).str.len().gt(0).any():
            row[f"best {g['best_metric'].iloc[0]}"] = _mean_std(g["best_value"])
        if g_all["target_value"].notna().any():
            reached = int(judged["steps_to_target"].notna().sum())
            row["reached target"] = f"{reached}/{len(judged)}" if len(judged) else "–"
            row["steps to target"] = _mean_std(judged["steps_to_target"])
            row["time to target (s)"] = _mean_std(judged["time_to_target"])
        row["steps"] = _mean_std(g["steps"])
        row["optimization time (s)"] = _mean_std(g["wall_time"])  # metrics.csv wall_time: training steps only
        if g["gauge_overhead"].notna().any():
            row["gauge overhead"] = _mean_std(g["gauge_overhead"])
        out.append(row)
    return pd.DataFrame(out)


def _markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        cells = ["–" if (isinstance(r[c], float) and math.isnan(r[c])) else str(r[c]).replace("|", "\\|") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve_by_step(runs: list[RunInfo], col: str) -> Optional[pd.DataFrame]:
    """Steps x runs table of ``col`` (NaN where a run has no value at that step)."""
    series = {}
    for r in runs:
        if r.metrics is None or col not in r.metrics:
            continue
        s = r.metrics[["step", col]].dropna().drop_duplicates("step").set_index("step")[col]
        if len(s):
            series[r.name] = s
    return pd.DataFrame(series).sort_index() if series else None


def _curve_by_time(runs: list[RunInfo], col: str, log: bool, n: int = 300) -> Optional[pd.DataFrame]:
    """Wall-time grid x runs: each run interpolated (in log10 for log-scale metrics) inside its
    own time range, NaN outside."""
    data = []
    for r in runs:
        if r.metrics is None or col not in r.metrics:
            continue
        d = r.metrics[["wall_time", col]].dropna()
        if log:
            d = d[d[col] > 0]
        if len(d) >= 1:
            data.append((r.name, d["wall_time"].to_numpy(), d[col].to_numpy()))
    if not data:
        return None
    t_max = max(t[-1] for _, t, _ in data)
    grid = np.linspace(0.0, t_max, n)  # (n,)
    out = {}
    for name, t, y in data:
        yy = np.log10(y) if log else y
        v = np.interp(grid, t, yy, left=np.nan, right=np.nan)
        out[name] = 10.0 ** v if log else v
    return pd.DataFrame(out, index=grid)


def _positive(runs: list[RunInfo], col: str) -> bool:
    vals = [r.metrics[col].dropna() for r in runs if r.metrics is not None and col in r.metrics]
    vals = [v for v in vals if len(v)]
    return bool(vals) and all((v > 0).mean() > 0.9 for v in vals)


def plot_model(runs: list[RunInfo], panels: list[tuple[str, str]], out_png: Path, title: str,
               target: Optional[tuple[str, float]] = None) -> Path:
    """A 2 x len(panels) figure: each (column, label) against steps (top) and wall time (bottom);
    one color per method: median over its runs, band from min to max."""
    plt = _plt()
    methods = list(dict.fromkeys(r.method for r in runs))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ncol = len(panels)
    fig, axes = plt.subplots(2, ncol, figsize=(5.2 * ncol, 8.0), squeeze=False)
    for j, (col, label) in enumerate(panels):
        log = _positive(runs, col)
        for i, method in enumerate(methods):
            mruns = [r for r in runs if r.method == method]
            color = colors[i % len(colors)]
            for row, table in ((0, _curve_by_step(mruns, col)), (1, _curve_by_time(mruns, col, log))):
                if table is None:
                    continue
                if log:
                    table = table.where(table > 0)
                med, lo, hi = table.median(axis=1), table.min(axis=1), table.max(axis=1)
                ok = table.notna().all(axis=1)  # where every run has a value: no jumps where one ends
                if not ok.any():
                    continue
                ax = axes[row][j]
                ax.plot(med.index[ok], med[ok], color=color, lw=1.6,
                        label=f"{method} ({table.shape[1]} run{'s' if table.shape[1] != 1 else ''})")
                if table.shape[1] > 1:
                    ax.fill_between(med.index[ok], lo[ok], hi[ok], color=color, alpha=0.2, lw=0)
        for row, xlabel in ((0, "training step"), (1, "wall time (s, optimization only)")):
            ax = axes[row][j]
            if log:
                ax.set_yscale("log")
            if target is not None and target[0] == col:
                ax.axhline(target[1], color="k", ls="--", lw=1, label=f"target: {col} = {target[1]:g}")
                ax.annotate(f"target {target[1]:g}", xy=(0.99, target[1]), xycoords=("axes fraction", "data"),
                            ha="right", va="bottom", fontsize=8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"{label} vs {'steps' if row == 0 else 'time'}", fontsize=10)
    # one legend for the figure, below the panels (inside a panel it covered the curves)
    handles, labels = {}, []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    ncol = max(1, min(len(labels), 3 if max((len(x) for x in labels), default=0) < 45 else 1))
    nrows = -(-len(labels) // ncol)
    bottom = min(0.4, (0.15 + 0.22 * nrows) / fig.get_figheight())  # legend height as a fraction of the figure
    if labels:
        fig.legend([handles[x] for x in labels], labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle(f"{title}\nline: median over seeds, band: min–max over seeds (drawn while every run has data)",
                 fontsize=11)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_png


def _guess_models(runs: list[RunInfo]) -> None:
    """A run not started yet (no config.yaml) belongs to its method's model, or to the sweep's one
    model: not to a table of its own under model '?'."""
    known = {r.method: r.model for r in runs if r.model != "?"}
    models = set(known.values())
    for r in runs:
        if r.model == "?":
            r.model = known.get(r.method) or (next(iter(models)) if len(models) == 1 else "?")


def _plotted(runs: list[RunInfo]) -> list[RunInfo]:
    """The runs a model's plot draws: per method its finished and diverged runs, or, when it has
    none, its unfinished ones under the label ``METHOD (unfinished)``."""
    import dataclasses

    out = []
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method and r.metrics is not None]
        done = [r for r in mine if r.status in FINISHED + ("diverged",)]
        out += done or [dataclasses.replace(r, method=f"{method} (unfinished)") for r in mine]
    return out


def _held_out_metric(runs: list[RunInfo], manifest: dict) -> Optional[str]:
    wanted = (manifest.get("report") or {}).get("metric")
    candidates = [wanted] if wanted else []
    candidates += [r.summary.get("target_metric") for r in runs] + [(r.summary.get("best") or {}).get("metric") for r in runs]
    candidates += [c for r in runs if r.metrics is not None for c in r.metrics.columns if c not in _BASE + _GAUGE]
    for c in candidates:
        if c and any(r.metrics is not None and c in r.metrics and r.metrics[c].notna().any() for r in runs):
            return c
    return None


# ----------------------------------------------------------------------------- the report
def build_report(sweep_dir: str | Path) -> ReportPaths:
    """Write summary.csv, report.md and plots/*.png for a sweep folder; return their paths."""
    sweep_dir = Path(sweep_dir)
    runs, manifest = collect(sweep_dir)
    _guess_models(runs)
    df = summary_frame(runs, manifest)
    summary_csv = sweep_dir / "summary.csv"
    with atomic_path(summary_csv, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False)

    title = (manifest.get("report") or {}).get("title") or f"Sweep {manifest.get('name', sweep_dir.name)}"
    lines = [f"# {title}", ""]
    from goldstone_cli.sweep import describe, run_counts, seed_count

    seed_keys = list(manifest.get("seed_keys") or ["seed"])
    planned = [(r.method, r.settings) for r in runs]
    if manifest.get("description"):  # its seed count the runs' (a sweep.json of an older version kept the file's)
        lines += [describe(manifest["description"], seed_count(planned, seed_keys), manifest.get("description_seeds")),
                  ""]
    counts = df["status"].value_counts()
    lines += [f"Sweep folder: `{sweep_dir}`" + (f", planned {manifest['created']}" if manifest.get("created") else ""),
              f"Runs: {run_counts(planned, seed_keys)}: {', '.join(f'{n} {s}' for s, n in counts.items())}. "
              "One row per run with every number: [summary.csv](summary.csv).", ""]
    if manifest.get("grid") or manifest.get("fixed") or manifest.get("methods"):
        lines.append("Plan:")
        for label, ovs in (manifest.get("methods") or {}).items():
            lines.append(f"- method `{label}`: `{' '.join(ovs)}`")
        if manifest.get("grid"):
            lines.append(f"- grid: `{' '.join(manifest['grid'])}`")
        if manifest.get("command_line"):
            lines.append(f"- from the command line: `{' '.join(manifest['command_line'])}`")
        if manifest.get("fixed"):
            lines.append(f"- every run: `{' '.join(manifest['fixed'])}`")
        lines.append("")
    t = manifest.get("target") or {}
    if t.get("value") is not None:
        op = "<=" if t.get("mode", "min") == "min" else ">="
        lines += [f"Target: {t.get('metric') or 'the model target metric'} {op} {t['value']:g}; steps and "
                  "optimization time (training steps only, without logging and evaluation) until the first "
                  "evaluation that reaches it.", ""]
        if t.get("metric") and not any(r.metrics is not None and t["metric"] in r.metrics for r in runs):
            lines[-2] += f" No run reports a metric `{t['metric']}` (metrics.csv), so none reaches the target."
    lines += ["Tables: mean ± standard deviation over the finished runs of each method (seeds); runs that "
              "did not finish are counted in `status` only. Plots: median over seeds, band from the minimum to "
              "the maximum, of the finished and diverged runs (a method none of whose runs finished is drawn "
              "from its unfinished runs, marked so).", ""]

    plots = []
    for model in dict.fromkeys(df["model"]):
        mruns = [r for r in runs if r.model == model]
        metric_cols = list(dict.fromkeys(c for r in mruns if r.metrics is not None
                                         for c in r.metrics.columns if c not in _BASE + _GAUGE))
        lines += [f"## Model `{model}`", ""]
        agg = aggregate(df, model, metric_cols)
        lines += [_markdown(agg), ""]
        held = _held_out_metric(mruns, manifest)
        panels = [("total", "loss L (total)"), ("psi", "psi (coupling)")]
        if held and held not in ("total", "psi"):
            panels.append((held, held))
        target = None
        if t.get("value") is not None:
            tm = t.get("metric") or held
            if tm:
                target = (tm, float(t["value"]))
        else:  # plain runs: their own trainer.target, when they share one
            own = {(r.summary.get("target_metric"), r.summary.get("target")) for r in mruns if r.summary}
            if len(own) == 1 and None not in next(iter(own)):
                tm, tv = next(iter(own))
                target = (tm, float(tv))
                if tm not in [c for c, _ in panels]:
                    panels.append((tm, tm))
        if any(r.metrics is not None for r in mruns):
            png = plot_model(_plotted(mruns), panels, sweep_dir / "plots" / f"{model}.png", f"{title} — {model}", target)
            plots.append(png)
            lines += [f"![{model}: loss, psi and {held or 'metrics'} against steps and wall time](plots/{png.name})", ""]

    show = ["run", "method"] + [k for k in (manifest.get("seed_keys") or ["seed"]) if k in df] + ["status", "steps"]
    show += [c for c in df.columns if c.startswith("final_") and c not in ("final_local",)]
    show += [c for c in ("steps_to_target", "time_to_target", "gauge_overhead") if df[c].notna().any()]
    runs_tab = df[show].copy()
    for c in runs_tab.columns:
        if c not in ("run", "method", "status"):
            runs_tab[c] = runs_tab[c].map(lambda x: _fmt(x) if isinstance(x, (float, int, np.number)) else x)
    runs_tab["run"] = [f"[{n}]({n}/)" for n in runs_tab["run"]]
    lines += ["## Runs", "", _markdown(runs_tab), ""]

    bad = [r for r in runs if r.status in ("failed", "diverged", "incomplete", "interrupted", "damaged") or r.problem]
    if bad:
        lines += ["## Runs that did not finish", ""]
        for r in bad:
            msg = "; ".join(m for m in (r.summary.get("message") or "", r.problem) if m)
            log = f" (log: [{r.name}/train.log]({r.name}/train.log))" if (r.folder / "train.log").is_file() else ""
            lines += [f"- `{r.name}`: {r.status}" + (f" — {msg}" if msg else "") + log]  # a plain run has no train.log
            tail = _tail(r.folder / "train.log")
            if tail and r.status in ("failed", "diverged"):
                lines += ["", "  ```", *("  " + ln for ln in tail), "  ```"]
        lines.append("")
    lines.append(f"Rebuild this report at any time with `goldstone report {sweep_dir}`.")
    report_md = sweep_dir / "report.md"
    atomic_write_text(report_md, "\n".join(lines) + "\n")
    return ReportPaths(sweep_dir, summary_csv, report_md, plots)


def _tail(path: Path, n: int = 8) -> list[str]:
    try:
        return path.read_text(errors="replace").rstrip().splitlines()[-n:]
    except FileNotFoundError:
        return []
