"""Errors of a run on several ranks, and which rank tells the user about them.

Most errors of a distributed run are raised on every rank alike (a bad setting, a checkpoint that
does not fit), or on rank 0 and then told to the others (:class:`PeerRankError`); the command line
prints them once, on rank 0. An error of one rank alone (:class:`RankError`) is printed by that rank.
"""

from __future__ import annotations


class PeerRankError(ValueError):
    """Raised on ranks > 0 for an error that rank 0 had and reported itself (the message repeats
    rank 0's, for logs and library callers): the command line prints nothing for it and exits with
    ``exit_code``, the code rank 0 exits with (2 for the errors it prints in one line, 1 otherwise).
    Inside the training loop (:class:`~goldstone_cli.distributed.failures.LocalFailures`) it is also
    raised on rank 0 for another rank's error: rank 0 prints it there, and the rank that had the error
    raises its own :class:`TrainingStopped` in silence, so the message is printed once, by rank 0."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class TrainingStopped(ValueError):
    """A failure of one rank inside the training loop (rank 0 could not write metrics.csv, a check on
    this rank's own data) that stopped every rank at the next step: one line naming what failed, the
    last checkpoint and how to continue. Raised on the rank that had it (the original exception is its
    ``__cause__``); the other ranks raise :class:`PeerRankError` with the same message."""


class RankError(ValueError):
    """An error of this rank alone (e.g. its local rank has no GPU): printed by the rank that raises it."""


def exit_code_of(exc: BaseException) -> int:
    """The code ``goldstone train`` (cli.py) exits with for ``exc`` raised before training: 2 for the
    errors it prints in one line (ValueError, FileNotFoundError, NotADirectoryError), else 1 (a traceback)."""
    if isinstance(exc, PeerRankError):
        return exc.exit_code
    return 2 if isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError)) else 1
