"""What a user sees on the command line and in plots (issue 13: small things found on a fresh machine)."""

from __future__ import annotations

from typer.testing import CliRunner

from goldstone_cli.cli import app

runner = CliRunner()


def test_offline_movielens_download_prints_one_line(tmp_path):
    """No raw `UserWarning` with a source line: the unreachable checksum falls back to the pinned
    MD5 silently when the download itself fails too; the error is one line."""
    import subprocess
    import sys

    # a real process: pytest would otherwise capture the warning itself
    res = subprocess.run([sys.executable, "-m", "goldstone_cli", "data", "download", "movielens", "--variant", "ml-20m",
                          "--dest", str(tmp_path), "--base-url", "http://127.0.0.1:1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    out = res.stdout + res.stderr
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "127.0.0.1:1" in lines[0], out
    assert "Warning" not in out


def test_plot_help_lists_only_existing_commands():
    res = runner.invoke(app, ["plot", "--help"])
    assert res.exit_code == 0
    assert "losses" not in res.output
    assert "trajectories" in res.output and "cosines" in res.output
