import numpy as np
import pytest
import scipy.sparse as sp
import torch

from goldstone_cli.optim.coupling import Coupling


def _random_graph(T, rng):
    A = np.zeros((T, T))
    for t in range(T - 1):  # a chain plus a few long-range edges
        A[t, t + 1] = A[t + 1, t] = rng.uniform(0.5, 2)
    for _ in range(T // 2):
        a, b = rng.choice(T, 2, replace=False)
        A[a, b] = A[b, a] = rng.uniform(0.1, 1)
    return A


@pytest.mark.parametrize("kind", ["chain", "weighted_chain", "graph", "sparse"])
def test_psi_gradient_and_moments_match_dense_formulas(kind):
    rng = np.random.default_rng(0)
    T, N, d = 9, 6, 3
    if kind == "chain":
        c = Coupling.chain(T, 2.5)
    elif kind == "weighted_chain":
        c = Coupling.chain(T, rng.uniform(0.1, 3, T - 1))
    elif kind == "graph":
        c = Coupling.from_adjacency(_random_graph(T, rng))
    else:
        c = Coupling.from_adjacency(sp.csr_matrix(_random_graph(T, rng)))
    Z = torch.randn(T, N, d, dtype=torch.float64, requires_grad=True)
    Y = torch.randn(T, N + 2, d, dtype=torch.float64, requires_grad=True)
    L = c.laplacian()
    ref = 0.5 * torch.einsum("ts,tnd,snd->", L, Z, Z) + 0.5 * torch.einsum("ts,tnd,snd->", L, Y, Y)  # Eq. 3
    val = c.psi([Z, Y])
    assert torch.allclose(val, ref, rtol=1e-12)
    g = torch.autograd.grad(val, [Z, Y])
    g_ref = torch.autograd.grad(ref, [Z, Y])
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-12)
    M = c.pair_moments([Z, Y])
    for e in range(c.num_edges):
        s, t = c.src[e], c.dst[e]
        assert torch.allclose(M[e], Z[s].T @ Z[t] + Y[s].T @ Y[t])  # Eq. 15
    assert torch.allclose(c.self_moments(Z), torch.einsum("tnd,tne->tde", Z, Z))


def test_chain_laplacian_is_eq_7_and_pinv():
    c = Coupling.chain(5, 10.0)
    L = c.laplacian()
    expected = 10.0 * torch.tensor([[1, -1, 0, 0, 0], [-1, 2, -1, 0, 0], [0, -1, 2, -1, 0],
                                    [0, 0, -1, 2, -1], [0, 0, 0, -1, 1]], dtype=torch.float64)
    assert torch.equal(L, expected)
    P = c.laplacian_pinv()
    assert torch.allclose(L @ P @ L, L, atol=1e-12) and torch.allclose(P @ L @ P, P, atol=1e-12)
    assert torch.allclose(P.sum(1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    # the smallest nonzero eigenvalue of a chain is 2 lambda (1 - cos(pi/T))  (Sec. 3.3)
    ev = torch.linalg.eigvalsh(L)
    assert abs(ev[1] - 2 * 10 * (1 - np.cos(np.pi / 5))) < 1e-10


def test_structure_queries():
    assert Coupling.chain(6, 1.0).is_chain() and Coupling.chain(6, 1.0).is_forest()
    A = np.zeros((4, 4))
    A[0, 1] = A[1, 0] = A[1, 2] = A[2, 1] = A[2, 0] = A[0, 2] = 1.0
    c = Coupling.from_adjacency(A)
    assert not c.is_chain() and not c.is_forest() and not c.is_connected()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Coupling.chain(5, [1.0, 2.0]), "needs 4 edge weights"),
        (lambda: Coupling.from_adjacency(np.array([[0, 1], [2, 0]])), "symmetric"),
        (lambda: Coupling(3, [0], [3], [1.0]), "edge endpoints"),
        (lambda: Coupling(3, [0], [1], [-1.0]), "non-negative"),
        (lambda: Coupling(3, [1], [1], [1.0]), "self-loops"),
    ],
)
def test_bad_couplings_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_wrong_T_is_rejected():
    with pytest.raises(ValueError, match="T=4"):
        Coupling.chain(4, 1.0).psi(torch.zeros(5, 2, 2))
