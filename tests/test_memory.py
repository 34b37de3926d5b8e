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


def test_a_dwe_run_that_cannot_fit_is_refused_in_one_line_before_the_model_is_made(in_tmp, tiny_corpus, monkeypatch):
    import goldstone_cli.models.dwe as dwe

    made = []
    original = dwe.DynamicWordEmbeddings.__init__

    def init(self, *a, **kw):
        made.append(1)
        original(self, *a, **kw)

    monkeypatch.setattr(dwe.DynamicWordEmbeddings, "__init__", init)
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

