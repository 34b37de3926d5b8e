"""goldstone_cli/models/memory.py: the predicted peak of a DWE step, what the machine has, and the
check that refuses a model=dwe run that cannot fit before its (T, V, d) tensors are made."""

import pytest
import torch
from typer.testing import CliRunner

from goldstone_cli.cli import app
from goldstone_cli.config import compose
from goldstone_cli.models import memory

runner = CliRunner()


def test_the_paper_size_predictions_of_docs_benchmarks():
    """docs/benchmarks.md, "Peak memory": variational at V=10,000, T=209, d=100 (73M nonzeros) is
    21.8 GB on a GPU and 23.0 GB on the CPU with Adam; MAP 8.4 / 9.7 GB."""
    gb = lambda **kw: round(memory.dwe_peak_bytes(10_000, 209, 100, 1000, 73e6, **kw)["total"] / 1e9, 1)
    assert (gb(variational=True, device="cuda"), gb(variational=True, device="cpu")) == (21.8, 23.0)
    assert (gb(variational=False, device="cuda"), gb(variational=False, device="cpu")) == (8.4, 9.7)
    # AdaGrad keeps one buffer per parameter instead of two; float64 doubles the dense tensors
    n = memory.dwe_n_params(10_000, 209, 100, True)
    one = memory.dwe_peak_bytes(10_000, 209, 100, 1000, 73e6, True, "cuda", moments=1)
    assert memory.dwe_peak_bytes(10_000, 209, 100, 1000, 73e6, True, "cuda")["state"] - one["state"] == 4 * n
    assert memory.dwe_peak_bytes(10_000, 209, 100, 1000, 73e6, True, "cuda", itemsize=8)["grads"] == 8 * n


@pytest.mark.parametrize("overrides, moments", [
    (["optimizer=adam"], 2), (["optimizer=adagrad"], 1), (["optimizer=gd"], 0),
    (["optimizer=gd", "optimizer.momentum=0.9"], 1), (["optimizer=goldstone", "optimizer.base=adam"], 2),
    (["optimizer=goldstone", "optimizer.base=adagrad"], 1), (["optimizer=goldstone", "optimizer.base=gd"], 0),
])
def test_optimizer_buffers_per_parameter(overrides, moments):
    assert memory.optimizer_moments(compose(["model=dwe", *overrides]).optimizer) == moments


def test_available_memory_is_read_and_below_what_the_machine_has():
    have = memory.available_bytes(torch.device("cpu"))
    assert have is not None and 0 < have
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    assert have <= total
    assert memory.available_bytes(torch.device("meta")) is None


def _count_constructions(monkeypatch, cls) -> list:
    """A list that gets one entry per ``cls(...)`` made while the test runs."""
    made = []
    original = cls.__init__

    def init(self, *a, **kw):
        made.append(1)
        original(self, *a, **kw)

    monkeypatch.setattr(cls, "__init__", init)
    return made


def test_a_dwe_run_that_cannot_fit_is_refused_in_one_line_before_the_model_is_made(in_tmp, tiny_corpus, monkeypatch):
    import goldstone_cli.models.dwe as dwe

    made = _count_constructions(monkeypatch, dwe.DynamicWordEmbeddings)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10**6)  # 1 MB free
    args = ["train", "model=dwe", *tiny_corpus, "trainer.steps=2", "trainer.progress=false", "run_dir=run"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and "model=dwe (variational, V=150, T=6, d=3, float32) needs about" in line
    assert "of the 0.0 GB available in RAM" in line and "model=dwe_map (about" in line
    assert "trainer.memory_check=false" in line and made == [] and not (in_tmp / "run").exists()
    res = runner.invoke(app, args[:-1] + ["trainer.memory_check=false", "run_dir=run2"])
    assert res.exit_code == 0 and made == [1], res.output
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10**12)
    assert runner.invoke(app, args[:-1] + ["run_dir=run3"]).exit_code == 0


