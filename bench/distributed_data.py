"""Start-up data cost of a distributed MovieLens run, per rank: bytes read and peak RSS, for the old
path (every rank runs ``load_movielens``: hashes the raw file, reads the whole ``.npz`` cache, keeps
its users' ratings) and the by-user path (rank 0 as before plus the by-user layout; ranks r > 0
memory-map it and copy only their users' rows), at 1 and more ranks.

Every (path, world, rank) is measured in a fresh Python process (so peak RSS is that rank's alone),
after the cache and by-user files exist (the steady state of a second run; the first run also
parses the file once, on rank 0 in the by-user path and on every rank in the old one).

- ``bytes``: bytes the rank's loading reads: raw file (hashed) + ``.npz`` cache for a full load;
  for a mapped rank the array bytes it copies out of the mapped files (``UserRatings.bytes_read``)
  plus ``header.json``; rank 0 of the by-user path also re-hashes the by-user files (its check).
- ``rss_mib``: the process's peak resident set (``VmHWM``, reset after the imports) minus its
  resident set then, i.e. what loading the ratings added (the kept arrays and every transient).

DWE (``--corpus``, a prepared corpus folder): the old path (every rank splits from the count files:
reads every step's ``.npz`` in full, keeps its words' rows) against the by-word path (rank 0 checks
or writes ``by_word-<key>/`` and copies its rows; ranks r > 0 copy only their rows:
``RowSplit.bytes_read`` plus ``header.json``). Split settings: the ``model=dwe`` defaults
(test_steps 0.1, test_mass 0.1, split_seed 0, val_mass 0).

Run:  python -m bench.distributed_data --ratings ../shared/data/movielens/ml-latest-small --ranks 1 2
      python -m bench.distributed_data --generate 5000000 --ranks 1 2   (synthetic file, shuffled order)
      goldstone data prepare corpus --bin-years 1 --vocab-size 10000 --out /tmp/sotu-y10k
      python -m bench.distributed_data --corpus /tmp/sotu-y10k --ranks 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    """Reset the peak resident set (VmHWM) to the current one (Linux >= 4.0: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(args) -> None:
    from goldstone_cli.data.movielens import find_ratings_file, load_movielens, prepare_by_user, read_user_rows
    from goldstone_cli.models.movielens import ratings_of_users

    import numpy as np  # noqa: F401  (imported before the peak is reset)

    _reset_peak()
    base = _status_kib("VmRSS")
    load = lambda: load_movielens(args.ratings, T=args.T, cache_dir=args.cache, progress=False)  # noqa: E731
    raw_bytes = find_ratings_file(args.ratings).stat().st_size
    n_local = 0
    if args.path == "old" or args.rank == 0:
        data = load()
        cache_bytes = Path(data.source.cache_path).stat().st_size
        nbytes = raw_bytes + cache_bytes
        if args.path == "old":
            n_users = data.n_users
            b = -(-n_users // args.world)
            u0, u1 = min(args.rank * b, n_users), min(args.rank * b + b, n_users)
            mine = ratings_of_users(data, u0, u1)
            keep = [data.user[mine], data.item[mine], data.t[mine], data.x[mine], data.split[mine]]
            n_local = int(mine.size)
        else:
            folder, key = prepare_by_user(data)
            nbytes += sum((folder / f).stat().st_size for f in os.listdir(folder))  # the SHA-256 check
            got = read_user_rows(folder, key, world=args.world, rank=0)
            nbytes += got.bytes_read
            n_local = len(got)
        del data
    else:
        data_key = json.loads(Path(args.key_file).read_text())
        folder = Path(data_key["folder"])
        got = read_user_rows(folder, data_key["key"], world=args.world, rank=args.rank)
        nbytes = got.bytes_read + (folder / "header.json").stat().st_size
        n_local = len(got)
    peak = _status_kib("VmHWM")  # peak since the reset
    print(json.dumps({"path": args.path, "world": args.world, "rank": args.rank, "ratings": n_local,
                      "bytes": int(nbytes), "rss_mib": round((peak - base) / 1024, 1)}))


DWE_SPLIT = (0.1, 0.1, 0, 0.0)  # test_steps, test_mass, split_seed, val_mass (model=dwe's defaults)


def child_dwe(args) -> None:
    from goldstone_cli.data.cooc import step_file
    from goldstone_cli.distributed.shard import RowShard
    from goldstone_cli.models import dwe_split as S

    import numpy as np  # noqa: F401  (imported before the peak is reset)
    import scipy.sparse  # noqa: F401

    import time

    _reset_peak()
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    src = S.StepSource.from_prepared(args.corpus)
    a, b = RowShard(args.rank, args.world).rows(src.V)
    if args.path == "old":
        got = S.split_rows(src, a, b, *DWE_SPLIT)
        nbytes = sum((Path(args.corpus) / step_file(t)).stat().st_size for t in range(src.T))
    else:
        nbytes = 0
        if args.rank == 0:
            folder, key = S.prepare_by_word(src, *DWE_SPLIT)
            nbytes += sum((folder / f).stat().st_size for f in os.listdir(folder))  # the SHA-256 check
        else:
            key = S.by_word_key(src, *DWE_SPLIT)
            folder = S.by_word_folder(src, key)
        got = S.read_word_rows(folder, key, a, b)
        nbytes += got.bytes_read + (folder / "header.json").stat().st_size
    seconds = time.perf_counter() - t0
    nnz = sum(m.nnz for m in got.train)
    peak = _status_kib("VmHWM")
    print(json.dumps({"path": args.path, "world": args.world, "rank": args.rank, "words": b - a,
                      "train_nnz": int(nnz), "bytes": int(nbytes), "rss_mib": round((peak - base) / 1024, 1),
                      "seconds": round(seconds, 2)}))


def main_dwe(args) -> None:
    from goldstone_cli.models import dwe_split as S

    src = S.StepSource.from_prepared(args.corpus)
    S.prepare_by_word(src, *DWE_SPLIT)  # warm: the by-word folder exists
    print(json.dumps({"corpus": str(args.corpus), "V": src.V, "T": src.T}))
    for world in args.ranks:
        for path in (["old"] if world == 1 else ["old", "byword"]):
            for rank in range(world):
                cmd = [sys.executable, "-m", "bench.distributed_data", "--child", "--corpus", str(args.corpus),
                       "--path", path, "--world", str(world), "--rank", str(rank)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                print(out.strip().splitlines()[-1], flush=True)


def generate(n: int, folder: Path, seed: int = 0) -> Path:
    """A synthetic ratings.csv of ``n`` ratings (n/100 users, n/500 items, half-star ratings over 20
    years), rows in random order (not grouped by user, unlike the published files)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ratings.csv"
    if path.is_file():
        return folder
    n_users, n_items = max(n // 100, 2), max(n // 500, 2)
    user = rng.integers(1, n_users + 1, n)
    item = rng.integers(1, n_items + 1, n)
    rating = rng.integers(1, 11, n) / 2
    ts = rng.integers(946684800, 946684800 + 20 * 365 * 86400, n)
    with open(path, "w") as f:
        f.write("userId,movieId,rating,timestamp\n")
        for s in range(0, n, 1 << 20):
            e = min(s + (1 << 20), n)
            f.write("".join(f"{u},{i},{r:g},{t}\n" for u, i, r, t in
                            zip(user[s:e].tolist(), item[s:e].tolist(), rating[s:e].tolist(), ts[s:e].tolist())))
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratings", help="a MovieLens folder or ratings file")
    p.add_argument("--generate", type=int, help="instead: a synthetic file of this many ratings")
    p.add_argument("--corpus", help="instead: a prepared corpus folder (DWE's by-word split)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--work", default=None, help="folder for the cache (and a generated file); default: a temp dir")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", choices=["old", "byuser", "byword"], help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--key-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_dwe(args) if args.corpus else child(args)
    if args.corpus:
        return main_dwe(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="goldstone-bench-data-"))
    ratings = str(generate(args.generate, work / f"synthetic-{args.generate}")) if args.generate else args.ratings
    if ratings is None:
        p.error("pass --ratings or --generate")
    cache = work / "cache"
    # warm: cache and by-user files exist, their key written for the mapped ranks
    from goldstone_cli.data.movielens import load_movielens, prepare_by_user

    data = load_movielens(ratings, T=args.T, cache_dir=cache, progress=False)
    folder, key = prepare_by_user(data)
    print(json.dumps({"ratings_file": ratings, "ratings": len(data), "n_users": data.n_users,
                      "n_items": data.n_items, "T": args.T}))
    del data
    key_file = work / "byuser-key.json"
    key_file.write_text(json.dumps({"folder": str(folder), "key": key}))
    for world in args.ranks:
        for path in (["old"] if world == 1 else ["old", "byuser"]):
            for rank in range(world):
                cmd = [sys.executable, "-m", "bench.distributed_data", "--child", "--ratings", ratings,
                       "--T", str(args.T), "--path", path, "--world", str(world), "--rank", str(rank),
                       "--cache", str(cache), "--key-file", str(key_file)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
