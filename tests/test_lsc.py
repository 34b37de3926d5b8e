"""SemEval-2020 Task 1: the official layout (generated, with planted changes), `goldstone data
prepare corpus --source semeval:DIR`, `goldstone eval lsc`, and the scores against scipy."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from goldstone_cli.analysis.lsc import rankdata, spearman
from goldstone_cli.analysis.planted import make_semeval_corpus
from goldstone_cli.cli import app
from goldstone_cli.data.cooc import load_cooc
from goldstone_cli.data.corpus import prepare_corpus

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def test_spearman_and_ranks_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (5, 37, 100):
        a = rng.standard_normal(n)
        b = a + rng.standard_normal(n)
        b[: n // 3] = np.round(b[: n // 3])  # ties
        a[::4] = 0.5
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
        np.testing.assert_allclose(rankdata(b), stats.rankdata(b))
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def _gz(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def test_semeval_prepare_layout_windows_and_targets(tmp_path):
    root = tmp_path / "semeval2020_ulscd_eng"
    _gz(root / "corpus1" / "lemma" / "ccoha1.txt.gz", ["a b plane_nn", "c d 1999", "a a"])
    _gz(root / "corpus2" / "lemma" / "ccoha2.txt.gz", ["plane_nn fly b", "c d"])
    (root / "targets.txt").write_text("plane_nn\nmissing_vb\n")
    r = prepare_corpus(f"semeval:{root}", tmp_path / "prep", vocab_size=2, progress=False)
    assert r.n_steps == 2 and r.n_documents == 5
    c = load_cooc(tmp_path / "prep")
    assert c.labels == ["1810-1860", "1960-2010"]  # the English periods (folder name *_eng)
    assert "plane_nn" in c.vocab and len(c.vocab) == 2  # the target is kept, whatever its rank
    assert "1999" not in c.vocab
    assert c.manifest["settings"]["targets_missing"] == ["missing_vb"]
    r = runner.invoke(app, ["data", "prepare", "corpus", "--source", f"semeval:{root}", "--out", str(tmp_path / "cli"),
                            "-q"])
    assert r.exit_code == 0 and "1 targets never occur in the corpora: missing_vb" in r.output, r.output
    # a window never crosses a line: with every word in the vocabulary, 'b' (end of line 1) and 'c'
    # (start of line 2) never co-occur
    prepare_corpus(f"semeval:{root}", tmp_path / "all", vocab_size=100, progress=False)
    c = load_cooc(tmp_path / "all")
    i = c.word_index()
    m1 = c.matrices[0]
    assert m1[i["b"], i["c"]] == 0 and m1[i["plane_nn"], i["c"]] == 0
    assert m1[i["a"], i["b"]] == 4 and m1[i["a"], i["plane_nn"]] == 3  # distances 1 and 2 in line 1
    assert m1[i["a"], i["a"]] == 8  # 'a a' (line 3): a diagonal pair counts twice, as in cooc
    # layout errors
    (root / "corpus2" / "lemma" / "ccoha2.txt.gz").unlink()
    with pytest.raises(ValueError, match="no .txt.gz or .txt file"):
        prepare_corpus(f"semeval:{root}", tmp_path / "p2", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_corpus(f"semeval:{tmp_path / 'nope'}", tmp_path / "p3", progress=False)
    with pytest.raises(ValueError, match="--years does not apply"):
        prepare_corpus(f"semeval:{root}", tmp_path / "p4", years=(1800, 1900), progress=False)
    _gz(root / "corpus2" / "lemma" / "ccoha2.txt.gz", ["", "  "])  # a period without text
    with pytest.raises(ValueError, match=r"corpus2 holds no tokens \(ccoha2.txt.gz empty\)"):
        prepare_corpus(f"semeval:{root}", tmp_path / "p5", progress=False)
    assert not (tmp_path / "p5").exists()


def test_semeval_end_to_end_with_planted_changes(tmp_path):
    """Generated corpus in the exact layout -> prepare -> train (Goldstone-GD) -> eval lsc."""
    root = make_semeval_corpus(tmp_path / "semeval2020_ulscd_eng")
    for p in ("corpus1/lemma/synthetic1.txt.gz", "corpus2/lemma/synthetic2.txt.gz", "targets.txt",
              "truth/binary.txt", "truth/graded.txt"):
        assert (root / p).is_file()
    prep = tmp_path / "prep"
    r = runner.invoke(app, ["data", "prepare", "corpus", "--source", f"semeval:{root}", "--out", str(prep), "--vocab",
                            "200", "-q"])
    assert r.exit_code == 0, r.output
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "model=dwe", "data=cooc", f"data.path={prep}", "model.d=8", "model.batch_words=0",
                            "model.batch_contexts=0", "model.test_mass=0", "model.val_mass=0", "trainer.steps=200",
                            "trainer.eval_every=200", "trainer.checkpoint_every=200", "trainer.progress=false",
                            "optimizer=goldstone", "optimizer.base=adam", "optimizer.lr=0.1", "optimizer.k1=10",
                            f"run_dir={run}"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", "lsc", str(run), "--targets", str(root / "targets.txt"), "--truth", str(root)])
    assert r.exit_code == 0, r.output
    res = json.loads((run / "analysis" / "lsc" / "lsc.json").read_text())
    assert res["spearman"] > 0.8 and res["accuracy"] >= 0.75, res
    graded = {rec["target"]: rec["graded"] for rec in res["records"]}
    assert max(graded[f"target{i}_nn"] for i in range(3)) < min(graded[f"target{i}_nn"] for i in range(5, 8))
    t2 = (run / "analysis" / "lsc" / "answer" / "task2" / "english.txt").read_text().splitlines()
    assert len(t2) == 8 and t2[0].startswith("target0_nn\t")
    t1 = (run / "analysis" / "lsc" / "answer" / "task1" / "english.txt").read_text().splitlines()
    assert {ln.split("\t")[1] for ln in t1} <= {"0", "1"}
    # the posterior score and the errors
    r = runner.invoke(app, ["eval", "lsc", str(run), "--targets", str(root / "targets.txt"), "--score", "posterior",
                            "--samples", "50", "--threshold", "median", "--out", str(tmp_path / "post")])
    assert r.exit_code == 0, r.output
    assert sum(json.loads((tmp_path / "post" / "lsc.json").read_text())["records"][i]["binary"] for i in range(8)) == 4
    bad = tmp_path / "targets_bad.txt"
    bad.write_text("target0_nn\nairplane_nn\n")
    r = runner.invoke(app, ["eval", "lsc", str(run), "--targets", str(bad)])
    assert r.exit_code == 2 and "1 targets are not in the vocabulary" in r.output and "airplane_nn" in r.output
    (tmp_path / "truth").mkdir()
    (tmp_path / "truth" / "binary.txt").write_text("target0_nn\t1\n")
    (tmp_path / "truth" / "graded.txt").write_text("target0_nn\t0.5\n")
    r = runner.invoke(app, ["eval", "lsc", str(run), "--targets", str(root / "targets.txt"), "--truth", str(tmp_path)])
    assert r.exit_code == 2 and "has no value for 7 targets" in r.output
    r = runner.invoke(app, ["eval", "lsc", str(run), "--targets", str(root / "targets.txt"), "--threshold", "high"])
    assert r.exit_code == 2 and "--threshold must be" in r.output
    # both periods the same step (1810 and 1850 are in 1810-1860): refused, not scored as rounding noise
    r = runner.invoke(app, ["eval", "lsc", str(run), "--targets", str(root / "targets.txt"), "--truth", str(root),
                            "--from", "1810", "--to", "1850", "--out", str(tmp_path / "same")])
    assert r.exit_code == 2 and "--from and --to are the same step (1810-1860)" in r.output, r.output
    assert "accuracy" not in r.output and not (tmp_path / "same").exists()
    # a year between the two periods is in no step (it used to mean the earlier period)
    r = runner.invoke(app, ["age-words", "target5_nn", "--run", str(run), "--to", "1900"])
    assert r.exit_code == 2 and "year 1900 is in no step" in r.output and "between 1810-1860 and 1960-2010" in r.output


def test_targets_and_truth_keep_words_that_str_splitlines_would_split(tmp_path):
    """targets.txt (analysis.lsc and data.semeval) and truth/*.txt: lines end at "\\n" only, so a
    target holding U+2028, \\x85 or \\x0c (str.splitlines split it into two lines) or a lone "\\r"
    (text-mode reading) comes back whole; Windows line ends and spaces between the fields still read."""
    from goldstone_cli.analysis.lsc import read_targets, read_truth
    from goldstone_cli.data.semeval import read_targets as semeval_targets

    words = ["a\u2028b_nn", "c\x85d_vb", "e\x0cf_nn", "x\ry_nn", "plain_nn"]
    (tmp_path / "targets.txt").write_bytes(("\r\n".join(words) + "\r\n").encode("utf-8"))
    assert read_targets(tmp_path / "targets.txt") == words
    assert semeval_targets(tmp_path / "targets.txt") == words
    truth = tmp_path / "truth"
    truth.mkdir()
    (truth / "binary.txt").write_bytes("".join(f"{w}\t{i % 2}\n" for i, w in enumerate(words)).encode("utf-8"))
    (truth / "graded.txt").write_bytes("".join(f"{w}  {i / 10}\r\n" for i, w in enumerate(words)).encode("utf-8"))
    binary, graded = read_truth(tmp_path, words)
    assert binary == {w: i % 2 for i, w in enumerate(words)}
    assert graded == {w: i / 10 for i, w in enumerate(words)}


def test_semeval_target_listed_twice_names_the_file_and_the_word(tmp_path):
    """A target given twice failed later with "vocabulary words must be unique" (no file, no word);
    it is refused as `eval lsc` refuses it ("lists a word twice"), naming the file and the word."""
    root = tmp_path / "semeval2020_ulscd_eng"
    _gz(root / "corpus1" / "lemma" / "ccoha1.txt.gz", ["a b plane_nn", "c d"])
    _gz(root / "corpus2" / "lemma" / "ccoha2.txt.gz", ["plane_nn fly b", "c d"])
    (root / "targets.txt").write_text("plane_nn\nfly_vb\nplane_nn\n")
    targets = root / "targets.txt"
    with pytest.raises(ValueError, match=f"targets file {targets} lists a word twice: 'plane_nn'; remove"):
        prepare_corpus(f"semeval:{root}", tmp_path / "prep", vocab_size=2, progress=False)
    r = runner.invoke(app, ["data", "prepare", "corpus", "--source", f"semeval:{root}", "--out", str(tmp_path / "cli"),
                            "-q"])
    assert r.exit_code == 1 and "lists a word twice: 'plane_nn'" in r.output and str(targets) in r.output.replace("\n", "")
    assert not (tmp_path / "prep").exists() and not (tmp_path / "cli").exists()
