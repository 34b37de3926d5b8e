"""Failures of one rank inside a loop whose ranks meet at a collective every step (the trainer).

What one rank alone does between two collectives (rank 0 writing metrics.csv, gauge.csv, snapshots.pt
or summary.json; a check on this rank's own data) may fail there only. Raising at once would leave
the other ranks waiting in their next collective until the process group's timeout (30 minutes by
default) wherever the failed process stays alive (a library caller, an in-process command line) and
with a 50-line "Connection closed by peer" traceback where it exits. So such code runs in
:meth:`LocalFailures.guard`, which keeps the first exception and lets the rank go on with the same
collectives as the others (guarded code must hold no collective, or one that raises on every rank
alike, as :func:`goldstone_cli.distributed.checkpoint.save` does). At the next point where the ranks
meet anyway, every rank adds :meth:`LocalFailures.flag` to the numbers it all-reduces there (the
trainer's per-step stop-signal all-reduce: no extra collective), and :meth:`LocalFailures.raise_if`
stops every rank together: the rank that failed first raises its error (:class:`TrainingStopped`, one
line), the others :class:`PeerRankError` with its message (the command line prints it once, on rank
0). Only then is a second collective run (gathering the messages), once per run.

On one process a failure is raised at once (nothing to agree on).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from goldstone_cli.distributed.errors import PeerRankError, TrainingStopped, exit_code_of
from goldstone_cli.distributed.shard import RowShard


class LocalFailures:
    """The first failure of this rank's own work since the ranks last agreed (see the module docstring).

    ``describe(exc, what)`` turns an exception of the guarded code ``what`` (e.g. "write metrics.csv
    at step 57") into the one-line message raised and printed; default: ``"rank R could not WHAT:
    Type: message"``."""

    def __init__(self, shard: RowShard, describe: Optional[Callable[[BaseException, str], str]] = None):
        self.shard = shard
        self.describe = describe or self._plain
        self.error: Optional[BaseException] = None
        self.message: Optional[str] = None

    def _plain(self, exc: BaseException, what: str) -> str:
        return f"rank {self.shard.rank} could not {what}: {type(exc).__name__}: {exc}"

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run the block; an exception (not KeyboardInterrupt: a second Ctrl-C aborts) is kept, the
        first one only, and raised at the next agreement; on one process it is raised at once.
        The block runs also after a failure: skipping it on one rank could skip a collective."""
        try:
            yield
        except Exception as exc:
            if self.error is None:
                self.error = exc
                try:
                    self.message = " ".join(str(self.describe(exc, what)).split())[:3000]
                except Exception as inner:  # noqa: BLE001 - the message must not hide the failure
                    self.message = f"{self._plain(exc, what)} (and describing it failed: {inner!r})"[:3000]
            if not self.shard.distributed:
                self._raise_own()

    @property
    def failed(self) -> bool:
        return self.error is not None

    def flag(self) -> float:
        """1.0 where this rank failed, else 0.0: all-reduce it with MAX (or SUM) at the next meeting."""
        return 1.0 if self.error is not None else 0.0

    def raise_if(self, agreed: float) -> None:
        """After the all-reduce of :meth:`flag` (``agreed`` > 0: some rank failed): stop every rank.
        Collective when ``agreed`` (every rank has the same value): the ranks' messages are gathered."""
        if not agreed:
            return
        if not self.shard.distributed:
            self._raise_own()
        mine = None if self.error is None else {"message": self.message, "code": exit_code_of(self._stopped())}
        told = self.shard.all_gather_json(mine, nbytes=1 << 16)  # the same on every rank; 3,000 characters escaped fit
        first = next((r for r, m in enumerate(told) if m is not None), None)
        if first is None:  # a flag without a message: cannot happen; never leave a rank running alone
            raise RuntimeError("a rank reported a failure but no message")
        if first == self.shard.rank:
            self._raise_own()
        raise PeerRankError(told[first]["message"], exit_code=int(told[first]["code"]))

    def agree(self) -> None:
        """A meeting of its own (one MAX all-reduce of the flag): where the ranks meet rarely anyway
        (a checkpoint, the end of the run), not every step."""
        if not self.shard.distributed:
            return
        flag = torch.tensor([self.flag()], device=self.shard.device or torch.device("cpu"))
        self.raise_if(float(self.shard.all_reduce_max_(flag).item()))

    def _stopped(self) -> TrainingStopped:
        return TrainingStopped(self.message)

    def _raise_own(self) -> None:
        raise self._stopped() from self.error
