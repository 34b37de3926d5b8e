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
from goldstone_cli import sweep as sweep_mod
from goldstone_cli.sweep import MANIFEST, prepare, run_sweep
from goldstone_cli.sweep_report import _fmt, _mean_std, build_report

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
    assert _table_row(report, "gd")["final total"] == "2.4 ± 1.6"  # 2.444 ± 1.588: the mean to the spread's digits
    assert (round(mean, 1), round(std, 1)) == (2.4, 1.6)
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
    mean = np.mean([1.0 + s for s in range(3)]) * (1 + 1 / 21)
    assert _table_row(report, "gd")["final total"] == f"{mean:.1f} ± {1 + 1 / 21:.1f}" == "2.1 ± 1.0"


def test_a_mean_shows_the_decimal_places_of_its_spread():
    """The spread is rounded to 2 significant digits and the mean to the same decimal place: "12 ± 0.034"
    hid the mean's digits that the spread says are known."""
    def ms(*values):
        return _mean_std(pd.Series(values))

    assert ms(11.966, 12.0, 12.034) == "12.000 ± 0.034"
    assert ms(0.9, 1.1) == "1.00 ± 0.14"
    assert ms(1234.5, 1234.6) == "1234.550 ± 0.071"
    assert ms(3000, 4000) == "3500 ± 710"  # a spread of 707: the mean to tens
    assert ms(5000, 5000, 5000) == "5000 ± 0" and ms(0.25) == "0.25" and ms() == "–"
    assert ms(1.0e-7, 1.4e-7) == "(1.20 ± 0.28)e-07"  # tiny or huge numbers share a power of ten
    assert ms(-0.7, -0.5) == "-0.60 ± 0.14"


def test_a_mean_and_spread_stay_short_and_share_the_rounded_means_power_of_ten():
    from goldstone_cli.sweep_report import _pm

    assert _pm(9.96e-6, 1e-6) == "(1.00 ± 0.10)e-05"  # the power of ten of the rounded mean: not (10.0 ± 1.0)e-06
    assert _pm(-9.96e-6, 1e-6) == "(-1.00 ± 0.10)e-05" and _pm(9.99996e6, 1e3) == "(1.00000 ± 0.00010)e+07"
    assert _pm(12.0, 1e-15) == "12 ± 1.0e-15"  # seeds that agree to rounding: not 17 decimal places
    assert _pm(12.0, 5e-324) == "12 ± 4.9e-324"  # the smallest float: it printed 330 characters
    assert _pm(12.3456789, 0.0) == "12.345679 ± 0"  # a zero spread: the mean's 8 digits, not 4
    assert _pm(999999.7, 0.3) == "999999.70 ± 0.30"  # 8 digits still in the plain form


# ----------------------------------------------------------------------------- damaged runs, while the sweep runs
class _FakeTrain:
    """``goldstone train`` as run_local starts it, without training: writes the run's metrics.csv and
    summary.json (``damage`` of the run folder's name: "metrics" cuts its last line, "summary" cuts summary.json)."""

    damage: dict[str, str] = {}

    def __init__(self, cmd, **_):
        folder = Path(next(a for a in cmd if a.startswith("run_dir=")).split("=", 1)[1].strip("'"))
        (folder / "metrics.csv").write_text(COLUMNS + _rows(20, 1.0))
        atomic_write_json(folder / "summary.json", {"status": "completed", "model": "dense_mf", "steps": 20,
                                                    "final": {"total": 1 + 1 / 21}})
        what = self.damage.get(folder.name)
        if what == "metrics":
            text = (folder / "metrics.csv").read_text()
            (folder / "metrics.csv").write_text(text[:-9])  # the last line cut mid-number
        elif what == "summary":
            (folder / "summary.json").write_text('{"status": "compl')

    def poll(self):
        return 0

    def send_signal(self, sig):
        pass


def test_the_sweep_warns_of_a_damaged_run_when_it_finishes_and_when_it_is_skipped(in_tmp, monkeypatch, capsys):
    monkeypatch.setattr(sweep_mod.subprocess, "Popen", _FakeTrain)
    monkeypatch.setattr(_FakeTrain, "damage", {"seed-1": "metrics", "seed-2": "summary"})
    d = in_tmp / "sw"
    lines: list[str] = []
    res = run_sweep(["optimizer=adam", "seed=0,1,2", "trainer.steps=20", "trainer.device=cpu"], sweep_dir=d,
                    jobs=1, progress=False, echo=lines.append)
    out = capsys.readouterr().out.splitlines()  # run_local writes with tqdm.write
    warned = [ln for ln in out + lines if ln.startswith("warning: run ")]
    assert len(warned) == 2, out + lines
    cut = next(ln for ln in warned if ln.startswith("warning: run seed-1 "))
    assert str(d / "seed-1") in cut and "last line of metrics.csv is cut off" in cut, cut
    assert f"delete the run folder {d / 'seed-1'}" in cut and f"goldstone sweep --dir {d}" in cut, cut
    bad = next(ln for ln in warned if ln.startswith("warning: run seed-2 "))
    assert "summary.json cannot be read" in bad and f"goldstone sweep --dir {d}" in bad, bad
    assert res.outcomes == {"seed-0": "done", "seed-1": "done", "seed-2": "failed"}, res.outcomes
    # continued: the finished but damaged run is skipped, and said so again; seed-2 trains again, now fine
    monkeypatch.setattr(_FakeTrain, "damage", {})
    lines.clear()
    res = run_sweep([], sweep_dir=d, progress=False, echo=lines.append)
    warned = [ln for ln in capsys.readouterr().out.splitlines() + lines if ln.startswith("warning: run ")]
    assert res.outcomes == {"seed-0": "skipped", "seed-1": "skipped", "seed-2": "done"}, res.outcomes
    assert len(warned) == 1 and warned[0] == cut, warned
    assert "- `seed-1`: damaged" in (d / "report.md").read_text()  # the report's check, the same words
