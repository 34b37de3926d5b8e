"""The models, Goldstone-GD and `goldstone train` on a CUDA device, each against the same computation
on the CPU (float64, so the two must agree to rounding). Skipped where no CUDA device exists; run
them on a GPU with `pytest tests/test_cuda.py tests/test_gauge.py tests/test_goldstone_optim.py`
(bench/gpu_check.sh does, with the GPU benchmarks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from goldstone_cli.cli import app
from goldstone_cli.models.dwe import DynamicWordEmbeddings
from goldstone_cli.models.movielens import SparseDynamicBernoulliMF
from goldstone_cli.optim import GoldstoneGD

from test_dwe import _wc
from test_movielens_model import planted

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
F64 = torch.float64


def _loss_and_grads(model, **kw):
    model.zero_grad()
    total = model.loss_terms(**kw)["total"]
    total.backward()
    return float(total.detach()), [p.grad.detach().cpu() for p in model.parameters()]


def _assert_same(cpu_model, gpu_model, **kw):
    loss_c, grads_c = _loss_and_grads(cpu_model, **kw)
    loss_g, grads_g = _loss_and_grads(gpu_model, **kw)
    assert loss_g == pytest.approx(loss_c, rel=1e-10)
    for a, b in zip(grads_c, grads_g):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)
    ev_c, ev_g = cpu_model.evaluate(), gpu_model.evaluate()
    assert sorted(ev_c) == sorted(ev_g)
    for k in ev_c:
        assert ev_g[k] == pytest.approx(ev_c[k], rel=1e-8, abs=1e-10, nan_ok=True), k


def test_movielens_model_on_cuda_matches_cpu():
    data = planted(n=3000, T=6)
    kw = dict(d=3, coupling=2.0, gamma=0.7, init_scale=0.5, chunk_size=501, dtype=F64)
    _assert_same(SparseDynamicBernoulliMF(data, **kw), SparseDynamicBernoulliMF(data, device="cuda", **kw))


def test_dwe_map_full_batch_on_cuda_matches_cpu():
    wc = _wc(V=12, T=5)
    kw = dict(d=3, inference="map", batch_words=0, batch_contexts=0, dtype=F64, test_mass=0.2)
    _assert_same(DynamicWordEmbeddings(wc, **kw), DynamicWordEmbeddings(wc, device="cuda", **kw))


def test_dwe_chain_terms_on_cuda_match_the_cpu():
    """The variational posterior's chain terms with the CUDA default (whole-tensor, blocked
    recurrences) against the CPU's sequential pass, float64: sample, terms and the dense gradients
    of the whole parameters through minibatch rows (one of them twice)."""
    from goldstone_cli.models.dwe import SCAN_METHOD, _ChainTerms

    assert SCAN_METHOD["cuda"] == "blocked"
    g = torch.Generator().manual_seed(0)
    T, V, P, d = 23, 9, 4, 3
    mu = torch.randn(T, P, d, generator=g, dtype=F64)
    raw = torch.randn(T, V, d, generator=g, dtype=F64) + 1.0
    off = 0.4 * torch.randn(T - 1, V, d, generator=g, dtype=F64)
    eps = torch.randn(T, P, d, generator=g, dtype=F64)
    w = 0.5 + torch.rand(T - 1, generator=g, dtype=F64) * 3
    gx = torch.randn(T, P, d, generator=g, dtype=F64)
    rows = torch.tensor([7, 2, 5, 2])
    out = []
    for dev, method in (("cpu", "sequential"), ("cuda", "blocked")):
        leaves = [t.to(dev).requires_grad_() for t in (mu, raw, off)]
        x, terms = _ChainTerms.apply(*leaves, eps.to(dev), w.to(dev), 0.7, rows.to(dev), True, method)
        grads = torch.autograd.grad((gx.to(dev) * x).sum() + 1.3 * terms, leaves)
        out.append([x.detach().cpu(), terms.detach().cpu()] + [gr.cpu() for gr in grads])
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("precision", ["highest", "high"])
def test_quadratic_terms_by_the_banded_product_on_cuda_match_the_cpu(precision):
    """The CUDA default for ``gamma Z + L Z`` (one batched product over blocks of time steps, middle
    blocks included at T=100) against the CPU's elementwise pass in float64; in float32 within a few
    roundings of float64 also where the user asked for TF32 matmuls ("high"): the product runs at
    full precision (TF32 would miss the small differences of a slowly drifting Z)."""
    from goldstone_cli.optim.coupling import LAPLACIAN_METHOD, Coupling, quadratic_terms_

    assert LAPLACIAN_METHOD["cuda"] == "banded"
    g = torch.Generator().manual_seed(0)
    T, N, d = 100, 300, 8
    c = Coupling.chain(T, (1 + 9 * torch.rand(T - 1, generator=g, dtype=F64)).tolist())
    Z = torch.randn(1, N, d, generator=g, dtype=F64) + 0.01 * torch.randn(T, N, d, generator=g, dtype=F64).cumsum(0)
    ref_out = torch.empty_like(Z)
    ref = quadratic_terms_(Z, c, 0.7, ref_out, native=False)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        out = torch.empty_like(Z, device="cuda")
        got = quadratic_terms_(Z.cuda(), c, 0.7, out)
        torch.testing.assert_close(out.cpu(), ref_out, rtol=1e-12, atol=1e-12)
        assert [float(v) for v in got] == pytest.approx([float(v) for v in ref], rel=1e-12)
        Z32 = Z.float().cuda()
        out32 = torch.empty_like(Z32)
        quadratic_terms_(Z32, c, 0.7, out32)
        assert torch.get_float32_matmul_precision() == precision
        exact = torch.empty_like(Z)
        quadratic_terms_(Z32.double().cpu(), c, 0.7, exact, native=False)
        A = (c.laplacian(F64) + 0.7 * torch.eye(T, dtype=F64)).abs()
        scale = (A @ Z32.double().cpu().abs().reshape(T, -1)).reshape(Z.shape)
        assert float(((out32.double().cpu() - exact).abs() / scale).max()) < 4 * torch.finfo(torch.float32).eps
    finally:
        torch.set_float32_matmul_precision(before)


def test_compiled_movielens_step_on_cuda_matches_the_cpu():
    """trainer.compile on CUDA (Triton: the chain quadratic kernel and the ratings pass with atomic
    scatter-adds) against the CPU's eager step in float64; no fallback warning (so the compiled
    kernels ran)."""
    import warnings

    data = planted(n=3000, T=40)
    kw = dict(d=3, coupling=2.0, gamma=0.7, init_scale=0.5, dtype=F64)
    cpu, gpu = SparseDynamicBernoulliMF(data, **kw), SparseDynamicBernoulliMF(data, device="cuda", **kw)
    gpu.set_compile(True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile")
        loss_c, grads_c = _loss_and_grads(cpu)
        loss_g, grads_g = _loss_and_grads(gpu)
    assert loss_g == pytest.approx(loss_c, rel=1e-10)
    for a, b in zip(grads_c, grads_g):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("solver", ["procrustes", "natural"])
def test_dwe_variational_trains_with_goldstone_gd_on_cuda(solver):
    wc = _wc(V=30, T=10)  # T >= 8: the blocked recurrence runs its blocks
    model = DynamicWordEmbeddings(wc, d=4, inference="variational", batch_words=10, batch_contexts=12,
                                  device="cuda", test_mass=0.2)
    opt = GoldstoneGD(torch.optim.Adam(model.parameters(), lr=0.05), model.symmetric_groups(), model.coupling,
                      k1=5, solver=solver, rotation="expm")
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(20):
        opt.zero_grad()
        loss = model.loss_terms(g)["total"]
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert opt.num_gauge_steps == 4
    assert opt.last_gauge["psi_after"] <= opt.last_gauge["psi_before"] * (1 + 1e-5)
    assert all(np.isfinite(v) for v in model.evaluate().values() if not np.isnan(v))


def test_goldstone_train_on_cuda_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["train", "model=dense_mf", "data=synthetic", "trainer.device=cuda",
                                   "trainer.steps=120", "trainer.eval_every=40", "run_dir=run"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 120
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
