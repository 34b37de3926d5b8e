"""`goldstone align`: chain Procrustes over O(d) (the optimizer's exact gauge solver) for embeddings
trained elsewhere, against HistWords' sequential pairwise Procrustes, and the file formats."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from goldstone_cli.analysis.align import (AnalysisError, chain_rotations, read_period, read_word2vec,
                                          sequential_procrustes, write_word2vec)
from goldstone_cli.cli import app

F64 = torch.float64
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def _periods(T=8, N=40, d=4, noise=0.0, seed=0, reflect=()):
    """Tables Z_t = Z0 Q_t (+ noise) with random rotations Q_t; periods in ``reflect`` get a mirror image."""
    g = torch.Generator().manual_seed(seed)
    Z0 = torch.randn(N, d, generator=g, dtype=F64)
    Q = torch.linalg.qr(torch.randn(T, d, d, generator=g, dtype=F64)).Q
    for t in reflect:
        Q[t, :, 0] *= -1  # det -1: a reflection
    Zs = [Z0 @ Q[t] + noise * torch.randn(N, d, generator=g, dtype=F64) for t in range(T)]
    return Z0, Q, Zs


def _drift(Q, R):
    """Misalignment left: C_t = Q_t R_t^T should be the same for every t; ||C_t - C_0||^2 per t."""
    C = Q @ R.transpose(1, 2)
    return ((C - C[0]) ** 2).sum(dim=(1, 2))


def test_exact_alignment_undoes_rotations_and_reflections():
    Z0, Q, Zs = _periods(reflect=(3, 5))
    R = chain_rotations(Zs, anchor="first")
    aligned = [z @ r.T for z, r in zip(Zs, R)]
    for a in aligned:
        torch.testing.assert_close(a, aligned[0])
    assert torch.linalg.det(Q[3] @ R[3].T) * torch.linalg.det(Q[0] @ R[0].T) > 0


def test_chain_equals_sequential_pairwise_procrustes_over_O_d():
    """On a chain the exact solver and HistWords' method solve the same per-edge problems."""
    _, _, Zs = _periods(noise=0.3, reflect=(2,))
    torch.testing.assert_close(chain_rotations(Zs, anchor="first"), sequential_procrustes(Zs), atol=1e-9, rtol=0)
    # 'least' differs only by one global rotation
    Rl = chain_rotations(Zs, anchor="least")
    G = Rl[0]
    torch.testing.assert_close(Rl, G @ sequential_procrustes(Zs), atol=1e-9, rtol=0)


def test_rotation_only_procrustes_leaves_a_reflection_domain_wall():
    """Periods 4.. are mirror images of periods 0..3 (a domain wall between 3 and 4): SO(d)-only
    alignment (a det-corrected Procrustes) cannot undo it; O(d) does."""
    Z0, Q, Zs = _periods(reflect=(4, 5, 6, 7))
    so = _drift(Q, sequential_procrustes(Zs, allow_reflections=False))
    od = _drift(Q, chain_rotations(Zs, anchor="first"))
    assert float(od.max()) < 1e-18
    assert float(so[4:].min()) > 1.0  # every period from the wall on stays misaligned
    assert float(so[:4].max()) < 1e-18


def test_skip_edges_stop_the_random_walk_of_pairwise_errors():
    """With noisy tables, sequential Procrustes accumulates rotation errors along the chain; the
    joint solver over a graph with cycles (--skip 4) pins each period to several neighbours."""
    for seed in range(3):
        _, Q, Zs = _periods(T=30, N=40, d=5, noise=0.5, seed=seed)
        seq = _drift(Q, sequential_procrustes(Zs))
        joint = _drift(Q, chain_rotations(Zs, skip=4, anchor="first"))
        assert float(joint[-1]) < 0.6 * float(seq[-1]), (seed, float(joint[-1]), float(seq[-1]))
        assert float(joint.mean()) < float(seq.mean())


def test_words_shared_by_neighbouring_periods_only():
    """Different vocabularies: only the shared (and non-zero) rows enter the alignment."""
    Z0, Q, Zs = _periods(T=3, N=30, d=3)
    vocab = [f"v{i}" for i in range(30)]
    vocabs = [vocab[:25], vocab[5:], vocab[::-1]]  # other words and another order
    tables = [Zs[0][:25], Zs[1][5:], Zs[2].flip(0)]
    tables[1] = tables[1].clone()
    tables[1][0] = 1e3  # 'v5' is garbage in period 1 ...
    present = [np.ones(25, bool), np.r_[False, np.ones(24, bool)], np.ones(30, bool)]  # ... and marked absent
    R = chain_rotations(tables, vocabs, present=present, anchor="first")
    for t in (1, 2):
        torch.testing.assert_close(Q[t] @ R[t].T, Q[0] @ R[0].T)
    with pytest.raises(AnalysisError, match="share only 2 words"):
        chain_rotations([Zs[0][:2], Zs[1][:2]], [vocab[:2], vocab[:2]])


def test_word2vec_text_and_binary_round_trip_and_gensim(tmp_path):
    gensim_models = pytest.importorskip("gensim.models")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "déjà"]
    X = rng.standard_normal((4, 3)).astype(np.float32)
    for binary in (False, True):
        p = tmp_path / ("a.bin" if binary else "a.txt")
        write_word2vec(p, words, X, binary=binary)
        w, Y = read_word2vec(p)
        assert w == words
        np.testing.assert_array_equal(Y, X)
        kv = gensim_models.KeyedVectors.load_word2vec_format(str(p), binary=binary)
        assert list(kv.index_to_key) == words
        np.testing.assert_array_equal(kv.vectors, X)
        # and what gensim writes, we read
        q = tmp_path / ("g.bin" if binary else "g.txt")
        kv.save_word2vec_format(str(q), binary=binary)
        w2, Y2 = read_word2vec(q)
        assert w2 == words
        np.testing.assert_allclose(Y2, X, rtol=1e-6)
    with pytest.raises(AnalysisError, match="white space"):
        write_word2vec(tmp_path / "bad.txt", ["two words"], X[:1])
    (tmp_path / "trunc.txt").write_text("3 2\na 1 2\nb 1\n")
    with pytest.raises(AnalysisError, match="header says 3 words"):
        read_word2vec(tmp_path / "trunc.txt")


