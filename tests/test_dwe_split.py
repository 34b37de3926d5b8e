"""The DWE split by word rows (goldstone_cli/models/dwe_split.py, issue 17): the step-by-step split
is dwe.split_counts's; the by-word folder gives every row block exactly what splitting the count
files gives, reading about its share of the bytes; damaged, stale or interrupted folders are never
trusted; two gloo ranks read only their rows."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from goldstone_cli.distributed.shard import RowShard
from goldstone_cli.models import dwe_split as S
from goldstone_cli.data.cooc import load_cooc
from goldstone_cli.models.dwe import split_counts, word_counts_from_cooc

SPLIT = dict(test_steps=0.15, test_mass=0.1, seed=3, val_mass=0.05)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The real sotu corpus, prepared: 24 ten-year steps, 2,000 words."""
    from goldstone_cli.data.corpus import prepare_corpus

    out = tmp_path_factory.mktemp("sotu") / "prepared"
    prepare_corpus("sotu", out, bin_years=10, vocab_size=2000, progress=False)
    return out


def _src(path):
    return S.StepSource.from_prepared(path)


def _args():
    return SPLIT["test_steps"], SPLIT["test_mass"], SPLIT["seed"], SPLIT["val_mass"]


def _same_csr(a: sp.csr_matrix, b: sp.csr_matrix) -> bool:
    a, b = a.tocsr(), b.tocsr()
    return a.shape == b.shape and (a != b).nnz == 0


def _same_split(a: S.RowSplit, b: S.RowSplit) -> None:
    assert a.test_steps == b.test_steps
    assert len(a.train) == len(b.train) and all(_same_csr(x, y) for x, y in zip(a.train, b.train))
    np.testing.assert_array_equal(a.c, b.c)
    for kind in ("held", "mass", "val"):
        xa, xb = getattr(a, kind), getattr(b, kind)
        assert [h.t for h in xa] == [h.t for h in xb], kind
        for h, g in zip(xa, xb):
            assert _same_csr(h.rows, g.rows), (kind, h.t)
            np.testing.assert_array_equal(h.c, g.c)


def test_step_by_step_split_is_split_counts(corpus):
    """All rows of split_rows == dwe.split_counts on the whole corpus (same draws, same order)."""
    src = _src(corpus)
    wc = word_counts_from_cooc(load_cooc(corpus))
    ref = split_counts(wc, SPLIT["test_steps"], SPLIT["test_mass"], SPLIT["seed"], SPLIT["val_mass"])
    got = S.split_rows(src, 0, src.V, *_args())
    assert got.test_steps == ref.test_steps and len(ref.test_steps) >= 2
    for t in range(src.T):
        assert _same_csr(got.train[t], ref.train[t]), t
        np.testing.assert_array_equal(got.c[t], np.asarray(ref.train[t].sum(axis=1)).ravel())
    assert [h.t for h in got.held] == [t for t in ref.test_steps if ref.heldout_steps[ref.test_steps.index(t)].nnz]
    for h in got.held:
        assert _same_csr(h.rows, ref.heldout_steps[ref.test_steps.index(h.t)])
    for kind, lst in (("mass", ref.heldout_mass), ("val", ref.val_mass)):
        want = [(t, m) for t, m in enumerate(lst) if m is not None and m.nnz]
        have = getattr(got, kind)
        assert [h.t for h in have] == [t for t, _ in want] and len(want) > 10
        for h, (_, m) in zip(have, want):
            assert _same_csr(h.rows, m)
            np.testing.assert_array_equal(h.c, np.asarray(m.sum(axis=1)).ravel())


@pytest.mark.parametrize("world", [2, 7])
def test_by_word_rows_equal_split_of_the_count_files(corpus, world):
    src = _src(corpus)
    folder, key = S.prepare_by_word(src, *_args())
    assert folder.parent == corpus and folder.name.startswith("by_word-")
    total = sum(f["bytes"] for f in json.loads((folder / "header.json").read_text())["files"].values())
    shard = RowShard(0, world)
    for r in range(world):
        a, b = shard.rows(src.V, r)
        got = S.read_word_rows(folder, key, a, b)
        _same_split(got, S.split_rows(src, a, b, *_args()))
        # exactly its rows of every matrix (offsets, int32 columns, float64 counts) and the row sums
        mats = got.train + [h.rows for h in got.held + got.mass + got.val]
        c_bytes = 8 * src.V * (src.T + len(got.held) + len(got.mass) + len(got.val))
        assert got.bytes_read == c_bytes + sum(8 * (b - a + 1) + 12 * m.nnz for m in mats)
        assert got.bytes_read < total