# ----------------------------------------------------------------------------- model=movielens
def test_movielens_prediction_counts_what_the_model_allocates(tiny_movielens):
    """The parameters, their optimizer state and the ratings on the device are exactly the model's
    (the transient and evaluation terms are fitted: docs/benchmarks.md, "Peak memory")."""
    from goldstone_cli.models import build_model
    from goldstone_cli.optim.factory import build_optimizer

    cfg = compose(["model=movielens", "optimizer=adam", *tiny_movielens, "trainer.progress=false"])
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    opt, _ = build_optimizer(cfg.optimizer, model)
    model.loss_terms()["total"].backward()
    opt.step()
    n = sum(int(s[0].numel()) for s in model._splits.values())
    need = memory.movielens_peak_bytes(model.n_users, model.n_items, 4, 3, n, model.n_train, 1, moments=2)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    adam = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if t.dim() > 0)
    assert need["parameters"] * 4 == params and need["state"] == params + adam and need["grads"] == params
    on_device = sum(t.numel() * t.element_size() for s in model._splits.values() for t in s)
    assert on_device == (memory.RATING_INDEX + 4) * n
    # ML-20M at data.T=100, model.d=100 with AdaGrad: 4 copies of 1.65e9 parameters (26.4 GB) and the rest
    big = memory.movielens_peak_bytes(138_493, 26_744, 100, 100, 20_000_263, 10_000_000, 3_000_000)
    assert big["parameters"] == 1_652_370_000 and 28e9 < big["total"] < 29e9


def test_a_movielens_run_that_cannot_fit_is_refused_in_one_line_before_the_model_is_made(in_tmp, tiny_movielens,
                                                                                        monkeypatch):
    import goldstone_cli.models.movielens as ml

    made = _count_constructions(monkeypatch, ml.SparseDynamicBernoulliMF)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10**6)  # 1 MB free
    args = ["train", "model=movielens", *tiny_movielens, "trainer.steps=2", "trainer.eval_every=2",
            "trainer.progress=false", "run_dir=run"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: model=movielens (") and "T=4, d=3, float32) needs about" in line
    assert "ratings, T=4" in line and "of the 0.0 GB available in RAM" in line
    assert "model.d=1: about" in line and "data.T=2: about" in line and "trainer.distributed=true" in line
    assert "trainer.memory_check=false" in line and made == [] and not (in_tmp / "run").exists()
    res = runner.invoke(app, args[:-1] + ["trainer.memory_check=false", "run_dir=run2"])
    assert res.exit_code == 0 and made == [1], res.output


# ----------------------------------------------------------------------------- the sharded DWE model
def test_ranks_on_one_host_are_checked_together():
    """Two ranks that each fit alone but not together on one host's RAM are refused; on two hosts
    (or two GPUs) they fit; what the ranks hold already counts as theirs."""
    GB = 10**9
    one_host = [{"where": "h/1", "need": 6 * GB, "have": 10 * GB, "held": 0},
                {"where": "h/1", "need": 6 * GB, "have": 11 * GB, "held": 0}]
    bad = memory.sharded_shortfall(one_host)
    assert bad == {"where": "h/1", "ranks": [0, 1], "need": 12 * GB, "have": 10 * GB, "worst": 0}
    assert memory.sharded_shortfall([dict(r, held=2 * GB) for r in one_host]) is None  # 12 <= 0.95 * (10 + 4)
    assert memory.sharded_shortfall([one_host[0], dict(one_host[1], where="g/2")]) is None
    assert memory.sharded_shortfall([dict(r, have=None) for r in one_host]) is None  # unknown: not refused
    gpus = [{"where": "h/1:cuda:0", "need": 6 * GB, "have": 7 * GB, "held": 0},
            {"where": "h/1:cuda:1", "need": 7 * GB, "have": 7 * GB, "held": 0}]
    assert memory.sharded_shortfall(gpus)["ranks"] == [1]


def test_sharded_prediction_is_per_rank():
    """Each rank holds 1/world of the rows' state; the (T, V) row sums, the gathered minibatch and
    the start's float64 draw of all words are on every rank."""
    kw = dict(V=10_000, T=209, d=100, batch_words=1000, batch_contexts=1000, nnz_local=0, variational=True)
    one = memory.dwe_sharded_peak_bytes(world=1, **kw)
    four = memory.dwe_sharded_peak_bytes(world=4, **kw)
    assert four["rows"] == 2500 and four["state"] * 4 == one["state"] and four["grads"] * 4 == one["grads"]
    assert four["counts"] - 8 * 209 * 2500 == one["counts"] - 8 * 209 * 10_000 == 16 * 209 * 10_000
    # 209 * 10,000 * 100 numbers: above FULL_INIT_MAX, so drawn one step at a time (8 V d + 16 T rows d + ...)
    assert four["init"] - four["counts"] == 8 * 10_000 * 100 + 24 * 209 * 2500 * 100
    small = memory.dwe_sharded_peak_bytes(world=4, **dict(kw, T=10))  # 1e7 numbers: one whole draw
    assert small["init"] - small["counts"] == 8 * 10 * 10_000 * 100 + 16 * 10 * 2500 * 100
    assert memory.dwe_sharded_peak_bytes(world=4, device="cuda", **kw)["init"] == 0  # drawn in host RAM
    from goldstone_cli.models.dwe_sharded import FULL_INIT_MAX

    assert memory.SHARDED_FULL_INIT_MAX == FULL_INIT_MAX


def _sharded_rank(path) -> dict:
    """One rank of test_sharded_check_on_two_ranks: the allocations of a model built through the
    registry (memory check on), then the same build with rank 1 seeing 1 MB free."""
    import torch.distributed as dist

    from goldstone_cli.distributed.shard import RowShard
    from goldstone_cli.models import build_model
    from goldstone_cli.models import dwe_sharded
    from goldstone_cli.optim.factory import build_base
    from test_distributed_dwe import _cfg

    shard = RowShard(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    cfg = _cfg(path)
    model = build_model(cfg, torch.device("cpu"), torch.float32, shard=shard)
    opt = build_base("adam", list(model.parameters()), compose(["optimizer=adam"]).optimizer)
    model.loss_terms(torch.Generator().manual_seed(5))["total"].backward()
    opt.step()
    m = cfg.model
    need = memory.dwe_sharded_peak_bytes(model.V, model.T, m.d, m.batch_words, m.batch_contexts, int(model.val.numel()),
                                         shard.world, True, rows=model.n_local)
    out = {"need": {k: int(v) for k, v in need.items()},
           "params": sum(p.numel() * p.element_size() for p in model.parameters()),
           "adam": sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if t.dim() > 0),
           "grads": sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()),
           "counts": sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n in ("crow", "col", "val", "c", "cneg")),
           "nnz": int(model.val.numel()), "c64": int(model._c64.nbytes),
           "scipy": sum(int(a.data.nbytes + a.indices.nbytes) for a in model._train_rows)}
    made = []
    dwe_sharded.ShardedDynamicWordEmbeddings._set_train_counts = lambda *a: made.append(1)
    if shard.rank == 1:
        memory.available_bytes = lambda device: 10**6
    try:
        build_model(cfg, torch.device("cpu"), torch.float32, shard=shard)
        out["error"] = None
    except ValueError as e:
        out["error"], out["message"] = type(e).__name__, str(e)
    out["made"] = made
    return out


