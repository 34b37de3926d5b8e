"""The command line (and the benchmarks) set OpenMP's passive wait policy before torch loads,
unless the user chose a policy; importing the package alone changes nothing."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _policy(code: str, **env) -> str:
    e = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    e.update(env)
    e["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
                         env=e, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_cli_sets_passive_wait_before_torch_is_loaded():
    assert _policy("import goldstone_cli.cli, sys; assert 'torch' not in sys.modules") == "PASSIVE"
    assert _policy("import bench") == "PASSIVE"


def test_users_policy_and_late_imports_are_left_alone():
    assert _policy("import goldstone_cli.cli", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert _policy("import torch, goldstone_cli.cli") == "None"  # too late to take effect: not set
    assert _policy("import goldstone_cli, goldstone_cli.models.dwe") == "None"  # the library alone: unchanged
