"""Benchmark: the MovieLens reader's repeat checks (rows repeated exactly; two ratings of one movie by
one user at one timestamp) on 20M rows, against pandas ``DataFrame.duplicated``.

    python -m bench.movielens_checks                 # 20,000,000 rows
    python -m bench.movielens_checks --rows 2000000  # quicker

Columns like ml-20m's (138,493 users, 26,744 movies, timestamps 1995-2015, ratings 0.5..5), in five
shapes: sorted by (user, movie) with distinct pairs (as ml-20m ships), the same shuffled, shuffled with
every (user, movie) pair rated twice at different times (fine: the worst case for the checks), the file
appended to itself (exact repeats), and every pair rated twice at one timestamp with different stars.
Both sides must report the same counts. The reference is what a user would write: two
``duplicated()`` calls, on all four columns, then on (user, movie, timestamp).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import pandas as pd

from goldstone_cli.data.movielens import _repeats


def shapes(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    k = np.unique(rng.integers(0, 138_493 * 26_744, int(n * 1.01)))[:n]
    u, i = k // 26_744, k % 26_744
    t = rng.integers(789_652_009, 1_427_784_002, n)
    r = rng.integers(1, 11, n) / 2
    yield "sorted, distinct pairs", (u, i, r, t)
    p = rng.permutation(n)
    yield "shuffled, distinct pairs", (u[p], i[p], r[p], t[p])
    h = n // 2
    for name, t2, r2 in (("shuffled, every pair re-rated later", t[:h] + rng.integers(1, 10**6, h), r[:h]),
                         ("file appended to itself", t[:h], r[:h]),
                         ("every pair twice at one time", t[:h], r[:h] % 5 + 0.5)):
        cols = [np.r_[a[:h], b] for a, b in ((u, u[:h]), (i, i[:h]), (r, r2), (t, t2))]
        p = rng.permutation(cols[0].size)
        yield name, tuple(c[p] for c in cols)


def reference(u, i, r, t) -> tuple[int, int]:
    df = pd.DataFrame({"u": u, "i": i, "r": r, "t": t})
    exact = int(df.duplicated().sum())
    return exact, (0 if exact else int(df.duplicated(["u", "i", "t"]).sum()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000_000, help="rows per shape")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side (median reported)")
    args = p.parse_args(argv)
    print(f"{platform.processor() or platform.machine()}, numpy {np.__version__}, pandas {pd.__version__}")
    print("| shape | rows | goldstone (s) | pandas duplicated (s) | ratio | repeats found |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, cols in shapes(args.rows):
        times: dict[str, list[float]] = {"ours": [], "ref": []}
        for _ in range(args.repeats):  # interleaved
            t0 = time.perf_counter()
            exact, same = _repeats(*cols)
            times["ours"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            want = reference(*cols)
            times["ref"].append(time.perf_counter() - t0)
        got = (exact[0] if exact else 0, same[0] if same else 0)
        if got != want:
            raise SystemExit(f"{name}: goldstone found {got} repeats, pandas {want}")
        ours, ref = (float(np.median(v)) for v in times.values())
        print(f"| {name} | {cols[0].size:,} | {ours:.2f} | {ref:.2f} | {ref / ours:.1f}x | "
              f"{got[0]:,} exact, {got[1]:,} at one time |")


if __name__ == "__main__":
    main()
