"""Roofline benchmark (issue 16): every model step against what this machine can do.

    python -m bench.roofline                                  # all cases, CPU
    python -m bench.roofline --cases ml_small gauge_procrustes --repeats 7
    python -m bench.roofline --device cuda --ml20m bench/results/movielens/ml-20m-synthetic-20000263-s0

In one process it first measures the machine: the float32 GEMM rate (a square matmul of a realistic
size) and the memory bandwidth (a large copy, and a fused AdaGrad update streaming five arrays).
Then, for each case (one model step or one gauge step at a stated size), it

- counts the step's floating-point operations and compulsory memory traffic with the formulas of the
  ``*_work`` functions below (each one says what it counts),
- times the step (median of ``--repeats``, after a warm-up), interleaved with the variants it is
  compared against (e.g. the plainly written ``torch.compile``'d autograd reference with a fused
  AdaGrad, and the formulation before issue 16) so that a load change on the shared machine hits
  all of them alike,
- prints the bound ``max(flops / GEMM rate, bytes / bandwidth)``, the achieved fraction of it, the
  ratios to the other variants, and the top operators of a ``torch.profiler`` run of the step.

Cases are registered with :func:`case` (a name and a function that builds them); add a model's
cases as new functions, e.g. the DWE steps. Results are written to
``bench/results/roofline-<device>.json``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional
from unittest import mock

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
ML_SMALL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "movielens" / "ml-latest-small"
ML20M_SLICE = RESULTS / "movielens" / "ml-20m-synthetic-2000000-s0"
F32 = 4  # bytes per float32


# ============================================================================ the machine
@dataclass
class Rates:
    """What the machine did in this run: float32 GEMM flop/s and memory bandwidth in bytes/s."""

    gemm_flops: float
    copy_bandwidth: float  # bytes read + written per second by a large out-of-place copy
    adagrad_bandwidth: float  # bytes of the five arrays a fused AdaGrad step streams, per second
    gemm_n: int = 0
    stream_numel: int = 0

    @property
    def bandwidth(self) -> float:
        """The best streaming rate seen: what a bandwidth-bound step could reach."""
        return max(self.copy_bandwidth, self.adagrad_bandwidth)


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def time_calls(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` (synchronized on a GPU)."""
    sync = _sync(device)
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def measure_rates(device: torch.device, repeats: int = 5, gemm_n: Optional[int] = None,
                  stream_numel: Optional[int] = None) -> Rates:
    """GEMM rate of a float32 (n, n) @ (n, n) product (2 n^3 flop) and bandwidth of a copy
    (2 * 4 bytes per number: read and write) and of ``torch.optim.Adagrad(fused=True)`` on one
    parameter (reads parameter, gradient and sum, writes parameter and sum: 5 * 4 bytes per number).
    Buffers are allocated once and reused (no page faults in the timed calls)."""
    gpu = device.type == "cuda"
    n = gemm_n or (8192 if gpu else 2048)
    m = stream_numel or ((1 << 28) if gpu else (1 << 25))  # 1 GiB / 128 MiB per float32 array
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    torch.mm(a, b, out=c)
    gemm = statistics.median(time_calls(lambda: torch.mm(a, b, out=c), repeats, device))
    del a, b, c
    src = torch.randn(m, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy = statistics.median(time_calls(lambda: dst.copy_(src), repeats, device))
    del dst
    p = torch.nn.Parameter(src)
    p.grad = torch.randn_like(src)
    opt = torch.optim.Adagrad([p], lr=1e-3, fused=True)
    opt.step()
    ada = statistics.median(time_calls(opt.step, repeats, device))
    del p, opt, src
    gc.collect()
    return Rates(gemm_flops=2.0 * n ** 3 / gemm, copy_bandwidth=2 * F32 * m / copy,
                 adagrad_bandwidth=5 * F32 * m / ada, gemm_n=n, stream_numel=m)


# ============================================================================ work counts
@dataclass
class Work:
    """Floating-point operations and bytes of memory traffic of one step."""

    flops: float
    bytes: float
    note: str = ""

    def bound_s(self, rates: Rates) -> float:
        return max(self.flops / rates.gemm_flops, self.bytes / rates.bandwidth)

    def limit(self, rates: Rates) -> str:
        return "flops" if self.flops / rates.gemm_flops >= self.bytes / rates.bandwidth else "bandwidth"


def adagrad_work(P: int) -> Work:
    """One AdaGrad update of P float32 parameters: ``sum += g^2; p -= lr g / (sqrt(sum) + eps)``.

    flops: 6 per parameter (square, add, sqrt, add, divide, multiply-add). Bytes: parameter, gradient
    and sum read, parameter and sum written: 5 * 4 bytes per parameter."""
    return Work(6.0 * P, 5.0 * F32 * P, "AdaGrad")


def movielens_step_work(T: int, n_rows: int, d: int, n_ratings: int, n_bands: int = 1) -> Work:
    """One full-batch training step of the sparse dynamic Bernoulli MF (Eqs. 6, 8, 9) + AdaGrad.

    ``P = T * n_rows * d`` parameters (``n_rows`` = users + items), ``n_ratings`` training ratings,
    ``n_bands`` distinct time offsets of the coupling (a chain: 1).

    flops per rating: the logit (2d), the two scaled rows of the gradient (2d) and their scatter-add
    (2d), plus ~10 for softplus / sigmoid: ``6d + 10``. Per parameter: the gamma term's value and
    gradient (4), psi's value (3 per band) and gradient ``L @ Z`` (3 per band), AdaGrad (6).

    Bytes (compulsory traffic of a step that keeps the gradient in memory between backward and the
    optimizer, as every ``torch.optim`` step does): the loss pass reads Z once (4P) and writes the
    gradient once (4P); per rating the two indices (8 bytes each) and x (4), the two gathered rows
    (2 * 4d) and the read-modify-write of the two gradient rows it scatters into (2 * 2 * 4d); AdaGrad
    (20P). Total ``28P + n (20 + 24d)`` bytes."""
    P = T * n_rows * d
    flops = n_ratings * (6 * d + 10) + P * (4 + 6 * n_bands) + adagrad_work(P).flops
    by = 2 * F32 * P + n_ratings * (20 + 24 * d) + adagrad_work(P).bytes
    return Work(float(flops), float(by), f"P={P:,} parameters, {n_ratings:,} ratings")


def dense_mf_step_work(T: int, n_rows: int, n_cols: int, d: int) -> Work:
    """One full-batch step of the dense dynamic Gaussian MF (Eqs. 4-7) + plain gradient descent.

    flops: the product ``U_t V_t^T`` (2 T n m d), the residual and its squared sum (3 T n m), the
    two gradient products ``R V`` and ``R^T U`` (4 T n m d), psi's value and gradient (6 P) and the
    GD update (2 P), ``P = T (n + m) d``. Bytes: X read (4 T n m), the residual written and read
    twice (12 T n m; it does not fit in cache at useful sizes), Z read, gradient written (8P), GD's
    read of parameter and gradient and write of the parameter (12P): ``16 T n m + 20 P`` bytes."""
    P = T * (n_rows + n_cols) * d
    nm = T * n_rows * n_cols
    flops = 6 * nm * d + 3 * nm + 8 * P
    by = 4 * (4 * nm + 5 * P)
    return Work(float(flops), float(by), f"P={P:,} parameters, X {T}x{n_rows}x{n_cols}")


def gauge_step_work(T: int, n_rows: int, d: int, n_edges: int, solver: str, k2: int = 10) -> Work:
    """One gauge step on a symmetric group of ``n_rows`` rows (all tensors of the group together).

    flops: the pair moments ``Z_t^T Z_t'`` of every edge (2 E n d^2), for ``procrustes`` the self
    moments (2 T n d^2), the rotation ``Z_t R_t^T`` (2 T n d^2), psi once (3P) and the d x d work
    (~30 E d^3 for SVDs / matrix exponentials, times k2 natural steps of ~10 d^3 per edge).
    Bytes: the moments and psi read Z (4P bytes, one pass when fused), the rotation reads and writes
    it (8P): ``12 P`` bytes."""
    P = T * n_rows * d
    flops = 2 * n_edges * n_rows * d * d + 2 * T * n_rows * d * d + 3 * P
    if solver == "procrustes":
        flops += 2 * T * n_rows * d * d + 30 * n_edges * d ** 3
    else:
        flops += k2 * 10 * n_edges * d ** 3 + 30 * T * d ** 3
    return Work(float(flops), float(3 * F32 * P), f"{solver}, P={P:,}")


# ============================================================================ cases
@dataclass
class Case:
    """One step to measure: ``variants`` maps a name to a zero-argument callable doing one step; the
    first variant is the project's step (profiled), the others are what it is compared against."""

    name: str
    work: Work
    variants: dict[str, Callable[[], object]]
    info: dict = field(default_factory=dict)
    warmup: int = 2


BUILDERS: dict[str, Callable[[argparse.Namespace, torch.device], Case]] = {}


def case(name: str):
    """Register ``fn(args, device) -> Case`` under ``name`` (``--cases name``)."""

    def deco(fn):
        BUILDERS[name] = fn
        return fn

    return deco


def _adagrad_cfg():
    from goldstone_cli.config import compose

    return compose(["model=movielens", "optimizer=adagrad"]).optimizer


def naive_movielens_loss(U, V, ru, rv, x, gamma: float, lam: float):
    """The plainly written MovieLens loss (Eqs. 6, 8, 9) for autograd: the reference of issue 16."""
    d = U.shape[-1]
    logit = (U.reshape(-1, d)[ru] * V.reshape(-1, d)[rv]).sum(-1)
    nll = F.softplus(-x * logit).sum()
    reg = 0.5 * gamma * (U.square().sum() + V.square().sum())
    psi = 0.5 * lam * ((U[1:] - U[:-1]).square().sum() + (V[1:] - V[:-1]).square().sum())
    return nll + reg + psi


def without_native(fn):
    """``fn`` run with ``GOLDSTONE_NATIVE=0``: the PyTorch versions of the native C loops
    (goldstone_cli/kernels), as on a machine without a C compiler."""
    def run():
        before = os.environ.get("GOLDSTONE_NATIVE")
        os.environ["GOLDSTONE_NATIVE"] = "0"
        try:
            return fn()
        finally:
            if before is None:
                del os.environ["GOLDSTONE_NATIVE"]
            else:
                os.environ["GOLDSTONE_NATIVE"] = before
    return run


def movielens_case(name: str, path: Path, args, device: torch.device, T: int = 100, d: int = 30) -> Case:
    """Full-batch step of ``model=movielens optimizer=adagrad`` at the paper's T, d on ``path``,
    against the compiled naive reference (autograd through :func:`naive_movielens_loss`, fused
    AdaGrad), the pre-issue-16 formulation (the base class's ``local_loss() + psi()`` with a for-loop
    AdaGrad) and ``trainer.compile=true``; on a GPU also ``goldstone_elementwise`` (``gamma Z + L Z``
    by the elementwise passes instead of the banded product, ``coupling.LAPLACIAN_METHOD``) and
    ``goldstone_scatter`` (the ratings' gradient scatter-added rating by rating instead of by row
    sums, ``movielens.RATINGS_GRADIENT``). All update the same parameters and AdaGrad state."""
    from goldstone_cli.data.movielens import load_movielens
    from goldstone_cli.models.base import DynamicModel
    from goldstone_cli.models.movielens import SparseDynamicBernoulliMF
    from goldstone_cli.optim.factory import build_optimizer

    data = load_movielens(str(path), T=T, seed=0, cache_dir=str(RESULTS / "movielens" / "cache"), progress=False)
    model = SparseDynamicBernoulliMF(data, d=d, coupling=10.0, gamma=1.0, device=device, dtype=torch.float32)
    opt, _ = build_optimizer(_adagrad_cfg(), model)
    ru, rv, x = model._splits["train"]

    def step():
        opt.zero_grad(set_to_none=True)
        terms = model.loss_terms()
        terms["total"].item()
        terms["total"].backward()
        opt.step()

    # every variant updates the same parameters with the same AdaGrad state (memory: one copy each)
    old_opt = torch.optim.Adagrad(model.parameters(), lr=1.0, foreach=False, fused=False)
    old_opt.state = opt.state

    def step_before():
        old_opt.zero_grad(set_to_none=True)
        terms = DynamicModel.loss_terms(model)
        terms["total"].item()
        terms["total"].backward()
        old_opt.step()

    def step_compiled():  # trainer.compile=true where the native loops are not built
        model.set_compile(True)
        try:
            without_native(step)()
        finally:
            model.set_compile(False)

    def step_elementwise():  # gamma Z + L Z by the elementwise passes (the GPU's method before the banded product)
        from goldstone_cli.optim import coupling

        with mock.patch.dict(coupling.LAPLACIAN_METHOD, {device.type: "elementwise"}):
            without_native(step)()

    def step_scatter():  # the eager ratings pass's gradient rating by rating (before the row sums)
        from goldstone_cli.models import movielens

        with mock.patch.dict(movielens.RATINGS_GRADIENT, {device.type: "scatter"}):
            without_native(step)()

    variants = {"goldstone": step, "goldstone_torch": without_native(step), "before_issue16": step_before}
    if device.type != "cpu":  # on the CPU the native loop (and its PyTorch twin) use no banded product
        variants["goldstone_elementwise"] = step_elementwise
        variants["goldstone_scatter"] = step_scatter
    if not args.no_compile:
        variants["goldstone_compiled"] = step_compiled
        U, V = model.U, model.V
        ref_opt = torch.optim.Adagrad([U, V], lr=1.0, fused=True)
        ref_opt.state = opt.state
        loss_fn = torch.compile(naive_movielens_loss)

        def step_reference():
            ref_opt.zero_grad(set_to_none=True)
            loss = loss_fn(U, V, ru, rv, x, model.gamma, 10.0)
            loss.item()
            loss.backward()
            ref_opt.step()

        variants["compiled_naive"] = step_reference
    work = movielens_step_work(T, model.n_users + model.n_items, d, model.n_train)
    return Case(name, work, variants, {"data": str(path), "n_users": model.n_users, "n_items": model.n_items,
                                       "T": T, "d": d, "train_ratings": model.n_train})


@case("ml_small")
def _ml_small(args, device):
    return movielens_case("ml_small", Path(args.ml_small), args, device)


@case("ml20m")
def _ml20m(args, device):
    return movielens_case("ml20m", Path(args.ml20m), args, device)


def gauge_case(name: str, solver: str, args, device: torch.device) -> Case:
    """One gauge step of ``model=movielens optimizer=goldstone`` (``solver``) on ml-latest-small at
    T=100, d=30, after one AdaGrad step (so psi is not at the i.i.d. start)."""
    from goldstone_cli.config import compose
    from goldstone_cli.data.movielens import load_movielens
    from goldstone_cli.models.movielens import SparseDynamicBernoulliMF
    from goldstone_cli.optim.factory import build_optimizer

    data = load_movielens(str(args.ml_small), T=100, seed=0, cache_dir=str(RESULTS / "movielens" / "cache"),
                          progress=False)
    model = SparseDynamicBernoulliMF(data, d=30, coupling=10.0, gamma=1.0, device=device, dtype=torch.float32)
    cfg = compose(["model=movielens", "optimizer=goldstone", f"optimizer.solver={solver}",
                   "optimizer.keep_gauge_fields=false"]).optimizer
    opt, _ = build_optimizer(cfg, model)
    opt.zero_grad()
    model.loss_terms()["total"].backward()
    opt.base.step()
    n = model.n_users + model.n_items
    work = gauge_step_work(100, n, 30, model.coupling.num_edges, solver, int(cfg.k2))
    return Case(name, work, {"goldstone": opt.gauge_step, "goldstone_torch": without_native(opt.gauge_step)},
                {"solver": solver, "rows": n, "T": 100, "d": 30})


@case("gauge_procrustes")
def _gauge_procrustes(args, device):
    return gauge_case("gauge_procrustes", "procrustes", args, device)


@case("gauge_natural")
def _gauge_natural(args, device):
    return gauge_case("gauge_natural", "natural", args, device)


@case("dense_mf")
def _dense_mf(args, device):
    """Dense MF (Eqs. 4-7) with plain GD at a size where the step is not launch-bound: T=30,
    1000 x 1000, d=30, float32 (the paper's Sec. 5.1 problem is 10 x 10, d=3: microseconds)."""
    from goldstone_cli.data.synthetic import make_synthetic
    from goldstone_cli.models.dense_mf import DenseDynamicMF

    T, n, m, d = 30, 1000, 1000, 30
    data = make_synthetic(n_rows=n, n_cols=m, rank=d, T=T)
    model = DenseDynamicMF(data, d=d, coupling=10.0, dtype=torch.float32, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        terms = model.loss_terms()
        terms["total"].item()
        terms["total"].backward()
        opt.step()

    return Case("dense_mf", dense_mf_step_work(T, n, m, d), {"goldstone": step}, {"T": T, "rows": n, "cols": m, "d": d})


# ============================================================================ DWE (issue 16b)
def dwe_parameter_count(T: int, V: int, d: int, variational: bool) -> int:
    """Numbers in the DWE parameters: MAP U, V (2 T V d); variational also the softplus diagonals
    (2 T V d) and the off-diagonals (2 (T-1) V d) of both posteriors."""
    return 2 * T * V * d + ((2 * T * V * d + 2 * (T - 1) * V * d) if variational else 0)


def dwe_step_work(T: int, V: int, d: int, P: int, Q: int, variational: bool) -> Work:
    """One minibatch step of DWE (``models/dwe.py``: rows x contexts = P x Q at all T steps) + Adam.

    flops: the logits ``u v^T`` and the two gradient products ``G v``, ``G^T u`` (6 T P Q d), and
    ~12 per logit for softplus, sigmoid, the two scalings and the negative-count contraction.
    Bytes (compulsory: the logits of a chunk stay in cache): the means read once for psi and the
    zero-mean term (4 bytes each), the dense gradient of every parameter written (4), Adam (reads
    parameter, gradient, two moments; writes parameter, two moments: 28); the minibatch's (T, P+Q, d)
    tensors: gathers, samples, the recurrences and their adjoints, about 24 passes variational and 6
    MAP (4 bytes each)."""
    n = dwe_parameter_count(T, V, d, variational)
    n_means = 2 * T * V * d
    flops = 6.0 * T * P * Q * d + 12.0 * T * P * Q
    mb = T * (P + Q) * d * (24 if variational else 6)
    by = F32 * (n_means + 8 * n + mb)
    kind = "variational" if variational else "MAP"
    return Work(float(flops), float(by), f"DWE {kind}, V={V:,}, T={T}, d={d}, {P} x {Q} minibatch, {n:,} parameters")


def dwe_case(name: str, variational: bool, args, device: torch.device) -> Case:
    """One Adam step of ``model=dwe`` (``--dwe-size V,T,d,B``; default the issue's V=2,000, T=100,
    d=100, 1,000 x 1,000 minibatch) on generated counts (``bench/dwe_scale.py``), against the
    formulation before issue 16 (log-depth Hillis-Steele scans, the (T, P, Q) logits materialized
    for autograd) and issue 16's first version (prior under autograd, eager logits passes) on the same
    model, optimizer and minibatch stream."""
    from bench.dwe_scale import generated_counts, set_paths
    from goldstone_cli.config import compose
    from goldstone_cli.models.dwe import DynamicWordEmbeddings
    from goldstone_cli.optim.factory import build_base

    V, T, d, B = (int(x) for x in args.dwe_size.split(","))
    wc = generated_counts(V, T, 20)
    model = DynamicWordEmbeddings(wc, d=d, inference="variational" if variational else "map", batch_words=B,
                                  batch_contexts=B, test_steps=0.1, test_mass=0.0, dtype=torch.float32, device=device)
    del wc
    opt = build_base("adam", model.parameters(), compose(["model=dwe", "optimizer=adam"]).optimizer)
    g = torch.Generator(device=device).manual_seed(0)

    def make(paths: str):
        def step():
            set_paths(model, paths)
            opt.zero_grad(set_to_none=True)
            loss = model.loss_terms(g)["total"]
            loss.item()
            loss.backward()
            opt.step()
        return step

    # issue 16's paths (bench/dwe_scale.py: PATHS): now, its first version, and before it
    variants = {"goldstone": make("issue16"), "issue16_first": make("issue16_first"),
                "before_issue16": make("before_issue16")}
    work = dwe_step_work(T, V, d, model.batch_words, model.batch_contexts, variational)
    return Case(name, work, variants, {"V": V, "T": T, "d": d, "batch": B, "train_nnz": int(model.val.numel()),
                                       "parameters": dwe_parameter_count(T, V, d, variational)}, warmup=1)


@case("dwe_variational")
def _dwe_variational(args, device):
    return dwe_case("dwe_variational", True, args, device)


@case("dwe_map")
def _dwe_map(args, device):
    return dwe_case("dwe_map", False, args, device)


# ============================================================================ running
def profile_top(fn: Callable[[], object], device: torch.device, k: int = 6) -> list[dict]:
    """The ``k`` operators with the most self time in one call of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [{"op": e.key, "share": getattr(e, key) / total, "ms": getattr(e, key) / 1e3, "calls": e.count}
            for e in events[:k]]


def run_case(c: Case, rates: Rates, repeats: int, device: torch.device, profile: bool = True) -> dict:
    """Warm up every variant, then time them interleaved (one call of each per round). A comparison
    variant that fails (e.g. torch.compile without a working compiler) is dropped and reported."""
    failed = {}
    for k, fn in list(c.variants.items()):
        try:
            for _ in range(c.warmup):
                fn()
        except Exception as exc:
            if k == next(iter(c.variants)):
                raise
            failed[k] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"   variant {k} failed and is left out: {failed[k]}")
            del c.variants[k]
    times: dict[str, list[float]] = {k: [] for k in c.variants}
    for _ in range(repeats):
        for k, fn in c.variants.items():
            times[k] += time_calls(fn, 1, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    bound = c.work.bound_s(rates)
    main = next(iter(c.variants))
    res = {
        "case": c.name, **c.info, "flops": c.work.flops, "bytes": c.work.bytes, "limit": c.work.limit(rates),
        "bound_s": bound, "median_s": med, "times_s": times,
        "fraction_of_bound": bound / med[main],
        "ratio_to": {k: med[main] / v for k, v in med.items() if k != main},
        "note": c.work.note, "failed_variants": failed,
    }
    if profile:
        res["top_ops"] = profile_top(c.variants[main], device)
    return res


def machine(device: torch.device) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor() or "?") if os.path.exists("/proc/cpuinfo") else platform.processor()
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{gpu}"


def print_case(r: dict) -> None:
    main = next(iter(r["median_s"]))
    print(f"\n== {r['case']}: {r['note']}")
    print(f"   {r['flops'] / 1e9:.3f} GFLOP, {r['bytes'] / 1e9:.3f} GB -> bound {1e3 * r['bound_s']:.2f} ms ({r['limit']})")
    for k, v in r["median_s"].items():
        extra = f"  ({main} / {k} = {r['ratio_to'][k]:.2f})" if k in r["ratio_to"] else ""
        print(f"   {k:>16}: {1e3 * v:9.2f} ms median{extra}")
    print(f"   achieved {100 * r['fraction_of_bound']:.1f}% of the bound ({1 / r['fraction_of_bound']:.2f}x above it)")
    for op in r.get("top_ops", []):
        print(f"      {100 * op['share']:5.1f}%  {op['ms']:8.2f} ms  {op['calls']:5d}x  {op['op']}")


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", default=None, help=f"cases to run (default all: {', '.join(BUILDERS)})")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    p.add_argument("--ml-small", default=str(ML_SMALL), help="ml-latest-small folder")
    p.add_argument("--ml20m", default=str(ML20M_SLICE),
                   help="ML-20M-shaped folder from bench.movielens_load (default: its 2,000,000-row slice)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd naive reference")
    p.add_argument("--dwe-size", default="2000,100,100,1000",
                   help="V,T,d,B of the DWE cases (B words x B contexts per minibatch; paper: 10000,209,100,1000)")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler top operators")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    names = args.cases or list(BUILDERS)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; valid: {', '.join(BUILDERS)}")
    rates = measure_rates(device)
    print(f"machine: {machine(device)}, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print(f"GEMM float32 {rates.gemm_flops / 1e9:.1f} GFLOP/s (n={rates.gemm_n}); bandwidth: copy "
          f"{rates.copy_bandwidth / 1e9:.1f} GB/s, fused AdaGrad {rates.adagrad_bandwidth / 1e9:.1f} GB/s")
    results = []
    for n in names:
        if n in ("ml_small", "gauge_procrustes", "gauge_natural") and not Path(args.ml_small).exists():
            print(f"\n== {n}: skipped, {args.ml_small} not found (--ml-small)")
            continue
        if n == "ml20m" and not Path(args.ml20m).exists():
            print(f"\n== {n}: skipped, {args.ml20m} not found (make it with python -m bench.movielens_load --rows N)")
            continue
        c = BUILDERS[n](args, device)
        r = run_case(c, rates, args.repeats, device, profile=not args.no_profile)
        print_case(r)
        results.append(r)
        del c
        gc.collect()
    rates_after = measure_rates(device)
    print(f"\nafter: GEMM {rates_after.gemm_flops / 1e9:.1f} GFLOP/s; copy {rates_after.copy_bandwidth / 1e9:.1f} GB/s, "
          f"AdaGrad {rates_after.adagrad_bandwidth / 1e9:.1f} GB/s")
    out = {"machine": machine(device), "torch": torch.__version__, "device": str(device),
           "rates_before": rates.__dict__, "rates_after": rates_after.__dict__,
           "load_average": os.getloadavg(), "cases": results,
           "command": "python -m bench.roofline " + " ".join(argv if argv is not None else __import__("sys").argv[1:])}
    from goldstone_cli.io import atomic_write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"roofline-{device.type}{('_' + args.tag) if args.tag else ''}.json"
    atomic_write_json(path, out)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
