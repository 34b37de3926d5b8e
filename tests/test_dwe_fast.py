"""The fast DWE step (issue 16): the sequential O(T) recurrence and the fused, chunked skip-gram
likelihood give the results of the earlier formulation (log-depth scan, materialized logits under
autograd) and of brute force, in float64 to 1e-10 and in float32 at a realistic size; the fused
step keeps no (T, P, Q) activation and the recurrence writes O(T) elements, not O(T log T)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import sym_counts as _sym_counts
from goldstone_cli.models.dwe import (
    DynamicWordEmbeddings,
    WordCounts,
    _blocks,
    chain_moments,
    linear_recurrence_loop,
    linear_scan,
    sample_chain,
    skipgram_block,
    skipgram_block_fused,
)

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- recurrence
@pytest.mark.parametrize("method", ["sequential", "blocked", "logdepth"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [2, 3, 8, 17, 53])
def test_scan_methods_match_loop_values_and_gradients(method, reverse, T):
    g = torch.Generator().manual_seed(T)
    a = (0.9 * torch.randn(T - 1, 5, 3, generator=g, dtype=F64)).requires_grad_()
    c = torch.randn(T, 5, 3, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(T, 5, 3, generator=g, dtype=F64)
    y = linear_scan(a, c, reverse=reverse, method=method)
    ga, gc = torch.autograd.grad((w * y).sum(), (a, c))
    y0 = linear_recurrence_loop(a, c, reverse=reverse)  # brute force under autograd
    ga0, gc0 = torch.autograd.grad((w * y0).sum(), (a, c))
    for got, want in ((y, y0), (ga, ga0), (gc, gc0)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["sequential", "blocked", "logdepth"])
@pytest.mark.parametrize("T", [7, 20])
def test_scan_gradcheck_and_broadcast_coefficients(method, T):
    g = torch.Generator().manual_seed(3)
    a = (0.5 * torch.randn(T - 1, 1, 3, generator=g, dtype=F64)).requires_grad_()  # one coefficient per column
    c = torch.randn(T, 4, 3, generator=g, dtype=F64, requires_grad=True)
    for reverse in (False, True):
        assert torch.autograd.gradcheck(lambda a, c: linear_scan(a, c, reverse=reverse, method=method), (a, c))
        torch.testing.assert_close(linear_scan(a, c, reverse=reverse, method=method),
                                   linear_recurrence_loop(a.expand(T - 1, 4, 3), c, reverse=reverse))


def test_scan_rejects_unknown_method():
    with pytest.raises(ValueError, match="sequential"):
        linear_scan(torch.zeros(2, 3), torch.zeros(3, 3), method="fast")


@pytest.mark.parametrize("T", list(range(8, 41)) + [100, 209, 211])
@pytest.mark.parametrize("reverse", [False, True])
def test_blocked_recurrence_every_block_layout_in_place_and_scaled(T, reverse):
    """Every T from the smallest blocked one (K blocks of L plus 0 .. L-1 steps left over): the
    blocked recurrence equals the loop, written over its own input (c is y) and with a coefficient
    scale (-1, as the chain pass uses it), and never reads what it has not written (NaN-filled output)."""
    from goldstone_cli.models.dwe import _block_length, _recurrence_blocked_into

    g = torch.Generator().manual_seed(T)
    a = 1.2 * torch.rand(T - 1, 3, 2, generator=g, dtype=F64) - 0.1
    c = torch.randn(T, 3, 2, generator=g, dtype=F64)
    for value in (1.0, -1.0):
        want = linear_recurrence_loop(value * a, c, reverse=reverse)
        y = torch.full_like(c, float("nan"))
        torch.testing.assert_close(_recurrence_blocked_into(y, a, c, reverse, value), want, rtol=1e-12, atol=1e-12)
        y = c.clone()
        torch.testing.assert_close(_recurrence_blocked_into(y, a, y, reverse, value), want, rtol=1e-12, atol=1e-12)
    L = _block_length(T)
    assert 2 <= L <= T // 2 and 3 * L + T // L + T % L <= 3 * (3 * T) ** 0.5 + 3


_NO_WRITE = {"view", "_unsafe_view", "alias", "select", "slice", "expand", "detach", "t", "transpose", "as_strided",
             "empty", "empty_like", "unsqueeze", "squeeze"}  # views and allocations


class _ElementsWritten(TorchDispatchMode):
    """Counts the elements of every tensor an ATen operation returns or writes (a work count)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(x, torch.Tensor) and func.overloadpacket.__name__ not in _NO_WRITE:
                self.n += x.numel()
        return out


