"""goldstone_cli.distributed: launcher environment parsing and row-shard collectives (gloo, 2 ranks)."""

import pytest
import torch

from goldstone_cli.distributed.env import first_host, launch_env, pick_device
from goldstone_cli.distributed.local import run_local
from goldstone_cli.distributed.shard import RowShard


# ---- environment parsing (no processes) ---------------------------------------------------------
def test_torchrun_env():
    e = launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29500"})
    assert (e.rank, e.world, e.local_rank, e.master_addr, e.master_port, e.source) == (3, 4, 1, "h0", 29500, "torchrun")


def test_no_launcher_is_none():
    assert launch_env({"PATH": "/bin"}) is None


def test_slurm_env_master_from_nodelist():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[007-010,012],big1", "SLURM_JOB_ID": "123456"}
    e = launch_env(env)
    assert (e.rank, e.world, e.local_rank, e.master_addr, e.source) == (5, 8, 1, "gpu007", "slurm")
    assert e.master_port == 20000 + 123456 % 20000
    assert launch_env({**env, "MASTER_ADDR": "x", "MASTER_PORT": "1234"}).master_port == 1234


def test_torchrun_wins_over_slurm():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n1",
           "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}
    assert launch_env(env).source == "torchrun"


@pytest.mark.parametrize("nodelist,host", [("n1", "n1"), ("n1,n2", "n1"), ("gpu[003-005]", "gpu003"),
                                           ("a-b[10,2]", "a-b10"), ("node-1", "node-1")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("env,match", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK='x'"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "0 <= rank"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": ""}, "MASTER_ADDR"),
])
def test_bad_env_messages(env, match):
    with pytest.raises(ValueError, match=match):
        launch_env(env)


def test_pick_device_cpu_and_missing_cuda():
    assert pick_device("cpu", 3) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device("auto", 0) == torch.device("cpu")
        with pytest.raises(ValueError, match="no GPU"):
            pick_device("cuda", 0)


# ---- row blocks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 5, 7, 8, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rows_match_torch_chunk_and_dtensor(n, world):
    """Blocks are torch.chunk's (what DTensor Shard(1) uses), padded with empty blocks at the end."""
    x = torch.arange(n)
    chunks = list(torch.chunk(x, world)) if n else []
    chunks += [x[:0]] * (world - len(chunks))
    for r in range(world):
        s = RowShard(r, world)
        start, stop = s.rows(n)
        assert torch.equal(x[start:stop], chunks[r])
        assert s.local_size(n) == len(chunks[r])
        if stop > start:
            assert torch.equal(s.owner(x[start:stop], n), torch.full((stop - start,), r))


def test_single_is_identity():
    s = RowShard.single()
    t = torch.randn(3, 5, 2)
    assert s.take(t) is not None and torch.equal(s.take(t), t)
    assert s.all_gather_rows(t, 5) is t and s.reduce_scatter_rows(t) is t and s.all_reduce_sum_(t) is t


def test_bad_rank():
    with pytest.raises(ValueError, match="0 <= rank"):
        RowShard(2, 2)


# ---- collectives on 2 gloo ranks ------------------------------------------------------------------
def _collectives(ns):
    return [_collectives_one(n) for n in ns]


def _collectives_one(n):
    import torch.distributed as dist

    from goldstone_cli.distributed import collective

    s = RowShard(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    works = []  # the Work each collective left in collective.last_work()
    orig = collective.run

    def run(fn, /, *args, **kwargs):
        orig(fn, *args, **kwargs)
        works.append(collective.last_work())

    collective.run = run
    try:
        out = _collectives_run(s, n)
    finally:
        collective.run = orig
    out["kept"] = [w is not None for w in works]  # (gloo's reduce_scatter Work never reports is_completed)
    out["distinct"] = len({id(w) for w in works})
    return out


def _collectives_run(s, n):
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, n, 2, generator=g, dtype=torch.float64)  # the same on every rank
    gathered = s.all_gather_rows(s.take(full).clone(), n)
    per_rank = full * (s.rank + 1)  # rank r contributes (r + 1) * full
    scattered = s.reduce_scatter_rows(per_rank)
    x32 = torch.tensor([1e8, 1.0], dtype=torch.float32) * (1 if s.rank == 0 else -1)
    x32[1] = 0.5
    s.all_reduce_sum_(x32)  # float64 accumulation: 1e8 - 1e8 and 0.5 + 0.5 exactly
    flag = torch.tensor([float(s.rank == 1)])
    s.all_reduce_max_(flag)
    b = torch.tensor([float(s.rank)])
    s.broadcast_(b, src=1)
    msg = s.broadcast_json({"rank": s.rank, "path": "/d\u00e9j\u00e0 vu", "n": [1, 2.5, None]})
    everyone = s.all_gather_json({"rank": s.rank, "x": "y" * (3 + s.rank)}, nbytes=128)
    s.barrier()
    return {"msg": msg, "everyone": everyone, "full": full, "gathered": gathered, "gathered_contiguous": gathered.is_contiguous(), "scattered": scattered, "x32": x32, "flag": flag, "b": b,
            "rows": list(s.rows(n))}


