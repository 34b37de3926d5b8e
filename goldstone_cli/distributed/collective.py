"""torch.distributed collectives whose tensors are freed on the calling (Python) thread.

gloo runs every collective on one of its worker threads, which drops its reference to the job (and
so to the job's tensors) just after it has woken the caller. When that reference is the last one,
the worker has to take the GIL to free the tensors' Python objects. If the caller has meanwhile
gone on to leave the interpreter (a script that ends with a gauge step, then
``destroy_process_group()``), the worker cannot, and the process dies with "terminate called
without an active exception" (SIGABRT) after all its work is done: torchrun then reports the run
as failed. ``destroy_process_group`` would join the workers first, but it only drops torch's own
references to the group, and ``import torch._dynamo`` (which every torch.optim optimizer does)
keeps one, so the workers live until the interpreter is torn down.

So each collective here is started with ``async_op=True``, waited for, and its ``Work`` kept until
the next collective replaces it: the worker's reference is then never the last, and the tensors
are freed here, in Python. The cost: the last collective's tensors live until the next one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist

_last_work: list[Any] = [None]  # the latest collective's Work (see the module docstring)


def run(collective_fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
    """``collective_fn(*args, **kwargs)`` (a ``torch.distributed`` collective), waited for; its
    ``Work`` is kept until the next call, so that its tensors are never freed by a backend thread."""
    work = collective_fn(*args, async_op=True, **kwargs)
    if work is not None:  # None: this rank is not a member of the group
        work.wait()
    _last_work[0] = work  # the previous Work (long finished) is freed here, on this thread


def last_work() -> Any:
    """The ``Work`` of the latest collective run here (None before the first)."""
    return _last_work[0]


# torch >= 2.12 names them *_single (the *_tensor names are deprecated); both take the ranks' blocks
# concatenated along dim 0
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
