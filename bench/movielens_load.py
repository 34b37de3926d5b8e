"""Benchmark: load a MovieLens-20M-sized ``ratings.csv`` (parse + preprocess + cache, then cached).

    python -m bench.movielens_load                 # full size: 20,000,263 rows
    python -m bench.movielens_load --rows 2000000  # quicker smoke run

The real ml-20m is not available offline, so the script first generates (once) a file in the exact
ml-20m layout: header ``userId,movieId,rating,timestamp``, rows sorted by user then movie, no
duplicate (user, movie) pairs, 138,493 users (each with >= 20 ratings, heavy-tailed activity, at
most 9,254 ratings), 26,744 distinct movie ids in 1..131262 with Zipf-like popularity,
ratings 0.5..5.0 in steps of 0.5 with ml-20m's rating histogram (scaled to the row count), unix
timestamps in 1995-01-09 11:46:49 .. 2015-03-31 06:40:02 UTC (ml-20m's range), bursty per user.

Each measurement runs in a fresh Python process so that its peak RSS (``ru_maxrss``) is its own.
Results go to ``bench/results/movielens_load.json`` (git-ignored) and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from goldstone_cli.io import atomic_path, atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"

N_ROWS_ML20M = 20_000_263
N_USERS_ML20M = 138_493
N_MOVIES_ML20M = 26_744
MAX_MOVIE_ID_ML20M = 131_262
MAX_USER_RATINGS_ML20M = 9_254
T_MIN_ML20M = 789_652_009  # 1995-01-09 11:46:49 UTC
T_MAX_ML20M = 1_427_784_002  # 2015-03-31 06:40:02 UTC
RATING_VALUES = np.arange(1, 11) / 2.0  # 0.5 .. 5.0
# ml-20m's rating histogram (counts of 0.5, 1.0, ..., 5.0; they sum to 20,000,263); median 3.5.
RATING_COUNTS_ML20M = np.array([239_125, 680_732, 279_252, 1_430_997, 883_398,
                                4_291_193, 2_200_156, 5_561_926, 1_534_824, 2_898_660])


def _user_counts(rng: np.random.Generator, n_rows: int, n_users: int, cap: int) -> np.ndarray:
    """Ratings per user: >= 20, heavy-tailed (log-normal), at most ``cap``, summing to ``n_rows``."""
    base = min(20, n_rows // n_users)
    w = rng.lognormal(0.0, 1.3, n_users)
    counts = base + np.floor(w / w.sum() * (n_rows - base * n_users)).astype(np.int64)
    counts = np.minimum(counts, cap)
    while (short := n_rows - int(counts.sum())) > 0:  # spread the remainder over users below the cap
        room = np.flatnonzero(counts < cap)
        add = np.bincount(rng.choice(room, size=short), minlength=n_users)
        counts = np.minimum(counts + add, cap)
    return counts


def generate_ml20m_like(path: Path, n_rows: int = N_ROWS_ML20M, seed: int = 0) -> dict:
    """Write a synthetic ``ratings.csv`` in the ml-20m layout (see module docstring); return its stats."""
    rng = np.random.default_rng(seed)
    scale = n_rows / N_ROWS_ML20M
    n_users = max(int(round(N_USERS_ML20M * scale)), 1) if n_rows < N_ROWS_ML20M else N_USERS_ML20M
    n_movies = N_MOVIES_ML20M
    counts = _user_counts(rng, n_rows, n_users, min(MAX_USER_RATINGS_ML20M, n_movies))  # (n_users,)

    movie_ids = np.sort(np.concatenate([
        [1, MAX_MOVIE_ID_ML20M],
        rng.choice(np.arange(2, MAX_MOVIE_ID_ML20M), n_movies - 2, replace=False),
    ]))  # (n_movies,)
    popularity = 1.0 / (np.arange(n_movies) + 30.0) ** 0.9
    popularity = rng.permutation(popularity / popularity.sum())  # (n_movies,)

    # Distinct (user, movie) pairs, sorted by user then movie: sample, deduplicate, top up the rest.
    keys = np.empty(0, np.int64)
    need = counts.copy()
    while need.sum() > 0:
        u = np.repeat(np.arange(n_users, dtype=np.int64), need)
        m = rng.choice(n_movies, size=u.size, p=popularity)
        new = np.unique(u * n_movies + m)
        if keys.size:
            pos = np.searchsorted(keys, new).clip(max=keys.size - 1)
            new = new[keys[pos] != new]
        keys = np.sort(np.concatenate([keys, new]), kind="stable")  # merge of two sorted runs
        need = counts - np.bincount(keys // n_movies, minlength=n_users)
    user = keys // n_movies  # (n,)
    movie = keys % n_movies  # (n,)
    del keys

    hist = np.round(RATING_COUNTS_ML20M * scale).astype(np.int64)
    hist[7] += n_rows - hist.sum()
    rating_code = rng.permutation(np.repeat(np.arange(10, dtype=np.int8), hist))  # (n,)

    # Bursty activity: each user rates within a window (log-normal length) at a random start.
    span = T_MAX_ML20M - T_MIN_ML20M
    window = np.minimum(rng.lognormal(np.log(60 * 86400.0), 1.5, n_users), span)
    start = T_MIN_ML20M + rng.random(n_users) * (span - window)
    ts = (start[user] + rng.random(n_rows) * window[user]).astype(np.int64)  # (n,)
    ts[0], ts[-1] = T_MIN_ML20M, T_MAX_ML20M

    rating_str = pa.array([f"{v:.1f}" for v in RATING_VALUES]).take(pa.array(rating_code))
    table = pa.table({
        "userId": pa.array(user + 1),
        "movieId": pa.array(movie_ids[movie]),
        "rating": rating_str,
        "timestamp": pa.array(ts),
    })
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"userId,movieId,rating,timestamp\n")
            pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=False, quoting_style="none",
                                                         batch_size=1 << 16))
    return {"rows": int(n_rows), "users": int(n_users), "movies": int(np.unique(movie).size),
            "seed": seed, "bytes": path.stat().st_size}


def _ensure_file(workdir: Path, n_rows: int, seed: int) -> Path:
    path = workdir / f"ml-20m-synthetic-{n_rows}-s{seed}" / "ratings.csv"
    marker = path.with_name("generated.json")
    if path.exists() and marker.exists() and json.loads(marker.read_text()).get("rows") == n_rows:
        return path
    print(f"generating {path} ({n_rows:,} rows) ...", flush=True)
    t0 = time.perf_counter()
    stats = generate_ml20m_like(path, n_rows, seed)
    stats["generate_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(marker, stats)
    print(f"  done in {stats['generate_s']} s, {stats['bytes'] / 1e6:.0f} MB", flush=True)
    return path


_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from goldstone_cli.data.movielens import load_movielens
t_import = time.perf_counter() - t0
t0 = time.perf_counter()
r0 = resource.getrusage(resource.RUSAGE_SELF)
d = load_movielens(sys.argv[1], T=100, seed=0, cache_dir=sys.argv[2], progress=False)
dt = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
print(json.dumps({"seconds": dt, "cpu_s": cpu, "import_s": t_import, "from_cache": d.source.from_cache,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "n": len(d), "n_users": d.n_users, "n_items": d.n_items, "median": d.median,
                  "timings": d.source.timings}))
"""


