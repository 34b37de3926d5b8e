"""The banded Laplacian product (``coupling.banded_laplacian_``, the GPU's way of forming
``gamma Z + L Z``) against the dense Laplacian and the elementwise pass: every block layout, graphs
with several and long offsets, float32 at a realistic size against float64, TF32 switched on by the
user, and the MovieLens and DWE steps it runs in (forced onto the CPU here)."""

import numpy as np
import pytest
import torch

from goldstone_cli.optim import coupling as C
from goldstone_cli.optim.coupling import Coupling, banded_laplacian_, quadratic_terms_

pytestmark = pytest.mark.usefixtures("one_thread")


def dense(coupling: Coupling, gamma: float, Z: torch.Tensor) -> torch.Tensor:
    T = coupling.T
    lap = coupling.laplacian(torch.float64) + gamma * torch.eye(T, dtype=torch.float64)
    return (lap @ Z.reshape(T, -1).double()).reshape(Z.shape)


def graph(T: int, g: torch.Generator) -> Coupling:
    """Random edges with offsets 1, 2, 3 and 7 (where T allows): several bands, halo 7."""
    src, dst = [], []
    for o in (1, 2, 3, 7):
        for t in range(T - o):
            if o == 1 or torch.rand((), generator=g) < 0.3:
                src.append(t)
                dst.append(t + o)
    w = (torch.rand(len(src), generator=g, dtype=torch.float64) + 0.1).tolist()
    return Coupling(T, src, dst, w)


@pytest.mark.parametrize("kind", ["chain", "graph"])
def test_banded_product_equals_the_dense_laplacian_for_every_block_layout(kind):
    """T from 1 to 140 covers one dense product (short T), one, two and many middle blocks, and
    every length of the last rows; a nonzero gamma goes through the identity blocks."""
    g = torch.Generator().manual_seed(0)
    layouts = set()
    for T in range(1, 141):
        c = Coupling.chain(T, (torch.rand(max(T - 1, 0), generator=g, dtype=torch.float64) + 0.5).tolist()) \
            if kind == "chain" else graph(T, g)
        Z = torch.randn(T, 5, 3, generator=g, dtype=torch.float64)
        for gamma in (0.0, 1.7):
            out = torch.full_like(Z, float("nan"))
            banded_laplacian_(Z.view(T, -1), c, gamma, out.view(T, -1))
            torch.testing.assert_close(out, dense(c, gamma, Z), rtol=1e-13, atol=1e-13)
        blk = C._banded_blocks(c, torch.float64, "cpu")
        layouts.add(0 if blk.mid is None else blk.mid.shape[0])
    assert {0, 1, 2, 3}.issubset(layouts)  # dense, and one to three middle blocks


def test_banded_product_with_an_offset_longer_than_a_block():
    """An edge (0, T/2) makes the halo longer than BANDED_ROWS: the blocks grow (b = 2h) or the
    product is one dense matrix; both exact."""
    g = torch.Generator().manual_seed(1)
    for T, o in ((100, 50), (200, 40), (300, 17)):
        c = Coupling(T, list(range(T - 1)) + [0], list(range(1, T)) + [o], [1.0] * (T - 1) + [2.5])
        Z = torch.randn(T, 4, 2, generator=g, dtype=torch.float64)
        out = torch.empty_like(Z)
        banded_laplacian_(Z.view(T, -1), c, 0.3, out.view(T, -1))
        torch.testing.assert_close(out, dense(c, 0.3, Z), rtol=1e-13, atol=1e-13)
        blk = C._banded_blocks(c, torch.float64, "cpu")
        assert blk.halo == o and blk.rows >= 2 * o


def test_bad_arguments_are_refused():
    c = Coupling.chain(5, 1.0)
    Z = torch.randn(5, 6)
    with pytest.raises(ValueError, match="contiguous"):
        banded_laplacian_(Z, c, 0.0, torch.empty(5, 5))
    with pytest.raises(ValueError, match="contiguous"):
        banded_laplacian_(Z, c, 0.0, torch.empty(6, 5).t())


