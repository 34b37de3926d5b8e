"""bench/dwe_kernels.py runs every kernel pair and records them (a smoke run, one repeat)."""

import json
import shutil
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from bench import dwe_kernels  # noqa: E402


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the native loops are not built")
def test_dwe_kernels_benchmark_runs_and_writes_its_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dwe_kernels, "RESULTS", tmp_path)
    out = dwe_kernels.main(["--repeats", "1"])
    assert set(out["kernels"]) == {"logits", "chain_fwd", "chain_bwd", "block"}
    for row in out["kernels"].values():
        assert row["numbers"] > 0 and row["ms"]["c"] > 0 and row["ms"]["torch"] > 0
    assert json.loads((tmp_path / "dwe_kernels-1t.json").read_text())["kernels"].keys() == out["kernels"].keys()
    assert "speed-up" in capsys.readouterr().out