def _written(method: str, T: int, N: int = 200) -> int:
    a = torch.rand(T - 1, N, requires_grad=True)
    c = torch.randn(T, N, requires_grad=True)
    y = linear_scan(a, c, reverse=True, method=method)
    g = torch.ones_like(y)
    with _ElementsWritten() as mode:
        y = linear_scan(a, c, reverse=True, method=method)
        y.backward(g)
    return mode.n


def test_sequential_recurrence_is_linear_work():
    """Forward + backward of the sequential recurrence write a few T N elements, independent of
    log T; the log-depth scan writes about 3 T N per level (this test failed with it)."""
    T, N = 128, 200
    seq = _written("sequential", T, N)
    assert seq <= 6 * T * N, seq / (T * N)
    assert _written("blocked", T, N) <= 9 * T * N  # two passes over the blocks' columns per direction
    assert _written("logdepth", T, N) > 3 * seq  # the count tells them apart


# ----------------------------------------------------------------------------- skip-gram block
def _block_data(T=4, P=7, Q=9, d=5, dtype=F64, seed=0, density=0.3):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(T, P, d, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(T, Q, d, generator=g, dtype=dtype, requires_grad=True)
    c_rows = torch.rand(T, P, generator=g, dtype=dtype) * 10
    cneg = torch.rand(T, Q, generator=g, dtype=dtype)
    cneg = cneg / cneg.sum(1, keepdim=True)
    mask = torch.rand(T, P, Q, generator=g) < density
    pt, pp, pq = mask.nonzero(as_tuple=True)
    pn = torch.randint(1, 6, (len(pt),), generator=g).to(dtype)
    return u, v, c_rows, cneg, pt, pp, pq, pn


def _reference(u, v, c_rows, cneg, r, pt, pp, pq, pn):
    return skipgram_block(torch.bmm(u, v.transpose(1, 2)), c_rows, cneg, r, pt, pp, pq, pn)


@pytest.mark.parametrize("chunk", [1, 5, 9, 40, 63, 10_000])
def test_fused_block_matches_materialized_logits_float64(chunk):
    """Value and both gradients against the earlier formulation (bmm + skipgram_block under
    autograd), for chunks of whole steps, of row ranges within a step and of one element."""
    u, v, c_rows, cneg, pt, pp, pq, pn = _block_data()
    w = torch.randn(())
    ref = _reference(u, v, c_rows, cneg, 1.3, pt, pp, pq, pn)
    gu0, gv0 = torch.autograd.grad(w * ref, (u, v))
    got = skipgram_block_fused(u, v, c_rows, cneg, 1.3, pt, pp, pq, pn, chunk=chunk)
    gu, gv = torch.autograd.grad(w * got, (u, v))
    assert got.dtype == F64
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gu, gu0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gv, gv0, rtol=1e-10, atol=1e-10)


