"""Crafted files never run code, and names read from files never leave their folder: checkpoints and
snapshots are read with weights_only=True; run names in sweep.json, file names in a prepared corpus's
manifest and files of a corpus folder must resolve inside their folder; malformed sweep.json files,
damaged corpora and run folders still in use get one-line errors."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from typer.testing import CliRunner

from goldstone_cli import checkpoint as ckpt
from goldstone_cli.cli import app
from goldstone_cli.config import compose
from goldstone_cli.data.cooc import CoocFormatError, CoocWriter, load_cooc
from goldstone_cli.runlock import RunLock
from goldstone_cli.sweep import prepare
from goldstone_cli.train import train

runner = CliRunner()
SMALL = ["data.T=6", "trainer.progress=false", "trainer.log_every=5", "trainer.eval_every=10"]


class _Payload:
    """Unpickling this creates ``marker``: a stand-in for any code a crafted file could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted(path: Path, marker: Path, kind: str = "last") -> None:
    torch.save({"format": ckpt.FORMAT, "version": 1, "kind": kind, "model": _Payload(marker), "checksum": "x"}, path)


def _one_line(res, *words, code=2):
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip() and not ln.startswith("using the newest")]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_the_crafted_file_really_runs_code_when_unpickled(tmp_path):
    """The payload of the tests below is live: an unsafe load creates the marker."""
    marker = tmp_path / "pwned"
    _crafted(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


def test_crafted_checkpoints_and_snapshots_never_run_code(in_tmp):
    run = train(compose([*SMALL, "trainer.steps=10", "run_dir=r"])).run_dir
    marker = in_tmp / "pwned"
    for name in ("last.pt", "prev.pt"):
        _crafted(run / "checkpoints" / name, marker)
    _one_line(runner.invoke(app, ["train", "resume=r"]), "r/checkpoints/last.pt", "not a goldstone checkpoint",
              "r/checkpoints/prev.pt")
    _crafted(run / "snapshots.pt", marker, kind="snapshots")
    _one_line(runner.invoke(app, ["plot", "trajectories", "r"]), "r/snapshots.pt", "refused without running")
    res = runner.invoke(app, ["plot", "trajectories", "r"])
    assert "GLOBAL io.open" in res.output and "weights_only" not in res.output  # names it, no advice to unpickle
    # age-words picks the newest word-embedding run by itself
    dwe = in_tmp / "outputs" / "dwe" / "x"
    (dwe / "checkpoints").mkdir(parents=True)
    (dwe / "config.yaml").write_text("model:\n  name: dwe\n")
    _crafted(dwe / "checkpoints" / "last.pt", marker)
    _one_line(runner.invoke(app, ["age-words", "king"]), "last.pt", "not a goldstone checkpoint")
    assert not marker.exists()


def test_checkpoints_hold_only_tensors_and_plain_values(in_tmp):
    run = train(compose([*SMALL, "trainer.steps=10", "run_dir=r"])).run_dir
    for p in [run / "checkpoints" / "last.pt", run / "checkpoints" / "prev.pt", run / "snapshots.pt"]:
        state = torch.load(p, weights_only=True)  # no allow-listed globals needed
        assert state["format"] == ckpt.FORMAT and len(state["checksum"]) == 64
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["config"]["trainer"]["dtype"] == "float64"
    from enum import Enum

    class Color(Enum):
        red = 1

    with pytest.raises(TypeError, match="checkpoint.config.c is a .*Color"):
        ckpt.save(in_tmp / "x.pt", {"config": {"c": Color.red}})
    with pytest.raises(TypeError, match="numpy"):
        ckpt.save(in_tmp / "x.pt", {"v": np.float64(1.0)})
    assert not (in_tmp / "x.pt").exists()


# ----------------------------------------------------------------------------- sweep.json
TINY = ["optimizer=adam", "seed=0,1", "trainer.steps=10", "data.T=6"]


_MANIFEST: dict = {}


def _sweep_folder(d: Path) -> dict:
    if not _MANIFEST:  # plan (and validate) once: composing the runs' configs takes a second
        _MANIFEST.update(prepare(TINY)[0].manifest())
    d.mkdir()
    m = json.loads(json.dumps(_MANIFEST))
    (d / "sweep.json").write_text(json.dumps(m))
    return m


@pytest.mark.parametrize("name", ["../victim", "/ABS/victim", ".."])
def test_run_names_in_sweep_json_never_leave_the_sweep_folder(in_tmp, name):
    victim = in_tmp / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    m = _sweep_folder(in_tmp / "sw")
    m["runs"][0]["name"] = name.replace("/ABS", str(in_tmp))
    (in_tmp / "sw" / "sweep.json").write_text(json.dumps(m))
    _one_line(runner.invoke(app, ["sweep", "--dir", "sw"]), "sw/sweep.json", "not a plain folder name")
    _one_line(runner.invoke(app, ["report", "sw"]), "not a plain folder name")
    assert (victim / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in (in_tmp / "sw").iterdir()) == ["sweep.json"]


def test_a_run_folder_that_is_a_symlink_is_neither_removed_through_nor_read(in_tmp):
    victim = in_tmp / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (victim / "summary.json").write_text('{"status": "completed", "model": "secret"}')
    m = _sweep_folder(in_tmp / "sw")
    os.symlink(victim, in_tmp / "sw" / m["runs"][0]["name"])
    _one_line(runner.invoke(app, ["sweep", "--dir", "sw"]), "is a symbolic link")
    _one_line(runner.invoke(app, ["report", "sw"]), "is a symbolic link")
    assert (victim / "precious.txt").read_text() == "keep me"
    # a plain folder of run folders (no sweep.json): links out of it are not followed
    plain = in_tmp / "plain"
    plain.mkdir()
    (victim / "config.yaml").write_text("model:\n  name: dense_mf\n")
    os.symlink(victim, plain / "link")
    res = runner.invoke(app, ["report", "plain"])
    assert res.exit_code != 0 and "neither sweep.json nor run folders" in res.output


@pytest.mark.parametrize("edit, words", [
    (lambda m: {}, "missing key 'name'"),
    (lambda m: [m], "expected a JSON object"),
    (lambda m: {k: v for k, v in m.items() if k != "runs"}, "missing key 'runs'"),
    (lambda m: {**m, "runs": {"a": 1}}, "'runs' must be a list"),
    (lambda m: {**m, "runs": [1]}, "'runs[0]' must be an object"),
    (lambda m: {**m, "runs": [{**m["runs"][0], "overrides": "seed=0"}]}, "'runs[0].overrides' must be a list"),
    (lambda m: {**m, "runs": [m["runs"][0], m["runs"][0]]}, "appears twice"),
    (lambda m: {**m, "grid": 3}, "'grid' must be a list"),
    (lambda m: {**m, "target": {**m["target"], "mode": "up"}}, "'target.mode' must be one of"),
    (lambda m: {**m, "launcher": {"name": "pbs", "params": {}}}, "'launcher.name' must be one of"),
    (lambda m: {**m, "report": {"title": 3}}, "'report.title' must be a string"),
])
def test_a_malformed_sweep_json_is_one_line(in_tmp, edit, words):
    m = _sweep_folder(in_tmp / "sw")
    (in_tmp / "sw" / "sweep.json").write_text(json.dumps(edit(m)))
    _one_line(runner.invoke(app, ["sweep", "--dir", "sw"]), "sw/sweep.json", words)
    _one_line(runner.invoke(app, ["report", "sw"]), words)


def test_sweep_never_starts_a_second_process_into_a_locked_run_folder(in_tmp):
    m = _sweep_folder(in_tmp / "sw")
    name = m["runs"][0]["name"]
    run = in_tmp / "sw" / name
    run.mkdir()
    (run / "train.log").write_text("the run a killed sweep left running\n")
    other = in_tmp / "sw" / m["runs"][1]["name"]
    with RunLock(run), RunLock(other):  # the runs' processes are still alive
        res = runner.invoke(app, ["sweep", "--dir", "sw"])
    assert res.exit_code == 75, res.output
    assert f"run {name} is still running in process {os.getpid()}" in res.output and "2 busy" in res.output
    assert "when the busy runs have finished" in res.output
    assert (run / "train.log").read_text() == "the run a killed sweep left running\n"  # not removed, not restarted
    assert sorted(p.name for p in other.iterdir()) == ["run.lock"]


# ----------------------------------------------------------------------------- prepared corpora
def _corpus(out: Path) -> Path:
    vocab = ["alpha", "beta", "gamma"]
    with CoocWriter(out, vocab, np.array([5, 4, 3])) as w:
        for t in range(3):
            m = sp.csr_matrix(np.array([[2, 1, 0], [1, 0, 3], [0, 3, 4]], dtype=np.int64) * (t + 1))
            w.add_step(str(1900 + t), 1900 + t, 1900 + t, m, tokens=100)
        w.finish({"kind": "corpus", "settings": {}})
    return out


def test_manifest_file_names_must_stay_inside_the_corpus_folder(tmp_path):
    c = _corpus(tmp_path / "c")
    mf = json.loads((c / "manifest.json").read_text())
    secret = tmp_path / "secret.txt"
    secret.write_text("x" * (c / "vocab.tsv").stat().st_size)
    for name in ["../secret.txt", str(secret)]:
        bad = dict(mf, files={**mf["files"], name: {"size": secret.stat().st_size, "sha256": "0"}})
        (c / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(CoocFormatError, match="not a plain name"):
            load_cooc(c)
    (c / "manifest.json").write_text(json.dumps(mf))
    (c / "vocab.tsv").rename(tmp_path / "vocab.tsv")
    os.symlink(tmp_path / "vocab.tsv", c / "vocab.tsv")  # a link out of the folder
    with pytest.raises(CoocFormatError, match="symbolic link"):
        load_cooc(c)


def test_a_corpus_with_flipped_bytes_is_a_one_line_error(in_tmp):
    c = _corpus(in_tmp / "c")
    f = c / "cooc_00001.npz"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 3] ^= 0x01  # inside the matrix data: the zip CRC no longer matches
    f.write_bytes(raw)
    with pytest.raises(CoocFormatError, match="cooc_00001.npz cannot be read"):
        load_cooc(c)
    res = runner.invoke(app, ["train", "model=dwe", "data=cooc", f"data.path={c}", "model.d=2", "trainer.steps=1",
                              "trainer.progress=false"])
    _one_line(res, "cooc_00001.npz", "prepare the corpus again")


def test_corpus_folder_files_linking_outside_are_refused(tmp_path):
    from goldstone_cli.data.corpus import folder_documents

    src = tmp_path / "texts"
    src.mkdir()
    (src / "1850-a.txt").write_text("the cat sat on the mat")
    (tmp_path / "private.txt").write_text("not part of the corpus")
    os.symlink(tmp_path / "private.txt", src / "1851-b.txt")
    with pytest.raises(ValueError, match="symbolic link .* outside"):
        folder_documents(src)
    (src / "1851-b.txt").unlink()
    os.symlink(src / "1850-a.txt", src / "1852-c.txt")  # a link inside the folder is fine
    assert [d.year for d in folder_documents(src)] == [1850, 1852]


def test_ngram_part_caches_are_trusted_only_as_real_files_of_their_work_folder(tmp_path, monkeypatch):
    from test_ngrams import _interrupt_inputs, same_output, write_v2

    from goldstone_cli.data import ngrams
    from goldstone_cli.data.ngrams import prepare_ngrams

    one, f1, f2_rows = _interrupt_inputs(tmp_path)
    f2 = write_v2(tmp_path / "f2.tsv", f2_rows)
    kw = dict(years=(1900, 1910), vocab_size=5, workers=1, progress=False)
    base = load_cooc(prepare_ngrams([one], [f1, f2], tmp_path / "base", **kw).out)
    out, work = tmp_path / "out", tmp_path / ".out.work"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, work)  # the cache folder is a link out: nothing is written (or removed) through it
    with pytest.raises(FileExistsError, match="symbolic link"):
        prepare_ngrams([one], [f1, f2], out, **kw)
    assert not any(elsewhere.iterdir())
    work.unlink()
    real_count, calls = ngrams._count_fivegrams, []

    def interrupted(job, report):
        calls.append(job.path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_count(job, report)

    monkeypatch.setattr(ngrams, "_count_fivegrams", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_ngrams([one], [f1, f2], out, **kw)
    monkeypatch.setattr(ngrams, "_count_fivegrams", real_count)
    part = next(p for p in work.iterdir() if p.name.startswith("fivegrams-"))
    part.rename(elsewhere / part.name)
    os.symlink(elsewhere / part.name, part)  # a part that links elsewhere is not read: it is recomputed
    r = prepare_ngrams([one], [f1, f2], out, **kw)
    assert r.processed_parts == 2 and r.reused_parts >= 1
    same_output(load_cooc(out), base)


def test_a_blocked_module_is_named_without_advice_to_unpickle(tmp_path):
    """torch 2.13 words a blocked module (os.system) differently from an unknown global: one line,
    naming it, without torch's hint to retry with weights_only=False."""
    import os

    class System:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"format": ckpt.FORMAT, "model": System()}, tmp_path / "last.pt")
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load(tmp_path / "last.pt")
    msg = str(info.value)
    assert "GLOBAL posix.system" in msg and "weights_only" not in msg and "\n" not in msg
