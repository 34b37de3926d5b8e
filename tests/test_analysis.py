"""Semantic-change analysis (goldstone_cli/analysis/): changes, neighbours, plots, export, and the
planted-drift evaluation, on generated corpora and small trained runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from goldstone_cli.analysis.changes import word_changes
from goldstone_cli.analysis.embeddings import AnalysisError, Embeddings, Posterior, load_embeddings, pair_moments
from goldstone_cli.analysis.neighbors import neighbors
from goldstone_cli.analysis.planted import change_point, make_dated_corpus, read_truth
from goldstone_cli.cli import app
from goldstone_cli.models.dwe import prior_precision, sample_chain

F64 = torch.float64
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def _emb(U, counts=None, posterior=None, labels=None) -> Embeddings:
    T = U.shape[0]
    return Embeddings(source=Path("."), vocab=[f"w{i}" for i in range(U.shape[1])],
                      labels=labels or [str(1800 + 10 * t) for t in range(T)],
                      years=1800 + 10 * np.arange(T), year_end=1809 + 10 * np.arange(T),
                      train_mask=np.ones(T, dtype=bool), U=U, counts=counts, posterior=posterior)


# ----------------------------------------------------------------------------- posterior pair moments
def test_pair_moments_match_the_dense_inverse_precision():
    """Var(x_t0), Var(x_t1), Cov(x_t0, x_t1) of the bidiagonal-Cholesky chain against inv(B B^T)."""
    g = torch.Generator().manual_seed(0)
    T, C = 7, 5
    raw = torch.randn(T, C, generator=g, dtype=F64)
    off = 0.5 * torch.randn(T - 1, C, generator=g, dtype=F64)
    b = torch.nn.functional.softplus(raw)
    for c in range(C):
        B = torch.diag(b[:, c]) + torch.diag(off[:, c], -1)  # lower bidiagonal: P = B B^T
        S = torch.linalg.inv(B @ B.T)
        for t0, t1 in [(0, 6), (2, 3), (1, 5), (4, 4)]:
            v0, v1, cov = pair_moments(raw, off, t0, t1)
            torch.testing.assert_close(v0[c], S[t0, t0])
            torch.testing.assert_close(v1[c], S[t1, t1])
            torch.testing.assert_close(cov[c], S[t0, t1])


def test_sample_pair_agrees_with_whole_path_samples():
    """The bivariate draws have the statistics of sample_chain's whole-path draws."""
    g = torch.Generator().manual_seed(1)
    T, V, d = 6, 3, 2
    mu = torch.randn(T, V, d, generator=g, dtype=F64)
    raw = torch.randn(T, V, d, generator=g, dtype=F64) + 1.0
    off = 0.5 * torch.randn(T - 1, V, d, generator=g, dtype=F64)
    emb = _emb(mu.clone(), posterior=Posterior(mu=mu, raw=raw, off=off))
    x0, x5 = emb.sample_pair(0, 5, 40000, torch.Generator().manual_seed(2))  # (n, V, d)
    eps = torch.randn(T, 40000, V, d, generator=torch.Generator().manual_seed(3), dtype=F64)
    path = sample_chain(mu[:, None], raw[:, None], off[:, None], eps)  # (T, n, V, d)
    n = x0.shape[0]
    for a, b in ((x0, path[0]), (x5, path[5])):
        se = (2 * b.var(0) / n).sqrt()  # standard error of the difference of two means
        assert ((a.mean(0) - b.mean(0)).abs() < 5 * se).all()
        torch.testing.assert_close(a.var(0), b.var(0), atol=0, rtol=0.05)

    def corr(p, q):
        return ((p - p.mean(0)) * (q - q.mean(0))).mean(0) / (p.std(0) * q.std(0))

    torch.testing.assert_close(corr(x0, x5), corr(path[0], path[5]), atol=0.03, rtol=0)