@pytest.mark.slow
def test_sharded_check_on_two_ranks(tmp_path):
    """2 gloo ranks through build_model: the prediction counts exactly what each rank allocates
    (its rows' parameters, Adam's moments, gradients, its counts and the replicated row sums); with
    1 MB free on rank 1 only, both refuse before any count or parameter tensor is made, rank 0 in
    one line (DoesNotFit, which the command line prints) and rank 1 with PeerRankError, and none
    waits for the other."""
    from goldstone_cli.distributed.local import run_local
    from test_distributed_dwe import _write_corpus

    _write_corpus(tmp_path / "c")
    ranks = run_local(_sharded_rank, 2, str(tmp_path / "c"), timeout_s=300)
    for r in ranks:
        need = r["need"]
        assert r["params"] == 4 * need["parameters"] and need["state"] == r["params"] + r["adam"]
        assert need["grads"] == r["grads"]
        assert need["counts"] + 8 == r["counts"] + r["c64"] + r["scipy"]  # (+ the CSR's last row offset)
    assert [r["need"]["rows"] for r in ranks] == [21, 20] and ranks[0]["nnz"] != ranks[1]["nnz"]
    assert [r["error"] for r in ranks] == ["DoesNotFit", "PeerRankError"] and ranks[0]["message"] == ranks[1]["message"]
    line = ranks[0]["message"]
    assert len(line.splitlines()) == 1 and line.startswith("model=dwe (variational, V=41, T=6, d=3, float32) on 2 ranks needs about")
    assert "its 2 ranks on" in line and "together" in line and "more hosts with fewer ranks each" in line
    assert "model=dwe_map (about" in line and "trainer.memory_check=false" in line
    assert all(r["made"] == [] for r in ranks)
