"""Hand-written fused CPU loops, compiled on first use and loaded with ctypes (issue 16).

PyTorch's eager CPU operators each make one pass over memory; a loop that needs six of them (the
MovieLens gamma term, psi and their gradient), or a gather, a dot product, two transcendental
functions and two scatter-adds per rating, runs several times slower than one fused loop, and
``torch.compile`` did not close the gap on our CPU (docs/benchmarks.md, "Roofline (issue 16)").
The loops live in plain C files next to this module (``movielens.c``, ``dwe.c``, ``normal.c``), with no Python
or PyTorch headers, so they build in under a second with the system C compiler.

- Build: ``$CC`` (default ``cc``) with :data:`FLAGS` into ``$GOLDSTONE_CACHE/kernels/`` (default
  ``~/.cache/goldstone/kernels``), the file name keyed by the sources, the compiler, the flags and
  this CPU (``-march=native``), so machines sharing a home folder never load each other's builds.
  The library is written to a temporary name (host and pid) and renamed into place: a build that
  is interrupted or fails leaves nothing a later run would load; dead writers' temporaries on this
  host are removed; a cached library that does not load is built again once.
- Fallback: no compiler, a failed build or ``GOLDSTONE_NATIVE=0`` -> :func:`library` returns None
  and the callers run their PyTorch twins (same values up to float rounding; tests compare them).
  One warning says why, once per process, except for ``GOLDSTONE_NATIVE=0``.
- Threads: ctypes releases the GIL during a call, so :func:`parallel_ranges` runs one call per
  thread on disjoint ranges (as many threads as ``torch.get_num_threads()``).
- Floating point: no ``-ffast-math`` (NaN and infinity behave as in PyTorch); ``-fno-trapping-math``
  lets GCC vectorize the loops' branches, ``-fno-math-errno`` its square roots (no loop reads
  errno), ``-ffp-contract=fast`` use FMA.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import socket
import subprocess
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from goldstone_cli.io import pid_alive

SOURCES = ("movielens.c", "dwe.c", "normal.c")
HEADERS = ("fastmath.h",)  # included by the sources: part of the build key
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=fast", "-fopenmp-simd",
         "-shared", "-fPIC", "-std=c11")
# x86: whole AVX2 registers even where -march=native tunes for 128-bit ones (Zen 1): the DWE logits
# loop ran 8% faster with them on our EPYC
X86_FLAGS = ("-mprefer-vector-width=256",)
ENV_SWITCH = "GOLDSTONE_NATIVE"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded library or None; "pool": the thread pool
f32p = ctypes.POINTER(ctypes.c_float)
i64p = ctypes.POINTER(ctypes.c_int64)
f64p = ctypes.POINTER(ctypes.c_double)


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's pool threads and may inherit the lock held by another
    thread of the parent: start both afresh; the loaded library stays."""
    global _lock
    _lock = threading.Lock()
    _state.pop("pool", None)


os.register_at_fork(after_in_child=_after_fork_in_child)