# ----------------------------------------------------------------------------- changes and neighbours
def _moving_words():
    """Four words in d=2: w0 turns by 90 degrees from step 0 to 2, w1 by 180, w2 stays, w3 has no
    data in step 2."""
    U = torch.zeros(3, 4, 2, dtype=F64)
    ang = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 1.5, 0.0, 0.1], [1.5708, 3.1416, 0.0, 0.2]], dtype=F64)
    U[..., 0], U[..., 1] = torch.cos(ang), torch.sin(ang)
    counts = np.full((3, 4), 50.0)
    counts[2, 3] = 0.0
    return U, counts


def test_changes_rank_by_cosine_distance_and_mark_words_without_data():
    U, counts = _moving_words()
    emb = _emb(U, counts)
    ch = word_changes(emb, 0, 2, min_count=1)
    assert [emb.vocab[i] for i in ch.ranked] == ["w1", "w0", "w2"]
    np.testing.assert_allclose(ch.distance[:3], [1.0, 2.0, 0.0], atol=1e-4)
    assert ch.unranked.tolist() == [3] and ch.status[3] == "no data in 1820"
    # without the presence rule the absent word is ranked like any other
    assert len(word_changes(emb, 0, 2, min_count=0).ranked) == 4
    with pytest.raises(AnalysisError, match="same step"):
        word_changes(emb, 1, 1)
    with pytest.raises(AnalysisError, match="MAP run"):
        word_changes(emb, 0, 2, by="posterior")


def test_changes_posterior_interval_covers_the_distance_and_widens_with_uncertainty():
    """Word 0 turns by 60 degrees and is certain; word 1 stays put but is very uncertain."""
    T, V, d = 4, 2, 16
    mu = torch.zeros(T, V, d, dtype=F64)
    mu[:, :, 0] = 4.0
    mu[3, 0, 0], mu[3, 0, 1] = 4.0 * 0.5, 4.0 * 0.75 ** 0.5  # cos 60 degrees: distance 0.5
    raw = torch.full((T, V, d), 3.0, dtype=F64)  # std ~ 1/softplus(3) = 0.33
    raw[:, 1] = -1.0  # std ~ 1/softplus(-1) = 3.2
    off = torch.zeros(T - 1, V, d, dtype=F64)
    emb = _emb(mu.clone(), posterior=Posterior(mu=mu, raw=raw, off=off))
    ch = word_changes(emb, 0, 3, min_count=0, samples=400)
    np.testing.assert_allclose(ch.distance, [0.5, 0.0], atol=1e-12)
    assert [emb.vocab[i] for i in ch.ranked] == ["w0", "w1"]
    assert ch.post_lo[0] < 0.5 < ch.post_hi[0]
    assert (ch.post_hi[1] - ch.post_lo[1]) > 2 * (ch.post_hi[0] - ch.post_lo[0])
    # posterior noise inflates the distance of the uncertain word (two noisy draws are less aligned)
    assert ch.post_mean[1] > 0.3 > ch.distance[1]
    assert word_changes(emb, 0, 3, min_count=0, samples=400, by="posterior").ranked.tolist() == [1, 0]
    # the same seed gives the same draws
    again = word_changes(emb, 0, 3, min_count=0, samples=400)
    np.testing.assert_array_equal(again.post_lo, ch.post_lo)


def test_neighbors_only_among_words_present_in_the_step():
    U, counts = _moving_words()
    emb = _emb(U, counts)
    counts2 = counts.copy()
    counts2[1, 2] = 0.0
    emb2 = _emb(U, counts2)
    (r0,) = neighbors(emb, "w2", [0], top=3)
    assert set(r0.words) == {"w0", "w1", "w3"} and r0.query_present
    (r1,) = neighbors(emb2, "w0", [1], top=3)
    assert "w2" not in r1.words and r1.words[0] == "w3"
    (r2,) = neighbors(emb2, "w2", [1], top=3)
    assert not r2.query_present
    with pytest.raises(AnalysisError, match="closest vocabulary words: w1"):
        emb.index("w1x")