@pytest.mark.parametrize("kind", ["chain", "graph"])
def test_quadratic_terms_and_laplacian_apply_by_the_banded_method(monkeypatch, kind):
    """With the CPU set to the GPU's method: the same sums (the same code) and the same gradient as
    the elementwise pass to float64 rounding; autograd through ``laplacian_apply`` still works (it
    takes the elementwise pass there)."""
    g = torch.Generator().manual_seed(2)
    T = 77
    c = Coupling.chain(T, 3.0) if kind == "chain" else graph(T, g)
    Z = torch.randn(T, 30, 4, generator=g, dtype=torch.float64)
    ref_out = torch.empty_like(Z)
    ref = quadratic_terms_(Z, c, 0.4, ref_out, native=False)
    ref_lap = c.laplacian_apply(Z)
    monkeypatch.setitem(C.LAPLACIAN_METHOD, "cpu", "banded")
    out = torch.full_like(Z, float("nan"))
    got = quadratic_terms_(Z, c, 0.4, out, native=False)
    assert float(got[0]) == float(ref[0]) and float(got[1]) == float(ref[1])
    torch.testing.assert_close(out, ref_out, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(c.laplacian_apply(Z), ref_lap, rtol=1e-13, atol=1e-13)
    Zg = Z.clone().requires_grad_()
    (c.laplacian_apply(Zg) * Z).sum().backward()  # d/dZ <L Z, W> = L W (L symmetric)
    torch.testing.assert_close(Zg.grad, ref_lap, rtol=1e-13, atol=1e-13)


def test_float32_at_a_realistic_size_against_float64_even_with_tf32_requested(monkeypatch):
    """T=100, 60,000 numbers per step (6M in all), a slowly drifting Z (the small differences the
    gradient is made of): the float32 product within a few float32 roundings of the float64 one,
    also where the user asked for TF32 matmuls (the product runs at full precision and the
    setting is restored)."""
    g = torch.Generator().manual_seed(3)
    T, L = 100, 60_000
    Z64 = torch.randn(1, L, generator=g, dtype=torch.float64) + 0.01 * torch.randn(T, L, generator=g,
                                                                                  dtype=torch.float64).cumsum(0)
    c = Coupling.chain(T, 10.0)
    Z = Z64.float()
    ref = dense(c, 1.0, Z.double())
    A = (c.laplacian(torch.float64) + torch.eye(T, dtype=torch.float64)).abs()
    scale = A @ Z.double().abs()  # each entry's sum of the sizes of its terms
    before = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "medium"):
            torch.set_float32_matmul_precision(precision)
            out = torch.empty_like(Z)
            banded_laplacian_(Z, c, 1.0, out)
            assert torch.get_float32_matmul_precision() == precision
            err = ((out.double() - ref).abs() / scale).max()
            assert err < 4 * torch.finfo(torch.float32).eps, (precision, float(err))
    finally:
        torch.set_float32_matmul_precision(before)


def test_movielens_step_by_the_banded_method_matches_the_default(shared_data, tmp_path, monkeypatch):
    """Real ml-latest-small, float64, the PyTorch step (no native loops): the banded method gives the
    elementwise method's loss terms and gradients to rounding."""
    from goldstone_cli.data.movielens import load_movielens
    from goldstone_cli.models.movielens import SparseDynamicBernoulliMF

    data = load_movielens(str(shared_data / "movielens" / "ml-latest-small"), T=40, seed=0,
                          cache_dir=str(tmp_path), progress=False)
    res = []
    for method in ("elementwise", "banded"):
        monkeypatch.setitem(C.LAPLACIAN_METHOD, "cpu", method)
        model = SparseDynamicBernoulliMF(data, d=6, seed=0, dtype=torch.float64)
        model.native = False
        terms = model.loss_terms()
        (terms["local"] + 2.0 * terms["psi"]).backward()  # weights != 1: the backward's second product
        res.append(([float(terms[k].detach()) for k in ("local", "psi")], [model.U.grad, model.V.grad]))
    np.testing.assert_allclose(res[0][0], res[1][0], rtol=1e-13)
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("inference", ["map", "variational"])
def test_dwe_step_by_the_banded_method_matches_the_default(monkeypatch, inference):
    """DWE (T=70: one middle block), float64, the PyTorch step: the mean terms' ``gamma x + L x`` by
    the banded product give the elementwise method's loss and gradients to rounding."""
    from goldstone_cli.models.dwe import DynamicWordEmbeddings

    from test_dwe import _wc

    wc = _wc(V=40, T=70)
    res = []
    for method in ("elementwise", "banded"):
        monkeypatch.setitem(C.LAPLACIAN_METHOD, "cpu", method)
        model = DynamicWordEmbeddings(wc, d=4, inference=inference, batch_words=10, batch_contexts=12,
                                      dtype=torch.float64, test_mass=0.2)
        model.native = False
        terms = model.loss_terms(torch.Generator().manual_seed(0))
        terms["total"].backward()
        res.append((float(terms["total"].detach()), [p.grad for p in model.parameters()]))
    assert res[0][0] == pytest.approx(res[1][0], rel=1e-13)
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