def test_collectives_two_ranks(one_thread):
    ns = [5, 1]  # 1 row: rank 1's block is empty
    results = run_local(_collectives, 2, ns)  # one spawn for all cases: starting a rank costs seconds
    for res in (res for per_rank in results for res in per_rank):
        assert torch.equal(res["gathered"], res["full"])
        assert res["gathered_contiguous"]  # callers view() it; an uneven n pads the last block
        start, stop = res["rows"]
        assert torch.allclose(res["scattered"], 3 * res["full"][:, start:stop], rtol=1e-15, atol=0)
        assert res["x32"].tolist() == [0.0, 1.0]
        assert res["flag"].item() == 1.0 and res["b"].item() == 1.0
        assert res["everyone"] == [{"rank": 0, "x": "yyy"}, {"rank": 1, "x": "yyyy"}]
        assert res["msg"] == {"rank": 0, "path": "/d\u00e9j\u00e0 vu", "n": [1, 2.5, None]}  # rank 0's, everywhere
        # 8 collectives; each left its own Work behind (kept until the next one)
        assert res["kept"] == [True] * 8 and res["distinct"] == 8


def test_json_collectives_refuse_a_message_longer_than_their_buffer():
    s = RowShard.single()
    assert s.broadcast_json({"a": "x" * 50}, nbytes=64) == {"a": "x" * 50}
    assert s.all_gather_json({"a": "x" * 50}, nbytes=64) == [{"a": "x" * 50}]
    with pytest.raises(ValueError, match="more than nbytes=64"):
        s.broadcast_json({"a": "x" * 100}, nbytes=64)
    with pytest.raises(ValueError, match="more than nbytes=64"):
        s.all_gather_json({"a": "x" * 100}, nbytes=64)


def _fails():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank one is unhappy")
    return 0


@pytest.mark.slow
def test_run_local_reports_a_failing_rank():
    with pytest.raises(RuntimeError, match="rank one is unhappy"):
        run_local(_fails, 2)


def test_rank_0s_error_in_from_main_is_a_peer_rank_error_elsewhere(monkeypatch):
    """Ranks > 0 raise PeerRankError (a ValueError: the command line exits with rank 0's code and
    prints nothing, rank 0 printed it) with rank 0's message; rank 0 re-raises its own error after
    telling the others its exit code (2: one-line errors, 1: others)."""
    from goldstone_cli.distributed.errors import PeerRankError

    sent = []

    def broadcast_json(self, msg, nbytes=8192, src=0):  # rank 0's side records, rank 1's side receives
        if self.rank == 0:
            sent.append(msg)
            return msg
        return sent[-1]

    monkeypatch.setattr(RowShard, "broadcast_json", broadcast_json)
    for exc, code in ((FileNotFoundError("No MovieLens data at /x"), 2), (KeyError("k"), 1)):
        def fail(exc=exc):
            raise exc

        with pytest.raises(type(exc)):
            RowShard(0, 2).from_main(fail, "load the MovieLens data")
        with pytest.raises(PeerRankError, match="rank 0 could not load the MovieLens data: ") as info:
            RowShard(1, 2).from_main(fail, "load the MovieLens data")
        assert isinstance(info.value, ValueError) and info.value.exit_code == code
        assert type(exc).__name__ in str(info.value)
    assert RowShard(0, 2).from_main(lambda: {"a": 1}, "x") == {"a": 1} == RowShard(1, 2).from_main(None, "x")
