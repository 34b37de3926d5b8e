"""``torch.randn``'s float32 CPU numbers from the same generator, drawn faster (``normal.c``).

PyTorch fills a float32 CPU tensor of 16 or more numbers with MT19937 uniforms, then Box-Muller
transforms them in groups of 16, both on one thread. :func:`randn_` reads the generator's state
(``Generator.get_state()``: the engine's 624 words and its two counters), draws the same uniforms
in C, transforms the groups on every torch thread and writes the advanced state back, so the
numbers and the generator afterwards are those of ``torch.randn(..., generator=g, out=out)`` up to
float rounding of the transform (a few ulps; the uniforms and the state are exact).

The state layout is PyTorch's, not a public contract: the first use in a process draws a probe
with both (a private generator) and compares numbers and states; if they differ (a PyTorch that
changed its layout or algorithm), it warns once and :func:`randn_` calls ``torch.randn`` from then
on. Tensors it does not cover (other dtypes or devices, fewer than 16 numbers, non-contiguous) and
``GOLDSTONE_NATIVE=0`` go to ``torch.randn`` too.

Unlike ``torch.randn``, a draw here does not hold the generator's lock from reading its state to
writing it back: two Python threads drawing from one generator at the same time would get the same
numbers. (The models draw from one thread; give each thread its own generator otherwise.)
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

from goldstone_cli.kernels import native

# torch/csrc CPUGeneratorImpl's state: int64 seed, int32 left, int32 seeded, uint64 next, then the
# 624 engine words stored as uint64 (little-endian) from byte 24; later fields are left untouched
_STATE_BYTES = 5056
_LEFT, _NEXT, _WORDS, _N = 8, 16, 24, 624
_GROUP_MIN = 2048  # groups of 16 per thread (at least): 32k numbers
_lock = threading.Lock()
_probe: dict[str, bool] = {}


def _draw(lib, out: Tensor, gen: torch.Generator) -> None:
    """The C draw into the flat float32 tensor ``out`` (>= 16 numbers) from ``gen``, advancing it."""
    n = out.numel()
    state = gen.get_state()
    if state.numel() != _STATE_BYTES:
        raise RuntimeError(f"unexpected CPU generator state of {state.numel()} bytes")
    words = state[_WORDS:_WORDS + 8 * _N].view(torch.int32)[0::2].contiguous()  # the low halves: uint32 bits
    counters = torch.tensor([int(state[_LEFT:_LEFT + 4].view(torch.int32)),
                             int(state[_NEXT:_NEXT + 8].view(torch.int64))], dtype=torch.int64)
    tail = torch.empty(16 if n % 16 else 0, dtype=torch.float32)
    wp, lp, xp = ctypes.cast(words.data_ptr(), ctypes.c_void_p), native.ptr(counters, native.i64p), \
        ctypes.cast(counters.data_ptr() + 8, native.i64p)
    for t in (out, tail):  # the n uniforms, then torch's 16 fresh ones for a last partial group
        if t.numel() and lib.gs_mt19937_uniform_f32(wp, lp, xp, native.ptr(t), t.numel()) != 0:
            raise RuntimeError(f"CPU generator counters out of range: left {int(counters[0])}, next {int(counters[1])}")
    optr = native.ptr(out)
    native.parallel_columns(lambda g0, g1: lib.gs_box_muller_f32(optr, g0, g1), n // 16, min_cols=_GROUP_MIN)
    if tail.numel():  # torch redraws the last 16 places (after the full groups) as one group
        lib.gs_box_muller_f32(native.ptr(tail), 0, 1)
        out[n - 16:].copy_(tail)
    state[_WORDS:_WORDS + 8 * _N].view(torch.int32)[0::2] = words
    state[_LEFT:_LEFT + 4].view(torch.int32)[0] = int(counters[0])
    state[_NEXT:_NEXT + 8].view(torch.int64)[0] = int(counters[1])
    gen.set_state(state)


def _agrees(lib) -> bool:
    """One probe per process: the C draw against torch.randn on private generators (numbers to float
    rounding, the generator states afterwards byte for byte, a partial last group included)."""
    ok = True
    for seed, n in ((12345, 16 * 700 + 5), (7, 16 * 40)):
        a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        torch.randn(3, generator=a), torch.randn(3, generator=b)  # mid-block counters
        want = torch.randn(n, generator=a)
        got = torch.empty(n)
        try:
            _draw(lib, got, b)
        except RuntimeError:
            return False
        ok = ok and bool((got - want).abs().max() <= 1e-5) and torch.equal(a.get_state(), b.get_state())
    return ok


def _library():
    lib = native.library()
    if lib is None:
        return None
    with _lock:
        if "ok" not in _probe:
            _probe["ok"] = _agrees(lib)
            if not _probe["ok"]:
                warnings.warn("goldstone's native normal draws do not reproduce this PyTorch's torch.randn "
                              "(its generator changed); using torch.randn (same numbers, slower)", stacklevel=3)
    return lib if _probe["ok"] else None


def randn_(out: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """``torch.randn(out.shape, generator=generator, out=out)``: the same numbers (to float rounding)
    and the same generator state afterwards, in C where it can (float32, contiguous, CPU, >= 16
    numbers, a CPU generator or the default one), else by torch.randn itself. Returns ``out``.

    A tensor that requires grad goes to torch.randn too, which refuses it (RuntimeError, also under
    no_grad); after a C draw the version counter of ``out`` is bumped, so a backward pass that saved
    ``out`` before the draw raises instead of reading the new numbers."""
    gen = torch.default_generator if generator is None else generator
    covered = (out.dtype == torch.float32 and out.device.type == "cpu" and out.is_contiguous() and out.numel() >= 16
               and gen.device.type == "cpu" and not out.requires_grad)
    lib = _library() if covered else None
    if lib is None:
        return torch.randn(out.shape, generator=generator, out=out)
    _draw(lib, out.view(-1), gen)
    torch.autograd.graph.increment_version(out)  # written through data_ptr: autograd must see it
    return out
