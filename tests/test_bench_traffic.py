"""bench/traffic.py: the operation and byte counts that model a GPU step on the CPU (issue 16)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_traffic_counter_counts_bytes_and_tells_the_chain_passes_apart(tmp_path, monkeypatch, capsys):
    """bench/traffic.py: an add of two 1,000-float tensors touches 12 kB, out of place, in place (a
    read-modify-write of self) or into an ``out=`` tensor; ``zero_`` writes 4 kB, ``copy_`` moves 8 kB;
    views nothing; fused AdaGrad reads and
    writes back the parameter and its sum of squares and only reads the gradient (5 passes); the CUDA default (blocked whole-tensor chain pass) moves well under half
    the minibatch-sized bytes of the log-depth chain terms under autograd, in about as many operations."""
    import bench.traffic as tr

    c = tr.StepCounter(lambda n: "all")
    a, b = torch.ones(1000), torch.ones(1000)
    o = torch.empty(1000)
    with c:
        _ = a + b
        a.add_(b)
        torch.add(a, b, out=o)
        _ = a.view(10, 100)[:3]
        o.zero_()  # written only
        o.copy_(a)  # a read, o written
    s = c.summary()
    assert s["ops"] == 5 and s["bytes"] == 3 * 12_000 + 4_000 + 8_000
    p = torch.nn.Parameter(torch.ones(1000))
    opt = torch.optim.Adagrad([p], lr=0.1, fused=True)
    p.grad = torch.ones(1000)
    opt.step()  # state made outside the counter
    c = tr.StepCounter(lambda n: "all")
    with c:
        opt.step()
    top = {r["op"]: r["bytes"] for r in c.summary()["top"]}
    assert top["_fused_adagrad_"] == 5 * 4000 + 2 * 4  # + the step counter (one float, read and written)
    # embedding_bag reads the rows its indices name (5 of 8 floats), not its whole 1000-row weight;
    # indices, offsets, per-sample weights and its outputs (2 rows, offset2bag, bag sizes) whole
    W, idx, off, w = torch.ones(1000, 8), torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2]), torch.ones(5)
    c = tr.StepCounter(lambda n: "all")
    with c:
        out = torch.nn.functional.embedding_bag(idx, W, off, mode="sum", per_sample_weights=w)
    (row,) = c.summary()["top"]
    assert out.shape == (2, 8) and row["calls"] == 1
    assert 5 * 32 + 5 * 8 + 2 * 8 + 5 * 4 + 2 * 32 <= row["bytes"] <= 5 * 32 + 5 * 8 + 2 * 8 + 5 * 4 + 2 * 32 + 6 * 8
    monkeypatch.setattr(tr, "RESULTS", tmp_path)
    monkeypatch.setattr("sys.argv", ["traffic", "--V", "80", "--T", "64", "--d", "4", "--batch", "30"])
    tr.main()
    res = json.loads(next(tmp_path.glob("dwe_traffic-*.json")).read_text())["paths"]
    new, old = res["issue16_torch"], res["issue16_logdepth"]
    assert new["scan_method"] == "blocked" and old["scan_method"] == "logdepth"

    def minibatch_work(r):  # everything but the whole-parameter operations (Adam, dense gradients)
        return r["bytes"] - r["by_class"].get("full", {"bytes": 0})["bytes"]

    assert 3 * minibatch_work(new) < minibatch_work(old)  # 5.5x here, 4.2x at T=209 with 1,000 x 1,000 minibatches
    assert new["bytes"] < old["bytes"] and new["ops"] < 1.2 * old["ops"]
    assert "issue16_torch:" in capsys.readouterr().out


def test_traffic_counts_the_movielens_step_on_real_ratings(shared_data, tmp_path, monkeypatch, capsys):
    """ml-latest-small at the paper's T=100, d=30: the step as on CUDA (no C loops, the GPU's time
    blocks) touches between 1x and 4x its compulsory bytes (bench.roofline); on the CPU the native
    loops replace most of its ATen operations (which is all the counter sees)."""
    import bench.traffic as tr

    monkeypatch.setattr(tr, "RESULTS", tmp_path)
    data = str(shared_data / "movielens" / "ml-latest-small")
    monkeypatch.setattr("sys.argv", ["traffic", "--movielens", data])
    tr.main()
    res = json.loads((tmp_path / "movielens_traffic-ml-latest-small.json").read_text())["movielens"]
    assert 1.0 < res["bytes"] / res["compulsory_bytes"] < 4.0
    assert res["train_ratings"] > 40_000 and "compulsory" in capsys.readouterr().out
    cpu = tr.count_movielens_step(data, as_device="cpu")
    assert cpu["ops"] < res["ops"]