def enabled() -> bool:
    """False if the user switched the native loops off (``GOLDSTONE_NATIVE=0``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("GOLDSTONE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "goldstone")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its instruction-set flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return platform.machine() + "\n" + "\n".join(sorted(set(keep)))


def _flags() -> tuple[str, ...]:
    return FLAGS + (X86_FLAGS if platform.machine().lower() in ("x86_64", "amd64") else ())


def _build(cc: str, rebuild: bool = False) -> Path:
    """Compile the sources into the cache (unless there already, or ``rebuild``) and return the
    library's path. Each writer compiles to ``<library>.<host>.<pid>.tmp`` and renames it into place;
    temporary files of writers on this host that no longer run are removed first."""
    here = Path(__file__).parent
    src = [here / s for s in SOURCES]
    headers = [here / h for h in HEADERS]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256()
    for part in [*(p.read_bytes() for p in src + headers), cc.encode(), version.encode(), " ".join(_flags()).encode(),
                 _cpu_signature().encode()]:
        key.update(part)
        key.update(b"\0")
    folder = cache_dir()
    lib = folder / f"goldstone_kernels-{key.hexdigest()[:20]}.so"
    if lib.is_file() and not rebuild:
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    stale = re.compile(re.escape(lib.name) + r"\.(.+)\.(\d+)\.tmp$")
    for p in folder.iterdir():
        m = stale.match(p.name)
        if m and m.group(1) == host and not pid_alive(int(m.group(2))):
            p.unlink(missing_ok=True)
    tmp = folder / f"{lib.name}.{host}.{os.getpid()}.tmp"
    try:
        res = subprocess.run([cc, *_flags(), "-o", str(tmp), *map(str, src), "-lm"], capture_output=True,
                             text=True, timeout=300)
        if res.returncode != 0 or not tmp.is_file():
            lines = (res.stderr or res.stdout).strip().splitlines()
            raise RuntimeError(f"{cc} exited with {res.returncode}" + (f": {lines[-1]}" if lines else ""))
        os.replace(tmp, lib)  # complete or absent: a later run never loads a half-written library
    finally:
        tmp.unlink(missing_ok=True)
    return lib


def _load(path: Path):
    lib = ctypes.CDLL(str(path))
    lib.gs_chain_quadratic_f32.argtypes = [f32p, f32p, f32p, f32p, ctypes.c_int64, ctypes.c_int64,
                                           ctypes.c_int64, ctypes.c_int64, f64p]
    lib.gs_chain_quadratic_f32.restype = None
    lib.gs_bernoulli_ratings_f32.argtypes = [f32p, f32p, i64p, i64p, f32p, ctypes.c_int64, ctypes.c_int64,
                                             ctypes.c_int64, ctypes.c_int64, ctypes.c_float, f32p, f32p]
    lib.gs_bernoulli_ratings_f32.restype = ctypes.c_double
    c64, c_d = ctypes.c_int64, ctypes.c_double
    lib.gs_chain_terms_fwd_f32.argtypes = [f32p, f32p, f32p, i64p, c64, f32p, c64, c64, c64, c64, c64,
                                           f32p, f32p, f32p, f32p, f32p, f32p, f64p, f64p, f64p]
    lib.gs_chain_terms_fwd_f32.restype = None
    lib.gs_chain_terms_bwd_f32.argtypes = [i64p, c64, f32p, f32p, f32p, f32p, f32p, f32p, f32p, c_d, f64p, c_d,
                                           c64, c64, c64, c64, c64, f32p, f32p, f32p, f32p, f32p, c64]
    lib.gs_chain_terms_bwd_f32.restype = None
    lib.gs_rows_gather_f32.argtypes = [f32p, i64p, c64, c64, c64, c64, c64, f32p]
    lib.gs_rows_gather_f32.restype = None
    lib.gs_rows_add_f32.argtypes = [f32p, i64p, c64, c64, c64, c64, c64, f32p]
    lib.gs_rows_add_f32.restype = None
    lib.gs_logits_block_f32.argtypes = [f32p, f32p, c64, c64, c64, c64, c64, f32p, i64p, i64p, i64p, f32p, f32p,
                                        c64, c64, c64, f32p, f32p, ctypes.c_float, f64p]
    lib.gs_logits_block_f32.restype = ctypes.c_int64
    lib.gs_block_positives.argtypes = [i64p, i64p, i64p, i64p, c64, c64, c64, c64, c64, i64p, i64p, i64p, i64p,
                                       f32p, f32p]
    lib.gs_block_positives.restype = ctypes.c_int64
    lib.gs_mt19937_uniform_f32.argtypes = [ctypes.c_void_p, i64p, i64p, f32p, c64]
    lib.gs_mt19937_uniform_f32.restype = ctypes.c_int64
    lib.gs_box_muller_f32.argtypes = [f32p, c64, c64]
    lib.gs_box_muller_f32.restype = None
    return lib


def library():
    """The loaded kernels, or None (switched off, no compiler, or the build failed: warned once)."""
    if not enabled():
        return None
    with _lock:
        if "lib" not in _state:
            cc = os.environ.get("CC", "cc")
            reason = None
            if shutil.which(cc) is None:
                reason = f"no C compiler ({cc!r} not found; set CC)"
            else:
                try:
                    try:
                        _state["lib"] = _load(_build(cc))
                    except OSError:  # a cached library this machine cannot load: build it again, once
                        _state["lib"] = _load(_build(cc, rebuild=True))
                except Exception as exc:  # build or load failed: the PyTorch twins run instead
                    reason = f"building them failed: {exc}"
            if reason is not None:
                _state["lib"] = None
                warnings.warn(f"goldstone's native CPU loops are not available, {reason}; using the PyTorch "
                              f"versions (same results, slower). CC names the C compiler, GOLDSTONE_CACHE a "
                              f"writable cache folder; {ENV_SWITCH}=0 silences this", stacklevel=3)
    return _state["lib"]


def usable(*tensors: Tensor | None, dtype: torch.dtype = torch.float32) -> bool:
    """True if the native loops can read these tensors: all of ``dtype``, contiguous, on the CPU
    (None entries are skipped)."""
    return all(t is None or (t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()) for t in tensors)


def refuse_overlap(outputs: dict[str, Tensor], inputs: dict[str, Tensor], what: str) -> None:
    """ValueError if two of the ``outputs`` (name: tensor) share memory, or one of them shares memory
    with one of the ``inputs``: a pass that writes its outputs while it reads its inputs (the native
    loops and their PyTorch twins alike) would read its own writes or add twice into one buffer,
    silently. ``coupling._may_overlap``: storages and byte ranges only, O(1) per pair, no pass over
    the data."""
    from goldstone_cli.optim.coupling import _may_overlap  # coupling imports this module

    outs = list(outputs.items())
    for i, (a, ta) in enumerate(outs):
        for b, tb in outs[i + 1:]:
            if _may_overlap(ta, tb):
                raise ValueError(f"{a} and {b} must not share memory ({what} writes both): pass separate buffers")
    for a, ta in outs:
        for b, tb in inputs.items():
            if tb is not None and _may_overlap(ta, tb):
                raise ValueError(f"{a} must not share memory with {b} ({what} reads {b} while it writes {a}): pass "
                                 "a separate buffer")


def ptr(t: Tensor | None, kind=f32p):
    return None if t is None else ctypes.cast(t.data_ptr(), kind)


def parallel_columns(fn, n_cols: int, min_cols: int = 1 << 15) -> list:
    """``fn(c0, c1)`` over disjoint column ranges covering ``[0, n_cols)``, one per torch thread (at
    least ``min_cols`` columns each), run concurrently (ctypes calls release the GIL); results in
    range order."""
    n = max(1, min(torch.get_num_threads(), n_cols // max(min_cols, 1)))
    return parallel_ranges(fn, [n_cols * i // n for i in range(n + 1)])


def parallel_ranges(fn, cuts: list[int]) -> list:
    """``fn(cuts[i], cuts[i + 1])`` for every i, concurrently on a thread pool (one range: in this
    thread); results in range order."""
    n = len(cuts) - 1
    if n <= 1:
        return [fn(cuts[0], cuts[-1])] if n == 1 else []
    with _lock:
        pool = _state.get("pool")
        if pool is None or pool._max_workers < n:
            pool = _state["pool"] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="goldstone-native")
    futures = [pool.submit(fn, cuts[i], cuts[i + 1]) for i in range(n)]
    return [f.result() for f in futures]