def test_steps_by_year_label_or_index():
    emb = _emb(torch.zeros(3, 2, 2, dtype=F64), labels=["a", "b", "c"])
    assert emb.step("1815") == 1 and emb.step("b") == 1 and emb.step("#-1") == 2 and emb.step("#0") == 0
    with pytest.raises(AnalysisError, match="year 1900 is in no step"):
        emb.step("1900")
    with pytest.raises(AnalysisError, match="unknown step 'zz'"):
        emb.step("zz")
    with pytest.raises(AnalysisError, match="#5 does not exist"):
        emb.step("#5")
    with pytest.raises(AnalysisError, match="--min-count 0"):
        emb.present(0, 1.0)  # no counts known


def test_change_point_of_a_step_curve():
    assert change_point(np.r_[np.zeros(5), np.ones(7)]) == 5
    assert change_point(np.r_[0.1, 0.12, 0.09, 0.8, 0.82, 0.79]) == 3
    with pytest.raises(AnalysisError):
        change_point(np.zeros(1))


# ----------------------------------------------------------------------------- a trained run, end to end
@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A variational DWE run (Goldstone-GD on Adam) on the planted-drift corpus, 5-year bins."""
    root = tmp_path_factory.mktemp("planted")
    corpus = make_dated_corpus(root / "gen", sentences_per_year=100)
    prep = root / "prep"
    r = runner.invoke(app, ["data", "prepare", "corpus", "--source", str(corpus / "texts"), "--out", str(prep),
                            "--bin-years", "5", "--vocab", "3000", "--keep-words", "", "-q"])
    assert r.exit_code == 0, r.output
    run_dir = root / "run"
    r = runner.invoke(app, ["train", "model=dwe", "data=cooc", f"data.path={prep}", "model.d=6", "model.batch_words=0",
                            "model.batch_contexts=0", "model.test_steps=0.1", "model.test_mass=0",
                            "model.val_mass=0", "trainer.steps=200", "trainer.eval_every=200", "trainer.checkpoint_every=200",
                            "trainer.progress=false", "optimizer=goldstone", "optimizer.base=adam",
                            "optimizer.lr=0.1", "optimizer.k1=10", f"run_dir={run_dir}"])
    assert r.exit_code == 0, r.output
    return {"root": root, "corpus": corpus, "run": run_dir}


def test_planted_words_rank_at_the_top_and_change_years_are_recovered(planted_run):
    r = runner.invoke(app, ["eval", "changes", str(planted_run["run"]), "--planted", str(planted_run["corpus"])])
    assert r.exit_code == 0, r.output
    res = json.loads((planted_run["run"] / "analysis" / "eval_changes.json").read_text())
    assert res["precision_at_k"] == 1.0, res
    assert res["year_error"] <= 5.0, res  # one 5-year bin at most
    assert set(res["top"]) == set(read_truth(planted_run["corpus"]).words)


def test_changes_neighbors_plot_cli(planted_run):
    run = str(planted_run["run"])
    r = runner.invoke(app, ["changes", run, "--top", "4"])
    assert r.exit_code == 0, r.output
    assert "most changed" in r.output and "most stable" in r.output and "90% interval" in r.output
    emb = load_embeddings(run)
    held = [emb.labels[t] for t in np.nonzero(~emb.train_mask)[0]]
    assert held  # test_steps=0.1 holds a step out
    csv = (planted_run["run"] / "analysis" / f"changes_{emb.labels[0]}_{emb.labels[-1]}.csv").read_text().splitlines()
    assert len(csv) == 1 + emb.V and csv[0].startswith("rank,word,distance,posterior_mean,ci90_low,ci90_high")
    top = [ln.split(",")[1] for ln in csv[1:4]]
    assert set(top) == {"drift0", "drift1", "drift2"}
    # a held-out step has no data for any word: nothing can be ranked there
    r = runner.invoke(app, ["changes", run, "--from", held[0]])
    assert r.exit_code == 2 and "held out of training" in r.output
    r = runner.invoke(app, ["changes", run, "--to", "2100"])
    assert r.exit_code == 2 and "year 2100 is in no step" in r.output
    r = runner.invoke(app, ["changes", str(planted_run["root"] / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.output

    r = runner.invoke(app, ["neighbors", "drift1", "--run", run, "--steps", "1900,1955", "--top", "5"])
    assert r.exit_code == 0, r.output
    rows = [ln for ln in r.output.splitlines() if ln.startswith(("1900-1904", "1955-1959"))]
    assert all(w.startswith("t02") for w in rows[0].split(None, 1)[1].split(", "))  # topic A before 1930
    assert all(w.startswith("t03") for w in rows[1].split(None, 1)[1].split(", "))  # topic B after
    r = runner.invoke(app, ["neighbors", "drift9", "--run", run])
    assert r.exit_code == 2 and "not in the vocabulary" in r.output

    out = planted_run["root"] / "plots"
    r = runner.invoke(app, ["plot", "word", "drift1", "stable0", "--run", run, "--out", str(out), "--samples", "50"])
    assert r.exit_code == 0, r.output
    assert (out / "path_drift1_stable0.png").stat().st_size > 10_000
    assert (out / "distance_drift1_stable0.png").stat().st_size > 10_000
    curve = json.loads((out / "distance_drift1_stable0.json").read_text())["records"]
    d1 = [c for c in curve if c["word"] == "drift1"]
    s0 = [c for c in curve if c["word"] == "stable0"]
    assert d1[-1]["distance_to_first"] > 0.5 > s0[-1]["distance_to_first"]
    assert all(c["low"] <= c["high"] for c in curve)
    for bad, msg in ((["--samples", "0"], "--samples must be at least 2"), (["--level", "5"], "--level must be between")):
        r = runner.invoke(app, ["plot", "word", "drift1", "--run", run, "--out", str(out / "bad"), *bad])
        assert r.exit_code == 2 and msg in r.output and not (out / "bad").exists(), r.output


def test_export_word2vec_read_by_gensim_and_npy_round_trip(planted_run):
    gensim_models = pytest.importorskip("gensim.models")
    run = planted_run["run"]
    emb = load_embeddings(run)
    out = planted_run["root"] / "export-w2v"
    r = runner.invoke(app, ["export", str(run), "--format", "word2vec", "--out", str(out)])
    assert r.exit_code == 0, r.output
    steps = (out / "steps.tsv").read_text().splitlines()
    assert len(steps) == 1 + emb.T and steps[0] == "step\tlabel\tstart\tend\ttrained\tfile"
    for t in (0, emb.T - 1):
        kv = gensim_models.KeyedVectors.load_word2vec_format(str(out / steps[1 + t].split("\t")[5]))
        assert list(kv.index_to_key) == emb.vocab
        np.testing.assert_array_equal(kv.vectors, emb.U[t].float().numpy())
    std = np.load(out / "std_000_1900-1904.npy")
    assert std.shape == (emb.V, 6) and (std > 0).all()
    assert np.load(out / "counts.npy").shape == (emb.T, emb.V)
    # the exported folder is read back for analysis: same ranking of the means
    again = load_embeddings(out)
    a = word_changes(emb, 0, emb.T - 1, samples=10)
    b = word_changes(again, 0, emb.T - 1, samples=10)
    assert a.ranked[:10].tolist() == b.ranked[:10].tolist()
    # npy, and the errors
    out2 = planted_run["root"] / "export-npy"
    r = runner.invoke(app, ["export", str(run), "--format", "npy", "--out", str(out2)])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.load(out2 / "step_001_1905-1909.npy"), emb.U[1].float().numpy())
    r = runner.invoke(app, ["export", str(run), "--format", "npy", "--out", str(out2)])
    assert r.exit_code == 2 and "not empty" in r.output
    r = runner.invoke(app, ["export", str(run), "--format", "glove", "--out", str(out2), "--force"])
    assert r.exit_code == 2 and "--format must be one of" in r.output


def _held_out_step(run) -> str:
    emb = load_embeddings(run)
    held = np.nonzero(~emb.train_mask)[0]
    assert len(held)  # test_steps=0.1 holds a step out
    return emb.labels[int(held[0])]


def test_held_out_steps_in_age_words_eval_lsc_and_plot_word(planted_run, monkeypatch):
    """A step held out of training has no data for any word: age-words and plot word say so instead of
    answering from the corpus' counts (age-words) or drawing no neighbours (plot word); eval lsc notes it."""
    from goldstone_cli.analysis import plots
    from goldstone_cli.words import load_run

    run, root = planted_run["run"], planted_run["root"]
    held = _held_out_step(run)
    wr = load_run(run)
    t = wr.labels.index(held)
    counts = wr.step_counts()
    assert counts.shape == (len(wr.labels), len(wr.vocab)) and not counts[t].any() and counts[wr.train_mask].any()
    r = runner.invoke(app, ["age-words", "drift1", "--run", str(run), "--to", held[:4], "--cos"])
    assert r.exit_code == 2 and f"step {held} was held out of training" in r.output and "--min-count 0" in r.output
    r = runner.invoke(app, ["age-words", "drift1", "--run", str(run), "--to", held[:4], "--min-count", "0"])
    assert r.exit_code == 0, r.output

    targets = root / "lsc_targets.txt"
    targets.write_text("drift0\ndrift1\nstable0\n")
    r = runner.invoke(app, ["eval", "lsc", str(run), "--targets", str(targets), "--from", held,
                            "--out", str(root / "lsc_held")])
    assert r.exit_code == 0 and f"note: step {held} was held out of training" in r.output, r.output

    out = root / "plots_held"
    r = runner.invoke(app, ["plot", "word", "drift1", "--run", str(run), "--from", held, "--out", str(out)])
    assert r.exit_code == 2 and f"--from {held}: that step was held out of training" in r.output, r.output
    assert not out.exists()
    labels = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: labels.append(fig.axes[0].get_ylabel()) or path)
    r = runner.invoke(app, ["plot", "word", "drift1", "--run", str(run), "--from", held, "--min-count", "0",
                            "--samples", "10", "--out", str(out)])
    assert r.exit_code == 0 and f"note: step {held} was held out of training" in r.output, r.output
    assert labels[-1] == f"cosine distance to step {held}"  # the --from step, not "the first step"