def test_align_cli_word2vec_and_histwords_npy(tmp_path):
    Z0, Q, Zs = _periods(T=4, N=30, d=3, reflect=(2,))
    vocab = [f"w{i}" for i in range(30)]
    src = tmp_path / "in"
    src.mkdir()
    files = []
    for t in range(4):
        p = src / f"{1900 + 10 * t}.txt"
        write_word2vec(p, vocab, Zs[t].numpy())
        files.append(str(p))
    out = tmp_path / "out"
    r = runner.invoke(app, ["align", *files, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "reflection (det R = -1)" in r.output
    al = [read_word2vec(out / f"{1900 + 10 * t}.txt")[1] for t in range(4)]
    for a in al[1:]:
        np.testing.assert_allclose(a, al[0], atol=1e-5)
    np.testing.assert_allclose(al[0], Zs[0].numpy(), atol=1e-6)  # --anchor first: the first period is kept
    meta = json.loads((out / "alignment.json").read_text())
    assert meta["shared_words"] == [30, 30, 30] and meta["psi_after"] < 1e-8 < meta["psi_before"]
    r = runner.invoke(app, ["align", *files, "--out", str(out)])
    assert r.exit_code == 2 and "not empty" in r.output

    # HistWords layout: 1900-w.npy + 1900-vocab.txt; all-zero rows are absent words and stay zero
    hw = tmp_path / "hw"
    hw.mkdir()
    npys = []
    for t in range(3):
        M = Zs[t].numpy().copy()
        M[t] = 0.0  # word w_t absent in period t
        np.save(hw / f"{1900 + 10 * t}-w.npy", M)
        (hw / f"{1900 + 10 * t}-vocab.txt").write_text("\n".join(vocab) + "\n")
        npys.append(str(hw / f"{1900 + 10 * t}-w.npy"))
    r = runner.invoke(app, ["align", *npys, "--out", str(tmp_path / "hw-out"), "--skip", "2"])
    assert r.exit_code == 0, r.output
    A = [np.load(tmp_path / "hw-out" / f"{1900 + 10 * t}-w.npy") for t in range(3)]
    assert not A[1][1].any() and (tmp_path / "hw-out" / "1910-vocab.txt").is_file()
    np.testing.assert_allclose(A[2][5], A[0][5], atol=1e-5)
    # a pickled vocabulary is refused, never read
    (hw / "1900-vocab.txt").unlink()
    (hw / "1900-vocab.pkl").write_bytes(b"\x80\x04N.")
    r = runner.invoke(app, ["align", *npys, "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "never read" in r.output and "1900-vocab.pkl" in r.output
    with pytest.raises(AnalysisError, match="unknown format"):
        read_period(hw / "1900-vocab.pkl")
    r = runner.invoke(app, ["align", files[0], "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "at least two periods" in r.output


def test_word2vec_text_lines_end_at_newline_only(tmp_path):
    """Words may hold characters str.splitlines() splits at (U+2028, \\x85, \\x0b, \\x0c, \\x1c-\\x1e): a
    valid word2vec text file (gensim reads it) is read with them; Windows line ends are accepted."""
    words = ["a\u2028b", "c\x85", "\x0bd", "e\x0cf", "g\x1ch\x1di\x1e", "plain"]
    X = np.arange(12, dtype=np.float32).reshape(6, 2)
    p = tmp_path / "odd.txt"
    p.write_bytes(("6 2\r\n" + "".join(f"{w} {a:g} {b:g}\r\n" for w, (a, b) in zip(words, X))).encode("utf-8"))
    w, Y = read_word2vec(p)
    assert w == words
    np.testing.assert_array_equal(Y, X)
    period = read_period(p)
    assert period.vocab == words
    try:
        from gensim.models import KeyedVectors
    except ImportError:
        return
    assert list(KeyedVectors.load_word2vec_format(str(p)).index_to_key) == words


def test_a_word_twice_in_a_period_is_refused_naming_it(tmp_path):
    """A duplicate word makes the words shared with the next period ambiguous: word2vec files and
    HistWords vocabularies are refused alike, with the word (not an IndexError in the alignment)."""
    _, _, Zs = _periods(T=2, N=12, d=3)
    vocab = [f"w{i}" for i in range(12)]
    dup = vocab[:7] + ["w3"] + vocab[8:]
    npys = []
    for t in range(2):
        np.save(tmp_path / f"{1900 + 10 * t}-w.npy", Zs[t].numpy())
        (tmp_path / f"{1900 + 10 * t}-vocab.txt").write_text("\n".join(dup if t else vocab) + "\n")
        npys.append(str(tmp_path / f"{1900 + 10 * t}-w.npy"))
    r = runner.invoke(app, ["align", *npys, "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "1910-vocab.txt: the word 'w3' appears twice" in r.output, r.output
    write_word2vec(tmp_path / "dup.txt", dup, Zs[1].numpy())
    with pytest.raises(AnalysisError, match="dup.txt: the word 'w3' appears twice"):
        read_period(tmp_path / "dup.txt")
