"""Issue 16: the native C loops (goldstone_cli/kernels) against their PyTorch twins and float64
references, at the paper's MovieLens size and on the edge cases; the build's fallbacks and its
crash safety (a build killed by SIGKILL leaves nothing a later run would load)."""

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from goldstone_cli.kernels import native
from goldstone_cli.models.movielens import ratings_pass
from goldstone_cli.optim.coupling import Coupling, quadratic_terms_

has_cc = shutil.which(os.environ.get("CC", "cc")) is not None
needs_cc = pytest.mark.skipif(not has_cc, reason="no C compiler on this machine (the PyTorch twins run)")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache and no library loaded yet in this process."""
    monkeypatch.setenv("GOLDSTONE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_state", {})
    return tmp_path / "cache" / "kernels"


class _Recorder:
    """The loaded library, recording which of its functions are called (a test that compares the C
    loop with the PyTorch twin must not pass because both calls ran the twin)."""

    def __init__(self, lib):
        self._lib, self.used = lib, set()

    def __getattr__(self, name):
        if name.startswith("gs_"):
            self.used.add(name)
        return getattr(self._lib, name)


@pytest.fixture
def used(monkeypatch):
    """The names of the native functions a test called (the library is built first)."""
    lib = native.library()
    if lib is None:
        pytest.skip("the native loops are not built here")
    rec = _Recorder(lib)
    monkeypatch.setitem(native._state, "lib", rec)
    return rec.used


@needs_cc
def test_the_library_builds_where_a_compiler_exists(fresh):
    lib = native.library()
    assert lib is not None
    built = list(fresh.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary left
    assert native.library() is lib  # built and loaded once per process


def _chain_reference(Z: torch.Tensor, w: np.ndarray, gamma: float):
    """gamma Z + L Z, sum ||Z||^2 and psi of a chain by brute force in float64."""
    Z = Z.double()
    out = gamma * Z
    psi = 0.0
    for t in range(Z.shape[0] - 1):  # reference only: a loop over the edges
        diff = Z[t + 1] - Z[t]
        psi += 0.5 * w[t] * float((diff * diff).sum())
        out[t] -= w[t] * diff
        out[t + 1] += w[t] * diff
    return out, float((Z * Z).sum()), psi


@needs_cc
@pytest.mark.parametrize("shape", [(1, 5, 3), (2, 4, 3), (7, 3, 2), (13, 700, 30)])
def test_native_chain_pass_matches_brute_force_and_the_pytorch_pass(shape, used):
    g = torch.Generator().manual_seed(1)
    Z = torch.randn(*shape, generator=g)
    w = np.linspace(0.5, 3.0, max(shape[0] - 1, 0))
    coupling = Coupling.chain(shape[0], w)
    out = torch.full_like(Z, float("nan"))
    sq, psi = quadratic_terms_(Z, coupling, 0.7, out)
    want_out, want_sq, want_psi = _chain_reference(Z, w, 0.7)
    assert abs(float(sq) - want_sq) <= 1e-12 * want_sq
    assert abs(float(psi) - want_psi) <= 1e-6 * max(want_psi, 1e-30)
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=1e-6 * float(want_out.abs().max()))
    eager_out = torch.empty_like(Z)
    e_sq, e_psi = quadratic_terms_(Z, coupling, 0.7, eager_out, native=False)
    torch.testing.assert_close(out, eager_out, rtol=0, atol=1e-6 * float(eager_out.abs().max()))
    v_sq, v_psi = quadratic_terms_(Z, coupling, 0.7)  # values only
    assert float(v_sq) == float(sq) and float(v_psi) == float(psi)
    assert float(quadratic_terms_(Z, coupling, 0.7, sum_squares=False)[0]) == 0.0
    assert used == {"gs_chain_quadratic_f32"}


@needs_cc
def test_native_chain_pass_at_the_papers_size_against_float64():
    """ml-latest-small's V at T=100, d=30 (29M numbers): float32 native vs the float64 pass."""
    g = torch.Generator().manual_seed(0)
    Z = 0.1 * torch.randn(100, 9742, 30, generator=g)
    coupling = Coupling.chain(100, 10.0)
    out = torch.empty_like(Z)
    sq, psi = quadratic_terms_(Z, coupling, 1.0, out)
    Zd = Z.double()
    want = torch.empty_like(Zd)
    w_sq, w_psi = quadratic_terms_(Zd, coupling, 1.0, want)  # float64: the PyTorch pass
    del Zd
    assert abs(float(sq) / float(w_sq) - 1) < 1e-12
    assert abs(float(psi) / float(w_psi) - 1) < 1e-7
    assert float((out.double() - want).abs().max()) < 1e-6 * float(want.abs().max())


@needs_cc
def test_columns_split_over_threads_give_the_one_thread_result():
    g = torch.Generator().manual_seed(2)
    Z = torch.randn(9, 5000, 30, generator=g)  # 150,000 columns: split over 2 threads
    coupling = Coupling.chain(9, 2.0)
    before = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = torch.empty_like(Z)
            results[n] = (quadratic_terms_(Z, coupling, 0.5, out), out)
    finally:
        torch.set_num_threads(before)
    (sq1, psi1), out1 = results[1]
    (sq2, psi2), out2 = results[2]
    assert torch.equal(out1, out2)  # each column is computed alike
    assert abs(float(sq1) / float(sq2) - 1) < 1e-14 and abs(float(psi1) / float(psi2) - 1) < 1e-14
    calls = []
    parts = native.parallel_columns(lambda a, b: calls.append((a, b)) or (a, b), 10, min_cols=1)
    assert sorted(calls) == parts and parts[0][0] == 0 and parts[-1][1] == 10
    assert all(parts[i][1] == parts[i + 1][0] for i in range(len(parts) - 1))