def test_age_words_finds_a_relative_corpus_path_in_the_run_folders_parents(planted_run, tmp_path, monkeypatch):
    """data.path as written by a training run started in ROOT (`data.path=prep`): found from any folder,
    as the analysis commands find it."""
    import shutil

    root = planted_run["root"]
    rel = root / "elsewhere" / "run"
    shutil.copytree(planted_run["run"], rel)
    cfg = (rel / "config.yaml").read_text()
    assert f"path: {root / 'prep'}" in cfg
    (rel / "config.yaml").write_text(cfg.replace(f"path: {root / 'prep'}", "path: prep"))
    monkeypatch.chdir(tmp_path)  # neither prep/ nor the run here
    r = runner.invoke(app, ["age-words", "drift1", "--run", str(rel), "--to", "1955", "--min-count", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["neighbors", "drift1", "--run", str(rel), "--steps", "1955", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output


def test_a_damaged_export_is_refused_naming_the_file(planted_run, tmp_path):
    """load_export checks export.json's keys, steps.tsv's columns and every array's shape: one line
    naming the file, no IndexError/KeyError traceback."""
    import shutil

    good = tmp_path / "good"
    r = runner.invoke(app, ["export", str(planted_run["run"]), "--format", "npy", "--out", str(good)])
    assert r.exit_code == 0, r.output
    emb = load_embeddings(good)
    T, V, d = emb.T, emb.V, emb.U.shape[-1]
    step3 = (good / "steps.tsv").read_text().splitlines()[4].split("\t")[5]

    def damaged(name, edit):
        bad = tmp_path / name
        shutil.copytree(good, bad)
        meta = json.loads((bad / "export.json").read_text())
        edit(bad, meta)
        (bad / "export.json").write_text(json.dumps(meta))
        return bad

    def tsv_line(k, fn):
        def edit(bad, meta):
            lines = (bad / "steps.tsv").read_text().splitlines()
            lines[k - 1] = fn(lines[k - 1].split("\t"))
            (bad / "steps.tsv").write_text("\n".join(lines) + "\n")
        return edit

    cases = [
        ("std", lambda b, m: m.update(std_files=m["std_files"][:3]), r"export.json: 3 std_files for 12 steps"),
        ("counts", lambda b, m: np.save(b / "counts.npy", np.ones((3, 5))),
         rf"counts.npy: shape \(3, 5\), expected \({T}, {V}\)"),
        ("cols", tsv_line(4, lambda r: "\t".join(r[:5])), r"steps.tsv, line 4: 5 tab-separated columns, expected 6"),
        ("year", tsv_line(4, lambda r: "\t".join(r[:2] + ["x"] + r[3:])), r"steps.tsv, line 4: start and end must be"),
        ("nokey", lambda b, m: m.pop("T"), r"export.json: no 'T'"),
        ("dims", lambda b, m: np.save(b / step3, np.ones((V, d - 2), np.float32)),
         rf"{step3}: shape \({V}, {d - 2}\), expected \({V}, {d}\)"),
        ("rows", lambda b, m: np.save(b / step3, np.ones((V - 5, d), np.float32)), rf"{step3}: shape \({V - 5}, {d}\)"),
        ("gone", lambda b, m: (b / m["std_files"][2]).unlink(), r"std_002_.*\.npy: missing"),
    ]
    for name, edit, msg in cases:
        bad = damaged(name, edit)
        with pytest.raises(AnalysisError, match=msg):
            load_embeddings(bad)
    r = runner.invoke(app, ["changes", str(tmp_path / "counts")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "export the run again" in r.output, r.output


def test_checkpoint_with_code_is_refused(tmp_path):
    """Run folders are read with torch.load(weights_only=True): a pickled object is refused."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {name: dwe}\n")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {"x": Evil()}}, run / "checkpoints" / "last.pt")
    with pytest.raises(AnalysisError, match="cannot read checkpoint"):
        load_embeddings(run)


def test_prior_precision_is_what_pair_moments_invert():
    """Sanity link to the model: with off = -w/b (the prior's own Cholesky shape) the covariance is
    positive definite and pair_moments stays finite."""
    w = np.full(4, 2.0)
    P = prior_precision(w, 1.0)
    assert np.all(np.linalg.eigvalsh(P) > 0)
    raw = torch.zeros(5, 1, dtype=F64)
    off = torch.full((4, 1), -0.3, dtype=F64)
    v0, v1, c = pair_moments(raw, off, 0, 4)
    assert torch.isfinite(torch.stack([v0, v1, c])).all() and (c.abs() <= (v0 * v1).sqrt()).all()


def test_every_option_of_the_analysis_commands_is_explained():
    import typer.main

    cli = typer.main.get_command(app)
    paths = [["changes"], ["neighbors"], ["export"], ["align"], ["plot", "word"], ["eval", "lsc"], ["eval", "changes"],
             ["data", "make-planted"]]
    for path in paths:
        cmd = cli
        for p in path:
            cmd = cmd.commands[p]
        assert cmd.help, path
        for param in cmd.params:
            assert getattr(param, "help", None), (path, param.name)
        r = runner.invoke(app, [*path, "--help"])
        assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_planted_drift_three_methods(tmp_path):
    """The benchmark row of docs/benchmarks.md at 5-year bins: the chain prior (Goldstone-GD or
    Adam) finds the planted words; without it (aligned afterwards) they drown in the noise of the
    separately fitted steps."""
    corpus = make_dated_corpus(tmp_path / "gen", sentences_per_year=100)
    prep = tmp_path / "prep"
    assert runner.invoke(app, ["data", "prepare", "corpus", "--source", str(corpus / "texts"), "--out", str(prep),
                               "--bin-years", "5", "--vocab", "3000", "--keep-words", "", "-q"]).exit_code == 0
    common = ["model=dwe", "data=cooc", f"data.path={prep}", "model.d=6", "model.batch_words=0",
              "model.batch_contexts=0", "model.test_steps=0", "model.test_mass=0", "model.val_mass=0", "trainer.steps=200",
              "trainer.eval_every=200", "trainer.checkpoint_every=200", "trainer.progress=false", "optimizer.lr=0.1"]
    methods = {"goldstone": ["optimizer=goldstone", "optimizer.base=adam", "optimizer.k1=10"],
               "adam": ["optimizer=adam"], "uncoupled": ["optimizer=adam", "model.coupled=false"]}
    prec = {}
    for name, over in methods.items():
        r = runner.invoke(app, ["train", *common, *over, f"run_dir={tmp_path / name}"])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["eval", "changes", str(tmp_path / name), "--planted", str(corpus)])
        assert r.exit_code == 0, r.output
        prec[name] = json.loads((tmp_path / name / "analysis" / "eval_changes.json").read_text())["precision_at_k"]
    assert prec["goldstone"] == 1.0 and prec["adam"] == 1.0 and prec["uncoupled"] < 1.0, prec


def test_alignment_of_an_uncoupled_run_rotates_means_and_posterior_draws(tmp_path):
    """Steps in unrelated coordinates (random O(d) per step): after _align_in_place the means agree,
    and posterior draws are rotated with them; export keeps std and rotations, and reads them back."""
    from goldstone_cli.analysis.embeddings import _align_in_place
    from goldstone_cli.analysis.export import export_embeddings, load_export

    g = torch.Generator().manual_seed(0)
    T, V, d = 4, 12, 3
    base = torch.randn(V, d, generator=g, dtype=F64)
    Q = torch.linalg.qr(torch.randn(T, d, d, generator=g, dtype=F64)).Q
    Q[2, :, 0] *= -1  # one mirrored step
    mu = torch.stack([base @ Q[t] for t in range(T)])  # (T, V, d)
    raw = torch.full((T, V, d), 4.0, dtype=F64)
    off = torch.zeros(T - 1, V, d, dtype=F64)
    emb = _emb(mu.clone(), posterior=Posterior(mu=mu, raw=raw, off=off))
    emb.source = tmp_path / "run"
    _align_in_place(emb)
    for t in range(1, T):
        torch.testing.assert_close(emb.U[t], emb.U[0])
    x0, x3 = emb.sample_pair(0, 3, 2000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(x0.mean(0), emb.U[0], atol=0.02, rtol=0)
    torch.testing.assert_close(x3.mean(0), emb.U[3], atol=0.02, rtol=0)
    assert float(word_changes(emb, 0, 3, min_count=0, samples=50).distance.max()) < 1e-12
    out = export_embeddings(emb, tmp_path / "exp", fmt="npy")
    back = load_export(out)
    torch.testing.assert_close(back.rotations, emb.rotations)
    torch.testing.assert_close(back.U, emb.U.float().double())
    assert back.std is not None and back.variational
    y0, _ = back.sample_pair(0, 3, 2000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(y0.mean(0), back.U[0], atol=0.02, rtol=0)
    with pytest.raises(AnalysisError, match="not empty"):
        export_embeddings(emb, out, fmt="npy")


def test_make_planted_cli_layouts_are_deterministic(tmp_path):
    for layout in ("dated", "semeval"):
        a, b = tmp_path / f"{layout}-a", tmp_path / f"{layout}-b"
        for out in (a, b):
            r = runner.invoke(app, ["data", "make-planted", "--out", str(out), "--layout", layout, "--seed", "3"])
            assert r.exit_code == 0, r.output
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
        r = runner.invoke(app, ["data", "make-planted", "--out", str(a), "--layout", layout])
        assert r.exit_code == 2 and "--force" in r.output
    assert (tmp_path / "dated-a" / "texts" / "1900.txt").is_file()
    truth = read_truth(tmp_path / "dated-a")
    assert truth.words == ["drift0", "drift1", "drift2"] and truth.change_years == [1915, 1930, 1945]
    r = runner.invoke(app, ["data", "make-planted", "--out", str(tmp_path / "c"), "--layout", "tsv"])
    assert r.exit_code == 2 and "--layout must be" in r.output
    r = runner.invoke(app, ["eval", "changes", str(tmp_path), "--planted", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no planted.tsv" in r.output
    # a damaged truth file: file and line, not an IndexError
    lines = (tmp_path / "dated-a" / "planted.tsv").read_text().splitlines()
    for k, bad in ((3, "drift1 1930"), (2, "drift0\tsoon\t0\t1")):
        f = tmp_path / f"planted-{k}.tsv"
        f.write_text("\n".join(lines[:k - 1] + [bad] + lines[k:]) + "\n")
        with pytest.raises(AnalysisError, match=rf"planted-{k}.tsv, line {k}: "):
            read_truth(f)
    r = runner.invoke(app, ["eval", "changes", str(tmp_path), "--planted", str(tmp_path / "planted-3.tsv")])
    assert r.exit_code == 2 and "line 3: expected 4 tab-separated columns" in r.output, r.output


def test_line_readers_split_at_newline_only(tmp_path):
    """goldstone_cli.io.split_lines / read_lines, which the analysis readers share: lines end at "\\n"
    only (U+2028, \\x85, \\x0b, \\x0c, \\x1c-\\x1e and a lone "\\r" belong to the line), one "\\r" before a
    "\\n" or at the end is dropped (Windows line ends), a final "\\n" makes no empty line, the empty
    lines in between stay (line numbers count)."""
    from goldstone_cli.io import read_lines, split_lines

    odd = ["a\u2028b", "c\x85", "\x0bd", "e\x0cf", "g\x1ch\x1di\x1e", "x\ry", "\u2029"]
    assert split_lines("\n".join(odd) + "\n") == odd
    assert split_lines("\r\n".join(odd) + "\r\n") == odd
    assert split_lines("a\r\n\nb") == ["a", "", "b"] and split_lines("a\r") == ["a"]
    assert split_lines("") == [] and split_lines("\n") == [""] and split_lines("a\r\r\n") == ["a\r"]
    for text in ("", "a", "a\n", "a\n\nb\n", " x \n\ty"):  # plain text: as str.splitlines
        assert split_lines(text) == text.splitlines()
    f = tmp_path / "lines.txt"
    f.write_bytes(("\r\n".join(odd) + "\r\n").encode("utf-8"))  # bytes: no newline translation on read either
    assert read_lines(f) == odd


def test_export_round_trips_words_that_str_splitlines_or_universal_newlines_would_split(tmp_path):
    """vocab.txt and steps.tsv are read with lines ending at "\\n" only: words holding U+2028, \\x85 or a
    lone "\\r" (which text-mode reading turned into a line end: a V mismatch) come back as written, and
    a vocab.txt / steps.tsv with Windows line ends reads the same."""
    from goldstone_cli.analysis.export import export_embeddings, load_export

    T, V, d = 3, 5, 2
    U = torch.randn(T, V, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    emb = _emb(U)
    emb.vocab = ["a\u2028b", "c\x85", "x\ry", "e\x0cf", "plain"]
    out = export_embeddings(emb, tmp_path / "exp", fmt="npy")
    back = load_export(out)
    assert back.vocab == emb.vocab and back.labels == emb.labels
    torch.testing.assert_close(back.U, U.float().double())
    for name in ("vocab.txt", "steps.tsv"):  # Windows line ends
        f = out / name
        f.write_bytes(f.read_bytes().replace(b"\n", b"\r\n"))
    again = load_export(out)
    assert again.vocab == emb.vocab and again.labels == emb.labels


def test_planted_truth_keeps_words_that_str_splitlines_would_split(tmp_path):
    """planted.tsv is read with lines ending at "\\n" only: a word holding U+2028 or \\x85 (a line end
    for str.splitlines: a row of 1 column, an error) reads whole, and line numbers still count file lines."""
    f = tmp_path / "planted.tsv"
    f.write_bytes("word\tchange_year\ttopic_before\ttopic_after\na\u2028b\t1850\t1\t2\n\nc\x85\t\t3\t3\n"
                  "bad\t1850\n".encode("utf-8"))
    with pytest.raises(AnalysisError, match="line 5: expected 4 tab-separated columns"):
        read_truth(f)
    f.write_bytes(f.read_bytes().rsplit(b"bad", 1)[0])
    truth = read_truth(f)
    assert truth.words == ["a\u2028b"] and truth.change_years == [1850] and truth.controls == ["c\x85"]
