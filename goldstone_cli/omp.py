"""OpenMP's wait policy for processes that mix PyTorch's parallel operators with the native loops.

After a parallel operator (e.g. MKL's matmul), PyTorch's OpenMP worker threads keep spinning for a
while; the native C loops (``goldstone_cli/kernels``) then run their second thread on a core that a
spinning worker holds: measured on the 2-core machine, a 4M-logit pass right after a matmul took
10.8 ms on two threads against 5.9 ms without the matmul (11.2 ms on one thread). With
``OMP_WAIT_POLICY=PASSIVE`` idle workers sleep instead: 6.2 ms, and whole steps on two threads got
faster (DWE V=2,000 variational 1.98 -> 1.87 s, MovieLens ml-latest-small 58 -> 54 ms). This module
imports nothing heavy: it must run before torch is imported (OpenMP reads the variable once, when
it is loaded)."""

from __future__ import annotations

import os
import sys


def prefer_passive_wait() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy or torch is already imported
    (then it could no longer take effect). Returns True if it was set here."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
