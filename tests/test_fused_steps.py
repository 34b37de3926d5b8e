"""Issue 16: the fused MovieLens step, the cache-blocked quadratic terms, reused gradient buffers and
fused optimizers give the same numbers as the formulation before (autograd through ``local_loss() +
psi()``, for-loop AdaGrad / Adam) up to float rounding, on real ml-latest-small data."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from goldstone_cli.config import compose
from goldstone_cli.data.movielens import load_movielens
from goldstone_cli.models.base import DynamicModel
from goldstone_cli.models import movielens as M
from goldstone_cli.models.movielens import GradBuffer, SparseDynamicBernoulliMF
from goldstone_cli.optim import coupling as C
from goldstone_cli.optim import gauge as G
from goldstone_cli.optim.coupling import Coupling, quadratic_terms_
from goldstone_cli.optim.factory import build_base
from goldstone_cli.train import train

# ML_SMALL: a copy of the sample elsewhere (bench/gpu_check.sh on a device machine without ../shared)
SAMPLE = Path(os.environ.get("ML_SMALL") or
              Path(__file__).resolve().parents[1].parent / "shared" / "data" / "movielens" / "ml-latest-small")
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason="ml-latest-small sample not available")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return load_movielens(str(SAMPLE), T=12, seed=0, cache_dir=str(tmp_path_factory.mktemp("cache")), progress=False)


def old_terms_and_grads(model, generator=None, weights=(1.0, 1.0)):
    model.zero_grad(set_to_none=True)
    t = DynamicModel.loss_terms(model, generator)  # local_loss() + psi(): the formulation before issue 16
    (weights[0] * t["local"] + weights[1] * t["psi"]).backward()
    return {k: v.detach() for k, v in t.items()}, (model.U.grad.clone(), model.V.grad.clone())


def new_terms_and_grads(model, generator=None, weights=(1.0, 1.0)):
    model.zero_grad(set_to_none=True)
    t = model.loss_terms(generator)
    (weights[0] * t["local"] + weights[1] * t["psi"]).backward()
    return {k: v.detach() for k, v in t.items()}, (model.U.grad.clone(), model.V.grad.clone())


@needs_sample
@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 3.0), (1.0, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("batch_size", [None, 5000])
def test_fused_loss_and_gradient_match_the_old_formulation_in_float64(small, weights, batch_size):
    model = SparseDynamicBernoulliMF(small, d=4, gamma=0.7, coupling=3.0, batch_size=batch_size, seed=3,
                                     dtype=torch.float64)
    new, g_new = new_terms_and_grads(model, torch.Generator().manual_seed(1), weights)
    old, g_old = old_terms_and_grads(model, torch.Generator().manual_seed(1), weights)
    for k in ("total", "local", "psi"):
        torch.testing.assert_close(new[k], old[k], rtol=1e-13, atol=0)
    for a, b in zip(g_new, g_old):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))


@needs_sample
def test_fused_float32_step_matches_float64_at_the_papers_size(tmp_path):
    """ml-latest-small at T=100, d=30 (29M parameters): float32 fused vs float64 old formulation."""
    data = load_movielens(str(SAMPLE), T=100, seed=0, cache_dir=str(tmp_path), progress=False)
    m32 = SparseDynamicBernoulliMF(data, d=30, seed=0, dtype=torch.float32)
    new, g_new = new_terms_and_grads(m32)
    del m32
    m64 = SparseDynamicBernoulliMF(data, d=30, seed=0, dtype=torch.float64)
    old, g_old = old_terms_and_grads(m64)
    for k in ("local", "psi"):
        assert abs(float(new[k]) / float(old[k]) - 1) < 1e-6, k
    for a, b in zip(g_new, g_old):
        assert float((a.double() - b).abs().max()) < 1e-5 * float(b.abs().max())


@needs_sample
def test_gradient_storage_is_reused_but_a_kept_gradient_is_never_overwritten(small):
    model = SparseDynamicBernoulliMF(small, d=3, seed=0)
    ptrs = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        model.loss_terms()["total"].backward()
        ptrs.append(model.U.grad.data_ptr())
    assert ptrs[0] == ptrs[1] == ptrs[2]  # no fresh multi-MB gradient per step
    kept = model.U.grad
    kept_copy = kept.clone()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.U.mul_(0.5)
    model.loss_terms()["total"].backward()
    assert model.U.grad.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(kept, kept_copy, rtol=0, atol=0)
    buf = GradBuffer()
    a = buf.get(torch.zeros(4, 3))
    view = a[1]
    del a
    b = buf.get(torch.zeros(4, 3))
    assert b.data_ptr() != view.untyped_storage().data_ptr()  # a view still holds the storage
    ptr = b.data_ptr()
    del b
    assert buf.get(torch.zeros(4, 3)).data_ptr() == ptr  # free again: reused


@needs_sample
def test_no_grad_terms_match_and_backward_twice_is_refused(small):
    model = SparseDynamicBernoulliMF(small, d=3, seed=0)
    with torch.no_grad():
        a = model.loss_terms()
    b = DynamicModel.loss_terms(model)
    torch.testing.assert_close(a["total"], b["total"].detach(), rtol=1e-6, atol=0)
    t = model.loss_terms()
    t["total"].backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        t["total"].backward()


@pytest.mark.parametrize("block", [1, 7, 1 << 22])
def test_quadratic_terms_match_psi_and_laplacian_on_a_graph_with_several_offsets(block):
    g = torch.Generator().manual_seed(0)
    T, N, d = 9, 5, 3
    src = [0, 0, 1, 2, 3, 5, 4, 6]
    dst = [1, 3, 2, 7, 4, 8, 6, 8]
    coupling = Coupling(T, src, dst, torch.rand(len(src), generator=g, dtype=torch.float64).tolist())
    Z = torch.randn(T, N, d, generator=g, dtype=torch.float64)
    out = torch.full_like(Z, float("nan"))
    sq, psi = quadratic_terms_(Z, coupling, 0.3, out, block_elems=block)
    torch.testing.assert_close(sq, (Z ** 2).sum(), rtol=1e-14, atol=0)
    torch.testing.assert_close(psi, coupling.psi(Z), rtol=1e-14, atol=0)
    torch.testing.assert_close(out, 0.3 * Z + coupling.laplacian_apply(Z), rtol=1e-14, atol=1e-14)
    sq2, psi2 = quadratic_terms_(Z, coupling, 0.3, None, block_elems=block)  # values only
    assert float(sq2) == float(sq) and float(psi2) == float(psi)


def test_default_block_keeps_a_few_blocks_in_cache():
    assert C.FUSED_BLOCK_ELEMS * 4 <= 64 << 20


@pytest.mark.parametrize("name", ["adagrad", "adam"])
def test_fused_optimizers_follow_the_for_loop_versions(name):
    cfg = compose(["model=movielens", f"optimizer={name}"]).optimizer
    g = torch.Generator().manual_seed(0)
    init = torch.randn(5, 40, 3, generator=g)
    target = torch.randn(5, 40, 3, generator=g)
    runs = []
    for fused in (True, False):
        p = torch.nn.Parameter(init.clone())
        opt = build_base(name, [p], cfg)
        if not fused:
            cls = type(opt)
            opt = cls([p], **{k: v for k, v in opt.defaults.items() if k not in ("fused", "foreach")},
                      foreach=False)
        assert bool(opt.defaults.get("fused")) == fused
        for _ in range(5):
            opt.zero_grad()
            ((p - target) ** 2).sum().backward()
            opt.step()
        runs.append(p.detach())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@needs_sample
def test_training_run_gives_the_same_metrics_as_before(tmp_path, monkeypatch):
    """Same seed, same config: metrics.csv of the fused step vs the pre-issue-16 step (base class
    loss_terms, for-loop AdaGrad) agree to float rounding, through the real trainer."""
    over = ["model=movielens", "optimizer=goldstone", f"data.path={SAMPLE}", "data.T=8", "model.d=4",
            "trainer.steps=12", "trainer.log_every=1", "trainer.eval_every=4", "trainer.checkpoint_every=12",
            "trainer.progress=false", "trainer.dtype=float64", "optimizer.k1=5",
            f"data.cache_dir={tmp_path / 'cache'}"]
    train(compose(over + [f"run_dir={tmp_path / 'new'}"]))
    import goldstone_cli.optim.factory as factory

    monkeypatch.setattr(SparseDynamicBernoulliMF, "loss_terms", DynamicModel.loss_terms)
    monkeypatch.setattr(factory, "_fused_if_possible", lambda cls, params, **kw: cls(params, foreach=False, **kw))
    train(compose(over + [f"run_dir={tmp_path / 'old'}"]))
    assert_same_metrics(tmp_path / "new", tmp_path / "old", 13, rtol=1e-9, atol=1e-9)


def assert_same_metrics(run_a: Path, run_b: Path, rows: int, rtol: float, atol: float) -> None:
    """metrics.csv of two runs: ``rows`` rows each, every column but the timings equal to tolerance."""
    a = pd.read_csv(run_a / "metrics.csv")
    b = pd.read_csv(run_b / "metrics.csv")
    cols = [c for c in a.columns if c not in ("wall_time", "gauge_time") and not c.endswith("_acc")]
    assert len(a) == len(b) == rows
    np.testing.assert_allclose(a[cols].to_numpy(float), b[cols].to_numpy(float), rtol=rtol, atol=atol)
    # accuracy is a step function of each logit: float rounding may flip a prediction whose logit is
    # ~0 (1 of ml-latest-small's ~17,500 validation ratings is 5.7e-5); allow up to 5
    acc = [c for c in a.columns if c.endswith("_acc")]
    np.testing.assert_allclose(a[acc].to_numpy(float), b[acc].to_numpy(float), rtol=0, atol=max(atol, 3e-4))


@needs_sample
def test_native_loops_give_the_metrics_of_the_pytorch_step(tmp_path, monkeypatch):
    """float32 training through the real trainer with the native C loops (goldstone_cli/kernels)
    and with GOLDSTONE_NATIVE=0 (the PyTorch passes): the same metrics to float32 rounding."""
    from goldstone_cli.kernels import native

    if native.library() is None:
        pytest.skip("no C compiler: the native loops are not built here")
    over = ["model=movielens", "optimizer=goldstone", f"data.path={SAMPLE}", "data.T=10", "model.d=8",
            "trainer.steps=15", "trainer.log_every=1", "trainer.eval_every=5", "trainer.checkpoint_every=15",
            "trainer.progress=false", "optimizer.k1=5", "optimizer.lr=0.1", f"data.cache_dir={tmp_path / 'cache'}"]
    train(compose(over + [f"run_dir={tmp_path / 'native'}"]))
    monkeypatch.setenv("GOLDSTONE_NATIVE", "0")
    assert native.library() is None
    train(compose(over + [f"run_dir={tmp_path / 'torch'}"]))
    assert_same_metrics(tmp_path / "native", tmp_path / "torch", 16, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [1, 4, 1 << 22])
def test_rotation_with_psi_equals_rotating_then_evaluating_psi(block):
    g = torch.Generator().manual_seed(1)
    T, N, d = 7, 6, 3
    coupling = Coupling(T, [0, 1, 2, 3, 4, 5, 0, 2], [1, 2, 3, 4, 5, 6, 3, 6], [1.0, 2.0, 0.5, 1.5, 1.0, 3.0, 0.7, 0.2])
    Z = torch.randn(T, N, d, generator=g, dtype=torch.float64)
    R = torch.linalg.qr(torch.randn(T, d, d, generator=g, dtype=torch.float64))[0]
    want = Z.clone()
    G.rotate_rows_(want, R)
    got = Z.clone()
    psi = G.rotate_rows_psi_(got, R, coupling, block_elems=block)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(psi, coupling.psi_value(want), rtol=1e-14, atol=0)


def test_gauge_step_evaluates_psi_once_per_tensor(monkeypatch):
    """psi before comes from the fused value pass, psi after from the rotation pass: no psi_value."""
    from goldstone_cli.optim.goldstone import GoldstoneGD

    coupling = Coupling.chain(6, 2.0)
    for solver in ("procrustes", "natural"):
        g = torch.Generator().manual_seed(2)
        U = torch.nn.Parameter(torch.randn(6, 8, 3, generator=g, dtype=torch.float64))
        V = torch.nn.Parameter(torch.randn(6, 5, 3, generator=g, dtype=torch.float64))
        opt = GoldstoneGD(torch.optim.SGD([U, V], lr=0.1), [[U, V]], coupling, k1=1, solver=solver, rotation="expm")
        calls = []
        monkeypatch.setattr(Coupling, "psi_value", lambda self, t: calls.append(1) or 0.0)
        before = float(sum(coupling.psi(Z) for Z in (U, V)))
        info = opt.gauge_step()
        monkeypatch.undo()
        assert calls == []
        assert abs(info["psi_before"] - before) <= 1e-12 * before
        after = float(sum(coupling.psi(Z) for Z in (U, V)))
        assert abs(info["psi_after"] - after) <= 1e-12 * after and after < before


def test_trainer_compile_is_a_validated_switch():
    assert compose(["model=movielens"]).trainer.compile is False
    assert compose(["model=movielens", "trainer.compile=true"]).trainer.compile is True
    with pytest.raises(Exception, match="compile"):
        compose(["model=movielens", "trainer.compile=maybe"])


def test_a_failing_compiled_kernel_falls_back_to_the_eager_pass(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no C++ compiler\nmore detail")

    monkeypatch.setitem(C._COMPILED, "chain", broken)
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(5, 4, 3, generator=g)
    coupling = Coupling.chain(5, 2.0)
    want_out = torch.empty_like(Z)
    want = quadratic_terms_(Z, coupling, 0.5, want_out, native=False)
    out = torch.empty_like(Z)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        got = quadratic_terms_(Z, coupling, 0.5, out, compiled=True, native=False)
    assert C._COMPILED["chain"] is None  # not tried again
    assert [float(v) for v in got] == [float(v) for v in want] and torch.equal(out, want_out)


@pytest.mark.slow
def test_compiled_quadratic_kernel_matches_the_eager_pass():
    g = torch.Generator().manual_seed(0)
    coupling = Coupling.chain(11, 3.0)
    for shape in ((11, 40, 5), (11, 7, 5)):
        Z = torch.randn(*shape, generator=g)
        a_out, b_out = torch.empty_like(Z), torch.empty_like(Z)
        a = quadratic_terms_(Z, coupling, 0.5, a_out, native=False)
        b = quadratic_terms_(Z, coupling, 0.5, b_out, compiled=True, native=False)
        for x, y in zip(a, b):
            assert abs(float(x) / float(y) - 1) < 1e-7  # eager: float32 partial sums of 1024 squares
        torch.testing.assert_close(a_out, b_out, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_sample
def test_fused_step_on_cuda_matches_the_cpu(small):
    res = []
    for device in ("cpu", "cuda"):
        model = SparseDynamicBernoulliMF(small, d=4, seed=0, dtype=torch.float64, device=device)
        terms, grads = new_terms_and_grads(model)
        res.append(([float(terms[k]) for k in ("local", "psi")], [g.cpu() for g in grads]))
        Z = model.U.detach().clone()
        R = torch.linalg.qr(torch.randn(model.T, 4, 4, dtype=torch.float64))[0].to(device)
        psi = G.rotate_rows_psi_(Z, R, model.coupling)
        assert abs(float(psi) / float(model.coupling.psi_value(Z)) - 1) < 1e-12
    np.testing.assert_allclose(res[0][0], res[1][0], rtol=1e-12)
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@needs_sample
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_step_matches_the_eager_step_on_real_ratings(small, dtype):
    """trainer.compile's MovieLens step (the compiled quadratic terms and ratings pass, the native
    loops off) against the eager PyTorch step on real ml-latest-small: the same loss terms and
    gradients to rounding (float32: the scatter-adds' order differs), weights != 1 included."""
    res = []
    for compiled in (False, True):
        terms, grads = new_terms_and_grads(_torch_model(small, compiled, dtype, d=5), weights=(1.0, 2.0))
        res.append(([float(terms[k]) for k in ("local", "psi")], grads))
    assert C._COMPILED.get("chain") is not None and M._COMPILED.get("ratings") is not None
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res[0][0], res[1][0], rtol=tol["rtol"])
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(b, a, **tol)


@needs_sample
def test_a_failing_compiled_ratings_pass_falls_back_to_the_eager_pass(small, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("inductor exploded\nmore detail")

    monkeypatch.setitem(M._COMPILED, "ratings", broken)
    monkeypatch.setitem(C._COMPILED, "chain", None)  # the quadratic terms eager (not compiled here)
    want = new_terms_and_grads(_torch_model(small, compiled=False))
    with pytest.warns(UserWarning, match="ratings pass failed \\(inductor exploded\\)"):
        got = new_terms_and_grads(_torch_model(small, compiled=True))
    assert M._COMPILED["ratings"] is None  # not tried again
    assert [float(want[0][k]) for k in want[0]] == [float(got[0][k]) for k in got[0]]
    for a, b in zip(want[1], got[1]):
        assert torch.equal(a, b)


def _torch_model(data, compiled: bool, dtype=torch.float64, d: int = 4) -> SparseDynamicBernoulliMF:
    """The MovieLens model with the PyTorch step (native loops off), ``trainer.compile`` on or off."""
    model = SparseDynamicBernoulliMF(data, d=d, seed=0, dtype=dtype)
    model.native = False
    model.set_compile(compiled)
    return model