def test_by_word_folder_is_reused_and_settings_get_their_own(corpus):
    src = _src(corpus)
    f1, k1 = S.prepare_by_word(src, *_args())
    mtime = (f1 / "header.json").stat().st_mtime_ns
    f2, k2 = S.prepare_by_word(src, *_args())
    assert (f1, k1) == (f2, k2) and (f2 / "header.json").stat().st_mtime_ns == mtime  # reused, not rewritten
    f3, k3 = S.prepare_by_word(src, SPLIT["test_steps"], SPLIT["test_mass"], SPLIT["seed"] + 1, SPLIT["val_mass"])
    assert f3 != f1 and k3 != k1
    with pytest.raises(ValueError, match="stale"):
        S.read_word_rows(f1, k3, 0, 10)


@pytest.mark.parametrize("how", ["flipped_byte", "truncated", "missing_header", "foreign_name", "no_files",
                                 "held_incomplete", "wrong_V"])
def test_damaged_by_word_folder_is_rebuilt_never_trusted(corpus, how):
    src = _src(corpus)
    folder, key = S.prepare_by_word(src, *_args())
    want = S.read_word_rows(folder, key, 0, src.V)
    victim = folder / "train-00005.data.npy"
    if how == "flipped_byte":
        raw = bytearray(victim.read_bytes())
        raw[-3] ^= 0xFF
        victim.write_bytes(bytes(raw))
    elif how == "truncated":
        victim.write_bytes(victim.read_bytes()[:-8])
        with pytest.raises(ValueError, match="bytes"):
            S.read_word_rows(folder, key, 0, 10)  # a rank that does not verify still refuses it
    elif how == "missing_header":
        (folder / "header.json").unlink()
    elif how == "foreign_name":
        h = json.loads((folder / "header.json").read_text())
        h["files"]["../manifest.json"] = {"bytes": 1, "sha256": "0"}
        (folder / "header.json").write_text(json.dumps(h))
        with pytest.raises(ValueError, match="outside the folder"):
            S.read_word_rows(folder, key, 0, 10)
    else:  # a header with the right key but missing or wrong fields
        h = json.loads((folder / "header.json").read_text())
        if how == "no_files":
            del h["files"]
        elif how == "held_incomplete":
            h["held"] = {}
        else:
            h["V"] = src.V - 1
        (folder / "header.json").write_text(json.dumps(h))
        if how != "wrong_V":
            with pytest.raises(ValueError, match="damaged"):
                S.read_word_rows(folder, key, 0, 10)
    with pytest.warns(UserWarning, match="rebuilding"):
        f2, k2 = S.prepare_by_word(src, *_args())
    assert (f2, k2) == (folder, key)
    _same_split(S.read_word_rows(f2, k2, 0, src.V), want)
    assert not [p for p in corpus.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_interrupted_write_leaves_nothing_a_later_run_trusts(corpus, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(corpus, copy, ignore=shutil.ignore_patterns("by_word-*"))
    src = _src(copy)
    load = src.load

    def failing(t):
        if t == 7:
            raise KeyboardInterrupt
        return load(t)

    src.load = failing
    with pytest.raises(KeyboardInterrupt):
        S.prepare_by_word(src, *_args())
    assert not [p for p in copy.iterdir() if p.name.startswith(("by_word-", ".by_word-"))]
    src.load = load
    folder, key = S.prepare_by_word(src, *_args())
    _same_split(S.read_word_rows(folder, key, 3, 900), S.split_rows(src, 3, 900, *_args()))


def test_stale_temp_folders_of_dead_writers_on_this_host_are_removed(corpus):
    import socket

    src = _src(corpus)
    key = S.by_word_key(src, *_args())
    name = S.by_word_folder(src, key).name
    host = socket.gethostname()
    dead = [corpus / f".{name}.tmp-{host}-999999999", corpus / f".{name}.old-{host}-999999998"]
    alive = [corpus / f".{name}.tmp-{host}-{os.getppid()}", corpus / f".{name}.tmp-other-node-999999999"]
    for p in dead + alive:
        p.mkdir()
    S.write_by_word(src, key, *_args())
    assert not any(p.exists() for p in dead)
    assert all(p.exists() for p in alive)  # a live writer's, and another node's (its pid means nothing here)
    for p in alive:
        p.rmdir()


def test_unwritable_folder_falls_back_to_the_count_files(corpus, monkeypatch):
    """Rank 0 cannot write next to the corpus: every rank splits from the count files (warning)."""
    src = _src(corpus)

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(corpus))

    monkeypatch.setattr(S, "write_by_word", refuse)
    monkeypatch.setattr(S, "prepare_by_word", lambda *a, **k: refuse())
    with pytest.warns(UserWarning, match="could not write the by-word split"):
        got = S.load_rows_distributed(src, RowShard.single(), 100, 700, *_args())
    assert got.bytes_read == 0
    _same_split(got, S.split_rows(src, 100, 700, *_args()))


def test_counts_in_memory_split_quietly():
    from goldstone_cli.models.dwe import planted_corpus

    src = S.StepSource.from_word_counts(planted_corpus(V=30, T=5, n_clusters=3, seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = S.load_rows_distributed(src, RowShard.single(), 0, 30, 0.2, 0.1, 0)
    _same_split(got, S.split_rows(src, 0, 30, 0.2, 0.1, 0))


def _rank_rows(path) -> dict:
    import torch.distributed as dist

    shard = RowShard(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    src = S.StepSource.from_prepared(path)
    a, b = shard.rows(src.V)
    got = S.load_rows_distributed(src, shard, a, b, *_args())
    _same_split(got, S.split_rows(src, a, b, *_args()))
    return {"rows": (a, b), "bytes_read": got.bytes_read}


@pytest.mark.usefixtures("one_thread")
def test_two_gloo_ranks_read_only_their_rows(corpus, tmp_path):
    import shutil

    from goldstone_cli.distributed.local import run_local

    copy = tmp_path / "c"  # without a by-word folder: rank 0 writes it, rank 1 waits for it
    shutil.copytree(corpus, copy, ignore=shutil.ignore_patterns("by_word-*"))
    out = run_local(_rank_rows, 2, str(copy), timeout_s=300)
    assert [o["rows"] for o in out] == [(0, 1000), (1000, 2000)]
    header = json.loads(next(copy.glob("by_word-*/header.json")).read_text())
    total = sum(f["bytes"] for f in header["files"].values())
    # rank 0 holds the frequent words (the vocabulary is sorted by frequency): most of the counts
    assert all(0 < o["bytes_read"] < total for o in out)
    assert sum(o["bytes_read"] for o in out) < 1.1 * total
    assert os.listdir(copy / next(copy.glob("by_word-*")).name)


def test_sigkilled_writer_leaves_nothing_trusted_and_the_next_run_cleans_up(corpus, tmp_path):
    """A real SIGKILL in the middle of writing the by-word folder: no final folder; the next
    prepare removes the dead writer's temporary folder and writes the same split."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    copy = tmp_path / "c"
    shutil.copytree(corpus, copy, ignore=shutil.ignore_patterns("by_word-*"))
    script = (
        "import sys, time\n"
        "from goldstone_cli.models import dwe_split as S\n"
        "src = S.StepSource.from_prepared(sys.argv[1]); load = src.load\n"
        "def slow(t):\n"
        "    if t == 5: print('writing', flush=True)\n"
        "    if t >= 5: time.sleep(30)\n"
        "    return load(t)\n"
        "src.load = slow\n"
        f"S.prepare_by_word(src, {SPLIT['test_steps']}, {SPLIT['test_mass']}, {SPLIT['seed']}, {SPLIT['val_mass']})\n")
    p = subprocess.Popen([sys.executable, "-c", script, str(copy)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        time.sleep(0.2)
        tmp = [q for q in copy.iterdir() if q.name.startswith(".by_word-")]
        assert len(tmp) == 1 and any(tmp[0].iterdir())  # steps 0-4 written to the temporary folder
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL
    assert not [q for q in copy.iterdir() if q.name.startswith("by_word-")]
    src = _src(copy)
    folder, key = S.prepare_by_word(src, *_args())
    assert not tmp[0].exists()
    _same_split(S.read_word_rows(folder, key, 0, src.V), S.split_rows(src, 0, src.V, *_args()))