def test_fused_block_unsorted_positives_gradcheck_and_empty():
    u, v, c_rows, cneg, pt, pp, pq, pn = _block_data(T=3, P=4, Q=5, d=3, seed=1)
    perm = torch.randperm(len(pt), generator=torch.Generator().manual_seed(0))
    args = (c_rows, cneg, 0.7, pt[perm], pp[perm], pq[perm], pn[perm])
    torch.testing.assert_close(skipgram_block_fused(u, v, *args, chunk=7), _reference(u, v, *args), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda u, v: skipgram_block_fused(u, v, *args, chunk=7), (u, v))
    e = torch.zeros(0, dtype=torch.int64)
    none = (c_rows, cneg, 0.7, e, e, e, torch.zeros(0, dtype=F64))
    torch.testing.assert_close(skipgram_block_fused(u, v, *none, chunk=6), _reference(u, v, *none), rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # no gradient wanted: the value alone
        torch.testing.assert_close(skipgram_block_fused(u, v, *args), _reference(u, v, *args), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="chunk"):
        skipgram_block_fused(u, v, *args, chunk=0)


def test_fused_block_float32_realistic_size_against_float64():
    """T=12 steps of a 300 x 400 block, d=50, logits of a trained model's scale: float32 fused (sums
    in float64) against the float64 reference: value to 1e-6 relative, gradients to 1e-4."""
    u, v, c_rows, cneg, pt, pp, pq, pn = _block_data(T=12, P=300, Q=400, d=50, seed=2, density=0.05)
    with torch.no_grad():
        u.mul_(0.4), v.mul_(0.4)
        c_rows.mul_(1000)
    ref = _reference(u, v, c_rows, cneg, 1.0, pt, pp, pq, pn)
    gu0, gv0 = torch.autograd.grad(ref, (u, v))
    u32, v32 = u.detach().float().requires_grad_(), v.detach().float().requires_grad_()
    got = skipgram_block_fused(u32, v32, c_rows.float(), cneg.float(), 1.0, pt, pp, pq, pn.float())
    gu, gv = torch.autograd.grad(got, (u32, v32))
    assert abs(got.double().item() - ref.item()) <= 1e-6 * abs(ref.item())
    for g32, g64 in ((gu, gu0), (gv, gv0)):
        assert float((g32.double() - g64).norm() / g64.norm()) < 1e-4


def test_blocks_cover_the_logits_once_within_the_chunk():
    for T, P, Q, chunk in ((5, 3, 4, 25), (3, 10, 7, 20), (2, 4, 4, 1), (4, 2, 2, 1000)):
        seen = np.zeros((T, P), dtype=int)
        for t0, t1, p0, p1 in _blocks(T, P, Q, chunk):
            assert (t1 - t0) * (p1 - p0) * Q <= max(chunk, Q)
            assert t1 - t0 == 1 or (p0, p1) == (0, P)
            seen[t0:t1, p0:p1] += 1
        assert (seen == 1).all()


# ----------------------------------------------------------------------------- the model's step
def _model(inference, dtype=F64, V=30, T=6, d=4, batch=0, seed=0):
    wc = WordCounts(vocab=[f"w{i}" for i in range(V)], years=np.arange(1800, 1800 + 10 * T, 10),
                    counts=_sym_counts(V, T, seed=seed))
    return DynamicWordEmbeddings(wc, d=d, inference=inference, batch_words=batch, batch_contexts=batch,
                                 test_steps=0.2, test_mass=0.1, dtype=dtype, seed=seed)


def _loss_and_grads(model, seed=5):
    model.zero_grad(set_to_none=True)
    loss = model.loss_terms(torch.Generator().manual_seed(seed))["total"]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _old_paths(model):
    """Before issue 16: log-depth scans, the logits materialized for autograd, the prior under autograd."""
    model.scan_method, model.fused_loglik, model.fused_prior, model.fast_logits = "logdepth", False, False, False


def _first_paths(model):
    """The first issue-16 version: sequential recurrences and the prior under autograd, fused
    likelihood with eager softplus / sigmoid passes."""
    model.scan_method, model.fused_loglik, model.fused_prior, model.fast_logits = None, True, False, False


def _blocked_paths(model):
    """The CUDA default: the fused paths with the chain terms as whole-tensor operations, blocked recurrences."""
    model.scan_method, model.fused_loglik, model.fused_prior, model.fast_logits = "blocked", True, True, True


@pytest.mark.parametrize("inference", ["variational", "map"])
@pytest.mark.parametrize("batch", [0, 11])
def test_model_step_equals_the_earlier_formulation_float64(inference, batch):
    model = _model(inference, batch=batch, T=10)  # T >= 8: the blocked recurrence runs its blocks
    model.logit_chunk = 50  # several blocks, some splitting a step's rows
    new = _loss_and_grads(model)
    for earlier in (_first_paths, _old_paths, _blocked_paths):
        earlier(model)
        old = _loss_and_grads(model)
        torch.testing.assert_close(new[0], old[0], rtol=1e-10, atol=1e-10)
        for a, b in zip(new[1], old[1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fused_step_keeps_no_logits_sized_activation():
    """Nothing of T x P x Q elements is saved for the backward pass (the earlier formulation saved
    the logits and log sigma(-X) under autograd: this test failed with it)."""
    model = _model("variational", dtype=torch.float32, V=40, T=5, d=3, batch=20)
    limit = model.T * model.batch_words * model.batch_contexts
    sizes = []

    def pack(x):
        sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model.loss_terms(torch.Generator().manual_seed(0))["total"].backward()
    assert sizes and max(sizes) < limit
    _old_paths(model)
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model.loss_terms(torch.Generator().manual_seed(0))["total"].backward()
    assert max(sizes) >= limit  # the check sees the materialized logits


@pytest.mark.parametrize("inference", ["variational", "map"])
def test_training_same_seed_same_metrics_as_earlier_formulation(inference):
    """20 Adam steps in float32 on minibatches from one seed: the metrics of the new and the earlier
    compute paths agree to float rounding."""
    out = []
    for old in (False, True):
        torch.manual_seed(0)
        model = _model(inference, dtype=torch.float32, V=40, T=6, d=5, batch=25)
        if old:
            _old_paths(model)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(1)
        for _ in range(20):
            opt.zero_grad(set_to_none=True)
            model.loss_terms(g)["total"].backward()
            opt.step()
        out.append(model.evaluate())
    for k, v in out[0].items():
        assert v == pytest.approx(out[1][k], rel=1e-4, abs=1e-5), k


def test_sample_and_moments_pass_the_method():
    g = torch.Generator().manual_seed(0)
    mu, raw, eps = (torch.randn(9, 4, generator=g, dtype=F64) for _ in range(3))
    off = 0.3 * torch.randn(8, 4, generator=g, dtype=F64)
    torch.testing.assert_close(sample_chain(mu, raw, off, eps, "sequential"), sample_chain(mu, raw, off, eps, "logdepth"))
    for x, y in zip(chain_moments(raw, off, "sequential"), chain_moments(raw, off, "logdepth")):
        torch.testing.assert_close(x, y)


def test_chain_terms_equal_the_three_functions():
    from goldstone_cli.models.dwe import chain_terms, expected_neg_log_prior_var, neg_entropy

    g = torch.Generator().manual_seed(4)
    mu, raw, eps = (torch.randn(7, 3, 2, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    off = (0.3 * torch.randn(6, 3, 2, generator=g, dtype=F64)).requires_grad_()
    w = torch.rand(6, generator=g, dtype=F64)
    x, terms = chain_terms(mu, raw, off, eps, w, 0.7)
    x0 = sample_chain(mu, raw, off, eps)
    terms0 = expected_neg_log_prior_var(raw, off, w, 0.7) + neg_entropy(raw)
    torch.testing.assert_close(x, x0, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(terms, terms0, rtol=1e-14, atol=1e-14)
    gr = torch.autograd.grad(x.sum() + terms, (mu, raw, off, eps))
    gr0 = torch.autograd.grad(x0.sum() + terms0, (mu, raw, off, eps))
    for a, b in zip(gr, gr0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bench_memory_model_and_checks(tmp_path, monkeypatch, capsys):
    """bench/dwe_scale.py: the memory model grows with V and its largest V fits the budget; the
    --compare mode and the --max-step-seconds check run at a toy size (the check fails loudly)."""
    import bench.dwe_scale as ds

    a = ds.memory_model(1000, 50, 20, 100, 1e6, True)
    b = ds.memory_model(2000, 50, 20, 100, 2e6, True)
    assert b["total"] > a["total"] and b["state"] == 2 * a["state"]
    # logits-sized activations dominate at a 1,000 x 1,000 minibatch: the old paths need more
    assert (ds.memory_model(1000, 50, 20, 1000, 1e6, True, "before_issue16")["total"]
            > ds.memory_model(1000, 50, 20, 1000, 1e6, True)["total"] + 0.9e9)
    v = ds.largest_vocabulary(1e9, 50, 20, 100, 20.0, False, "issue16", "cpu")
    fits = ds.memory_model(v, 50, 20, 100, 20.0 * v * 50, False, "issue16", "cpu")["total"]
    over = ds.memory_model(v + 1, 50, 20, 100, 20.0 * (v + 1) * 50, False, "issue16", "cpu")["total"]
    assert fits <= 1e9 < over
    monkeypatch.setattr(ds, "RESULTS", tmp_path)
    import bench.roofline as rl

    real = rl.measure_rates  # the machine-rate measurement at a toy size (the full one takes seconds)
    monkeypatch.setattr(rl, "measure_rates", lambda device: real(device, repeats=1, gemm_n=64, stream_numel=1 << 12))
    small = ["--V", "60", "--T", "5", "--d", "4", "--batch", "20", "--steps", "2", "--device", "cpu"]
    monkeypatch.setattr("sys.argv", ["dwe_scale", *small, "--inference", "variational", "--compare", "--no-compile"])
    ds.main()
    out = capsys.readouterr().out
    assert "speedup_cpu" in out and list(tmp_path.glob("dwe_compare-*.json"))
    saved = json.loads(next(tmp_path.glob("dwe_compare-*.json")).read_text())
    assert len(saved["steady_wall_s"]) == 2 and saved["above_bound_steady"] > 0
    monkeypatch.setattr("sys.argv", ["dwe_scale", *small, "--inference", "map", "--max-step-seconds", "1e-9"])
    with pytest.raises(SystemExit, match="CHECK FAILED: median step"):
        ds.main()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["sequential", "blocked", "logdepth"])
def test_fused_block_and_recurrence_on_cuda_match_the_cpu(method):
    u, v, c_rows, cneg, pt, pp, pq, pn = _block_data(T=5, P=40, Q=30, d=6, seed=3)
    ref = _reference(u, v, c_rows, cneg, 1.1, pt, pp, pq, pn)
    gu0, gv0 = torch.autograd.grad(ref, (u, v))
    dev = torch.device("cuda")
    ug, vg = u.detach().to(dev).requires_grad_(), v.detach().to(dev).requires_grad_()
    got = skipgram_block_fused(ug, vg, c_rows.to(dev), cneg.to(dev), 1.1, pt.to(dev), pp.to(dev), pq.to(dev),
                               pn.to(dev), chunk=500)
    gu, gv = torch.autograd.grad(got, (ug, vg))
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gu.cpu(), gu0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gv.cpu(), gv0, rtol=1e-10, atol=1e-10)
    a = torch.rand(9, 4, 3, dtype=F64)
    c = torch.randn(10, 4, 3, dtype=F64)
    torch.testing.assert_close(linear_scan(a.to(dev), c.to(dev), reverse=True, method=method).cpu(),
                               linear_recurrence_loop(a, c, reverse=True))


def test_roofline_dwe_work_counts():
    import bench.roofline as rl

    T, V, d, P, Q = 10, 50, 4, 20, 30
    n = 2 * T * V * d + 2 * T * V * d + 2 * (T - 1) * V * d
    assert rl.dwe_parameter_count(T, V, d, True) == n and rl.dwe_parameter_count(T, V, d, False) == 2 * T * V * d
    w = rl.dwe_step_work(T, V, d, P, Q, True)
    assert w.flops == 6 * T * P * Q * d + 12 * T * P * Q
    assert w.bytes == 4 * (2 * T * V * d + 8 * n + 24 * T * (P + Q) * d)
    assert {"dwe_variational", "dwe_map"} <= set(rl.BUILDERS)


# ----------------------------------------------------------------------------- fused chain terms (issue 16c)
def _chain_data(T, N=4, d=3, dtype=F64, seed=0, V=None):
    g = torch.Generator().manual_seed(seed)
    n = N if V is None else V
    mu = torch.randn(T, N, d, generator=g, dtype=dtype, requires_grad=True)
    raw = (torch.randn(T, n, d, generator=g, dtype=dtype) + 1.0).requires_grad_()
    off = (0.4 * torch.randn(T - 1, n, d, generator=g, dtype=dtype)).requires_grad_()
    eps = torch.randn(T, N, d, generator=g, dtype=dtype, requires_grad=True)
    w = 0.5 + torch.rand(T - 1, generator=g, dtype=dtype) * 3
    gx = torch.randn(T, N, d, generator=g, dtype=dtype)
    return mu, raw, off, eps, w, gx


@pytest.mark.parametrize("method", ["sequential", "blocked"])
@pytest.mark.parametrize("T", [2, 3, 8, 31, 64])
def test_fused_chain_terms_equal_autograd_float64(T, method):
    """_ChainTerms (one pass per direction, or whole-tensor operations with blocked recurrences;
    analytic adjoints) against the whole-tensor formulation under autograd and against the three
    public functions: sample, terms and all four gradients."""
    from goldstone_cli.models.dwe import _chain_terms_autograd, chain_terms, expected_neg_log_prior_var, neg_entropy

    mu, raw, off, eps, w, gx = _chain_data(T, seed=T)
    x, terms = chain_terms(mu, raw, off, eps, w, 0.7, method)
    assert x.grad_fn is not None and "ChainTerms" in type(x.grad_fn).__name__  # the fused Function ran
    x0, terms0 = _chain_terms_autograd(mu, raw, off, eps, w, 0.7, "sequential")
    terms1 = expected_neg_log_prior_var(raw, off, w, 0.7) + neg_entropy(raw)
    torch.testing.assert_close(x, x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x, sample_chain(mu, raw, off, eps, "logdepth"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms, terms0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms, terms1, rtol=1e-12, atol=1e-12)
    gr = torch.autograd.grad((gx * x).sum() - 1.7 * terms, (mu, raw, off, eps))
    gr0 = torch.autograd.grad((gx * x0).sum() - 1.7 * terms0, (mu, raw, off, eps))
    for a, b in zip(gr, gr0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # only the terms, or only the sample, used
    ref = lambda: _chain_terms_autograd(mu, raw, off, eps, w, 0.7, "sequential")  # noqa: E731
    torch.testing.assert_close(torch.autograd.grad(chain_terms(mu, raw, off, eps, w, 0.7, method)[1], raw)[0],
                               torch.autograd.grad(ref()[1], raw)[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(chain_terms(mu, raw, off, eps, w, 0.7, method)[0].sum(), off)[0],
                               torch.autograd.grad(ref()[0].sum(), off)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["sequential", "blocked"])
def test_fused_chain_terms_gradcheck_rows_and_fallbacks(method):
    from goldstone_cli.models.dwe import _chain_terms_autograd, _ChainTerms, chain_terms

    for T in (5, 12):
        mu, raw, off, eps, w, _ = _chain_data(T, N=2, d=2, seed=1)
        assert torch.autograd.gradcheck(lambda *z: chain_terms(*z, w, 0.9, method), (mu, raw, off, eps))
    # rows: raw and off are whole (T, V, d) parameters, gathered inside; dense gradients
    mu, raw, off, eps, w, gx = _chain_data(10, N=3, d=2, seed=2, V=8)
    for rows in (torch.tensor([6, 1, 3]), torch.tensor([3, 1, 3])):  # a row twice: its gradients add up
        x, terms = _ChainTerms.apply(mu, raw, off, eps, w, 0.7, rows, True, method)
        x0, terms0 = _chain_terms_autograd(mu, raw[:, rows], off[:, rows], eps, w, 0.7, "sequential")
        torch.testing.assert_close(x, x0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(terms, terms0, rtol=1e-12, atol=1e-12)
        gr = torch.autograd.grad((gx * x).sum() + terms, (mu, raw, off))
        gr0 = torch.autograd.grad((gx * x0).sum() + terms0, (mu, raw, off))
        for a, b in zip(gr, gr0):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        assert gr[1].shape == raw.shape and float(gr[1][:, [0, 2, 4, 5, 7]].abs().max()) == 0.0
    rows = torch.tensor([6, 1, 3])
    # the log-depth method and fused=False take the autograd formulation; bad shapes are refused
    assert "ChainTerms" not in type(chain_terms(mu, raw[:, rows], off[:, rows], eps, w, 0.7, "logdepth")[0].grad_fn).__name__
    assert "ChainTerms" not in type(chain_terms(mu, raw[:, rows], off[:, rows], eps, w, 0.7, fused=False)[0].grad_fn).__name__
    with pytest.raises(ValueError, match="offdiag"):
        chain_terms(mu, raw[:, rows], off[:, rows][:-1], eps, w, 0.7)


def test_fused_chain_terms_float32_realistic_size_against_float64():
    """T=60 steps, 400 chains x d=25, a trained posterior's scale (std ~0.05-0.3, correlated
    neighbours), strong coupling (w = 1/(D tau) = 1000): float32 fused pass against the float64 reference."""
    from goldstone_cli.models.dwe import _chain_terms_autograd, chain_terms

    T, N, d = 60, 400, 25
    g = torch.Generator().manual_seed(7)
    mu = 0.3 * torch.randn(T, N, d, generator=g, dtype=F64)
    raw = torch.log(torch.expm1(3.0 + 17.0 * torch.rand(T, N, d, generator=g, dtype=F64)))  # b in (3, 20)
    off = -(0.6 + 0.35 * torch.rand(T - 1, N, d, generator=g, dtype=F64)) * F.softplus(raw[:-1])
    eps = torch.randn(T, N, d, generator=g, dtype=F64)
    w = torch.full((T - 1,), 1000.0, dtype=F64)
    gx = torch.randn(T, N, d, generator=g, dtype=F64) * 1e3
    leaves = [t.clone().requires_grad_() for t in (mu, raw, off)]
    x0, terms0 = _chain_terms_autograd(*leaves, eps, w, 1.0, "sequential")
    gr0 = torch.autograd.grad((gx * x0).sum() + terms0, leaves)
    for method in ("sequential", "blocked"):
        l32 = [t.float().requires_grad_() for t in (mu, raw, off)]
        x, terms = chain_terms(*l32, eps.float(), w.float(), 1.0, method)
        gr = torch.autograd.grad((gx.float() * x).sum() + terms, l32)
        assert float((x.detach().double() - x0.detach()).norm() / x0.detach().norm()) < 1e-6
        assert abs(terms.double().item() - terms0.item()) <= 1e-5 * abs(terms0.item())
        for a, b in zip(gr, gr0):
            assert float((a.double() - b).norm() / b.norm()) < 1e-4


def test_fused_chain_terms_keep_no_autograd_temporaries():
    """The fused pass saves raw, b, a, y, s, eps (and w): at most 6 (T, N, d) tensors, against the
    whole-tensor formulation's many autograd temporaries (this test fails with it)."""
    from goldstone_cli.models.dwe import chain_terms

    mu, raw, off, eps, w, _ = _chain_data(9, N=20, d=5, dtype=torch.float32)
    big = mu.numel() // 2

    def saved(fused):
        n = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: (n.append(x.numel() >= big), x)[1], lambda x: x):
            x, terms = chain_terms(mu, raw, off, eps, w, 1.0, fused=fused)
        return sum(n), x, terms

    n_fused, x, terms = saved(True)
    assert n_fused <= 6
    assert saved(False)[0] > 2 * n_fused


def test_rows_and_squares_value_and_gradient():
    from goldstone_cli.models.dwe import rows_and_squares

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, 3, generator=g, dtype=F64, requires_grad=True)
    rows = torch.tensor([8, 0, 5, 2])
    xr, sq = rows_and_squares(x, rows)
    assert sq.dtype == F64
    torch.testing.assert_close(xr, x[:, rows])
    torch.testing.assert_close(sq, (x * x).sum(), rtol=1e-14, atol=1e-14)
    gr = torch.randn(xr.shape, generator=g, dtype=F64)
    got = torch.autograd.grad((gr * xr).sum() + 0.3 * sq, x)[0]
    want = torch.autograd.grad((gr * x[:, rows]).sum() + 0.3 * (x * x).sum(), x)[0]
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(lambda x: rows_and_squares(x, rows), (x,))
    x32 = torch.randn(3, 2_000_000, 2, generator=g)  # 1.2e7 float32 squares, summed in float64
    assert abs(rows_and_squares(x32, rows)[1].item() / x32.double().square().sum().item() - 1) < 1e-8


# ----------------------------------------------------------------------------- fast logits pass (issue 16c)
def test_fast_logits_pass_equals_the_first_pass_and_falls_back():
    """The fast path (one softplus/sigmoid pass, scalings on the small operands) and the first
    issue-16 passes give the same value and gradients in float64; r = 0 and a positive with a zero
    row count take the first passes (the fast path's division would be undefined)."""
    u, v, c_rows, cneg, pt, pp, pq, pn = _block_data(T=3, P=6, Q=8, d=4, seed=5)
    ref = _reference(u, v, c_rows, cneg, 1.3, pt, pp, pq, pn)
    g0 = torch.autograd.grad(-2.5 * ref, (u, v))
    for fast in (True, False):
        got = skipgram_block_fused(u, v, c_rows, cneg, 1.3, pt, pp, pq, pn, chunk=20, fast=fast, weight=-2.5)
        torch.testing.assert_close(got, -2.5 * ref, rtol=1e-10, atol=1e-10)
        for a, b in zip(torch.autograd.grad(got, (u, v)), g0):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    zero = c_rows.clone()
    zero[pt[0], pp[0]] = 0.0  # a positive whose row count is 0: the rank-one factor vanishes there
    for r, cr in ((0.0, c_rows), (1.3, zero)):
        ref = _reference(u, v, cr, cneg, r, pt, pp, pq, pn)
        got = skipgram_block_fused(u, v, cr, cneg, r, pt, pp, pq, pn, chunk=20)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
        for a, b in zip(torch.autograd.grad(got, (u, v)), torch.autograd.grad(ref, (u, v))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fast_softplus_rows_float32_extreme_logits():
    """The eager pass's per-row softplus sums and sigmoid: float32 against float64, logits from -60 to 60
    (per-row weighted sums to 1e-5 relative, the float32 sum's rounding over 1,001 terms, and no worse
    than 2x F.softplus's own float32 result, even for rows of tiny values; sigmoid to 1e-7 absolute)."""
    from goldstone_cli.models.dwe import _softplus_rows_sigmoid_eager

    X64 = torch.linspace(-60, 60, 2 * 7 * 1001, dtype=F64).reshape(2, 7, 1001)
    nb = torch.rand(2, 1001, generator=torch.Generator().manual_seed(0), dtype=F64)
    want = (F.softplus(X64) * nb[:, None, :]).sum(-1)
    X = X64.float()
    got = _softplus_rows_sigmoid_eager(X, nb.float(), torch.empty_like(X))
    err = ((got.double() - want) / want).abs()
    plain = torch.bmm(F.softplus(X64.float()), nb.float().unsqueeze(-1)).squeeze(-1)
    assert float(err.max()) < 1e-5
    assert bool((err <= 2 * ((plain.double() - want) / want).abs() + 1e-6).all())
    assert float((X.double() - torch.sigmoid(X64)).abs().max()) < 1e-7


@pytest.mark.slow
def test_compiled_logits_pass_equals_eager():
    """trainer.compile: the torch.compile'd softplus/sigmoid pass gives the eager pass's value and
    gradients (float32, to float rounding); slow: the first compile takes ~20 s."""
    from goldstone_cli.models import dwe

    if dwe._compiled_logits_kernel() is None:
        pytest.skip("torch.compile unavailable")
    u, v, c_rows, cneg, pt, pp, pq, pn = _block_data(T=5, P=40, Q=300, d=6, seed=3, dtype=torch.float32)
    with torch.no_grad():
        u.mul_(2.0)
    outs = []
    for compiled in (False, True):
        got = skipgram_block_fused(u, v, c_rows, cneg, 1.0, pt, pp, pq, pn, chunk=5000, compiled=compiled,
                                   native=False)
        outs.append((got, *torch.autograd.grad(got, (u, v))))
    assert dwe._COMPILED.get("logits") is not None  # it compiled and ran, no fallback
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_chain_workspace_reuses_only_free_buffers():
    """The fused pass takes its (T, N, d) buffers from a pool: one is reused once its graph and
    sample are gone, never while a retained graph (or a kept sample, or a view of it) still holds it."""
    from goldstone_cli.models.dwe import chain_terms
    from goldstone_cli.numerics import WORKSPACE as _WORKSPACE

    mu, raw, off, eps, w, gx = _chain_data(7, N=30, d=4, dtype=torch.float32, seed=3)
    x, terms = chain_terms(mu, raw, off, eps, w, 1.0)
    first = torch.autograd.grad((gx * x).sum() + terms, (mu, raw, off), retain_graph=True)
    x_value = x.detach().clone()
    # a second pass while the first graph and its sample are alive: other buffers
    x2, terms2 = chain_terms(mu, 2.0 * raw, off, eps, w, 1.0)
    assert x2.data_ptr() != x.data_ptr()
    again = torch.autograd.grad((gx * x).sum() + terms, (mu, raw, off))  # the retained graph, untouched
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(x, x_value, rtol=0, atol=0)
    view, ptr = x[1:], x.data_ptr()
    del x, terms, first, again
    x3, terms3 = chain_terms(mu, raw, off, eps, w, 1.0)
    assert x3.data_ptr() != ptr  # the view still holds the first sample's buffer
    del view, x3, terms3, x2, terms2
    x4, _ = chain_terms(mu, raw, off, eps, w, 1.0)  # everything free again: x4 is made in a pooled buffer
    assert any(st.data_ptr() == x4.data_ptr() for sts in _WORKSPACE.storages.values() for st in sts)


def test_workspace_is_bounded():
    from goldstone_cli.numerics import BufferPool as _Workspace

    ws = _Workspace(per_key=2, max_keys=2)
    held = [ws.take((3, n), torch.float32, "cpu") for n in (1, 1, 1, 2, 3)]  # 3 of key 1: the third unpooled
    assert list(ws.storages) == [((3, 2), torch.float32), ((3, 3), torch.float32)]  # key (3, 1) dropped
    assert all(len(v) <= 2 for v in ws.storages.values()) and len(held) == 5


@pytest.mark.parametrize("inference", ["variational", "map"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 3.0), (1.0, 0.0), (0.0, 1.0)])
def test_loss_terms_with_mean_terms_equal_local_loss_plus_psi(inference, weights):
    """loss_terms (each mean's gather, zero-mean square sum and psi in one autograd function with one
    dense gradient pass) against the base class's local_loss() + psi(), float64, with the two outputs
    weighted differently (psi's weight 0: the zero-mean term alone; local's 0: psi alone)."""
    from goldstone_cli.models.base import DynamicModel

    model = _model(inference, V=40, T=6, d=5, batch=13)
    res = []
    for fn in (model.loss_terms, lambda g: DynamicModel.loss_terms(model, g)):
        model.zero_grad(set_to_none=True)
        t = fn(torch.Generator().manual_seed(3))
        (weights[0] * t["local"] + weights[1] * t["psi"]).backward()
        res.append(({k: v.detach() for k, v in t.items()}, [p.grad.clone() for p in model.parameters()]))
    for k in ("total", "local", "psi"):
        torch.testing.assert_close(res[0][0][k], res[1][0][k], rtol=1e-13, atol=1e-12)
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))
