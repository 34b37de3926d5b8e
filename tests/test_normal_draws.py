"""Issue 16: the C normal draws (goldstone_cli/kernels/normal.c) give torch.randn's numbers and leave
the generator where torch.randn leaves it; everything they do not cover goes to torch.randn."""

import math
import warnings

import pytest
import torch

from goldstone_cli.kernels import native, normal


@pytest.fixture
def used(monkeypatch):
    """The native functions called during the test (a fresh probe; skipped without the library)."""
    lib = native.library()
    if lib is None:
        pytest.skip("the native loops are not built here")
    names = set()

    class Recorder:
        def __getattr__(self, name):
            names.add(name)
            return getattr(lib, name)

    monkeypatch.setitem(native._state, "lib", Recorder())
    monkeypatch.setattr(normal, "_probe", {})
    return names


def _pair(seed, warm=0):
    a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    if warm:  # counters in the middle of the engine's 624-word block
        torch.rand(warm, generator=a), torch.rand(warm, generator=b)
    return a, b


@pytest.mark.parametrize("n", [16, 17, 31, 32, 1000, 624 * 16 + 3, 100 * 1000 * 100])
@pytest.mark.parametrize("warm", [0, 5, 623])
def test_same_numbers_and_state_as_torch_randn(n, warm, used):
    a, b = _pair(n + warm, warm)
    want = torch.randn(n, generator=a)
    got = normal.randn_(torch.empty(n), b)
    assert {"gs_mt19937_uniform_f32", "gs_box_muller_f32"} <= used
    assert torch.equal(a.get_state(), b.get_state())  # the engine advanced exactly as torch's
    err = (got - want).abs()
    assert float(err.max()) <= 2e-6 and float((err / want.abs().clamp_min(1.0)).max()) <= 1e-6
    # later draws from either generator stay the same numbers
    assert torch.equal(torch.rand(50, generator=a), torch.rand(50, generator=b))


def test_box_muller_against_float64_from_the_same_uniforms(used):
    """Independent of torch.randn: torch's uniforms of the same seed, transformed in float64."""
    n = 16 * 50_000 + 9  # a partial last group: its 16 places are drawn again
    g = torch.Generator().manual_seed(11)
    got = normal.randn_(torch.empty(n), g).double()
    u = torch.rand(n + 16, generator=torch.Generator().manual_seed(11)).double()

    def groups(v):  # (k, 16) uniforms -> normals, the first 8 from cos, the last 8 from sin
        r = torch.sqrt(-2.0 * torch.log(1.0 - v[:, :8]))
        th = (torch.tensor(2.0 * math.pi, dtype=torch.float32) * v[:, 8:].float()).double()  # 2 pi u2 in float32
        return torch.cat([r * torch.cos(th), r * torch.sin(th)], 1)

    want = groups(u[: n // 16 * 16].reshape(-1, 16)).reshape(-1)
    want = torch.cat([want, torch.zeros(n - want.numel(), dtype=torch.float64)])
    want[n - 16:] = groups(u[n:].reshape(1, 16)).reshape(-1)
    assert float((got - want).abs().max()) <= 2e-6
    assert abs(float(got.mean())) < 5e-3 and abs(float(got.var()) - 1.0) < 5e-3


def test_default_generator_and_shapes(used):
    state = torch.get_rng_state()
    try:
        torch.manual_seed(3)
        want = torch.randn(7, 300, 5)
        after = torch.get_rng_state()
        torch.manual_seed(3)
        got = normal.randn_(torch.empty(7, 300, 5))  # generator None: the default one, as torch.randn
        assert torch.equal(torch.get_rng_state(), after)
        assert float((got - want).abs().max()) <= 2e-6
    finally:
        torch.set_rng_state(state)


def test_threads_give_the_one_thread_numbers(used):
    n = 16 * 200_000
    threads = torch.get_num_threads()
    try:
        outs = []
        for k in (1, 3):
            torch.set_num_threads(k)
            outs.append(normal.randn_(torch.empty(n), torch.Generator().manual_seed(2)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("case", ["float64", "strided", "short"])
def test_what_it_does_not_cover_goes_to_torch_randn_exactly(case, used):
    a, b = _pair(4)
    if case == "float64":
        want, out = torch.randn(1000, generator=a, dtype=torch.float64), torch.empty(1000, dtype=torch.float64)
    elif case == "strided":
        want = torch.randn(500, 2, generator=a, out=torch.empty(2, 500).t())  # torch's strided path
        out = torch.empty(2, 500).t()
    else:
        want, out = torch.randn(15, generator=a), torch.empty(15)
    got = normal.randn_(out, b)
    assert got is out and torch.equal(got, want) and torch.equal(a.get_state(), b.get_state())
    assert not used


def test_switched_off_it_is_torch_randn(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    a, b = _pair(5)
    assert torch.equal(normal.randn_(torch.empty(4000), b), torch.randn(4000, generator=a))


def test_a_generator_it_cannot_reproduce_warns_once_and_falls_back(used, monkeypatch):
    """A PyTorch whose generator state differs (simulated: another state size) fails the probe."""
    monkeypatch.setattr(normal, "_STATE_BYTES", 5000)
    a, b = _pair(6)
    with pytest.warns(UserWarning, match="do not reproduce"):
        got = normal.randn_(torch.empty(4000), b)
    assert torch.equal(got, torch.randn(4000, generator=a)) and torch.equal(a.get_state(), b.get_state())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normal.randn_(torch.empty(4000), b)  # no second warning
    assert normal._probe == {"ok": False}


def test_autograd_sees_a_c_draw_and_a_tensor_that_requires_grad_is_refused(used):
    """The C draw writes through the data pointer: it bumps the version counter, so a backward pass
    that saved the tensor before a draw into it (here through a detached view) raises instead of
    giving a silently wrong gradient; a tensor that requires grad is refused as torch.randn refuses it."""
    a = torch.ones(64, requires_grad=True)
    c = a.exp()  # exp saves its output c for backward
    before = c._version
    normal.randn_(c.detach())  # shares c's storage and version counter
    assert "gs_box_muller_f32" in used and c._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        c.sum().backward()
    for t in (torch.ones(64, requires_grad=True), torch.ones(64, requires_grad=True).exp()):
        with pytest.raises(RuntimeError, match="require grad") as want:
            torch.randn(t.shape, out=t)
        with pytest.raises(RuntimeError, match="require grad") as got:
            normal.randn_(t)
        assert str(got.value) == str(want.value)
