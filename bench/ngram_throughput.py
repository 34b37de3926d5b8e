"""Benchmark: Google Books v2 5-gram co-occurrence counting, MB/s of uncompressed input per process.

    python -m bench.ngram_throughput                  # 2 files x 256 MB, vocabulary 10,000
    python -m bench.ngram_throughput --mb 32          # quicker smoke run

The real 5-gram files are not available offline, so the script first generates (once, into
``bench/results/ngram_data/``) files in the exact v2 layout ``ngram<TAB>year<TAB>match<TAB>volumes``
with realistic distributions:
- 200,000 word types with Zipf(1.07) frequencies and frequency-dependent lengths (frequent words are
  short; mean token length about 5 letters), 8% of tokens capitalized, punctuation tokens among the
  most frequent ones; 6% of 5-grams start with ``_START_``, 6% end with ``_END_``, 4% carry a POS tag
  (``word_NOUN``: skipped by the default rule, as in the real files);
- per 5-gram, the years from a first appearance ``2008 - Exponential(45)`` to 2008, each present with
  a per-ngram probability, so rows concentrate in recent years like the real corpus; match counts
  heavy-tailed with the v2 inclusion threshold of >= 40 in total; volume counts <= match counts;
- lines grouped by 5-gram with increasing years, 5-grams sorted, about 45 bytes per line.
A 1-gram file over 1800-2008 from the same word distribution gives the 10,000-word vocabulary.

Measurements, each in a fresh process so that its peak RSS is its own:
1. one plain 5-gram file, one process (``fivegram_counts``): MB/s and peak RSS;
2. the same file gzip-compressed (MB/s of *uncompressed* text);
3. ``prepare_ngrams`` end to end with 2 worker processes over all files (1-grams, 5-grams, merge, write).
Reported: wall-clock MB/s, MB per CPU-second of the process (robust to other load on a shared machine;
equal to the wall-clock rate on an idle core), peak RSS (VmHWM; for 3. the largest worker), and the
1-minute load average when the run started. Results: ``bench/results/ngram_throughput.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

RESULTS = Path(__file__).resolve().parent / "results"
YEARS = (1800, 2008)
GEN_VERSION = 1


def _words(rng: np.random.Generator, W: int) -> pa.Array:
    """W distinct lowercase words, shorter for more frequent ranks, plus punctuation at the top."""
    rank = np.arange(W)
    lens = np.clip(np.round(1.5 + 0.55 * np.log2(rank + 2) + rng.normal(0, 1.2, W)), 1, 18).astype(np.int64)
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    freq = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9,
                     1.5, 1.0, 0.8, 0.15, 0.15, 0.1, 0.07])
    chars = letters[rng.choice(26, size=int(lens.sum()), p=freq / freq.sum())]
    offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    arr = pa.StringArray.from_buffers(W, pa.py_buffer(offs), pa.py_buffer(chars.tobytes()))
    punct = pa.array([",", ".", "'s", ";", ":", "-", "?", "!", "(", ")", "\""])
    uniq = pc.unique(arr)  # first occurrences, in rank order
    return pa.concat_arrays([uniq.slice(0, 2), punct, uniq.slice(2)])


def _write_lines(f, cols: list) -> int:
    """Write tab-separated columns as lines (no quoting: v2 ngrams may contain quotes); returns bytes."""
    strs = [c if isinstance(c, pa.Array) and pa.types.is_string(c.type) else pa.array(np.asarray(c)).cast(pa.string())
            for c in cols]
    lines = pc.binary_join_element_wise(*strs, "\t")
    text = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(lines)], pa.int32()), lines), "\n")[0].as_py()
    data = (text + "\n").encode()
    f.write(data)
    return len(data)


def _zipf_p(W: int, s: float = 1.07) -> np.ndarray:
    p = 1.0 / np.arange(1, W + 1) ** s
    return p / p.sum()


def generate_fivegrams(path: Path, target_mb: float, seed: int, words: pa.Array) -> int:
    """Write a v2 5-gram file of about ``target_mb`` MB; returns its size in bytes."""
    rng = np.random.default_rng(seed)
    W = len(words)
    p = _zipf_p(W)
    caps = pc.utf8_capitalize(words)
    tags = pa.array(["NOUN", "VERB", "ADJ", "ADV", "PRON", "DET", "ADP", "NUM", "CONJ", "PRT"])
    written = 0
    with open(path, "wb") as f:
        while written < target_mb * 1e6:
            U = int(min(200_000, max(5_000, (target_mb * 1e6 - written) / 600)))  # ~600 bytes per 5-gram
            ids = rng.choice(W, size=(U, 5), p=p)  # (U, 5)
            cols = []
            for k in range(5):
                tok = pc.if_else(pa.array(rng.random(U) < 0.08), pc.take(caps, pa.array(ids[:, k])),
                                 pc.take(words, pa.array(ids[:, k])))
                if k == 0:
                    tok = pc.if_else(pa.array(rng.random(U) < 0.06), pa.scalar("_START_"), tok)
                if k == 4:
                    tok = pc.if_else(pa.array(rng.random(U) < 0.06), pa.scalar("_END_"), tok)
                if k == 2:
                    tagged = pc.binary_join_element_wise(tok, pc.take(tags, pa.array(rng.integers(0, 10, U))), "_")
                    tok = pc.if_else(pa.array(rng.random(U) < 0.04), tagged, tok)
                cols.append(tok)
            ng = pc.unique(pc.binary_join_element_wise(*cols, " "))
            ng = pc.take(ng, pc.sort_indices(ng))
            U = len(ng)
            first = np.maximum(YEARS[1] - np.floor(rng.exponential(45, U)).astype(np.int64), 1550)  # (U,)
            span = YEARS[1] - first + 1
            present = rng.beta(1.2, 2.5, U)  # per-ngram share of years with a row
            nrows = np.maximum(1, rng.binomial(span, present))
            rep = np.repeat(np.arange(U), nrows)  # (E,)
            within = np.arange(len(rep)) - np.repeat(np.cumsum(nrows) - nrows, nrows)
            # distinct years: the last nrows years of the span, thinned deterministically
            stride = np.maximum(span // nrows, 1)
            year = YEARS[1] - (nrows[rep] - 1 - within) * stride[rep]
            scale = rng.lognormal(0.0, 1.0, U)
            match = 1 + np.floor(rng.pareto(1.6, len(rep)) * scale[rep]).astype(np.int64)
            tot = np.bincount(rep, weights=match, minlength=U)
            short = np.maximum(0, 40 - tot).astype(np.int64)  # v2 keeps ngrams seen >= 40 times in total
            last = np.cumsum(nrows) - 1
            match[last] += short
            vol = np.maximum(1, np.floor(match * rng.uniform(0.3, 1.0, len(rep)))).astype(np.int64)
            written += _write_lines(f, [pc.take(ng, pa.array(rep)), year, match, vol])
    return path.stat().st_size


def generate_onegrams(path: Path, seed: int, words: pa.Array, top: int = 30_000) -> None:
    """A v2 1-gram file: the ``top`` most frequent types (and capitalized forms), counts per year."""
    rng = np.random.default_rng(seed)
    W = len(words)
    p = _zipf_p(W)[:top]
    yrs = np.arange(YEARS[0], YEARS[1] + 1)
    N = 1e6 * np.exp(np.log(1e3) * (yrs - YEARS[0]) / (YEARS[1] - YEARS[0]))  # (Y,) tokens per year, x1000 growth
    lam = p[:, None] * N[None, :] * rng.lognormal(0, 0.3, (top, len(yrs)))  # (top, Y)
    cnt = rng.poisson(lam)
    wi, yi = np.nonzero(cnt)
    toks = pa.concat_arrays([words.slice(0, top), pc.utf8_capitalize(words.slice(0, top))])
    capital = rng.random(len(wi)) < 0.08
    c = cnt[wi, yi]
    t = pa.table({"n": pc.take(toks, pa.array(wi + top * capital)), "y": yrs[yi], "m": c,
                  "v": np.maximum(1, c // 3)})
    t = t.group_by(["n", "y"]).aggregate([("m", "sum"), ("v", "sum")])
    t = t.take(pc.sort_indices(t, sort_keys=[("n", "ascending"), ("y", "ascending")]))
    with open(path, "wb") as f:
        _write_lines(f, [t["n"].combine_chunks(), t["y"].combine_chunks(), t["m_sum"].combine_chunks(),
                         t["v_sum"].combine_chunks()])


def ensure_data(folder: Path, files: int, mb: float, seed: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"v": GEN_VERSION, "files": files, "mb": mb, "seed": seed}
    stamp = folder / "spec.json"
    paths = {"five": [folder / f"5gram-{k}.tsv" for k in range(files)], "five_gz": folder / "5gram-0.tsv.gz",
             "one": folder / "1gram.tsv"}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec and all(p.exists() for p in paths["five"]):
        return paths
    shutil.rmtree(folder)
    folder.mkdir(parents=True)
    words = _words(np.random.default_rng(seed), 200_000)
    t = time.perf_counter()
    for k, pth in enumerate(paths["five"]):
        generate_fivegrams(pth, mb, seed + 1 + k, words)
    generate_onegrams(paths["one"], seed, words)
    with open(paths["five"][0], "rb") as src, gzip.open(paths["five_gz"], "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    stamp.write_text(json.dumps(spec))
    print(f"generated data in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return paths


def _measure(spec: dict) -> dict:
    """Runs in a fresh process (so that VmHWM, the peak resident memory, is its own)."""
    from goldstone_cli.data import ngrams

    base = ngrams.peak_rss_mb()
    load0 = os.getloadavg()[0]
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    if spec["what"] == "file":
        S, meta = ngrams.fivegram_counts(spec["path"], spec["vocab"], tuple(spec["years"]), block_mb=spec["block_mb"])
        res = {"lines": meta["lines"], "nnz": int(S.nnz), "annotated": meta["annotated_lines"],
               "peak_rss_mb": ngrams.peak_rss_mb()}
        uncompressed = spec["uncompressed"]
    else:
        r = ngrams.prepare_ngrams([spec["one"]], spec["five"], spec["out"], years=tuple(spec["years"]),
                                  vocab_size=spec["V"], workers=spec["workers"], block_mb=spec["block_mb"],
                                  force=True, progress=False)
        res = {"total_lines": r.total_lines, "peak_rss_mb": r.peak_rss_mb}  # max over the worker processes
        uncompressed = sum(os.path.getsize(p) for p in spec["five"] + [spec["one"]])
    dt = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {**res, "seconds": dt, "mb_per_s": uncompressed / 1e6 / dt, "cpu_seconds": cpu,
            "mb_per_cpu_s": uncompressed / 1e6 / cpu if spec["what"] == "file" else None,
            "baseline_rss_mb": base, "loadavg_1min": [load0, os.getloadavg()[0]]}


def _run(spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.ngram_throughput", "--_measure", json.dumps(spec)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=256, help="size of each generated 5-gram file (MB)")
    ap.add_argument("--files", type=int, default=2, help="number of 5-gram files")
    ap.add_argument("--vocab", type=int, default=10_000, help="vocabulary size")
    ap.add_argument("--block-mb", type=float, default=8.0, help="block size of the streaming parser")
    ap.add_argument("--workers", type=int, default=2, help="processes for the end-to-end run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_measure", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._measure:
        print(json.dumps(_measure(json.loads(a._measure))))
        return
    from goldstone_cli.data import ngrams

    paths = ensure_data(RESULTS / "ngram_data", a.files, a.mb, a.seed)
    tab, meta = ngrams.onegram_counts(paths["one"], YEARS, denominators=None)
    vocab = tab.take(pc.sort_indices(tab, sort_keys=[("count", "descending"), ("word", "ascending")]))["word"]
    vocab = vocab.slice(0, a.vocab).to_pylist()
    size0 = paths["five"][0].stat().st_size
    rows = []
    r = _run({"what": "file", "path": str(paths["five"][0]), "vocab": vocab, "years": YEARS, "block_mb": a.block_mb,
              "uncompressed": size0})
    rows.append({"run": "1 plain file, 1 process", "input_mb": size0 / 1e6, **r})
    r = _run({"what": "file", "path": str(paths["five_gz"]), "vocab": vocab, "years": YEARS, "block_mb": a.block_mb,
              "uncompressed": size0})
    rows.append({"run": f"same file gzip ({paths['five_gz'].stat().st_size / 1e6:.0f} MB), 1 process",
                 "input_mb": size0 / 1e6, **r})
    out = RESULTS / "ngram_throughput_out"
    r = _run({"what": "prepare", "one": str(paths["one"]), "five": [str(p) for p in paths["five"]], "out": str(out),
              "years": YEARS, "V": a.vocab, "workers": a.workers, "block_mb": a.block_mb})
    total = sum(p.stat().st_size for p in paths["five"] + [paths["one"]])
    rows.append({"run": f"prepare_ngrams end to end, {a.workers} workers, {a.files} files + 1-grams",
                 "input_mb": total / 1e6, **r})
    shutil.rmtree(out, ignore_errors=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    result = {"machine": f"{cpu}, {os.cpu_count()} CPUs", "python": platform.python_version(),
              "pyarrow": pa.__version__, "numpy": np.__version__, "vocab": a.vocab, "block_mb": a.block_mb,
              "lines_per_file": rows[0]["lines"], "bytes_per_line": size0 / rows[0]["lines"], "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ngram_throughput.json").write_text(json.dumps(result, indent=2))
    print(f"machine: {result['machine']}; vocabulary {a.vocab}; block {a.block_mb} MB; "
          f"{result['bytes_per_line']:.1f} bytes/line\n")
    print("| run | input (MB, uncompressed) | seconds | MB/s (wall) | MB per CPU-second | peak RSS (MB) | load avg |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        cpu = f"{r['mb_per_cpu_s']:.1f}" if r["mb_per_cpu_s"] else "-"
        print(f"| {r['run']} | {r['input_mb']:.0f} | {r['seconds']:.1f} | {r['mb_per_s']:.1f} | {cpu} | "
              f"{r['peak_rss_mb']:.0f} | {r['loadavg_1min'][0]:.1f} |")


if __name__ == "__main__":
    main()
