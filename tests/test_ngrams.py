"""Google Books Ngram pipeline: real v2 rows, hand-computed co-occurrences, v2/v3/gzip equality,
malformed lines, parallel workers, interruption and resume."""

from __future__ import annotations

import contextlib
import csv
import gzip
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from goldstone_cli.cli import app
from goldstone_cli.data import ngrams
from goldstone_cli.data.cooc import CoocFormatError, load_cooc
from goldstone_cli.data.ngrams import MalformedInputError, prepare_ngrams

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ONEGRAM_REAL = DATA / "ngrams" / "googlebooks-eng-all-1gram-20120701-years-subset.tsv.gz"
TOTALCOUNTS_REAL = DATA / "ngrams" / "googlebooks-eng-all-totalcounts-20120701.txt"
TAG_RE = re.compile(r"_(NOUN|VERB|ADJ|ADV|PRON|DET|ADP|NUM|CONJ|PRT|X|\.)_?$")


def real(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real sample data not found at {path} (the checkout's ../shared/data)")
    return path


# ------------------------------------------------------------------------------------------ writers

def write_v2(path: Path, rows, gz: bool = False) -> Path:
    text = "".join(f"{n}\t{y}\t{m}\t{v}\n" for n, y, m, v in rows).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


def write_v3(path: Path, rows, gz: bool = False) -> Path:
    by = defaultdict(list)
    for n, y, m, v in rows:
        by[n].append(f"{y},{m},{v}")
    text = "".join(f"{n}\t" + "\t".join(e) + "\n" for n, e in by.items()).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


def dense(d, t):
    return d.matrices[t].toarray()


def same_output(a, b) -> None:
    assert a.vocab == b.vocab and a.labels == b.labels
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.totals, b.totals)
    for x, y in zip(a.matrices, b.matrices):
        assert (x != y).nnz == 0


ONE = [("a", 1900, 10, 1), ("A", 1901, 2, 1), ("b", 1900, 5, 1), ("c", 1900, 3, 1), ("x", 1900, 1, 1),
       ("cat_NOUN", 1900, 50, 1), ("_START_", 1900, 99, 1)]
FIVE = [
    ("a x b a c", 1900, 2, 1),          # the hand-computed 5-gram
    ("a x b a c", 1901, 1, 1),
    ("A x b _END_ y", 1901, 3, 2),      # capitals are lowercased; _END_ is an out-of-vocabulary position
    ("b_NOUN c a a a", 1900, 7, 1),     # POS-annotated: skipped
    ("a b c a b", 1850, 100, 9),        # outside --years
]


def expected_hand() -> tuple[np.ndarray, np.ndarray]:
    """By hand, vocabulary (a, b, c). 'a x b a c' at positions 0..4: pairs (a0,b2) d=2 w3, (a0,a3) d=3 w2,
    (a0,c4) d=4 w1, (b2,a3) d=1 w4, (b2,c4) d=2 w3, (a3,c4) d=1 w4. Times match count n:
    a-b 7n, a-a 2n (diagonal doubled: 4n), a-c 5n, b-c 3n.  'a x b _END_ y' (n=3): (a0,b2) d=2 w3 -> a-b 9."""
    def m(n):
        return np.array([[4 * n, 7 * n, 5 * n], [7 * n, 0, 3 * n], [5 * n, 3 * n, 0]])
    e1901 = m(1)
    e1901[0, 1] += 9
    e1901[1, 0] += 9
    return m(2), e1901


# ------------------------------------------------------------------------------------------ real data

def test_real_v2_onegrams_parse_with_independent_totals():
    path = real(ONEGRAM_REAL)
    tab, meta = ngrams.onegram_counts(path, (1400, 2100))
    assert meta["layout"] == "v2" and meta["malformed"] == 0 and meta["annotated_lines"] == 0
    # Independent computation: plain csv reading.
    per_year = defaultdict(int)
    per_word = defaultdict(int)
    n = 0
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            per_year[int(row[1])] += int(row[2])
            per_word[row[0]] += int(row[2])
            n += 1
    assert meta["lines"] == n == 53_393
    years = np.arange(1400, 2101)
    np.testing.assert_array_equal(np.array(meta["year_totals"]), [per_year.get(int(y), 0) for y in years])
    assert dict(zip(tab["word"].to_pylist(), tab["count"].to_pylist())) == dict(per_word)
    assert len(per_word) == 200  # the tokens "1800".."1999"
    # A sub-range keeps only its years.
    _, sub = ngrams.onegram_counts(path, (1900, 1909))
    assert sub["year_totals"] == [per_year[y] for y in range(1900, 1910)]
    assert sub["out_of_range_lines"] > 0


def test_real_totalcounts_parses():
    path = real(TOTALCOUNTS_REAL)
    tc = ngrams.read_totalcounts(path)
    recs = re.findall(r"(\d+),(\d+),(\d+),(\d+)", path.read_text())
    assert len(tc["year"]) == len(recs) == 425
    assert (tc["year"][0], tc["match_count"][0], tc["page_count"][0], tc["volume_count"][0]) == (1505, 32059, 231, 1)
    assert (tc["year"][-1], tc["match_count"][-1], tc["page_count"][-1], tc["volume_count"][-1]) == \
        (2008, 19482936409, 108811006, 206272)
    assert np.all(np.diff(tc["year"]) > 0)
    np.testing.assert_array_equal(tc["match_count"], [int(r[1]) for r in sorted(recs, key=lambda r: int(r[0]))])


def test_bad_totalcounts_is_reported(tmp_path):
    bad = tmp_path / "tc.txt"
    bad.write_text(" \t1800,1,2,3\t1801,x,2,3\t")
    with pytest.raises(MalformedInputError, match="record 2"):
        ngrams.read_totalcounts(bad)


def test_real_onegrams_with_totalcounts_end_to_end(tmp_path):
    one, tcp = real(ONEGRAM_REAL), real(TOTALCOUNTS_REAL)
    # Independent relfreq ranking: mean over years (with a total) of count / total(year).
    tc = {int(y): int(m) for y, m, _, _ in re.findall(r"(\d+),(\d+),(\d+),(\d+)", tcp.read_text())}
    y0, y1 = 1850, 1999
    score = defaultdict(float)
    count = defaultdict(int)
    with gzip.open(one, "rt") as f:
        for ln in f:
            w, y, m, _ = ln.rstrip("\n").split("\t")
            y, m = int(y), int(m)
            if y0 <= y <= y1:
                score[w] += m / tc[y]
                count[w] += m
    ranked = sorted(score, key=lambda w: (-score[w], -count[w], w))[:20]
    rng = np.random.default_rng(1)
    toks = sorted(count)
    rows = [(" ".join(rng.choice(toks, 5)), int(rng.integers(y0, y1 + 1)), int(rng.integers(1, 9)), 1) for _ in range(300)]
    five = write_v2(tmp_path / "five.tsv", rows)
    r = prepare_ngrams([one], [five], tmp_path / "out", years=(y0, y1), vocab_size=20, totalcounts=tcp, progress=False)
    d = load_cooc(r.out, verify=True)
    assert d.vocab == ranked
    assert d.counts.tolist() == [count[w] for w in ranked]
    np.testing.assert_array_equal(d.tokens, [tc[y] for y in range(y0, y1 + 1)])
    assert d.years.tolist() == list(range(y0, y1 + 1)) and d.labels[0] == str(y0)
    assert d.manifest["settings"]["tokens_source"] == "totalcounts"
    roles = sorted(i["role"] for i in d.manifest["inputs"])
    assert roles == ["fivegrams", "onegrams", "totalcounts"]


# ------------------------------------------------------------------------------------------ counting rule

@pytest.mark.parametrize("layout,gz", [("v2", False), ("v2", True), ("v3", False), ("v3", True)])
def test_hand_computed_cooccurrences(tmp_path, layout, gz):
    write = write_v2 if layout == "v2" else write_v3
    one = write(tmp_path / "one", ONE, gz)
    five = write(tmp_path / "five", FIVE, gz)
    r = prepare_ngrams([one], [five], tmp_path / "out", years=(1900, 1902), vocab_size=3, workers=1, progress=False)
    d = load_cooc(r.out)
    assert d.vocab == ["a", "b", "c"]  # relfreq: a (10/19+2/2)/2 > b 5/19/2 > c 3/19/2 > x; cat_NOUN and _START_ excluded
    assert d.counts.tolist() == [12, 5, 3]
    assert d.tokens.tolist() == [19, 2, 0]  # 1-gram totals without the annotated token and the marker
    e1900, e1901 = expected_hand()
    np.testing.assert_array_equal(dense(d, 0), e1900)
    np.testing.assert_array_equal(dense(d, 1), e1901)
    np.testing.assert_array_equal(dense(d, 2), np.zeros((3, 3)))  # 1902: no data, kept as an empty step
    for m in d.matrices:
        assert (m != m.T).nnz == 0
    assert d.totals.tolist() == [int(e1900.sum()), int(e1901.sum()), 0]
    assert d.manifest["inputs"][1]["layout"] == layout
    assert d.manifest["stats"]["annotated_lines"] == 2  # the b_NOUN 5-gram line and the cat_NOUN 1-gram
    assert d.manifest["malformed"]["lines"] == 0


def test_count_rank_keep_case_and_pos_keep(tmp_path):
    one = write_v2(tmp_path / "one", ONE)
    five = write_v2(tmp_path / "five", FIVE + [("cat_NOUN x _START_ y z", 1900, 1, 1)])  # annotated unless keep
    r = prepare_ngrams([one], [five], tmp_path / "o1", years=(1900, 1901), vocab_size=3, rank="count", progress=False)
    d = load_cooc(r.out)
    assert d.vocab == ["a", "b", "c"]  # counts 12, 5, 3 (cat_NOUN, _START_ dropped)
    r = prepare_ngrams([one], [five], tmp_path / "o2", years=(1900, 1901), vocab_size=2, rank="count", pos="keep",
                       lowercase=False, progress=False)
    d = load_cooc(r.out)
    assert d.vocab == ["_START_", "cat_NOUN"]  # kept verbatim, and the biggest counts
    assert dense(d, 0)[0, 1] == 3 and r.total_weight == 6  # distance 2: weight 3, both halves


def annotated(ngram: str) -> bool:
    return any(TAG_RE.search(t) and t not in ("_START_", "_END_", "_ROOT_") for t in ngram.split(" "))


def reference(rows, vocab, years, lowercase=True):
    """Plain Python, line by line: the counting rule of DESIGN.md Sec. 5 with the default POS rule."""
    idx = {w: i for i, w in enumerate(vocab)}
    T, V = years[1] - years[0] + 1, len(vocab)
    out = np.zeros((T, V, V), dtype=np.int64)
    for ngram, y, m, _ in rows:
        if not years[0] <= y <= years[1]:
            continue
        toks = ngram.split(" ")
        if annotated(ngram):
            continue
        ids = [idx.get(t.lower() if lowercase else t) for t in toks]
        for p in range(5):
            for q in range(p + 1, 5):
                if ids[p] is not None and ids[q] is not None:
                    out[y - years[0], ids[p], ids[q]] += (5 - (q - p)) * m
                    out[y - years[0], ids[q], ids[p]] += (5 - (q - p)) * m
    return out


def random_rows(seed: int, n_ngrams: int = 400):
    rng = np.random.default_rng(seed)
    words = ["the", "The", "of", "cat", "dog", "Dog", "sat", "on", "mat", "zz", "q", "_START_", "_END_", "ran_VERB",
             "_NOUN_", "\"quote", "x.y", "naïve", "NA", "null"]
    p = np.linspace(2, 0.2, len(words))
    p /= p.sum()
    rows = []
    seen = set()
    for _ in range(n_ngrams):
        ng = " ".join(rng.choice(words, 5, p=p))
        if ng in seen:
            continue
        seen.add(ng)
        yrs = np.sort(rng.choice(np.arange(1895, 1916), rng.integers(1, 8), replace=False))
        rows += [(ng, int(y), int(rng.integers(1, 60)), 1) for y in yrs]
    return rows


def test_matches_plain_python_reference_across_blocks_layouts_and_workers(tmp_path):
    rows = random_rows(0) + random_rows(1)
    vocab = ["the", "of", "cat", "dog", "sat", "on", "mat", "\"quote", "naïve", "na", "null"]
    years = (1900, 1910)
    ref = reference(rows, vocab, years)
    one = write_v2(tmp_path / "one.tsv", [("the", 1900, 5, 1)])
    half = len(rows) // 2
    v2a = write_v2(tmp_path / "a.tsv", rows[:half])
    v3b = write_v3(tmp_path / "b.tsv.gz", rows[half:], gz=True)
    outs = {}
    for name, kw in {"big-blocks": dict(block_mb=16, workers=1), "tiny-blocks": dict(block_mb=0.004, workers=1),
                     "two-workers": dict(block_mb=0.004, workers=2)}.items():
        r = prepare_ngrams([one], [v2a, v3b], tmp_path / name, years=years, vocab_words=vocab, progress=False, **kw)
        outs[name] = load_cooc(r.out)
    assert v2a.stat().st_size > 4 * 4096  # the tiny blocks really split the file
    for d in outs.values():
        assert d.vocab == vocab
        got = np.stack([m.toarray() for m in d.matrices])
        np.testing.assert_array_equal(got, ref)
    same_output(outs["big-blocks"], outs["two-workers"])
    # annotated lines: one per row in v2, one per distinct ngram in v3
    n_ann = sum(annotated(n) for n, *_ in rows[:half]) + len({n for n, *_ in rows[half:] if annotated(n)})
    assert n_ann > 0
    assert outs["big-blocks"].manifest["stats"]["annotated_lines"] == n_ann


# ------------------------------------------------------------------------------------------ bad input

def test_malformed_lines_are_counted_with_an_example(tmp_path):
    rows = random_rows(2, 300)
    lines = [f"{n}\t{y}\t{m}\t{v}" for n, y, m, v in rows]
    assert len(lines) > 300
    lines.insert(10, "the cat sat on\t1900\t3\t1")  # 4 tokens in a 5-gram file
    lines.insert(50, "the cat sat on mat\t19x0\t3\t1")  # not an integer (slow path)
    five = tmp_path / "five.tsv"
    five.write_text("\n".join(lines) + "\n")
    one = write_v2(tmp_path / "one.tsv", [("the", 1900, 5, 1)])
    r = prepare_ngrams([one], [five], tmp_path / "out", years=(1900, 1910), vocab_words=["the", "cat"], progress=False)
    assert r.malformed_lines == 2 and r.total_lines == len(lines) + 1
    ex = {(e["line"], e["text"]) for e in r.malformed_examples}
    assert (11, "the cat sat on\t1900\t3\t1") in ex and (51, "the cat sat on mat\t19x0\t3\t1") in ex
    d = load_cooc(r.out)
    assert d.manifest["malformed"]["lines"] == 2
    np.testing.assert_array_equal(np.stack([m.toarray() for m in d.matrices]),
                                  reference(rows, ["the", "cat"], (1900, 1910)))


def test_more_than_one_percent_malformed_fails(tmp_path):
    rows = random_rows(3, 100)
    lines = [f"{n}\t{y}\t{m}\t{v}" for n, y, m, v in rows]
    for k in range(0, len(lines), 40):  # 2.5% broken: truncated lines
        lines[k] = lines[k].split("\t")[0]
    five = tmp_path / "five.tsv"
    five.write_text("\n".join(lines) + "\n")
    one = write_v2(tmp_path / "one.tsv", [("the", 1900, 5, 1)])
    with pytest.raises(MalformedInputError) as ei:
        prepare_ngrams([one], [five], tmp_path / "out", years=(1900, 1910), vocab_words=["the"], progress=False)
    msg = str(ei.value)
    assert str(five) in msg and "malformed" in msg and "line 1:" in msg and "1%" in msg
    assert not (tmp_path / "out").exists()
    # A looser threshold accepts the same file.
    r = prepare_ngrams([one], [five], tmp_path / "out", years=(1900, 1910), vocab_words=["the"], max_malformed=0.05,
                       progress=False)
    assert r.malformed_lines == len(range(0, len(lines), 40))


def test_not_an_ngram_file_and_truncated_gzip(tmp_path):
    one = write_v2(tmp_path / "one.tsv", [("the", 1900, 5, 1)])
    junk = tmp_path / "junk.txt"
    junk.write_text("hello world\nthis is not an ngram file\n")
    with pytest.raises(MalformedInputError, match="not a Google Books Ngram file"):
        prepare_ngrams([one], [junk], tmp_path / "out", years=(1900, 1910), vocab_words=["the"], progress=False)
    rows = random_rows(4, 200)
    data = gzip.compress("".join(f"{n}\t{y}\t{m}\t{v}\n" for n, y, m, v in rows).encode())
    cut = tmp_path / "cut.tsv.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MalformedInputError, match="truncated"):
        prepare_ngrams([one], [cut], tmp_path / "out", years=(1900, 1910), vocab_words=["the"], progress=False)


def test_missing_input_file_is_a_clear_error(tmp_path):
    one = write_v2(tmp_path / "one.tsv", [("the", 1900, 5, 1)])
    with pytest.raises(FileNotFoundError, match=r"--fivegrams: input file .*nope\.gz does not exist"):
        prepare_ngrams([one], [tmp_path / "nope.gz"], tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="--onegrams: no file matches"):
        prepare_ngrams([str(tmp_path / "*.missing")], [one], tmp_path / "out", progress=False)
    res = CliRunner().invoke(app, ["data", "prepare", "ngrams", "--onegrams", str(one), "--fivegrams",
                                   str(tmp_path / "nope.gz"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "does not exist" in res.output and "nope.gz" in res.output
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path):
    one = write_v2(tmp_path / "one.tsv", ONE)
    five = write_v2(tmp_path / "five.tsv", FIVE)
    kw = dict(years=(1900, 1901), vocab_size=3, progress=False)
    prepare_ngrams([one], [five], tmp_path / "out", **kw)
    with pytest.raises(FileExistsError, match="--force"):
        prepare_ngrams([one], [five], tmp_path / "out", **kw)
    r = prepare_ngrams([one], [five], tmp_path / "out", force=True, **{**kw, "vocab_size": 2})
    assert load_cooc(r.out).V == 2


# ------------------------------------------------------------------------------------------ interruption

def _interrupt_inputs(tmp_path):
    one = write_v2(tmp_path / "one.tsv", [(w, 1900, c, 1) for w, c in [("the", 50), ("of", 40), ("cat", 30),
                                                                       ("dog", 20), ("mat", 10)]])
    f1 = write_v2(tmp_path / "f1.tsv", random_rows(10, 300))
    f2_rows = random_rows(11, 300)
    return one, f1, f2_rows


def test_interrupted_in_a_worker_then_resumed(tmp_path, monkeypatch):
    one, f1, f2_rows = _interrupt_inputs(tmp_path)
    f2 = write_v2(tmp_path / "f2.tsv", f2_rows)
    kw = dict(years=(1900, 1910), vocab_size=5, workers=1, progress=False)
    base = load_cooc(prepare_ngrams([one], [f1, f2], tmp_path / "base", **kw).out)

    real_count = ngrams._count_fivegrams
    calls = []

    def failing(job, report):
        calls.append(job.path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if Ctrl-C arrived while the second file was read
        return real_count(job, report)

    monkeypatch.setattr(ngrams, "_count_fivegrams", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_ngrams([one], [f1, f2], out, **kw)
    assert not out.exists()
    with pytest.raises(CoocFormatError):
        load_cooc(out)
    parts = sorted(p.name for p in (tmp_path / ".out.work").iterdir())
    assert sum(p.startswith("fivegrams-") for p in parts) == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]

    monkeypatch.setattr(ngrams, "_count_fivegrams", real_count)
    r = prepare_ngrams([one], [f1, f2], out, **kw)
    assert r.processed_parts == 1  # only the second 5-gram file; the 1-grams and the first file were reused
    same_output(load_cooc(out), base)
    assert not (tmp_path / ".out.work").exists()


def _failed_on_f2(tmp_path, monkeypatch):
    """A run that saved f1's part and then failed on f2 (the work folder kept): (one, f1, f2, kwargs)."""
    one, f1, f2_rows = _interrupt_inputs(tmp_path)
    f2 = write_v2(tmp_path / "f2.tsv", f2_rows)
    kw = dict(years=(1900, 1910), vocab_size=5, workers=1, progress=False)
    real_count = ngrams._count_fivegrams

    def failing(job, report):
        if job.path == str(f2):
            raise RuntimeError("boom")
        return real_count(job, report)

    monkeypatch.setattr(ngrams, "_count_fivegrams", failing)
    with pytest.raises(RuntimeError, match="boom"):
        prepare_ngrams([one], [f1, f2], tmp_path / "out", **kw)
    monkeypatch.setattr(ngrams, "_count_fivegrams", real_count)
    return one, f1, f2, kw


def test_changed_input_is_not_trusted_after_an_interruption(tmp_path, monkeypatch):
    one, f1, f2, kw = _failed_on_f2(tmp_path, monkeypatch)
    write_v2(f1, random_rows(12, 300))  # f1 changes after its part was saved
    r = prepare_ngrams([one], [f1, f2], tmp_path / "out", **kw)
    assert r.processed_parts == 2  # both 5-gram files counted again; the 1-gram parts reused
    same_output(load_cooc(r.out), load_cooc(prepare_ngrams([one], [f1, f2], tmp_path / "base", **kw).out))


def test_killed_process_then_resumed(tmp_path):
    """A real kill (SIGKILL) while the run waits on its second 5-gram file, a named pipe."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs named pipes")
    one, f1, f2_rows = _interrupt_inputs(tmp_path)
    f2 = tmp_path / "f2.tsv"
    os.mkfifo(f2)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "goldstone_cli", "data", "prepare", "ngrams", "--onegrams", str(one),
           "--fivegrams", str(f1), "--fivegrams", str(f2), "--out", str(out), "--years", "1900-1910", "--vocab", "5",
           "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        work = tmp_path / ".out.work"
        while not (work.is_dir() and any(p.name.startswith("fivegrams-") for p in work.iterdir())):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the first 5-gram file was never finished"
            time.sleep(0.05)
        time.sleep(0.2)
        assert proc.poll() is None  # blocked on the pipe
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()
    with pytest.raises(CoocFormatError):
        load_cooc(out)
    f2.unlink()
    write_v2(f2, f2_rows)
    r = prepare_ngrams([one], [f1, f2], out, years=(1900, 1910), vocab_size=5, workers=1, progress=False)
    assert r.processed_parts == 1 and r.reused_parts >= 2
    base = prepare_ngrams([one], [f1, f2], tmp_path / "base", years=(1900, 1910), vocab_size=5, workers=1,
                          progress=False)
    a, b = load_cooc(out), load_cooc(base.out)
    same_output(a, b)
    strip = lambda m: {k: v for k, v in m.items() if k != "created_utc"}  # noqa: E731
    assert strip(a.manifest) == strip(b.manifest)


# ------------------------------------------------------------------------------------------ command line

def test_cli_help_and_run(tmp_path):
    res = CliRunner().invoke(app, ["data", "prepare", "ngrams", "--help"])
    assert res.exit_code == 0
    for opt in ["--onegrams", "--fivegrams", "--out", "--years", "--vocab", "--rank", "--totalcounts", "--pos",
                "--workers", "--block-mb", "--max-malformed", "--force", "--vocab-file", "--lowercase"]:
        assert opt in res.output
    one = write_v2(tmp_path / "one.tsv", ONE)
    write_v2(tmp_path / "five-1.tsv", FIVE[:2])
    write_v2(tmp_path / "five-2.tsv", FIVE[2:])
    res = CliRunner().invoke(app, ["data", "prepare", "ngrams", "--onegrams", str(one), "--fivegrams",
                                   str(tmp_path / "five-*.tsv"), "--out", str(tmp_path / "out"), "--years", "1900-1901",
                                   "--vocab", "3", "-q"])
    assert res.exit_code == 0, res.output
    assert "2 years x 3 words" in res.output
    d = load_cooc(tmp_path / "out")
    e1900, e1901 = expected_hand()
    np.testing.assert_array_equal(dense(d, 0), e1900)
    np.testing.assert_array_equal(dense(d, 1), e1901)


# ------------------------------------------------------------------------------------------ issue 12: overflow, CRLF

@pytest.mark.parametrize("layout", ["v2", "v3"])
def test_huge_match_counts_fail_instead_of_overflowing(tmp_path, layout):
    """20 lines of count 1e18 gave a negative yearly total (int64 wrap) and a wrong vocabulary."""
    write = write_v2 if layout == "v2" else write_v3
    big = 9 * 10**17  # 18 digits: the largest count both layouts parse (v3 allows at most 18 digits)
    one = write(tmp_path / "one", [(f"w{k}", 1900, big, 1) for k in range(20)])
    five = write(tmp_path / "five", FIVE)
    with pytest.raises(MalformedInputError, match=r"add up to 1.8e\+19.*64-bit integers and could overflow"):
        prepare_ngrams([one], [five], tmp_path / "out", years=(1900, 1901), vocab_size=3, workers=1, progress=False)
    assert not (tmp_path / "out").exists()
    # the same total split over two files: caught by the check over all files
    a = write(tmp_path / "a", [(f"w{k}", 1900, big, 1) for k in range(4)])
    b = write(tmp_path / "b", [(f"v{k}", 1900, big, 1) for k in range(4)])
    with pytest.raises(MalformedInputError, match="over all files"):
        prepare_ngrams([a, b], [five], tmp_path / "out2", years=(1900, 1901), vocab_size=3, workers=1, progress=False)
    # 5-grams: the bound includes the pair weights (up to 40x the match count)
    one_ok = write(tmp_path / "one_ok", ONE)
    big5 = write(tmp_path / "big5", [("a a a a a", 1900, 2 * 10**17, 1)])
    with pytest.raises(MalformedInputError, match="fivegram lines add up"):
        prepare_ngrams([one_ok], [big5], tmp_path / "out3", years=(1900, 1901), vocab_size=3, workers=1,
                       progress=False)


def test_large_counts_below_the_limit_are_exact(tmp_path):
    """Counts above 2^53 (where a float64 sum is no longer exact) are summed exactly in int64."""
    n = 2**53 + 1
    one = write_v2(tmp_path / "one", [("a", 1900, n, 1), ("a", 1901, n, 1), ("b", 1900, 3, 1), ("c", 1900, 1, 1)])
    five = write_v2(tmp_path / "five", [("a b c a b", 1900, n, 1), ("a b x a b", 1900, 1, 1)])  # same a-b, a-a pairs
    r = prepare_ngrams([one], [five], tmp_path / "out", years=(1900, 1901), vocab_size=3, rank="count", workers=1,
                       progress=False)
    d = load_cooc(r.out)
    assert d.vocab == ["a", "b", "c"]
    assert d.counts.tolist() == [2 * n, 3, 1] and d.tokens.tolist() == [n + 4, n]
    # 'a b c a b': a-b pairs (0,1) w4, (0,4) w1, (1,3) w3, (3,4) w4 -> 12 per match count; a-a (0,3) w2,
    # doubled on the diagonal -> 4
    ai, bi = d.vocab.index("a"), d.vocab.index("b")
    assert int(d.matrices[0][ai, bi]) == 12 * (n + 1) and int(d.matrices[0][ai, ai]) == 4 * (n + 1)


@pytest.mark.parametrize("layout", ["v2", "v3"])
@pytest.mark.parametrize("gz", [False, True])
def test_crlf_files_give_the_same_output(tmp_path, layout, gz):
    write = write_v2 if layout == "v2" else write_v3
    lf_one, lf_five = write(tmp_path / "one", ONE), write(tmp_path / "five", FIVE)
    crlf = {}
    for name, p in (("one", lf_one), ("five", lf_five)):
        text = p.read_bytes().replace(b"\n", b"\r\n")
        q = tmp_path / f"{name}_crlf"
        q.write_bytes(gzip.compress(text) if gz else text)
        crlf[name] = q
    kw = dict(years=(1900, 1902), vocab_size=3, workers=1, progress=False, block_mb=0.001)
    ref = load_cooc(prepare_ngrams([lf_one], [lf_five], tmp_path / "ref", **kw).out)
    r = prepare_ngrams([crlf["one"]], [crlf["five"]], tmp_path / "out", **kw)
    assert r.malformed_lines == 0
    same_output(ref, load_cooc(r.out))
    e1900, _ = expected_hand()
    np.testing.assert_array_equal(dense(load_cooc(r.out), 0), e1900)


# ------------------------------------------------------------------------------------------ inputs given twice, empty

@pytest.mark.parametrize("role", ["onegrams", "fivegrams"])
@pytest.mark.parametrize("kind", ["0 bytes", "gzip"])
def test_empty_input_file_is_an_error_naming_it(tmp_path, role, kind):
    empty = tmp_path / ("empty.gz" if kind == "gzip" else "empty.tsv")
    empty.write_bytes(gzip.compress(b"") if kind == "gzip" else b"")
    one, five = write_v2(tmp_path / "one.tsv", ONE), write_v2(tmp_path / "five.tsv", FIVE)
    args = ([one, empty], [five]) if role == "onegrams" else ([one], [five, empty])
    what = "a gzip file that holds no text" if kind == "gzip" else "0 bytes"
    with pytest.raises(MalformedInputError, match=rf"--{role}: .*{empty.name} is empty \({what}\); expected Google"):
        prepare_ngrams(*args, tmp_path / "out", years=(1900, 1901), vocab_size=3, progress=False)
    assert not (tmp_path / "out").exists()
    # the worker's own check (the library call, or a pipe that cannot be read ahead)
    with pytest.raises(MalformedInputError, match=f"{empty.name} is empty"):
        ngrams.fivegram_counts(empty, ["a"], (1900, 1901))
    o, f = args
    res = CliRunner().invoke(app, ["data", "prepare", "ngrams", "--out", str(tmp_path / "out"), "--years", "1900-1901",
                                   "--vocab", "3", "--quiet", *[x for p in o for x in ("--onegrams", str(p))],
                                   *[x for p in f for x in ("--fivegrams", str(p))]])
    assert res.exit_code == 1 and "is empty" in res.output and "wrote" not in res.output
    assert not (tmp_path / "out").exists()


def test_zero_total_weight_fails_instead_of_writing(tmp_path):
    one = write_v2(tmp_path / "one.tsv", ONE)
    five = write_v2(tmp_path / "five.tsv", [("a b c a b", 1850, 4, 1), ("b_NOUN a a a a", 1900, 2, 1),
                                            ("x y z a q", 1900, 1, 1)])  # outside the years, annotated, one word
    with pytest.raises(MalformedInputError, match=r"no co-occurrence .* 1 POS-annotated, 1 rows outside the years"):
        prepare_ngrams([one], [five], tmp_path / "out", years=(1900, 1901), vocab_size=3, progress=False)
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(app, ["data", "prepare", "ngrams", "--onegrams", str(one), "--fivegrams", str(five),
                                   "--out", str(tmp_path / "out"), "--years", "1900-1901", "--vocab", "3", "--quiet"])
    assert res.exit_code == 1 and "no co-occurrence" in res.output and "total weight" not in res.output


def _five_text(seed: int) -> bytes:
    return "".join(f"{n}\t{y}\t{m}\t{v}\n" for n, y, m, v in random_rows(seed, 300)).encode()


def test_the_same_rows_given_twice_are_an_error(tmp_path):
    one = write_v2(tmp_path / "one.tsv", [(w, 1900, c, 1) for w, c in [("the", 5), ("of", 4), ("cat", 3)]])
    text = _five_text(20)
    a = tmp_path / "a.tsv"
    a.write_bytes(text)
    kw = dict(years=(1900, 1910), vocab_size=3, workers=1, progress=False, block_mb=0.004)
    assert len(text) > 4 * 4096  # the repeats below lie blocks apart
    copy, packed, crlf = tmp_path / "copy.tsv", tmp_path / "a.tsv.gz", tmp_path / "a-crlf.tsv"
    copy.write_bytes(text)
    packed.write_bytes(gzip.compress(text))
    crlf.write_bytes(text.replace(b"\n", b"\r\n"))
    for other in (copy, packed, crlf):  # a copy under another name; the same file compressed, with CRLF
        with pytest.raises(ValueError, match=rf"--fivegrams: .*a\.tsv and .*{other.name} begin with the same line"):
            prepare_ngrams([one], [a, other], tmp_path / "out", **kw)
        assert not (tmp_path / "out").exists()
    # a file concatenated with itself, plain or as two gzip members: its first row comes back
    ngram, year = text.decode().split("\n", 1)[0].split("\t")[:2]
    n_lines = text.count(b"\n")
    for name, data in (("aa.tsv", text + text), ("aa.tsv.gz", gzip.compress(text) * 2)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MalformedInputError, match=re.escape(f"{name}: line {n_lines + 1} repeats line 1 (ngram "
                                                                f"{ngram!r}, year {year}) (was the file concatenated "
                                                                f"with itself?)")):
            prepare_ngrams([one], [tmp_path / name], tmp_path / "out", **kw)
    # a line repeated in place, also across a block boundary
    lines = text.splitlines(keepends=True)
    for k in (40, 250):
        (tmp_path / "rep.tsv").write_bytes(b"".join(lines[:k + 1] + lines[k:]))
        with pytest.raises(MalformedInputError, match=rf"rep\.tsv: line {k + 2} repeats line {k + 1} "):
            prepare_ngrams([one], [tmp_path / "rep.tsv"], tmp_path / "out", **kw)
    # the same ngram in another year, or different files: no error
    r = prepare_ngrams([one], [a, write_v2(tmp_path / "b.tsv", random_rows(21, 300))], tmp_path / "out", **kw)
    assert r.total_weight > 0 and load_cooc(r.out).V == 3


def test_the_same_content_through_two_pipes_is_an_error(tmp_path):
    """Pipes cannot be read ahead: the sha256 recorded while counting catches them."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs named pipes")
    import threading

    one = write_v2(tmp_path / "one.tsv", [(w, 1900, c, 1) for w, c in [("the", 5), ("of", 4), ("cat", 3)]])
    text = _five_text(22)
    pipes = [tmp_path / "p1", tmp_path / "p2"]

    def feed(p):
        with open(p, "wb") as f:
            f.write(text)

    for p in pipes:
        os.mkfifo(p)
    threads = [threading.Thread(target=feed, args=(p,), daemon=True) for p in pipes]
    for t in threads:
        t.start()
    with pytest.raises(ValueError, match=r"--fivegrams: .*p1 and .*p2 have the same content \(sha256"):
        prepare_ngrams([one], pipes, tmp_path / "out", years=(1900, 1910), vocab_size=3, workers=1, progress=False)
    for t in threads:
        t.join(10)
    assert not (tmp_path / "out").exists()


def test_changed_content_with_restored_mtime_is_counted_again(tmp_path, monkeypatch):
    """cp -p, rsync -a and tar restore the modification time: the size and mtime of the key match, the sha256
    recorded in the part does not."""
    one, f1, f2, kw = _failed_on_f2(tmp_path, monkeypatch)
    st = f1.stat()
    text = f1.read_bytes()
    changed = text.replace(b"\t1\n", b"\t2\n", 1)
    changed = changed[:changed.index(b"\t") + 1] + b"1909" + changed[changed.index(b"\t") + 5:]  # another year
    assert len(changed) == len(text) and changed != text
    f1.write_bytes(changed)
    os.utime(f1, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f1.stat().st_size == st.st_size and f1.stat().st_mtime_ns == st.st_mtime_ns
    r = prepare_ngrams([one], [f1, f2], tmp_path / "out", **kw)
    assert r.processed_parts == 2 and r.reused_parts == 2  # both 5-gram files; the two 1-gram passes reused
    same_output(load_cooc(r.out), load_cooc(prepare_ngrams([one], [f1, f2], tmp_path / "base", **kw).out))


# ------------------------------------------------------------------------------------------ fast and strict parsers

def test_invalid_utf8_in_a_short_line_prints_no_traceback(tmp_path):
    """pyarrow decodes an invalid row's text for the handler; invalid UTF-8 there printed 'Exception ignored'."""
    lines = [f"a b c d {k}\t1900\t3\t1\n".encode() for k in range(300)]
    lines.insert(12, b"a \xff c d e\t1900\t3\n")  # invalid UTF-8 and 3 fields
    lines.insert(40, b"a b c d e\t1900\n")  # 2 fields
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"".join(lines))
    code = ("import sys; from goldstone_cli.data import ngrams; "
            "S, m = ngrams.fivegram_counts(sys.argv[1], ['a', 'b'], (1900, 1901)); "
            "print(m['malformed'], sorted((e['line'], e['why']) for e in m['examples']), int(S.sum()))")
    p = subprocess.run([sys.executable, "-c", code, str(bad)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    assert p.stdout.split()[0] == "2" and "(13, 'invalid UTF-8')" in p.stdout and "(41, '2 tab-separated" in p.stdout
    assert int(p.stdout.split()[-1]) == 300 * 4 * 3  # each good line: a-b at distance 1 (weight 4) times 3


@pytest.mark.parametrize("col", [1, 2, 3])
@pytest.mark.parametrize("value", ["-1", "-0", "0x5", " 5", "5 ", "1234567890123456789"])
def test_v2_fast_and_strict_paths_agree_on_numbers(tmp_path, col, value):
    """pyarrow's int64 parser takes some of these (a negative volume_count was counted); the strict check
    of each line does not. Both paths now call the line malformed."""
    good = [f"a b c d {k}\t1900\t3\t1" for k in range(300)]
    f = good[7].split("\t")
    f[col] = value
    lines = good[:7] + ["\t".join(f)] + good[8:]
    block = ("\n".join(lines) + "\n").encode()
    rows = ngrams._parse_v2(block, iss := ngrams._Issues("x"), 0, len(lines))  # the fast path first
    assert iss.malformed == 1 and iss.examples[0]["line"] == 8, iss.examples
    assert 7 not in rows.line and len(rows.line) == 299
    _, kept = ngrams._strict_filter(block, "v2", ngrams._Issues("x"), 0)
    np.testing.assert_array_equal(kept, rows.line)


# ------------------------------------------------------------------------------------------ workers and SIGKILL

def _proc_table() -> dict[int, tuple[int, str, bytes]]:
    """pid -> (parent pid, state, start time) of every process, from /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    rest = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            out[int(d)] = (int(rest[1]), rest[0].decode(), rest[19])
    return out


def _descendants(pid: int) -> dict[int, bytes]:
    table = _proc_table()
    found, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for c, (pp, _, start) in table.items():
            if pp == p and c not in found:
                found[c] = start
                todo.append(c)
    return found


def test_workers_exit_when_the_main_process_is_killed(tmp_path):
    """A real SIGKILL of the main process while one worker is busy (a pipe fed without end) and one waits
    on a pipe nobody writes: every process of the run (forkserver, workers) must be gone in seconds."""
    if not (hasattr(os, "mkfifo") and os.path.isdir("/proc/self")):
        pytest.skip("needs named pipes and /proc")
    import signal
    import threading

    one = write_v2(tmp_path / "one.tsv", [(w, 1900, c, 1) for w, c in [("w0", 5), ("w1", 4), ("w2", 3)]])
    busy, idle = tmp_path / "busy.tsv", tmp_path / "idle.tsv"
    os.mkfifo(busy)
    os.mkfifo(idle)
    fed = [0]
    stop = threading.Event()

    def feed():  # distinct rows, block after block, until the reader dies
        try:
            with open(busy, "wb") as f:
                for b in range(10**6):
                    if stop.is_set():
                        return
                    chunk = "".join(f"w{k % 3} w{b} x{k} y z\t1900\t3\t1\n" for k in range(2000)).encode()
                    f.write(chunk)
                    fed[0] += len(chunk)
        except (BrokenPipeError, OSError):
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    cmd = [sys.executable, "-m", "goldstone_cli", "data", "prepare", "ngrams", "--onegrams", str(one),
           "--fivegrams", str(busy), "--fivegrams", str(idle), "--out", str(tmp_path / "out"), "--years", "1900-1901",
           "--vocab", "3", "--workers", "2", "--block-mb", "0.05", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs: dict[int, bytes] = {}
    try:
        deadline = time.monotonic() + 120
        while True:  # two workers (grandchildren: main -> forkserver -> worker), one of them reading
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the workers never started"
            table = _proc_table()
            procs = _descendants(proc.pid)
            workers = [p for p in procs if table.get(table.get(p, (0,))[0], (0,))[0] == proc.pid]
            if len(workers) >= 2 and fed[0] > (4 << 20):
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()
        alive = procs
        while alive and time.monotonic() < t0 + 15:
            time.sleep(0.1)
            table = _proc_table()
            alive = {p: s for p, s in procs.items() if p in table and table[p][2] == s and table[p][1] != "Z"}
        assert not alive, f"still running {time.monotonic() - t0:.0f} s after the kill: {sorted(alive)}"
        assert time.monotonic() - t0 < 10
    finally:
        stop.set()
        table = _proc_table()
        for p, s in procs.items():  # never leave a process of a failed test behind
            if p in table and table[p][2] == s:
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if feeder.is_alive():  # unblock a feeder still waiting for a reader
            with contextlib.suppress(OSError):
                os.close(os.open(busy, os.O_RDONLY | os.O_NONBLOCK))
        feeder.join(10)
    # nothing of the killed run is trusted: with real files the run completes and matches a fresh one
    busy.unlink()
    idle.unlink()
    write_v2(busy, [("w0 w1 w2 w0 w1", 1900, 2, 1)])
    write_v2(idle, [("w2 w1 x y z", 1901, 1, 1)])
    kw = dict(years=(1900, 1901), vocab_size=3, workers=2, progress=False)
    r = prepare_ngrams([one], [busy, idle], tmp_path / "out", **kw)
    same_output(load_cooc(r.out), load_cooc(prepare_ngrams([one], [busy, idle], tmp_path / "ref", **kw).out))


# ------------------------------------------------------------------------------------------ review: --vocab-file case

def test_given_vocabulary_is_lowercased_like_the_tokens(tmp_path):
    """--vocab-file words were used as written: with the tokens lowercased (the default), 'A' got count
    0 and no co-occurrences, silently. They are lowercased as the tokens are; words that then repeat
    are refused by name; words that never occur are warned about."""
    one = write_v2(tmp_path / "one", ONE)
    five = write_v2(tmp_path / "five", FIVE)
    r = prepare_ngrams([one], [five], tmp_path / "o1", years=(1900, 1902), vocab_words=["A", "B", "C"], workers=1,
                       progress=False)
    d = load_cooc(r.out)
    assert d.vocab == ["a", "b", "c"] and d.counts.tolist() == [12, 5, 3]
    e1900, e1901 = expected_hand()
    np.testing.assert_array_equal(dense(d, 0), e1900)
    np.testing.assert_array_equal(dense(d, 1), e1901)
    with pytest.raises(ValueError, match=r"lists 1 word\(s\) twice after lowercasing: 'a' \(as 'a', 'A'\); remove "
                                         r"the repeats \(or pass --keep-case\)"):
        prepare_ngrams([one], [five], tmp_path / "o2", years=(1900, 1902), vocab_words=["a", "b", "A"], progress=False)
    assert not (tmp_path / ".o2.work").exists()  # refused before any counting
    with pytest.raises(ValueError, match=r"lists 1 word\(s\) twice: 'b' \(as 'b', 'b'\); remove the repeats$"):
        prepare_ngrams([one], [five], tmp_path / "o3", years=(1900, 1902), vocab_words=["a", "b", "b"], progress=False)
    with pytest.warns(UserWarning, match=r"1 of the 3 given vocabulary words never occur in the 1-grams in 1900-1902 "
                                         r"\(count 0\), e.g. \['paris'\]; check their spelling$"):
        r = prepare_ngrams([one], [five], tmp_path / "o4", years=(1900, 1902), vocab_words=["a", "Paris", "b"],
                           workers=1, progress=False)
    assert load_cooc(r.out).vocab == ["a", "paris", "b"]
    # --keep-case: the words as written (Google's case)
    r = prepare_ngrams([one], [five], tmp_path / "o5", years=(1900, 1902), vocab_words=["a", "A", "b"],
                       lowercase=False, workers=1, progress=False)
    assert load_cooc(r.out).counts.tolist() == [10, 2, 5]
    # the command line: a vocabulary file with a byte order mark and Windows line ends
    vf = tmp_path / "vocab.txt"
    vf.write_bytes("\ufeffA\r\nB\r\nc\r\n".encode("utf-8"))
    res = CliRunner().invoke(app, ["data", "prepare", "ngrams", "--onegrams", str(one), "--fivegrams", str(five),
                                   "--out", str(tmp_path / "cli"), "--years", "1900-1902", "--vocab-file", str(vf),
                                   "-j", "1", "-q"])
    assert res.exit_code == 0, res.output
    d = load_cooc(tmp_path / "cli")
    assert d.vocab == ["a", "b", "c"] and d.counts.tolist() == [12, 5, 3]
    np.testing.assert_array_equal(dense(d, 0), e1900)