def _ratings_problem(n_rows_u=50, n_rows_v=40, d=30, n=20000, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(n_rows_u, d, generator=g, dtype=dtype)
    V = torch.randn(n_rows_v, d, generator=g, dtype=dtype)
    ru = torch.sort(torch.randint(n_rows_u, (n,), generator=g)).values  # many ratings per row
    rv = torch.randint(n_rows_v, (n,), generator=g)
    x = (torch.randint(2, (n,), generator=g) * 2 - 1).to(dtype)
    return U, V, ru, rv, x


@needs_cc
def test_native_ratings_pass_matches_autograd_in_float64_and_the_pytorch_loop(used):
    U, V, ru, rv, x = _ratings_problem()
    scale = 1.7
    gU, gV = torch.zeros_like(U), torch.zeros_like(V)
    nll = ratings_pass(U, V, ru, rv, x, scale, gU, gV)
    # reference: autograd in float64 of scale * sum softplus(-x u.v)
    Ud, Vd = U.double().requires_grad_(), V.double().requires_grad_()
    ref = torch.nn.functional.softplus(-x.double() * (Ud[ru] * Vd[rv]).sum(1)).sum()
    (scale * ref).backward()
    assert abs(float(nll) / float(ref.detach()) - 1) < 1e-6
    torch.testing.assert_close(gU.double(), Ud.grad, rtol=0, atol=1e-4 * float(Ud.grad.abs().max()))
    torch.testing.assert_close(gV.double(), Vd.grad, rtol=0, atol=1e-4 * float(Vd.grad.abs().max()))
    eU, eV = torch.zeros_like(U), torch.zeros_like(V)
    e_nll = ratings_pass(U, V, ru, rv, x, scale, eU, eV, chunk=777, native=False)
    assert abs(float(nll) / float(e_nll) - 1) < 1e-6
    torch.testing.assert_close(gU, eU, rtol=1e-4, atol=1e-4 * float(eU.abs().max()))
    torch.testing.assert_close(gV, eV, rtol=1e-4, atol=1e-4 * float(eV.abs().max()))
    assert float(ratings_pass(U, V, ru, rv, x, scale, None, None)) == float(nll)  # values only
    # large logits: softplus(y) = y above 20, as torch computes it
    big = ratings_pass(U * 10, V * 10, ru, rv, x, 1.0, None, None)
    assert abs(float(big) / float(ratings_pass(U * 10, V * 10, ru, rv, x, 1.0, None, None, native=False)) - 1) < 1e-6
    assert float(ratings_pass(U, V, ru[:0], rv[:0], x[:0], 1.0, None, None)) == 0.0
    assert used == {"gs_bernoulli_ratings_f32"}


@needs_cc
def test_native_ratings_pass_refuses_bad_rows_and_shapes():
    U, V, ru, rv, x = _ratings_problem(n=100)
    bad = rv.clone()
    bad[37] = V.shape[0]
    with pytest.raises(IndexError, match="rating 37 .* out of range"):
        ratings_pass(U, V, ru, bad, x, 1.0, None, None)
    bad = ru.clone()
    bad[5] = -1
    with pytest.raises(IndexError, match="rating 5"):
        ratings_pass(U, V, bad, rv, x, 1.0, torch.zeros_like(U), torch.zeros_like(V))
    with pytest.raises(ValueError, match="one length"):
        ratings_pass(U, V, ru, rv[:-1], x, 1.0, None, None)
    with pytest.raises(ValueError, match="both"):
        ratings_pass(U, V, ru, rv, x, 1.0, torch.zeros_like(U), None)


@pytest.mark.parametrize("native_on", [True, False])
def test_ratings_pass_refuses_gradient_buffers_that_share_memory(native_on):
    """gU and gV are added into while U, V (and the ratings) are read: the same tensor as gU and gV,
    two overlapping views of one buffer, or an input as a gradient buffer is a ValueError before
    anything is written (these were accepted and silently wrong); disjoint views of one buffer are
    fine and give the separate buffers' numbers."""
    U, V, ru, rv, x = _ratings_problem(n_rows_u=40, n_rows_v=40, n=500)
    Ub = torch.cat([U, torch.zeros(10, U.shape[1])])
    U = Ub[:40]  # Ub[10:]: a buffer overlapping U in part
    gU, gV = torch.zeros_like(U), torch.zeros_like(V)
    want = ratings_pass(U, V, ru, rv, x, 1.3, gU, gV, native=native_on)
    buf = torch.zeros(2 * U.numel())
    apart = (buf[:U.numel()].view_as(U), buf[U.numel():].view_as(V))  # one storage, disjoint ranges
    assert float(ratings_pass(U, V, ru, rv, x, 1.3, *apart, native=native_on)) == float(want)
    assert torch.equal(apart[0], gU) and torch.equal(apart[1], gV)
    g = torch.zeros_like(U)
    half = U.numel() // 2
    overlapping = (buf[:U.numel()].view_as(U), buf[half:half + V.numel()].view_as(V))
    for bad, match in (((g, g), "gU and gV must not share memory"), (overlapping, "gU and gV must not share memory"),
                       ((U, g), "gU must not share memory with U"), ((Ub[10:], g), "gU .* with U"),
                       ((g, U), "gV must not share memory with U"), ((g, V), "gV must not share memory with V")):
        before = [t.clone() for t in bad]
        with pytest.raises(ValueError, match=match):
            ratings_pass(U, V, ru, rv, x, 1.3, *bad, native=native_on)
        assert all(torch.equal(t, b) for t, b in zip(bad, before))  # nothing was added


def test_switched_off_or_without_a_compiler_the_pytorch_versions_run(fresh, monkeypatch):
    Z = torch.randn(6, 4, 3)
    coupling = Coupling.chain(6, 1.5)
    want = quadratic_terms_(Z, coupling, 0.2, None, native=False)
    monkeypatch.setenv("GOLDSTONE_NATIVE", "0")
    assert native.library() is None  # no warning: the user asked for it
    monkeypatch.setenv("GOLDSTONE_NATIVE", "1")
    monkeypatch.setenv("CC", "no-such-compiler-goldstone")
    with pytest.warns(UserWarning, match="no C compiler .*no-such-compiler-goldstone.*GOLDSTONE_NATIVE=0"):
        got = quadratic_terms_(Z, coupling, 0.2, None)
    assert [float(v) for v in got] == [float(v) for v in want]
    assert native.library() is None  # decided once per process
    assert not fresh.exists() or not list(fresh.iterdir())


def test_a_failing_build_warns_and_leaves_nothing(fresh, monkeypatch, tmp_path):
    cc = tmp_path / "badcc"
    cc.write_text("#!/bin/sh\necho 'badcc 1.0'\n[ \"$1\" = --version ] && exit 0\necho 'error: broken' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    with pytest.warns(UserWarning, match="building them failed: .*exited with 1: error: broken"):
        assert native.library() is None
    assert not list(fresh.iterdir())  # no half-written library, no temporary


@needs_cc
def test_a_build_killed_by_sigkill_leaves_nothing_a_later_run_loads(fresh, tmp_path):
    """A real SIGKILL while the compiler writes its output: the partial file keeps its temporary
    name (never the library's), and the next run removes it and builds a working library."""
    real = shutil.which(os.environ.get("CC", "cc"))
    slow = tmp_path / "slowcc"
    slow.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        [ "$1" = --version ] && exec {real} --version
        out=""; prev=""
        for a in "$@"; do [ "$prev" = -o ] && out="$a"; prev="$a"; done
        [ -z "$SLOW_CC" ] && exec {real} "$@"
        printf 'partial' > "$out"
        sleep 60
        """))
    slow.chmod(0o755)
    env = dict(os.environ, CC=str(slow), GOLDSTONE_CACHE=str(fresh.parent), SLOW_CC="1")
    proc = subprocess.Popen([sys.executable, "-c", "from goldstone_cli.kernels import native; native.library()"],
                            env=env, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (fresh.is_dir() and any(p.name.endswith(".tmp") for p in fresh.iterdir())):
            time.sleep(0.05)
        assert fresh.is_dir() and [p for p in fresh.iterdir() if p.name.endswith(".tmp")], "the build never started"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    left = list(fresh.iterdir())
    assert left and all(p.name.endswith(".tmp") for p in left)  # nothing under the library's name
    # the next run (same compiler, now fast): removes the dead writer's temporary file, builds and loads
    env.pop("SLOW_CC")
    code = ("from goldstone_cli.kernels import native; import torch; "
            "from goldstone_cli.optim.coupling import Coupling, quadratic_terms_; "
            "assert native.library() is not None; "
            "Z = torch.randn(4, 3, 2); c = Coupling.chain(4, 1.0); "
            "a = quadratic_terms_(Z, c, 0.5); b = quadratic_terms_(Z, c, 0.5, native=False); "
            "assert abs(float(a[1]) - float(b[1])) < 1e-5")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert [p.suffix for p in fresh.iterdir()] == [".so"]


@needs_cc
def test_a_dead_writers_temporary_file_is_removed(fresh):
    lib = native._build(os.environ.get("CC", "cc"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    stale = lib.parent / f"{lib.name}.{socket.gethostname()}.{dead.pid}.tmp"
    stale.write_bytes(b"partial")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = lib.parent / f"{lib.name}.{socket.gethostname()}.{other.pid}.tmp"
        alive.write_bytes(b"another process's build in progress")
        native._build(os.environ.get("CC", "cc"), rebuild=True)
        assert not stale.exists() and alive.exists() and lib.is_file()
    finally:
        other.kill()
        other.wait()


@needs_cc
def test_a_cached_library_that_does_not_load_is_rebuilt(fresh):
    lib = native._build(os.environ.get("CC", "cc"))
    lib.write_bytes(b"not a shared object")
    assert native.library() is not None  # rebuilt once, loaded
    assert lib.read_bytes()[:4] == b"\x7fELF"


# ----------------------------------------------------------------------------- the DWE logits pass
@needs_cc
def test_native_logits_pass_float32_against_float64_with_extreme_logits():
    """Per-row weighted softplus sums and sigmoid of the native loop (its own exp and log1p) against
    float64, logits from -100 to 100 plus signed zeros, tiny, huge and non-finite values: as accurate
    as PyTorch's float32 pass (rows to 1e-5 relative, sigmoid to 2e-7 absolute), NaN propagated."""
    from goldstone_cli.models.dwe import _softplus_rows_sigmoid_eager, _softplus_rows_sigmoid_native

    X64 = torch.linspace(-100, 100, 3 * 5 * 1003, dtype=torch.float64).reshape(3, 5, 1003)
    X64[0, 0, :12] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 20.0, -20.0, 88.0, -88.0, 1e30, -1e30])
    nb = torch.rand(3, 1003, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = (torch.nn.functional.softplus(X64) * nb[:, None, :]).sum(-1)
    X = X64.float()
    got = _softplus_rows_sigmoid_native(native.library(), X, nb.float())
    assert float(((got.double() - want) / want).abs().max()) < 1e-5
    assert float((X.double() - torch.sigmoid(X64)).abs().max()) < 2e-7
    # the same within a few ulps of PyTorch's float32 pass, element by element
    Xe = X64.float()
    eager = _softplus_rows_sigmoid_eager(Xe, nb.float(), torch.empty_like(Xe))
    torch.testing.assert_close(got, eager, rtol=2e-6, atol=0)
    torch.testing.assert_close(X, Xe, rtol=1e-6, atol=2e-7)
    bad = torch.tensor([[[float("nan"), 1.0], [float("inf"), -float("inf")]]])
    rows = _softplus_rows_sigmoid_native(native.library(), bad, torch.ones(1, 2))
    assert torch.isnan(rows[0, 0]) and torch.isnan(bad[0, 0, 0]) and rows[0, 1] == float("inf")
    assert bad[0, 1, 0] == 1.0 and 0.0 <= float(bad[0, 1, 1]) < 1e-37


@needs_cc
@pytest.mark.parametrize("r, weight, chunk, columns_in_order", [(1.0, 1.0, None, False), (1.7, -2.5, 300_000, False),
                                                               (1.7, -2.5, 300_000, True)])
def test_native_logits_pass_gives_the_pytorch_likelihood_and_gradients(r, weight, chunk, columns_in_order, used):
    """skipgram_block_fused with the native loop (which leaves G / (-r) in the block: the rank-one
    factor applied per logit, the GEMMs scaled by -r weight) vs PyTorch's eager pass (native=False),
    float32, at the size of one CPU chunk (4 x 1000 x 1000 logits) and in row blocks of 300 (later
    blocks of a step add into gv), both against float64; positives whose row count or negative weight
    is 0 included (they ran the first passes before)."""
    from goldstone_cli.models.dwe import skipgram_block_fused

    g = torch.Generator().manual_seed(4)
    T, P, Q, d = 4, 1000, 1000, 20
    u = (0.5 * torch.randn(T, P, d, generator=g)).requires_grad_()
    v = (0.5 * torch.randn(T, Q, d, generator=g)).requires_grad_()
    c_rows, cneg = 100 * torch.rand(T, P, generator=g), torch.rand(T, Q, generator=g)
    nnz = 20000
    pt, pp, pq = (torch.randint(T, (nnz,), generator=g), torch.randint(P, (nnz,), generator=g),
                  torch.randint(Q, (nnz,), generator=g))
    pn = torch.rand(nnz, generator=g) * 5
    if columns_in_order:  # sorted by (t, p, q) as block_positives gives them (else by (t, p) only, unstably)
        order = torch.argsort((pt * P + pp) * Q + pq)
        pt, pp, pq = pt[order], pp[order], pq[order]
    c_rows[pt[:50], pp[:50]] = 0.0
    cneg[pt[50:90], pq[50:90]] = 0.0
    args = (c_rows, cneg, r, pt, pp, pq, pn)
    outs = {}
    for nat in (True, False):
        val = skipgram_block_fused(u, v, *args, chunk=chunk, weight=weight, native=nat)
        outs[nat] = (val, *torch.autograd.grad(val, (u, v)))
    ud, vd = u.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    ref = skipgram_block_fused(ud, vd, c_rows.double(), cneg.double(), r, pt, pp, pq, pn.double(), weight=weight)
    gref = torch.autograd.grad(ref, (ud, vd))
    for nat in (True, False):
        val, gu, gv = outs[nat]
        assert abs(float(val.detach()) / float(ref.detach()) - 1) < 1e-6
        for a, b in zip((gu, gv), gref):
            assert float((a.double() - b).norm() / b.norm()) < 1e-5
    for i in (1, 2):
        torch.testing.assert_close(outs[True][i], outs[False][i], rtol=1e-4,
                                   atol=1e-4 * float(outs[False][i].abs().max()))
    assert used == {"gs_logits_block_f32"}


@needs_cc
@pytest.mark.parametrize("columns_in_order", [False, True])
def test_native_logits_block_with_its_positives_against_float64_threads_and_bad_entries(columns_in_order):
    """The fused C loop (logits pass + the positives of each row) against float64 over logits from
    -100 to 100: per-row softplus sums, sum n log sigma(x), and sigmoid(X) + n sigma(-x) / scale
    added at the positives like index_add_ (repeated entries add up; a row with more positives than
    one chunk of the loop); one thread and three give the same numbers; an entry outside its block
    or out of row order is an IndexError that names it. Both orders of a row's columns: increasing
    (as block_positives gives them: the pass saves their logits as it goes) and any other (read
    before the pass)."""
    from goldstone_cli.models.dwe import _native_logits_block

    g = torch.Generator().manual_seed(5)
    tb, pb, Q, k = 3, 100, 700, 6000  # 300 rows: three threads take 100 each (at least 2^16 logits)
    X64 = torch.linspace(-100, 100, tb * pb * Q, dtype=torch.float64)[torch.randperm(tb * pb * Q, generator=g)]
    X64 = X64.reshape(tb, pb, Q)
    t0, p0 = 7, 100
    pt, pp, pq = (torch.randint(tb, (k,), generator=g) + t0, torch.randint(pb, (k,), generator=g) + p0,
                  torch.randint(Q, (k,), generator=g))
    pt[:600], pp[:600] = t0 + 1, p0 + 3  # one row with 600 positives (more than one 256-entry chunk)
    order = torch.argsort(((pt - t0) * pb + pp - p0) * (Q if columns_in_order else 1) + (pq if columns_in_order else 0),
                          stable=True)
    pt, pp, pq = pt[order], pp[order], pq[order]
    n, scale = torch.rand(k, generator=g, dtype=torch.float64) * 5, -(torch.rand(k, generator=g, dtype=torch.float64) + 0.1)
    nb = torch.rand(tb, Q, generator=g, dtype=torch.float64)
    flat = ((pt - t0) * pb + pp - p0) * Q + pq
    x = X64.reshape(-1)[flat]
    want_rows = (torch.nn.functional.softplus(X64) * nb[:, None, :]).sum(-1)
    want_ll = float((n * torch.nn.functional.logsigmoid(x)).sum())
    want_S = torch.sigmoid(X64).reshape(-1).index_add(0, flat, n * torch.sigmoid(-x) / scale).reshape(X64.shape)
    threads, outs = torch.get_num_threads(), []
    try:
        for nt in (1, 3):
            torch.set_num_threads(nt)
            X = X64.float()
            rows, ll = _native_logits_block(native.library(), X, nb.float(), pt, pp, pq, n.float(), scale.float(),
                                            t0, p0)
            outs.append((X, rows, ll))
    finally:
        torch.set_num_threads(threads)
    for X, rows, ll in outs:
        assert float(((rows.double() - want_rows) / want_rows).abs().max()) < 1e-5
        assert abs(ll / want_ll - 1) < 1e-6
        torch.testing.assert_close(X.double(), want_S, rtol=2e-6, atol=2e-7)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert abs(outs[0][2] - outs[1][2]) <= 1e-12 * abs(outs[0][2])
    bad = pq.clone()
    bad[1234] = Q
    with pytest.raises(IndexError, match="positive count 1234 .* outside its logits block"):
        _native_logits_block(native.library(), X64.float(), nb.float(), pt, pp, bad, n.float(), scale.float(), t0, p0)
    swapped = pp.clone()
    swapped[[700, 5000]] = swapped[[5000, 700]]
    if int(swapped[700]) != int(pp[700]):
        with pytest.raises(IndexError, match="out of .* order"):
            _native_logits_block(native.library(), X64.float(), nb.float(), pt, swapped, pq, n.float(), scale.float(),
                                 t0, p0)


@needs_cc
@pytest.mark.parametrize("n_rows, n_cols, P, Q", [(300, 300, 120, 90), (50, 300, 50, 300), (40, 70, 0, 10), (40, 70, 5, 0)])
def test_native_block_positives_equal_the_pytorch_selection(n_rows, n_cols, P, Q, used):
    """The minibatch's positives by the C loop and by whole-tensor operations: the same entries in the
    same (t, p) order, on a random stacked CSR (a shard's local rows: n_rows < n_cols)."""
    import scipy.sparse as sp

    from goldstone_cli.models.dwe import block_positives

    T = 7
    rng = np.random.default_rng(P + Q)
    stacked = sp.random(T * n_rows, n_cols, density=0.05, format="csr", random_state=rng, dtype=np.float32)
    stacked.sort_indices()
    crow, col = torch.from_numpy(stacked.indptr.astype(np.int64)), torch.from_numpy(stacked.indices.astype(np.int64))
    val = torch.from_numpy(stacked.data)
    rows = torch.from_numpy(np.sort(rng.choice(n_rows, P, replace=False)))
    cols = torch.from_numpy(np.sort(rng.choice(n_cols, Q, replace=False)))
    got = block_positives(crow, col, val, rows, cols, T, n_rows, n_cols)
    want = block_positives(crow, col, val, rows, cols, T, n_rows, n_cols, native=False)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    got64 = block_positives(crow, col, val.double(), rows, cols, T, n_rows, n_cols)  # counts gathered after the loop
    for a, b in zip(got64, want):
        assert torch.equal(a, b.to(a.dtype))
    dense = stacked.toarray().reshape(T, n_rows, n_cols)[:, rows.numpy()][:, :, cols.numpy()]  # brute force
    assert used == {"gs_block_positives"}
    t, p, q, n = got
    assert len(n) == np.count_nonzero(dense) and np.array_equal(dense[t.numpy(), p.numpy(), q.numpy()], n.numpy())
    if P:
        with pytest.raises(IndexError, match="minibatch rows must lie in"):
            block_positives(crow, col, val, rows + n_rows, cols, T, n_rows, n_cols)
        damaged = crow.clone()
        damaged[1:] += col.numel()  # offsets past the stored counts: refused, nothing read out of range
        with pytest.raises(IndexError, match="point outside"):
            block_positives(damaged, col, val, rows, cols, T, n_rows, n_cols)


# ----------------------------------------------------------------------------- the DWE chain terms
def _chain_problem(T=12, V=60, P=25, d=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    raw = (0.5 * torch.randn(T, V, d, generator=g) + 1.0).to(dtype).requires_grad_()
    off = (0.3 * torch.randn(T - 1, V, d, generator=g)).to(dtype).requires_grad_()
    mu = torch.randn(T, P, d, generator=g).to(dtype).requires_grad_()
    eps = torch.randn(T, P, d, generator=g).to(dtype).requires_grad_()
    rows = torch.randperm(V, generator=g)[:P].sort().values
    w = (3 * torch.rand(T - 1, generator=g)).to(dtype)
    gx = torch.randn(T, P, d, generator=g).to(dtype)
    return raw, off, mu, eps, rows, w, gx


def _chain_run(prob, native_on: bool, rows=True, gx_none=False):
    from goldstone_cli.models.dwe import _ChainTerms

    raw, off, mu, eps, r, w, gx = prob
    if rows:
        x, terms = _ChainTerms.apply(mu, raw, off, eps, w, 0.5, r, native_on)
    else:
        x, terms = _ChainTerms.apply(mu, raw[:, r].contiguous(), off[:, r].contiguous(), eps, w, 0.5, None, native_on)
    loss = 1.7 * terms + (0.0 if gx_none else (x * gx).sum())
    grads = torch.autograd.grad(loss, (mu, raw, off, eps), allow_unused=True)
    return x.detach(), terms.detach(), [None if v is None else v.detach() for v in grads]


@needs_cc
@pytest.mark.parametrize("rows", [True, False])
@pytest.mark.parametrize("gx_none", [False, True])
def test_native_chain_terms_match_float64_and_the_pytorch_pass(rows, gx_none, used):
    """The C forward and backward of the variational chain terms (sample, covariance part of the
    prior, entropy; gradients of mu, raw, off, eps) against float64 autograd-free reference runs of
    the PyTorch pass and against its float32 run."""
    prob = _chain_problem()
    got = _chain_run(prob, True, rows, gx_none)
    f32 = _chain_run(prob, False, rows, gx_none)
    ref = _chain_run(tuple(t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
                           for t in prob), False, rows, gx_none)
    assert used == {"gs_chain_terms_fwd_f32", "gs_chain_terms_bwd_f32"}
    assert abs(float(got[1]) / float(ref[1]) - 1) < 1e-6
    assert float((got[0].double() - ref[0]).abs().max()) < 1e-5 * float(ref[0].abs().max())
    for a, b, c in zip(got[2], f32[2], ref[2]):
        if c is None:
            continue
        if float(c.norm()) == 0.0:  # mu without a sample gradient: exactly zero in all three
            assert float(a.abs().max()) == 0.0 and float(b.abs().max()) == 0.0
            continue
        assert float((a.double() - c).norm() / c.norm()) < 1e-6
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(c.abs().max()))


@needs_cc
@pytest.mark.parametrize("shape", [(6, 9), (6, 9, 2, 3)])
def test_chain_terms_without_a_position_axis_or_with_two_feature_axes(shape, used):
    """(T, P) chains run the C pass with one number per position; (T, P, a, d) ones are left to the
    PyTorch pass (the C pass reads (T, P, d) layouts only); both give the PyTorch pass's numbers."""
    from goldstone_cli.models.dwe import _ChainTerms

    g = torch.Generator().manual_seed(3)
    T = shape[0]
    raw = (0.5 * torch.randn(*shape, generator=g) + 1.0).requires_grad_()
    off = (0.3 * torch.randn(T - 1, *shape[1:], generator=g)).requires_grad_()
    mu, eps, gx = (torch.randn(*shape, generator=g) for _ in range(3))
    w = 2.0 * torch.rand(T - 1, generator=g)

    def run(native_on):
        x, terms = _ChainTerms.apply(mu, raw, off, eps, w, 0.5, None, native_on)
        return [x.detach(), terms.detach(), *torch.autograd.grad(1.3 * terms + (x * gx).sum(), (raw, off))]

    got = run(True)
    assert used == ({"gs_chain_terms_fwd_f32", "gs_chain_terms_bwd_f32"} if len(shape) == 2 else set())
    for a, b in zip(got, run(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_cc
def test_native_chain_terms_threads_and_repeated_rows():
    """Positions split over two threads give the one-thread numbers; repeated rows (which two
    threads would both write) run on one thread and add their gradients like index_add_."""
    prob = _chain_problem(T=9, V=400, P=300, d=8, seed=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _chain_run(prob, True)
        torch.set_num_threads(2)
        two = _chain_run(prob, True)
        raw, off, mu, eps, rows, w, gx = prob
        rep = torch.cat([rows[:150], rows[:150]])  # every row twice
        rep_prob = (raw, off, mu, eps, rep, w, gx)
        got = _chain_run(rep_prob, True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and float(one[1]) == pytest.approx(float(two[1]), rel=1e-12)
    for a, b in zip(one[2], two[2]):
        assert torch.equal(a, b)
    want = _chain_run(rep_prob, False)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@needs_cc
@pytest.mark.parametrize("ends", [False, True])
def test_chain_gradients_written_whole_over_a_dirty_pool(ends, used):
    """With strictly increasing rows the C backward writes the dense raw / off gradients whole (the
    rows between, before and after the minibatch's set to zero, no zero-filled buffer): pooled
    buffers full of NaN from an earlier use must not show through, on one thread or split over two
    (rows 0 and V - 1 in the minibatch or not)."""
    from goldstone_cli.models.dwe import WORKSPACE

    prob = list(_chain_problem(T=7, V=300, P=150, d=5, seed=4))  # two threads: two slices of >= 64 positions
    rows = torch.randperm(300, generator=torch.Generator().manual_seed(5))[:150].sort().values
    if ends:
        rows[0], rows[-1] = 0, 299
    prob[4] = rows
    want = _chain_run(tuple(prob), False)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            held = [WORKSPACE.take(shape, torch.float32, "cpu").fill_(float("nan"))
                    for shape in ((7, 300, 5), (6, 300, 5)) for _ in range(3)]
            del held  # back in the pool, dirty
            got = _chain_run(tuple(prob), True)
            for a, b in zip(got[2], want[2]):
                assert bool(torch.isfinite(a).all())
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
            outside = torch.ones(300, dtype=torch.bool)
            outside[rows] = False
            assert float(got[2][1][:, outside].abs().max()) == 0.0 and float(got[2][2][:, outside].abs().max()) == 0.0
    finally:
        torch.set_num_threads(before)
    assert "gs_chain_terms_bwd_f32" in used


@needs_cc
def test_native_row_gather_and_add_equal_index_select_and_index_add(used):
    """The minibatch rows of a (T, N, d) mean (gs_rows_gather_f32) and their gradient added into a
    dense one (gs_rows_add_f32) give index_select's and index_add_'s numbers bitwise, split over
    threads by time step, with repeated rows added in order; bad rows raise; other dtypes, non-
    contiguous inputs and native=False take the PyTorch calls."""
    from goldstone_cli.models.dwe import _pooled_rows, _rows_add_

    g = torch.Generator().manual_seed(6)
    x = torch.randn(37, 90, 6, generator=g)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            for rows in (torch.randperm(90, generator=g)[:40].sort().values, torch.tensor([5, 89, 5, 0, 5]),
                         torch.arange(90), torch.zeros(0, dtype=torch.int64)):
                assert torch.equal(_pooled_rows(x, rows), x[:, rows])
                src = torch.randn(37, rows.numel(), 6, generator=g)
                assert torch.equal(_rows_add_(x.clone(), rows, src), x.clone().index_add_(1, rows, src))
    finally:
        torch.set_num_threads(before)
    assert used == {"gs_rows_gather_f32", "gs_rows_add_f32"}
    for bad in (torch.tensor([0, 90]), torch.tensor([-1, 3])):
        with pytest.raises(IndexError, match="minibatch rows must lie in"):
            _pooled_rows(x, bad)
        with pytest.raises(IndexError, match="minibatch rows must lie in"):
            _rows_add_(x.clone(), bad, torch.zeros(37, 2, 6))
    used.clear()
    rows = torch.tensor([3, 1, 3])
    src = torch.randn(37, 3, 6, generator=g)
    x64, xt = x.double(), x.transpose(0, 1).contiguous().transpose(0, 1)  # float64; a non-contiguous view
    assert torch.equal(_pooled_rows(x64, rows), x64[:, rows]) and torch.equal(_pooled_rows(xt, rows), x[:, rows])
    assert torch.equal(_rows_add_(x.clone(), rows, src, native=False), x.clone().index_add_(1, rows, src))
    assert torch.equal(_pooled_rows(x, rows, native=False), x[:, rows])
    assert used == set()


def test_pooled_gradients_accumulate_when_kept():
    """psi's and the chain pass's gradients come from a buffer pool: with the gradients kept between
    two backward passes (accumulation), the second pass must not overwrite the first's buffers."""
    from goldstone_cli.models.dwe import _ChainTerms

    Z = torch.randn(6, 50, 4, requires_grad=True)
    coupling = Coupling.chain(6, 2.0)
    coupling.psi(Z).backward()
    once = Z.grad.clone()
    (3.0 * coupling.psi(Z)).backward()  # a different gradient: a reused buffer would give 6x, not 4x
    torch.testing.assert_close(Z.grad, 4 * once, rtol=1e-6, atol=1e-6)
    raw, off, mu, eps, rows, w, gx = _chain_problem()
    for k in (1.0, 3.0):  # the minibatch rows of the whole parameters: dense, pooled gradients
        (k * _ChainTerms.apply(mu.detach(), raw, off, eps.detach(), w, 0.5, rows)[1]).backward()
    g2 = raw.grad.clone()
    raw.grad = None
    _ChainTerms.apply(mu.detach(), raw, off, eps.detach(), w, 0.5, rows)[1].backward()
    torch.testing.assert_close(g2, 4 * raw.grad, rtol=1e-5, atol=1e-6)


@needs_cc
def test_ratings_split_over_threads_at_bin_boundaries():
    """Two threads take whole time bins each (no row written by both): the gradients equal the one-
    thread ones bit for bit; unsorted ratings or ratings whose bins differ stay on one thread."""
    from goldstone_cli.models.movielens import _bin_cuts

    g = torch.Generator().manual_seed(3)
    T, nu, ni, d, n = 20, 300, 200, 8, 300_000
    U, V = torch.randn(T, nu, d, generator=g), torch.randn(T, ni, d, generator=g)
    t = torch.randint(T, (n,), generator=g)
    ru = t * nu + torch.randint(nu, (n,), generator=g)
    rv = t * ni + torch.randint(ni, (n,), generator=g)
    order = torch.argsort(ru)
    ru, rv = ru[order].contiguous(), rv[order].contiguous()
    x = (torch.randint(2, (n,), generator=g) * 2 - 1).float()
    before = torch.get_num_threads()
    out = {}
    try:
        for k in (1, 2):
            torch.set_num_threads(k)
            gU, gV = torch.zeros_like(U), torch.zeros_like(V)
            out[k] = (ratings_pass(U, V, ru, rv, x, 1.3, gU, gV), gU, gV)
        cuts = _bin_cuts(U, V, ru, rv, True)
        shuffled = torch.randperm(n, generator=g)
        one_range = _bin_cuts(U, V, ru[shuffled], rv[shuffled], True)
        mixed = _bin_cuts(U, V, ru, (rv + ni) % (T * ni), True)
    finally:
        torch.set_num_threads(before)
    assert len(cuts) == 3 and cuts[0] == 0 and cuts[-1] == n
    tb = ru // nu
    assert tb[cuts[1] - 1] < tb[cuts[1]]  # the cut falls between two bins
    assert one_range == [0, n] and mixed == [0, n]
    assert torch.equal(out[1][1], out[2][1]) and torch.equal(out[1][2], out[2][2])
    assert float(out[1][0]) == pytest.approx(float(out[2][0]), rel=1e-12)


def test_thread_pool_works_in_a_forked_child():
    """A child forked after the parent used the pool and its lock (a fork-based launcher) still runs
    parallel ranges (the child starts with a fresh lock and pool: native._after_fork_in_child)."""
    import multiprocessing as mp

    assert native.parallel_ranges(lambda a, b: b - a, [0, 3, 10]) == [3, 7]  # the parent's pool exists
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_ranges_in_child).get(timeout=60)
    assert got == [3, 7]


def _ranges_in_child():
    return native.parallel_ranges(lambda a, b: b - a, [0, 3, 10])


# ---------------------------------------------------------- review: shapes, aliasing, non-finite values
def _sg_problem(T=2, P=3, Q=5, d=4):
    g = torch.Generator().manual_seed(8)
    u, v = torch.randn(T, P, d, generator=g).requires_grad_(), torch.randn(T, Q, d, generator=g).requires_grad_()
    c, cn = torch.rand(T, P, generator=g) + 0.5, torch.rand(T, Q, generator=g) + 0.5
    pt, pp, pq = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2, 1, 2]), torch.tensor([1, 4, 0, 3])
    return [u, v, c, cn, pt, pp, pq, torch.tensor([1.0, 2.0, 3.0, 4.0])]


@needs_cc
@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("i, bad, name", [
    (3, lambda t: t[:, :3].contiguous(), "cneg_cols"), (3, lambda t: t[0].clone(), "cneg_cols"),
    (2, lambda t: t[:, :1].contiguous(), "c_rows"), (2, lambda t: t[None], "c_rows"),
    (7, lambda t: t[:2].clone(), "pos_n"), (6, lambda t: t[:2].clone(), "pos_q"),
    (5, lambda t: t[:1].clone(), "pos_p"), (4, lambda t: t[:, None], "pos_t")])
def test_skipgram_block_fused_refuses_counts_of_the_wrong_shape(native_on, i, bad, name):
    """c_rows (T, P), cneg_cols (T, Q) and the positives' four vectors of one length, on both paths:
    the C loop read past too-short ones (ASan), PyTorch broadcast a length-1 pos_p silently."""
    from goldstone_cli.models.dwe import skipgram_block_fused

    args = _sg_problem()
    want = float(skipgram_block_fused(*args[:4], 1.3, *args[4:], native=native_on).detach())
    args[i] = bad(args[i])
    with pytest.raises(ValueError, match=name):
        skipgram_block_fused(*args[:4], 1.3, *args[4:], native=native_on)
    assert math.isfinite(want)


@pytest.mark.parametrize("native_on, fast", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("i, value, name", [(4, 2, "pos_t"), (4, -1, "pos_t"), (5, 3, "pos_p"), (5, -1, "pos_p"),
                                            (6, 5, "pos_q"), (6, -1, "pos_q")])
def test_skipgram_block_refuses_positives_out_of_range_on_every_path(native_on, fast, i, value, name):
    """A positive's step, row or column outside the (T, P, Q) = (2, 3, 5) block is the same ValueError
    on the C path, the PyTorch passes and the materialized skipgram_block, naming the index vector and
    the entry (it was silently dropped (a step), counted at a neighbouring step's row or wrapped around
    (-1), or a raw IndexError, depending on the path)."""
    from goldstone_cli.models.dwe import skipgram_block, skipgram_block_fused

    args = _sg_problem()
    args[i] = args[i].clone()
    args[i][2] = value
    msg = rf"{name} must lie in \[0, {(2, 3, 5)[i - 4]}\).* got {value} at positive count 2 "
    with pytest.raises(ValueError, match=msg):
        skipgram_block_fused(*args[:4], 1.3, *args[4:], native=native_on, fast=fast)
    u, v = args[0].detach(), args[1].detach()
    with pytest.raises(ValueError, match=msg):
        skipgram_block(torch.bmm(u, v.transpose(1, 2)), *args[2:4], 1.3, *args[4:])


@needs_cc
def test_native_logits_block_refuses_mismatched_lengths_and_shapes():
    """_native_logits_block reads nb (tb, Q), cb (tb, pb) and k = pt.numel() numbers of pp, pq, npos
    and scale: anything else is a ValueError naming the argument, before the C call."""
    from goldstone_cli.models.dwe import _native_logits_block

    lib = native.library()
    X, nb = torch.randn(2, 3, 5), torch.rand(2, 5)
    pt, pp, pq, n = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]), torch.ones(3)
    rows, ll = _native_logits_block(lib, X.clone(), nb, pt, pp, pq, n, None, 0, 0, torch.ones(2, 3), -1.0)
    assert rows.shape == (2, 3) and math.isfinite(ll)
    for kw, name in ((dict(npos=torch.ones(1)), "npos"), (dict(pq=pq[:2]), "pq"), (dict(pp=pp[None]), "pp"),
                     (dict(nb=nb[:, :3].contiguous()), "nb"), (dict(nb=nb[0]), "nb"),
                     (dict(cb=torch.ones(2, 1)), "cb"), (dict(cb=None, scale=torch.ones(2)), "scale")):
        a = dict(X=X.clone(), nb=nb, pt=pt, pp=pp, pq=pq, npos=n, scale=None, cb=torch.ones(2, 3))
        a.update(kw)
        with pytest.raises(ValueError, match=name):
            _native_logits_block(lib, a["X"], a["nb"], a["pt"], a["pp"], a["pq"], a["npos"], a["scale"], 0, 0, a["cb"],
                                 -1.0)


@needs_cc
def test_exp_nonpos_of_nan_is_nan_without_undefined_behaviour(tmp_path):
    """fastmath.h's exp_nonpos converted NaN to int and shifted a negative value (UBSan: undefined
    behaviour); built with UBSan (trapping), NaN gives NaN, -inf and -100 the clamp's e^-87, and the
    values elsewhere stay within a few ulps of expf."""
    cc = os.environ.get("CC", "cc")
    src = tmp_path / "t.c"
    src.write_text(textwrap.dedent("""\
        #include <math.h>
        #include <stdio.h>
        #include "fastmath.h"
        int main(void) {
            volatile float in[] = {NAN, -NAN, -INFINITY, -100.0f, -87.0f, -20.0f, -1.0f, -1e-8f, -0.0f, 0.0f};
            int bad = !isnan(exp_nonpos(in[0])) || !isnan(exp_nonpos(in[1]));
            for (int i = 2; i < 10; ++i) {
                const double want = exp(in[i] < -87.0f ? -87.0 : (double)in[i]);
                bad |= fabs(exp_nonpos(in[i]) - want) > 4e-7 * want;
            }
            printf(bad ? "wrong\\n" : "ok\\n");
            return bad;
        }
        """))
    exe = tmp_path / "t"
    here = os.path.join(os.path.dirname(native.__file__))
    build = subprocess.run([cc, "-O1", "-std=c11", "-fsanitize=undefined,float-cast-overflow",
                            "-fno-sanitize-recover=all", "-I", here, "-o", str(exe), str(src), "-lm"],
                           capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"no UBSan runtime for {cc}: {build.stderr.strip()[-200:]}")
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


@needs_cc
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_native_chain_terms_pass_an_infinite_or_nan_scale_on_to_the_terms(bad, used):
    """raw = +inf gives b = inf and log b = inf in PyTorch; the C pass's mantissa-and-exponent log of
    the product gave a finite 88.7 instead (the loss lost its non-finite value). NaN stays NaN."""
    from goldstone_cli.models.dwe import chain_terms

    T, P, d = 3, 2, 4
    mu, raw, off = torch.zeros(T, P, d), torch.zeros(T, P, d), torch.zeros(T - 1, P, d)
    eps = torch.randn(T, P, d, generator=torch.Generator().manual_seed(2))
    raw[1, 0, 0] = bad
    got = float(chain_terms(mu, raw, off, eps, torch.ones(T - 1), 1.0, method="sequential", native=True)[1])
    want = float(chain_terms(mu, raw, off, eps, torch.ones(T - 1), 1.0, method="sequential", native=False)[1])
    assert "gs_chain_terms_fwd_f32" in used
    assert (math.isnan(got) and math.isnan(want)) if bad != bad else (got == want == float("inf"))


@needs_cc
@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("block_elems", [None, 1])
def test_chain_quadratic_refuses_an_out_that_overlaps_z(native_on, block_elems):
    """out <- gamma Z + L Z reads Z's neighbouring steps after writing out at others: out = Z, or
    out overlapping Z, is a ValueError on every path (the C loop, whose pointers are restrict, and
    the blocked pass with one step per block gave wrong numbers silently); disjoint parts of one
    buffer are fine."""
    coupling = Coupling.chain(5, 1.0)
    buf = torch.randn(10, 3, 2, generator=torch.Generator().manual_seed(9))
    ref = torch.empty(5, 3, 2)
    want = quadratic_terms_(buf[:5].clone(), coupling, 0.5, ref, block_elems=block_elems, native=native_on)
    for Z, out in ((buf[:5], buf[:5]), (buf[:5], buf[1:6]), (buf[1:6], buf[:5]), (buf[:5], buf[4:9])):
        before = buf.clone()
        with pytest.raises(ValueError, match="must not overlap Z"):
            quadratic_terms_(Z, coupling, 0.5, out, block_elems=block_elems, native=native_on)
        assert torch.equal(buf, before)
    Z, out = buf[:5], buf[5:]  # the same storage, no shared element
    got = quadratic_terms_(Z, coupling, 0.5, out, block_elems=block_elems, native=native_on)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert [float(v) for v in got] == pytest.approx([float(v) for v in want], rel=1e-6)


@needs_cc
def test_native_writes_move_the_version_counter(used):
    """The C loops write gU / gV (ratings pass), out (chain quadratic) and x (_rows_add_) through
    their pointers: each bumps the tensor's version counter, so autograd's in-place checks see it."""
    from goldstone_cli.models.dwe import _rows_add_

    U, V, ru, rv, x = _ratings_problem(n=500)
    gU, gV = torch.zeros_like(U), torch.zeros_like(V)
    vu, vv = gU._version, gV._version
    ratings_pass(U, V, ru, rv, x, 1.0, gU, gV)
    assert gU._version > vu and gV._version > vv
    Z, out = torch.randn(6, 4, 3), torch.empty(6, 4, 3)
    vo = out._version
    quadratic_terms_(Z, Coupling.chain(6, 1.0), 0.1, out)
    assert out._version > vo
    xr = torch.zeros(3, 5, 2)
    vx = xr._version
    _rows_add_(xr, torch.tensor([1, 4]), torch.ones(3, 2, 2))
    assert xr._version > vx
    assert used == {"gs_bernoulli_ratings_f32", "gs_chain_quadratic_f32", "gs_rows_add_f32"}
    leaf = torch.zeros(3, 5, 2, requires_grad=True)  # refused as index_add_ refuses it
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        _rows_add_(leaf, torch.tensor([1, 4]), torch.ones(3, 2, 2))


@needs_cc
def test_native_ratings_pass_checks_every_index_before_adding_anything():
    """A bad row index anywhere (here in the second thread's bins) is an IndexError naming it, with
    gU and gV untouched (the C loop stopped at it, after adding the ratings before it)."""
    T, nu, nv, d, per_bin = 4, 30, 20, 5, 40_000
    g = torch.Generator().manual_seed(10)
    U, V = torch.randn(T, nu, d, generator=g), torch.randn(T, nv, d, generator=g)
    tb = torch.arange(T).repeat_interleave(per_bin)
    ru = tb * nu + torch.sort(torch.randint(nu, (T * per_bin,), generator=g)).values
    rv = tb * nv + torch.randint(nv, (T * per_bin,), generator=g)
    x = (torch.randint(2, (T * per_bin,), generator=g) * 2 - 1).float()
    before = torch.get_num_threads()
    try:
        for threads, at in ((1, 7), (2, T * per_bin - 5)):
            torch.set_num_threads(threads)
            for name in ("ru", "rv"):
                bad = {"ru": ru.clone(), "rv": rv.clone()}
                bad[name][at] = -1 if name == "ru" else T * nv
                gU, gV = torch.zeros_like(U), torch.zeros_like(V)
                with pytest.raises(IndexError, match=f"rating {at} points at row .* out of range"):
                    ratings_pass(U, V, bad["ru"], bad["rv"], x, 1.0, gU, gV)
                assert not gU.any() and not gV.any()
    finally:
        torch.set_num_threads(before)


@needs_cc
@pytest.mark.parametrize("native_on", [True, False])
def test_ratings_pass_refuses_another_d_for_v_and_takes_d_zero(native_on):
    """V's rows must have U's d (both paths read a (4, 3) V as 12 numbers of 3-number rows before);
    d = 0 gives softplus(0) per rating with empty gradients (was a ZeroDivisionError)."""
    ru, rv, x = torch.tensor([0, 1, 3]), torch.tensor([0, 2, 3]), torch.tensor([1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="same last dimension"):
        ratings_pass(torch.randn(4, 3), torch.randn(3, 4), ru, rv, x, 1.0, None, None, native=native_on)
    U, V = torch.randn(2, 4, 0), torch.randn(2, 4, 0)
    gU, gV = torch.zeros_like(U), torch.zeros_like(V)
    nll = ratings_pass(U, V, ru, rv, x, 1.0, gU, gV, native=native_on)
    assert float(nll) == pytest.approx(3 * math.log(2.0), rel=1e-6)
    assert float(ratings_pass(U, V, ru, rv, x, 1.0, None, None, native=native_on)) == pytest.approx(float(nll))


@needs_cc
@pytest.mark.parametrize("shape, rows", [((3, 0, 4), []), ((0, 5, 4), [1, 2]), ((0, 0, 4), [])])
def test_native_rows_of_an_empty_parameter(shape, rows, used):
    """T = 0 or R = 0: the C row loops gather / add nothing (d was read from x[0, 0], an IndexError)."""
    from goldstone_cli.models.dwe import _pooled_rows, _rows_add_

    x, r = torch.zeros(shape), torch.tensor(rows, dtype=torch.int64)
    assert _pooled_rows(x, r).shape == x[:, r].shape
    src = torch.ones(shape[0], len(rows), shape[2])
    assert torch.equal(_rows_add_(x.clone(), r, src), x.clone().index_add_(1, r, src))
    assert used <= {"gs_rows_gather_f32", "gs_rows_add_f32"} and "gs_rows_gather_f32" in used


@pytest.mark.parametrize("native_on", [True, False])
def test_block_positives_refuse_a_negative_column(native_on):
    """cols index col_pos: a negative entry wrapped around (counted the last column) on both paths."""
    from goldstone_cli.models.dwe import block_positives

    crow, col, val = torch.tensor([0, 2, 3, 3, 5]), torch.tensor([0, 5, 1, 2, 5]), torch.ones(5)
    for cols in (torch.tensor([0, -1]), torch.tensor([0, 6])):
        with pytest.raises(IndexError, match=r"minibatch columns \(cols\) must lie in \[0, 6\)"):
            block_positives(crow, col, val, torch.tensor([0, 1]), cols, 2, 2, 6, native_on)
    t, p, q, n = block_positives(crow, col, val, torch.tensor([0, 1]), torch.tensor([0, 5]), 2, 2, 6, native_on)
    assert q.tolist() == [0, 1, 1]
