"""`goldstone report` on run folders written by hand (no training): the tables aggregate the finished
runs only, their numbers equal the runs' metrics.csv (mean and standard deviation computed here by
hand), and a damaged metrics.csv or summary.json in one run is named, left out, and breaks nothing."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from goldstone_cli.cli import app
from goldstone_cli.io import atomic_write_json
from goldstone_cli.sweep import MANIFEST, prepare
from goldstone_cli.sweep_report import _fmt, build_report

runner = CliRunner()
COLUMNS = "step,wall_time,total,local,psi,lr\n"


def _rows(last_step: int, scale: float) -> str:
    """metrics.csv rows every 5 steps up to ``last_step``: total = scale * (1 + 1/(step+1))."""
    out = []
    for step in range(0, last_step + 1, 5):
        total = scale * (1 + 1 / (step + 1))
        out.append(f"{step},{0.01 * step:.6f},{total!r},{0.9 * total!r},{0.1 * total!r},0.1\n")
    return "".join(out)


def _run(folder: Path, status: str, last_step: int, scale: float, steps: int | None = None) -> float:
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(COLUMNS + _rows(last_step, scale))
    final = scale * (1 + 1 / (last_step + 1))
    atomic_write_json(folder / "summary.json", {"status": status, "model": "dense_mf", "steps": steps or last_step,
                                                "final": {"total": final}})
    (folder / "train.log").write_text("log\n")
    return final


def _sweep(tmp: Path) -> Path:
    plan, _, _, _ = prepare(["optimizer=adam,gd", "seed=0,1,2", "trainer.steps=20"])
    d = tmp / "sw"
    d.mkdir()
    atomic_write_json(d / MANIFEST, plan.manifest())
    return d


def _table_row(report: str, method: str) -> dict[str, str]:
    lines = [ln for ln in report.splitlines() if ln.startswith("| method |")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    row = next(ln for ln in report.splitlines() if ln.startswith(f"| {method} |"))
    return dict(zip(head, [c.strip() for c in row.strip("|").split("|")]))


def test_the_tables_aggregate_finished_runs_and_damaged_ones_are_named_and_left_out(in_tmp):
    d = _sweep(in_tmp)
    gd = [_run(d / f"optimizer-gd__seed-{s}", "completed", 20, scale) for s, scale in enumerate((1.0, 2.0, 4.0))]
    adam0 = _run(d / "optimizer-adam__seed-0", "completed", 20, 3.0)
    _run(d / "optimizer-adam__seed-1", "completed", 20, 5.0)
    cut = (d / "optimizer-adam__seed-1" / "metrics.csv").read_text()
    (d / "optimizer-adam__seed-1" / "metrics.csv").write_text(cut[: len(cut) - 9])  # last line cut mid-number
    _run(d / "optimizer-adam__seed-2", "interrupted", 10, 7.0)  # stopped at step 10: not a final value

    paths = build_report(d)
    summary = pd.read_csv(paths.summary_csv).set_index("run")
    report = paths.report_md.read_text()
    # the numbers of a finished run are its metrics.csv's last row
    m = pd.read_csv(d / "optimizer-gd__seed-2" / "metrics.csv")
    assert summary.loc["optimizer-gd__seed-2", "final_total"] == m["total"].iloc[-1] == gd[2]
    # gd: mean ± std (ddof 1) over its three seeds, by hand
    mean = sum(gd) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in gd) / 2)
    assert _table_row(report, "gd")["final total"] == f"{_fmt(mean)} ± {_fmt(std, 2)}"
    # adam: only its one finished run (the cut-off one is damaged, the interrupted one at step 10)
    row = _table_row(report, "adam")
    assert row["final total"] == _fmt(adam0) and row["steps"] == "20", row
    assert "1 damaged" in row["status"] and "1 interrupted" in row["status"], row
    assert summary.loc["optimizer-adam__seed-1", "status"] == "damaged"
    assert math.isnan(summary.loc["optimizer-adam__seed-1", "final_total"])  # the cut-off number is not used
    line = next(ln for ln in report.splitlines() if ln.startswith("- `optimizer-adam__seed-1`"))
    assert "cut off" in line and "delete the run folder" in line and "goldstone sweep --dir" in line, line
    # the plot draws the finished runs: a run's last line cut off is not plotted either
    assert paths.plots and paths.plots[0].is_file()


def test_other_damage_to_one_run_is_named_and_the_rest_of_the_report_stands(in_tmp):
    d = _sweep(in_tmp)
    for s in range(3):
        _run(d / f"optimizer-gd__seed-{s}", "completed", 20, 1.0 + s)
    _run(d / "optimizer-adam__seed-0", "completed", 20, 3.0, steps=40)  # metrics.csv ends before the run did
    _run(d / "optimizer-adam__seed-1", "completed", 20, 3.0)
    p = d / "optimizer-adam__seed-1" / "metrics.csv"
    p.write_text(p.read_text().replace("\n10,", "\nten,", 1))  # text where a number belongs
    _run(d / "optimizer-adam__seed-2", "completed", 20, 3.0)
    (d / "optimizer-adam__seed-2" / "summary.json").write_text('{"status": "compl')  # cut off

    res = runner.invoke(app, ["report", str(d)])
    assert res.exit_code == 0, res.output
    summary = pd.read_csv(d / "summary.csv").set_index("run")
    report = (d / "report.md").read_text()
    assert summary.loc["optimizer-adam__seed-0", "status"] == "damaged"
    assert summary.loc["optimizer-adam__seed-1", "status"] == "damaged"
    assert summary.loc["optimizer-adam__seed-2", "status"] == "incomplete"
    lines = {ln.split("`")[1]: ln for ln in report.splitlines() if ln.startswith("- `optimizer-adam")}
    assert "ends at step 20, summary.json at step 40" in lines["optimizer-adam__seed-0"]
    assert "'ten' in column step" in lines["optimizer-adam__seed-1"]
    assert "summary.json cannot be read" in lines["optimizer-adam__seed-2"]
    assert _table_row(report, "adam")["final total"] == "–"  # no finished adam run left
    assert summary.loc[[f"optimizer-gd__seed-{s}" for s in range(3)], "status"].eq("completed").all()
    assert _table_row(report, "gd")["final total"].startswith(_fmt(np.mean([1.0 + s for s in range(3)]) * (1 + 1 / 21)))
