"""Issue 17, data: each rank of a distributed MovieLens run reads only its users' ratings from a
by-user layout next to the cache (memory-mapped), and gets exactly the arrays of the old path
(``ratings_of_users`` on the fully loaded data)."""

import json
import warnings

import numpy as np
import pytest
import torch

from goldstone_cli.data.movielens import (by_user_folder, load_movielens, load_user_rows_distributed,
                                          prepare_by_user, read_user_rows)
from goldstone_cli.distributed.shard import RowShard
from goldstone_cli.models.movielens import SparseDynamicBernoulliMF, ratings_of_users

FIELDS = ("user", "item", "t", "x", "split")


@pytest.fixture
def small(tmp_path, shared_data):
    return load_movielens(shared_data / "movielens" / "ml-latest-small", T=5, cache_dir=tmp_path / "cache",
                          progress=False)


def old_path(data, u0, u1):
    mine = ratings_of_users(data, u0, u1)
    return {k: np.asarray(getattr(data, k))[mine] for k in FIELDS}


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_mmap_rows_equal_old_path_on_ml_latest_small(small, world):
    folder, key = prepare_by_user(small)
    assert folder == by_user_folder(small.source.cache_path) and (folder / "header.json").is_file()
    total = 0
    for rank in range(world):
        sh = RowShard(rank=rank, world=world)
        u0, u1 = sh.rows(small.n_users)
        got = read_user_rows(folder, key, world=world, rank=rank)
        want = old_path(small, u0, u1)
        assert got.user_rows == (u0, u1)
        assert (got.n_users, got.n_items, got.T) == (small.n_users, small.n_items, small.T)
        for k in FIELDS:  # same values, same order (file order), same dtypes as the loaded data
            np.testing.assert_array_equal(getattr(got, k), want[k], err_msg=k)
            assert getattr(got, k).dtype == np.asarray(getattr(small, k)).dtype, k
        total += len(got)
        # only this block's rows (6 arrays, at most 8 bytes each) and two offsets were copied
        assert got.bytes_read <= 16 + len(got) * (4 + 2 + 2 + 1 + 1 + 4) + 1e-9
    assert total == len(small)


class CountsShard(RowShard):
    """A rank of ``world`` without a process group: the all-reduce of the per-bin counts keeps only
    this rank's (enough to compare the ratings a rank's model holds)."""

    def all_reduce_sum_(self, t, **kw):
        return t


def test_sharded_model_from_mmap_rows_equals_old_path(small):
    """A rank's model built on its UserRatings holds the same ratings, in the same order, as one built
    on all the data (the old path: ``ratings_of_users`` inside ``_init_sharded``)."""
    folder, key = prepare_by_user(small)
    for rank in range(2):
        sh = CountsShard(rank=rank, world=2)
        models = [SparseDynamicBernoulliMF(data, d=3, dtype=torch.float64, shard=sh)
                  for data in (small, read_user_rows(folder, key, world=2, rank=rank))]
        for name in ("train", "val", "test"):
            for x, y in zip(models[0]._splits[name], models[1]._splits[name]):
                assert torch.equal(x, y), name
        assert torch.equal(models[0].U, models[1].U) and torch.equal(models[0].V, models[1].V)
        with pytest.raises(ValueError, match="holds the ratings of users"):  # another rank's rows
            SparseDynamicBernoulliMF(read_user_rows(folder, key, world=2, rank=1 - rank), d=3, shard=sh)


def _damage(folder):
    p = folder / "item.npy"
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte in the last rating's item
    p.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["flip", "truncate", "no_header", "stale_key", "missing_file"])
