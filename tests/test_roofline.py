"""bench/roofline.py: the work-counting formulas, the machine rates and the interleaved timing."""

import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO))
from bench import roofline  # noqa: E402


def test_movielens_step_work_counts_the_compulsory_traffic():
    # ml-latest-small at T=100, d=30: 9,730 rows, 43,850 training ratings
    w = roofline.movielens_step_work(100, 9730, 30, 43850)
    P = 100 * 9730 * 30
    assert w.bytes == 28 * P + 43850 * (20 + 24 * 30)
    assert w.flops == 43850 * (6 * 30 + 10) + P * (4 + 6) + 6 * P
    assert roofline.adagrad_work(P).bytes == 20 * P


def test_gauge_and_dense_work():
    g = roofline.gauge_step_work(10, 100, 3, 9, "procrustes")
    P = 10 * 100 * 3
    assert g.bytes == 12 * P
    assert g.flops == 2 * 9 * 100 * 9 + 2 * 10 * 100 * 9 + 3 * P + 2 * 10 * 100 * 9 + 30 * 9 * 27
    d = roofline.dense_mf_step_work(2, 3, 4, 1)
    assert d.bytes == 16 * 2 * 3 * 4 + 20 * 2 * 7 * 1


def test_bound_is_the_slower_of_flops_and_bytes():
    rates = roofline.Rates(gemm_flops=1e9, copy_bandwidth=1e9, adagrad_bandwidth=2e9)
    assert roofline.Work(4e9, 1e9).bound_s(rates) == 4.0
    assert roofline.Work(1e9, 8e9).bound_s(rates) == 4.0 and roofline.Work(1e9, 8e9).limit(rates) == "bandwidth"


def test_rates_and_interleaved_case_run():
    rates = roofline.measure_rates(torch.device("cpu"), repeats=1, gemm_n=64, stream_numel=1 << 12)
    assert rates.gemm_flops > 0 and rates.bandwidth > 0
    calls = []

    def broken():
        raise RuntimeError("no compiler")

    case = roofline.Case("toy", roofline.Work(1e3, 1e3), {"main": lambda: calls.append("m"),
                                                           "other": lambda: calls.append("o"), "broken": broken})
    res = roofline.run_case(case, rates, repeats=3, device=torch.device("cpu"), profile=True)
    assert calls[-7:] == ["m", "o"] * 3 + ["m"]  # interleaved rounds, then the profiled call
    assert set(res["median_s"]) == {"main", "other"} and "broken" in res["failed_variants"]
    assert res["fraction_of_bound"] > 0


def test_every_registered_case_is_known_and_unknown_ones_are_refused():
    assert {"ml_small", "ml20m", "gauge_procrustes", "gauge_natural", "dense_mf"} <= set(roofline.BUILDERS)
    with pytest.raises(SystemExit, match="unknown case"):
        roofline.main(["--cases", "nope"])