def _measure(path: Path, cache_dir: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(cache_dir)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=N_ROWS_ML20M, help="rows in the generated file")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated file")
    p.add_argument("--repeats", type=int, default=3, help="how often each measurement runs")
    p.add_argument("--workdir", type=Path, default=RESULTS / "movielens", help="where the file is generated")
    args = p.parse_args(argv)

    path = _ensure_file(args.workdir, args.rows, args.seed)
    load_before = os.getloadavg()[0]
    cache_dir = args.workdir / "cache"
    first, cached = [], []
    for _ in range(args.repeats):
        for f in cache_dir.glob("*.npz"):
            f.unlink()
        first.append(_measure(path, cache_dir))
        assert not first[-1]["from_cache"]
        cached.append(_measure(path, cache_dir))
        assert cached[-1]["from_cache"]
        print(f"first {first[-1]['seconds']:.2f} s ({first[-1]['peak_rss_mb']:.0f} MB peak), "
              f"cached {cached[-1]['seconds']:.2f} s ({cached[-1]['peak_rss_mb']:.0f} MB peak)", flush=True)

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    result = {
        "file": str(path), "bytes": path.stat().st_size, "rows": args.rows,
        "machine": f"{cpu}, {os.cpu_count()} cores", "python": platform.python_version(),
        "pyarrow": pa.__version__, "numpy": np.__version__,
        "first_load_s": [r["seconds"] for r in first], "cached_load_s": [r["seconds"] for r in cached],
        "first_cpu_s": [r["cpu_s"] for r in first], "cached_cpu_s": [r["cpu_s"] for r in cached],
        "load_average_1min_before": load_before,
        "first_peak_rss_mb": max(r["peak_rss_mb"] for r in first),
        "cached_peak_rss_mb": max(r["peak_rss_mb"] for r in cached),
        "first_stage_timings_s": first[-1]["timings"], "cached_stage_timings_s": cached[-1]["timings"],
        "kept": first[-1]["n"], "n_users": first[-1]["n_users"], "n_items": first[-1]["n_items"],
        "median": first[-1]["median"], "import_s": first[-1]["import_s"],
        "cache_bytes": sum(f.stat().st_size for f in cache_dir.glob("*.npz")),
        "load_average_1min_after": os.getloadavg()[0],  # other jobs on the machine slow the timings
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "movielens_load.json", result)
    print(f"\n| stage | wall median of {args.repeats} (s) | wall min (s) | CPU median (s) | peak RSS (MB) |\n"
          "|---|---|---|---|---|")
    for name, xs, cs, mem in [
            ("first load (parse + preprocess + cache write)", result["first_load_s"], result["first_cpu_s"],
             result["first_peak_rss_mb"]),
            ("cached load (hash + read cache)", result["cached_load_s"], result["cached_cpu_s"],
             result["cached_peak_rss_mb"])]:
        print(f"| {name} | {np.median(xs):.2f} | {min(xs):.2f} | {np.median(cs):.2f} | {mem:.0f} |")
    print(json.dumps({k: result[k] for k in ("first_stage_timings_s", "cached_stage_timings_s", "cache_bytes",
                                             "load_average_1min_before", "load_average_1min_after")}, indent=1))


if __name__ == "__main__":
    main()