def test_damaged_or_stale_by_user_files_are_rebuilt(small, how):
    folder, key = prepare_by_user(small)
    good = {k: (folder / f"{k}.npy").read_bytes() for k in ("user", "item", "t", "x", "split", "pos", "offsets")}
    if how == "flip":
        _damage(folder)
    elif how == "truncate":  # a half-written file under the right name
        p = folder / "t.npy"
        p.write_bytes(p.read_bytes()[:-100])
    elif how == "no_header":  # a rebuild that stopped before its header
        (folder / "header.json").unlink()
    elif how == "stale_key":
        h = json.loads((folder / "header.json").read_text())
        h["key"] = "0" * 64
        (folder / "header.json").write_text(json.dumps(h))
    else:
        (folder / "pos.npy").unlink()
    if how in ("truncate", "no_header", "stale_key", "missing_file"):  # other ranks refuse it too
        with pytest.raises(ValueError):
            read_user_rows(folder, key, world=2, rank=1)
    with pytest.warns(UserWarning, match="rebuilding"):
        folder2, key2 = prepare_by_user(small)
    assert (folder2, key2) == (folder, key)
    assert {k: (folder / f"{k}.npy").read_bytes() for k in good} == good
    got = read_user_rows(folder, key, world=2, rank=1)
    want = old_path(small, *RowShard(rank=1, world=2).rows(small.n_users))
    for k in FIELDS:
        np.testing.assert_array_equal(getattr(got, k), want[k])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_by_user(small)  # intact now: no warning, no rewrite


def test_other_settings_get_other_folder(small, tmp_path, shared_data):
    other = load_movielens(shared_data / "movielens" / "ml-latest-small", T=6, cache_dir=tmp_path / "cache",
                           progress=False)
    f1, k1 = prepare_by_user(small)
    f2, k2 = prepare_by_user(other)
    assert f1 != f2 and k1 != k2
    with pytest.raises(ValueError, match="stale"):
        read_user_rows(f1, k2, world=2, rank=0)


class ReplayShard:
    """Two ranks in one process: rank 0's broadcast buffer is kept and replayed to rank 1."""

    sent = None

    def __init__(self, rank):
        self.rank, self.world, self.device = rank, 2, None

    broadcast_json = RowShard.broadcast_json
    from_main = RowShard.from_main

    def broadcast_(self, t, src=0):
        if self.rank == 0:
            ReplayShard.sent = t.clone()
        else:
            t.copy_(ReplayShard.sent)
        return t


def test_distributed_load_only_rank0_loads(small, tmp_path, shared_data):
    calls = []

    def load(rank):
        def f():
            calls.append(rank)
            return load_movielens(shared_data / "movielens" / "ml-latest-small", T=5, cache_dir=tmp_path / "cache",
                                  progress=False)
        return f

    r0 = load_user_rows_distributed(ReplayShard(0), load(0))
    r1 = load_user_rows_distributed(ReplayShard(1), load(1))
    assert calls == [0]  # rank 1 neither hashes the raw file nor reads the .npz
    for rank, got in enumerate((r0, r1)):
        want = old_path(small, *RowShard(rank=rank, world=2).rows(small.n_users))
        for k in FIELDS:
            np.testing.assert_array_equal(getattr(got, k), want[k])
    assert len(r0) + len(r1) == len(small)


def test_distributed_load_falls_back_without_cache(tmp_path, shared_data):
    def load():
        return load_movielens(shared_data / "movielens" / "ml-latest-small", T=5, use_cache=False, progress=False)

    with pytest.warns(UserWarning, match="no cache file"):
        r0 = load_user_rows_distributed(ReplayShard(0), load)
    with pytest.warns(UserWarning, match="no cache file"):
        r1 = load_user_rows_distributed(ReplayShard(1), load)
    assert len(r0) == len(r1) and r0.n_users == r1.n_users  # the full data; the model keeps its users'


def test_distributed_load_error_on_rank0_reaches_other_ranks(tmp_path):
    def load():
        raise FileNotFoundError("No MovieLens data at /nowhere")

    from goldstone_cli.distributed.errors import PeerRankError

    with pytest.raises(FileNotFoundError):
        load_user_rows_distributed(ReplayShard(0), load)
    with pytest.raises(PeerRankError, match="rank 0 could not load the MovieLens data: FileNotFoundError") as info:
        load_user_rows_distributed(ReplayShard(1), load)
    assert info.value.exit_code == 2  # rank 0's: the command line exits with it, printing nothing


