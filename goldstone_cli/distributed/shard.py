"""Which rows of a ``(T, N, d)`` tensor this rank holds, and the collectives that move rows.

Rows are split into contiguous blocks with ``torch.chunk`` semantics: block size ``ceil(N / world)``,
rank ``r`` holds rows ``[r * b, min((r + 1) * b, N))``, so the last blocks may be shorter or empty.
This is exactly how a DTensor with placement ``Shard(1)`` splits a ``(T, N, d)`` tensor, which is what
lets torch.distributed.checkpoint save on N ranks and load on M (goldstone_cli.distributed.checkpoint).

``RowShard.single()`` is one process (rank 0 of 1, no group): every method is then the identity, so a
model has one code path for both cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from goldstone_cli.distributed import collective
from goldstone_cli.distributed.errors import PeerRankError, exit_code_of


@dataclass(frozen=True)
class RowShard:
    rank: int
    world: int
    group: Optional[dist.ProcessGroup] = None
    #: where small tensors for collectives live (CUDA for NCCL); None: the CPU (gloo)
    device: Optional[torch.device] = None

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} of world size {self.world}: need 0 <= rank < world size")

    @classmethod
    def single(cls) -> "RowShard":
        return cls(rank=0, world=1, group=None)

    @classmethod
    def from_dist(cls, d) -> "RowShard":
        """From a :class:`goldstone_cli.distributed.env.Dist` (``None``: one process)."""
        return cls.single() if d is None else cls(rank=d.rank, world=d.world, group=d.group, device=d.device)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def is_main(self) -> bool:
        return self.rank == 0

    # ---- row bookkeeping -------------------------------------------------------------------
    def block(self, n: int) -> int:
        """Rows per block: ``ceil(n / world)`` (torch.chunk / DTensor ``Shard`` semantics)."""
        return -(-n // self.world)

    def rows(self, n: int, rank: Optional[int] = None) -> tuple[int, int]:
        """``(start, stop)`` of ``rank``'s (default: this rank's) block of ``n`` rows."""
        r = self.rank if rank is None else rank
        b = self.block(n)
        start = min(r * b, n)
        return start, min(start + b, n)

    def local_size(self, n: int, rank: Optional[int] = None) -> int:
        start, stop = self.rows(n, rank)
        return stop - start

    def owner(self, index: Tensor, n: int) -> Tensor:
        """Rank holding each global row in ``index`` (a long tensor of rows in ``[0, n)``)."""
        return torch.div(index, max(self.block(n), 1), rounding_mode="floor")

    def take(self, full: Tensor, dim: int = 1) -> Tensor:
        """This rank's rows of a tensor that holds all ``full.shape[dim]`` rows (a view)."""
        start, stop = self.rows(full.shape[dim])
        return full.narrow(dim, start, stop - start)

    # ---- collectives (identity on one process) --------------------------------------------
    def all_reduce_sum_(self, t: Tensor, *, float64: bool = True) -> Tensor:
        """Sum ``t`` over ranks, in place; returns ``t``. With ``float64`` (default) lower-precision
        floating tensors are summed in float64 (scalars, moments); pass ``float64=False`` for large
        gradients where the extra traffic matters."""
        if not self.distributed:
            return t
        if float64 and t.is_floating_point() and t.dtype != torch.float64:
            buf = t.to(torch.float64)
            collective.run(dist.all_reduce, buf, op=dist.ReduceOp.SUM, group=self.group)
            t.copy_(buf)
        else:
            collective.run(dist.all_reduce, t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_reduce_max_(self, t: Tensor) -> Tensor:
        """Elementwise maximum over ranks, in place (flags: stop / diverged / interrupted)."""
        if self.distributed:
            collective.run(dist.all_reduce, t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def broadcast_(self, t: Tensor, src: int = 0) -> Tensor:
        """Overwrite ``t`` with rank ``src``'s copy, in place."""
        if self.distributed:
            root = dist.get_global_rank(self.group, src) if self.group is not None else src
            collective.run(dist.broadcast, t, src=root, group=self.group)
        return t

    def broadcast_json(self, msg: Any, nbytes: int = 8192, src: int = 0) -> Any:
        """Rank ``src``'s JSON-able ``msg`` on every rank (UTF-8 JSON in a zero-padded uint8 tensor of
        ``nbytes``: nothing is unpickled). A message too long for the buffer raises on ``src`` only
        after the others have received an error message, so no rank waits forever."""
        buf = torch.zeros(nbytes, dtype=torch.uint8)
        too_long = None
        if self.rank == src:
            raw = json.dumps(msg).encode()
            if len(raw) > nbytes:
                too_long = len(raw)
                raw = json.dumps({"ok": False, "error": f"message of {too_long} bytes > {nbytes}"}).encode()
            buf[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        buf = self.broadcast_(buf.to(self.device or "cpu"), src=src).cpu()
        if too_long is not None:
            raise ValueError(f"broadcast_json: the message has {too_long} bytes, more than nbytes={nbytes}")
        return json.loads(bytes(buf.numpy()).rstrip(b"\0").decode())

    def from_main(self, fn: Any, what: str, nbytes: int = 8192) -> Any:
        """``fn()`` run on rank 0 only, its JSON-able result on every rank (:meth:`broadcast_json`).
        An exception in ``fn`` is told to the other ranks (they raise :class:`PeerRankError`, "rank 0
        could not <what>: ...", which the command line does not print again) and re-raised on rank 0,
        so that no rank waits for a broadcast that never comes."""
        msg = None
        if self.rank == 0:
            try:
                msg = fn()
            except BaseException as e:  # re-raised after the other ranks have heard of it
                self.broadcast_json({"error": f"{type(e).__name__}: {e}"[:2000], "code": exit_code_of(e)}, nbytes)
                raise
        msg = self.broadcast_json({"result": msg}, nbytes)
        if "error" in msg:
            raise PeerRankError(f"rank 0 could not {what}: {msg['error']}", exit_code=int(msg.get("code", 2)))
        return msg["result"]

    def all_gather_json(self, msg: Any, nbytes: int = 1 << 16) -> list[Any]:
        """Every rank's JSON-able ``msg``, in rank order, on every rank (UTF-8 JSON in zero-padded
        uint8 tensors of ``nbytes``, all-gathered: nothing is unpickled). A message too long for the
        buffer raises on its rank after the gather (the others see ``None`` for it)."""
        raw = json.dumps(msg).encode()
        too_long = len(raw) > nbytes
        if too_long:
            raw = b"null"
        if not self.distributed:
            out = [json.loads(raw)]
        else:
            buf = torch.zeros(nbytes, dtype=torch.uint8)
            buf[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            dev = self.device or torch.device("cpu")
            gathered = torch.empty(self.world * nbytes, dtype=torch.uint8, device=dev)
            collective.run(collective.all_gather_single, gathered, buf.to(dev), group=self.group)
            flat = gathered.cpu().numpy()
            out = [json.loads(bytes(flat[r * nbytes:(r + 1) * nbytes]).rstrip(b"\0").decode())
                   for r in range(self.world)]
        if too_long:
            raise ValueError(f"all_gather_json: the message has more than nbytes={nbytes} bytes")
        return out

    def barrier(self) -> None:
        if self.distributed:
            collective.run(dist.barrier, group=self.group)

    def all_gather_rows(self, local: Tensor, n: int, dim: int = 1) -> Tensor:
        """The full tensor (``n`` rows along ``dim``) from every rank's block ``local``."""
        if local.shape[dim] != self.local_size(n):
            raise ValueError(f"rank {self.rank} holds {local.shape[dim]} rows along dim {dim}, but its block "
                             f"of {n} rows has {self.local_size(n)}")
        if not self.distributed:
            return local
        b = self.block(n)
        padded = _pad_rows(local.contiguous(), b, dim)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        collective.run(dist.all_gather, parts, padded, group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, n).contiguous()  # callers view() it (padding: not contiguous)

    def reduce_scatter_rows(self, full: Tensor, dim: int = 1) -> Tensor:
        """Every rank passes a full-size tensor (e.g. a gradient of all rows); returns this rank's
        block of their sum (half the traffic of all_reduce + take)."""
        if not self.distributed:
            return full
        n = full.shape[dim]
        b = self.block(n)
        rows_first = _pad_rows(full.movedim(dim, 0), b * self.world, 0).contiguous()  # (world*b, ...)
        out = torch.empty((b,) + tuple(rows_first.shape[1:]), dtype=full.dtype, device=full.device)
        collective.run(collective.reduce_scatter_single, out, rows_first, op=dist.ReduceOp.SUM, group=self.group)
        return out.narrow(0, 0, self.local_size(n)).movedim(0, dim)

    def gather_rows(self, local: Tensor, n: int, dim: int = 1) -> Tensor:
        """Differentiable :meth:`all_gather_rows`: the backward pass reduce-scatters the gradient of the
        full tensor, so each rank's local rows get the sum over ranks of their gradients."""
        if not self.distributed:
            return local
        return _GatherRows.apply(local, self, int(n), int(dim))

    def all_gather_varlen(self, local: Tensor) -> Tensor:
        """Concatenation (rank order, along dim 0) of tensors whose first dimension differs by rank."""
        if not self.distributed:
            return local
        size = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        collective.run(dist.all_gather, sizes, size, group=self.group)
        sizes = [int(s) for s in sizes]
        padded = _pad_rows(local.contiguous(), max(sizes), 0)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        collective.run(dist.all_gather, parts, padded, group=self.group)
        return torch.cat([p[:k] for p, k in zip(parts, sizes)], dim=0)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: Tensor, shard: RowShard, n: int, dim: int) -> Tensor:
        ctx.shard, ctx.dim = shard, dim
        return shard.all_gather_rows(local, n, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.shard.reduce_scatter_rows(grad.contiguous(), ctx.dim), None, None, None


def _pad_rows(t: Tensor, rows: int, dim: int) -> Tensor:
    """``t`` with zero rows appended along ``dim`` up to ``rows``."""
    missing = rows - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)
