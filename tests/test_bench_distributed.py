"""bench/distributed.py runs, and the bytes it records are the formulas of docs/scaling.md."""

from __future__ import annotations


import pytest
import torch

from bench import distributed as B

TINY = dict(reps=1, gauge_T=6, gauge_N=40, gauge_d=3, mf_T=4, mf_n=20, mf_d=2, dwe_V=60, dwe_T=4, dwe_d=3,
            dwe_batch=10, ml_data="/nonexistent", ml_T=4, ml_d=2, device="cpu", threads=1,
            cases=["gauge", "dense_mf", "dwe", "dwe_context", "movielens"])


@pytest.mark.usefixtures("one_thread")
def test_one_rank_runs_every_case_and_moves_nothing(capsys):
    rows = B.worker(dict(TINY))
    assert {r["case"] for r in rows} == {"gauge", "dense_mf", "dwe_step", "dwe_gauge", "dwe_context"}
    assert all(r["world"] == 1 and r["payload_bytes"] == 0 and r["calls"] == 0 and r["seconds"] > 0 for r in rows)
    assert "movielens case skipped" in capsys.readouterr().out


def test_counter_records_payload_and_ring_wire_bytes():
    c = B.CommCounter()
    c.add("all_reduce", torch.zeros(10, dtype=torch.float64))
    c.add("all_gather", [torch.zeros(3), torch.zeros(3)])
    s = c.summary(world=2)
    assert s["payload_bytes"] == 80 + 24 and s["wire_bytes"] == 80 + 12
    assert s["by_kind"]["all_gather"]["calls"] == 1


def _two_rank_rows(args: dict) -> list:
    return B.worker(args)


@pytest.mark.slow
def test_two_ranks_move_the_formula_bytes(shared_data):
    from goldstone_cli.distributed.local import run_local

    ml = str(shared_data / "movielens" / "ml-latest-small")
    rows = run_local(_two_rank_rows, 2, dict(TINY, cases=["gauge", "dense_mf", "dwe", "movielens"], ml_data=ml))[0]
    ml_rows = {r["variant"]: r for r in rows if r["case"] == "movielens"}
    rows = [r for r in rows if r["case"] != "movielens"]
    # items sharded: gather V + reduce-scatter its gradient; replicated: one all-reduce of the gradient,
    # half the payload but the same ring traffic, and every rank holds all of V
    sh, rep = ml_rows["items sharded"], ml_rows["items replicated"]
    assert sh["calls"] == 2 and sh["payload_bytes"] == sh["formula_payload_bytes"]
    assert rep["calls"] == 1 and 2 * rep["payload_bytes"] == sh["payload_bytes"]
    assert rep["wire_bytes"] == sh["wire_bytes"]
    assert rep["param_bytes_per_rank"] > sh["param_bytes_per_rank"]
    for r in rows:
        assert r["world"] == 2 and r["calls"] == 2
        if r["case"] in ("gauge", "dense_mf", "dwe_gauge"):
            assert r["payload_bytes"] == r["formula_payload_bytes"], r
        else:  # DWE steps: the minibatch's context rows, padded to the larger share of the two ranks
            assert r["formula_payload_bytes"] <= r["payload_bytes"] <= 2 * r["formula_payload_bytes"], r