def test_mmap_rows_keep_file_order_of_a_shuffled_file(tmp_path, shared_data):
    """ml-latest-small's file is sorted by user, so file order and by-user order agree there; in a
    shuffled copy they do not, and each rank must still get its ratings in file order."""
    lines = (shared_data / "movielens" / "ml-latest-small" / "ratings.csv").read_text().splitlines()
    body = np.array(lines[1:], dtype=object)
    np.random.default_rng(1).shuffle(body)
    (tmp_path / "shuffled").mkdir()
    (tmp_path / "shuffled" / "ratings.csv").write_text("\n".join([lines[0], *body]) + "\n")
    data = load_movielens(tmp_path / "shuffled", T=4, cache_dir=tmp_path / "cache", progress=False)
    folder, key = prepare_by_user(data)
    for rank in range(3):
        got = read_user_rows(folder, key, world=3, rank=rank)
        want = old_path(data, *RowShard(rank=rank, world=3).rows(data.n_users))
        assert not np.all(np.diff(got.user) >= 0)  # not sorted by user: file order
        for k in FIELDS:
            np.testing.assert_array_equal(getattr(got, k), want[k], err_msg=k)


def _rank_rows(ratings: str, cache: str) -> dict:
    """On a gloo rank: this rank's ratings through the real broadcast, and whether it loaded."""
    from goldstone_cli.distributed.env import init_distributed

    shard = RowShard.from_dist(init_distributed("cpu"))
    loaded = []

    def load():
        loaded.append(True)
        return load_movielens(ratings, T=5, cache_dir=cache, progress=False)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the full load on any rank
        got = load_user_rows_distributed(shard, load)
    return {"loaded": bool(loaded), "rows": list(got.user_rows),
            **{k: torch.from_numpy(np.ascontiguousarray(getattr(got, k))) for k in FIELDS}}


def test_two_gloo_ranks_read_only_their_rows(small, tmp_path, shared_data):
    from goldstone_cli.distributed.local import run_local

    res = run_local(_rank_rows, 2, str(shared_data / "movielens" / "ml-latest-small"), str(tmp_path / "cache"))
    assert [r["loaded"] for r in res] == [True, False]
    for rank, r in enumerate(res):
        want = old_path(small, *r["rows"])
        assert tuple(r["rows"]) == RowShard(rank=rank, world=2).rows(small.n_users)
        for k in FIELDS:
            np.testing.assert_array_equal(r[k].numpy(), want[k], err_msg=k)


@pytest.mark.slow  # four fresh Python processes (about 14 s alone)
def test_bench_distributed_data_counts(tmp_path, shared_data, capsys, monkeypatch):
    """bench/distributed_data.py on ml-latest-small, 2 ranks: the mapped rank reads its 11 bytes per
    rating and less than a full load; the old path reads the same on both ranks."""
    import sys

    from bench import distributed_data

    monkeypatch.setattr(sys, "argv", ["distributed_data", "--ratings", str(shared_data / "movielens" / "ml-latest-small"),
                                      "--ranks", "2", "--T", "5", "--work", str(tmp_path)])
    distributed_data.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    head, rows = rows[0], {(r["path"], r["rank"]): r for r in rows[1:]}
    assert set(rows) == {("old", 0), ("old", 1), ("byuser", 0), ("byuser", 1)}
    assert rows["old", 0]["bytes"] == rows["old", 1]["bytes"]
    mapped = rows["byuser", 1]
    assert mapped["ratings"] == rows["old", 1]["ratings"]
    assert rows["byuser", 0]["ratings"] + mapped["ratings"] == head["ratings"]
    header = (next((tmp_path / "cache").glob("*.byuser")) / "header.json").stat().st_size
    assert mapped["bytes"] == 11 * mapped["ratings"] + 16 + header < rows["old", 1]["bytes"]
