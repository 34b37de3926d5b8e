"""Peak memory of a training step, predicted before the model is made, and the check that refuses
a run that cannot fit (a dense (T, V, d) model at the paper's size needs tens of GB: better a
one-line error at once than an out-of-memory kill, or a swap storm, an hour in).

The DWE model below is the one docs/benchmarks.md ("Peak memory") fits to measured peaks (within 6%
on the CPU; 25.9 vs 26.1 GB on an H200); ``bench/dwe_scale.py --memory-model`` prints its predictions. The sharded DWE model
(``trainer.distributed=true``, :func:`dwe_sharded_peak_bytes`) is counted per rank, and the ranks that
share one host's RAM (or one GPU) are checked together (:func:`check_sharded_dwe_fits`).
"""

from __future__ import annotations

import math
import socket
from pathlib import Path
from typing import Optional, Sequence

import torch

from goldstone_cli.io import proc_kib_field

#: saved (T, B, d) minibatch tensors per side (words, contexts) of the current DWE step on the CPU
#: (the fused chain pass keeps 1/b, sigmoid(raw), a, y, s; fitted to V=2,000 variational: 3.13 GB)
SAVED_PER_SIDE_FUSED = {"variational": 14, "map": 5}
#: the same for the autograd recurrences (the GPU path, and the paths before issue 16)
SAVED_PER_SIDE = {"variational": 17, "map": 5}
#: the CPU process's own footprint (torch's libraries, the interpreter)
RUNTIME_CPU = 0.4e9
#: the logits are formed this many elements at a time (two blocks live at once)
LOGITS_CHUNK = {"cpu": 1 << 22, "cuda": 1 << 26}


def dwe_n_params(V: int, T: int, d: int, variational: bool) -> int:
    """Parameters: means of words and contexts (2 T V d); variational adds their diagonals and
    off-diagonals (2 T V d + 2 (T-1) V d)."""
    return 2 * T * V * d + ((2 * T * V * d + 2 * (T - 1) * V * d) if variational else 0)


def dwe_peak_bytes(V: int, T: int, d: int, batch: int, nnz: float, variational: bool, device: str = "cpu",
                   moments: int = 2, itemsize: int = 4, saved_per_side: Optional[int] = None,
                   logits_elems: Optional[float] = None, foreach_sqrt: bool = False) -> dict:
    """Predicted peak (bytes) of one DWE training step, by component.

    ``state``: parameters and ``moments`` optimizer buffers per parameter (Adam 2, AdaGrad 1, GD 0);
    ``grads``: one more; ``transient``: a mean's gradient arrives in parts that autograd adds (one
    (T, V, d) tensor); ``counts``: 12 bytes per stored nonzero on the device + 8 per row (on the CPU
    also the split's scipy copy, 12 more); ``activations``: the saved (T, B, d) minibatch tensors and
    two blocks of logits. The activations live while the gradients are formed, which come last:
    ``state + counts + max(activations, grads + transient)`` (+ the CPU runtime). ``foreach_sqrt``:
    ``torch.optim.Adam``'s foreach update holds the square root of every second moment at once."""
    n = dwe_n_params(V, T, d, variational)
    state, grads, transient = (1 + moments) * itemsize * n, itemsize * n, itemsize * T * V * d
    counts = (24 if device == "cpu" else 12) * nnz + 8 * T * V
    if saved_per_side is None:
        saved_per_side = (SAVED_PER_SIDE_FUSED if device == "cpu" else SAVED_PER_SIDE)[
            "variational" if variational else "map"]
    if logits_elems is None:
        logits_elems = 2 * min(LOGITS_CHUNK.get(device, LOGITS_CHUNK["cuda"]), T * batch * batch)
    act = itemsize * (2 * saved_per_side * T * batch * d + logits_elems)
    total = state + counts + max(act, grads + transient)
    if foreach_sqrt:
        total = max(total, state + grads + itemsize * n + counts)
    total += RUNTIME_CPU if device == "cpu" else 0
    return {"parameters": n, "state": state, "grads": grads, "transient": transient, "counts": counts,
            "activations": act, "total": total}


#: a (T, V, d) mean of the sharded model with at most this many numbers is drawn whole (float64) on
#: every rank, which keeps its rows (``dwe_sharded.FULL_INIT_MAX``); a larger one one step at a time
SHARDED_FULL_INIT_MAX = 1 << 27


def dwe_sharded_peak_bytes(V: int, T: int, d: int, batch_words: int, batch_contexts: int, nnz_local: float,
                           world: int, variational: bool, device: str = "cpu", moments: int = 2, itemsize: int = 4,
                           rows: Optional[int] = None, saved_per_side: Optional[int] = None,
                           full_init_max: int = SHARDED_FULL_INIT_MAX) -> dict:
    """Predicted peak (bytes) of ONE rank of the sharded DWE model (``dwe_sharded.py``, word and context
    rows split over ``world`` ranks), by component, as :func:`dwe_peak_bytes`. ``rows``: this rank's
    words (default the largest block, ``ceil(V / world)``); ``nnz_local``: its stored training nonzeros.

    What one rank allocates (counted from ``ShardedDynamicWordEmbeddings``):

    - ``state``, ``grads``, ``transient``: those of :func:`dwe_peak_bytes` for its ``rows`` rows;
    - ``counts``: its rows' nonzeros (12 bytes each on the device; on the CPU the split's scipy copy,
      12 more), the stacked CSR's row offsets (8 T rows), and, on every rank alike, the row sums ``c`` and
      the negatives' ``c^0.75`` of ALL words (2 itemsize T V; on the CPU also the split's float64 ``c``,
      8 T V);
    - ``activations``: the saved minibatch tensors of its share of the minibatch (``rows / V`` of the
      ``batch_words`` words and of the ``batch_contexts`` contexts), its two logits blocks, and what every
      rank holds in full: the gathered (T, Q, d) context block with its gradient, the gather's and the
      reduce-scatter's buffers (4 T Q d), and (variational) the noise of the whole minibatch
      ((T, P, d) + (T, Q, d), drawn on every rank so that the draw does not depend on the rank count);
    - ``init`` (CPU only: the start is drawn there): each mean drawn for the whole vocabulary in float64
      (8 T V d; above ``full_init_max`` numbers one step at a time, 8 V d, its T row blocks stacked:
      16 T rows d), scaled (8 T rows d) and cast (itemsize T rows d), with the first mean already made.

    On the CPU the step holds ``state + counts + activations + 2 grads + transient`` with ``transient`` four
    (T, rows, d) gradient parts of the means (fitted to measured peaks of 2 gloo ranks within 4%,
    docs/benchmarks.md "Peak memory"); on a GPU ``state + counts + max(activations, grads + transient)``
    as :func:`dwe_peak_bytes`. ``total = max(init, step)`` (+ the CPU runtime)."""
    cpu = device == "cpu"
    n = -(-V // world) if rows is None else int(rows)
    share = n / V if V else 0.0
    P, Q = min(batch_words, V), min(batch_contexts, V)
    P_r, Q_r = math.ceil(P * share), math.ceil(Q * share)
    n_par = dwe_n_params(n, T, d, variational)
    state, grads, transient = (1 + moments) * itemsize * n_par, itemsize * n_par, itemsize * T * n * d
    counts = (24 if cpu else 12) * nnz_local + 8 * T * n + 2 * itemsize * T * V + (8 * T * V if cpu else 0)
    if saved_per_side is None:
        saved_per_side = (SAVED_PER_SIDE_FUSED if cpu else SAVED_PER_SIDE)["variational" if variational else "map"]
    logits = 2 * min(LOGITS_CHUNK["cpu" if cpu else "cuda"], T * P_r * Q)
    replicated = 4 * T * Q * d + ((P + Q) * T * d if variational else 0)
    act = itemsize * (saved_per_side * T * d * (P_r + Q_r) + logits + replicated)
    if cpu:  # measured (docs/benchmarks.md, "Peak memory"): the pooled minibatch buffers stay, and
        # the gradients are formed beside them: twice (dense from the gathers' backward, then kept) with
        # two more (T, rows, d) parts for each mean (zero-mean term and psi); glibc keeps the freed blocks
        transient = 4 * itemsize * T * n * d
        step = state + counts + act + 2 * grads + transient
    else:  # the one-process model's (the caching allocator reuses the activations' memory)
        step = state + counts + max(act, grads + transient)
    if not cpu:
        init = 0
    elif T * V * d <= full_init_max:
        init = counts + 8 * T * V * d + (8 + 2 * itemsize) * T * n * d
    else:
        init = counts + 8 * V * d + (16 + 2 * itemsize) * T * n * d
    total = max(step, init) + (RUNTIME_CPU if cpu else 0)
    return {"parameters": n_par, "rows": n, "state": state, "grads": grads, "transient": transient, "counts": counts,
            "activations": act, "init": init, "step": step, "total": total}


#: the one-process MovieLens run's own footprint on the CPU (the command line's imports and the cached
#: loader's; measured 0.24 GB after imports, fitted 0.3 GB with the rest below)
RUNTIME_CPU_MOVIELENS = 0.3e9
#: bytes per rating of the loaded data on the host (``MovieLensData``: user, item, bin int64, x, split
#: int8) and, besides x, on the device (each split's flat U row and V row, int64)
RATING_HOST, RATING_INDEX = 26, 16
#: bytes per evaluated rating besides the gathered rows (logits, the AUC's sort, ranks and groups)
EVAL_PER_RATING = 40


def movielens_peak_bytes(n_users: int, n_items: int, T: int, d: int, n_ratings: int, n_train: int, n_eval: int,
                         device: str = "cpu", moments: int = 1, itemsize: int = 4, batch_size: Optional[int] = None,
                         chunk: int = 1 << 20) -> dict:
    """Predicted peak (bytes) of a one-process ``model=movielens`` run (``models/movielens.py``), by
    component, fitted to measured peaks of real runs (docs/benchmarks.md, "Peak memory": steps with
    the optimizer's update, gauge steps and an evaluation).

    ``parameters``: U (T, n_users, d) and V (T, n_items, d); ``state``: them and ``moments`` optimizer
    buffers per parameter (AdaGrad 1, Adam 2, GD 0); ``grads``: the reused gradient buffers (one more
    copy, kept between steps); ``transient``: one more copy of the parameters (the start's draw, the
    optimizer's and the gauge step's temporaries: measured); ``counts``: the ratings, ``n_ratings`` of
    all splits, on the host (26 bytes each) and on the device (16 + itemsize); on a GPU also the
    training ratings' row groups of the gradient pass (16 + itemsize per training rating) and four
    (chunk, d) blocks; a minibatch (``batch_size``) adds its indices and gathered ratings;
    ``activations``: the evaluation of the larger held-out split (``n_eval`` ratings): its two gathered
    (min(chunk, n_eval), d) blocks and 40 bytes per rating.
    ``total = state + grads + transient + counts + activations`` (+ the CPU runtime)."""
    cpu = device == "cpu"
    n_par = T * (n_users + n_items) * d
    state, grads, transient = (1 + moments) * itemsize * n_par, itemsize * n_par, itemsize * n_par
    counts = RATING_HOST * n_ratings + (RATING_INDEX + itemsize) * n_ratings
    if batch_size is not None and batch_size < n_train:
        counts += (8 + RATING_INDEX + itemsize) * batch_size
    if not cpu:
        counts += (RATING_INDEX + itemsize) * n_train + 4 * itemsize * min(chunk, n_train) * d
    act = 2 * itemsize * min(chunk, n_eval) * d + EVAL_PER_RATING * n_eval
    total = state + grads + transient + counts + act + (RUNTIME_CPU_MOVIELENS if cpu else 0)
    return {"parameters": n_par, "state": state, "grads": grads, "transient": transient, "counts": counts,
            "activations": act, "total": total}


# ----------------------------------------------------------------------------- what the machine has
def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _meminfo_available() -> Optional[int]:
    return proc_kib_field("/proc/meminfo", "MemAvailable")


def _cgroup_available() -> Optional[int]:
    """Room left under this process's cgroup memory limit (a container's or a Slurm job's), if any."""
    v2 = Path("/sys/fs/cgroup")
    limit, used = _read_int(v2 / "memory.max"), _read_int(v2 / "memory.current")
    if limit is None:  # cgroup v1
        v1 = v2 / "memory"
        limit, used = _read_int(v1 / "memory.limit_in_bytes"), _read_int(v1 / "memory.usage_in_bytes")
        if limit is not None and limit >= 1 << 60:  # v1's "no limit"
            limit = None
    if limit is None or used is None:
        return None
    return max(0, limit - used)


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory a new allocation can take now: the GPU's free memory, or on the CPU the smaller of
    MemAvailable and the room under the cgroup limit; None where it cannot be read."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    values = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(values) if values else None


def optimizer_moments(opt_cfg) -> int:
    """Per-parameter buffers of the configured optimizer (Goldstone-GD: its base's)."""
    value = lambda v: str(getattr(v, "value", v))  # an enum of the structured config, or a plain string
    name = value(opt_cfg.get("name"))
    if name == "goldstone":
        name = value(opt_cfg.get("base") or "gd")
    if name == "adam":
        return 2
    if name == "adagrad":
        return 1
    return 1 if float(opt_cfg.get("momentum") or 0) > 0 else 0


class DoesNotFit(ValueError):
    """A run whose predicted peak memory exceeds what its device has (a config error: one line)."""


#: the predicted peak must stay below this share of the available memory: the model is within 6% of
#: measured peaks, and other processes allocate while a run starts
MARGIN = 0.95


def check_fits(need: dict, device: torch.device, what: str, hint: str) -> None:
    """Raise DoesNotFit (one line) when the predicted peak ``need["total"]`` exceeds :data:`MARGIN`
    of what ``device`` has available now; silent when that cannot be read."""
    have = available_bytes(device)
    if have is None or need["total"] <= MARGIN * have:
        return
    gb = lambda b: f"{b / 1e9:.1f} GB"
    where = "free on the GPU" if device.type == "cuda" else "available in RAM"
    raise DoesNotFit(f"{what} needs about {gb(need['total'])} at its peak (parameters and optimizer state "
                      f"{gb(need['state'])}, gradients {gb(need['grads'])}, counts {gb(need['counts'])}): more than "
                      f"{MARGIN:.0%} of the {gb(have)} {where}; use {hint} (trainer.memory_check=false tries anyway)")


def _dwe_sizes(V: int, cfg, device: torch.device, dtype: torch.dtype) -> tuple[bool, int, int, dict]:
    """(variational, minibatch words, minibatch contexts, the keyword arguments of the peak models)."""
    m = cfg.model
    P = V if int(m.batch_words) <= 0 else min(int(m.batch_words), V)
    Q = V if int(m.batch_contexts) <= 0 else min(int(m.batch_contexts), V)
    moments = optimizer_moments(cfg.optimizer) if cfg.get("optimizer") is not None else 2  # none given: Adam's
    kw = dict(moments=moments, itemsize=torch.finfo(dtype).bits // 8,
              device="cuda" if device.type == "cuda" else "cpu")
    return str(m.inference) == "variational", P, Q, kw


def _join(hints: list[str]) -> str:
    return ", ".join(hints[:-1]) + " or " + hints[-1] if len(hints) > 1 else hints[0]


def check_dwe_fits(V: int, T: int, nnz: int, cfg, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a DWE run of ``cfg`` (V words, T steps, nnz stored co-occurrence counts) whose step
    would not fit ``device`` (one process; the sharded model: :func:`check_sharded_dwe_fits`)."""
    m = cfg.model
    variational, P, Q, kw = _dwe_sizes(V, cfg, device, dtype)
    batch = max(P, Q)
    need = dwe_peak_bytes(V, T, int(m.d), batch, nnz, variational, **kw)
    hints = []
    if variational:
        hints.append(f"model=dwe_map (about {dwe_peak_bytes(V, T, int(m.d), batch, nnz, False, **kw)['total'] / 1e9:.1f} GB)")
    hints += ["a smaller data.vocab_size or model.d"]
    if device.type == "cpu":
        hints.append("a GPU (trainer.device=cuda)")
    hints.append("several processes (trainer.distributed=true, docs/scaling.md)")
    check_fits(need, device, f"model=dwe ({m.inference}, V={V:,}, T={T}, d={m.d}, {str(dtype).replace('torch.', '')})",
               _join(hints))


def check_movielens_fits(data, cfg, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a one-process ``model=movielens`` run of ``cfg`` on the loaded ``data`` (a ``MovieLensData``:
    the number of ratings is known) whose peak would not fit ``device``, before U and V are made."""
    import numpy as np

    m = cfg.model
    split = np.asarray(data.split)
    n_train = int((split == 0).sum())
    n_eval = max(int((split == 1).sum()), int((split == 2).sum()))
    moments = optimizer_moments(cfg.optimizer) if cfg.get("optimizer") is not None else 1  # none given: AdaGrad's
    kw = dict(moments=moments, itemsize=torch.finfo(dtype).bits // 8, device="cuda" if device.type == "cuda" else "cpu",
              batch_size=None if m.get("batch_size") is None else int(m.batch_size), chunk=int(m.chunk_size))
    T, d, nu, ni = int(data.T), int(m.d), int(data.n_users), int(data.n_items)
    need = movielens_peak_bytes(nu, ni, T, d, len(split), n_train, n_eval, **kw)
    half_d = movielens_peak_bytes(nu, ni, T, max(1, d // 2), len(split), n_train, n_eval, **kw)["total"]
    half_t = movielens_peak_bytes(nu, ni, max(2, T // 2), d, len(split), n_train, n_eval, **kw)["total"]
    hints = [f"a smaller model.d (model.d={max(1, d // 2)}: about {half_d / 1e9:.1f} GB) or data.T "
             f"(data.T={max(2, T // 2)}: about {half_t / 1e9:.1f} GB)"]
    if device.type == "cpu":
        hints.append("a GPU (trainer.device=cuda)")
    hints.append("several processes (trainer.distributed=true, docs/scaling.md)")
    check_fits(need, device, f"model=movielens ({nu:,} users, {ni:,} items, {len(split):,} ratings, T={T}, d={d}, "
                             f"{str(dtype).replace('torch.', '')})", _join(hints))


# ----------------------------------------------------------------------------- several ranks
def host_id() -> str:
    """Which RAM this process draws on: the host name and the kernel's boot id (containers of one
    host share the kernel, hence the id; two hosts never share both)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}" if boot else socket.gethostname()


def _rss_bytes() -> int:
    """This process's resident memory now (VmRSS; 0 where it cannot be read)."""
    return proc_kib_field("/proc/self/status", "VmRSS") or 0


def sharded_shortfall(ranks: Sequence[dict], margin: float = MARGIN) -> Optional[dict]:
    """The first memory (in rank order) that the ranks drawing on it cannot fit, or None.

    ``ranks``: one dict per rank (rank order): ``where`` (a host's RAM, or one GPU of a host), ``need``
    (its predicted peak), ``have`` (what it read as available, None: unknown) and ``held`` (what it holds
    already, part of ``need``: its resident memory on the CPU). The ranks with the same ``where`` share
    it: they fit when the sum of their needs is at most ``margin`` of the smallest available they read
    plus what they hold. The same list gives the same answer on every rank."""
    groups: dict[str, list[int]] = {}
    for r, info in enumerate(ranks):
        groups.setdefault(str(info["where"]), []).append(r)
    for where, members in groups.items():
        readings = [ranks[r]["have"] for r in members if ranks[r].get("have") is not None]
        if not readings:
            continue
        need = sum(int(ranks[r]["need"]) for r in members)
        have = min(int(h) for h in readings) + sum(int(ranks[r].get("held") or 0) for r in members)
        if need > margin * have:
            worst = max(members, key=lambda r: int(ranks[r]["need"]))
            return {"where": where, "ranks": members, "need": need, "have": have, "worst": worst}
    return None


def check_sharded_dwe_fits(V: int, T: int, nnz_local: int, cfg, device: torch.device, dtype: torch.dtype, shard,
                           rows: Optional[int] = None) -> None:
    """Refuse, on every rank alike, a sharded DWE run of ``cfg`` (``trainer.distributed=true``) whose
    step would not fit: each rank predicts its own peak (:func:`dwe_sharded_peak_bytes`, with its rows
    and its ``nnz_local`` stored training nonzeros) and reads what it has; one all-gather gives every
    rank all of them, and the ranks that share a host's RAM (on the CPU: all local ranks of a host) or
    one GPU are checked together (:func:`sharded_shortfall`). Call it on every rank, after the data
    and before the parameters are made; rank 0 raises :class:`DoesNotFit` (one line), the others
    ``PeerRankError`` with the same message (the command line prints it once)."""
    from goldstone_cli.distributed.errors import PeerRankError

    m = cfg.model
    d = int(m.d)
    variational, P, Q, kw = _dwe_sizes(V, cfg, device, dtype)
    need = dwe_sharded_peak_bytes(V, T, d, P, Q, nnz_local, shard.world, variational, rows=rows, **kw)
    shard.barrier()  # every rank has its data in memory: what is available is read after all of them
    where = host_id() + ("" if device.type == "cpu" else f":{device}")
    mine = {"where": where, "need": int(need["total"]), "have": available_bytes(device),
            "held": _rss_bytes() if device.type == "cpu" else 0,
            "parts": [int(need[k]) for k in ("state", "grads", "counts", "init")]}
    ranks = shard.all_gather_json(mine)
    bad = sharded_shortfall(ranks)
    if bad is None:
        return
    gb = lambda b: f"{b / 1e9:.1f} GB"
    w = ranks[bad["worst"]]
    state, grads, counts, init = w["parts"]
    k = len(bad["ranks"])
    host = bad["where"].split("/")[0] + ("" if device.type == "cpu" else bad["where"][bad["where"].rfind(":"):])
    what = f"model=dwe ({m.inference}, V={V:,}, T={T}, d={d}, {str(dtype).replace('torch.', '')}) on {shard.world} ranks"
    parts = f"parameters and optimizer state {gb(state)}, gradients {gb(grads)}, counts {gb(counts)}"
    if device.type == "cpu":
        parts += f", the start's float64 draw {gb(init - counts)}"
    place = "available in RAM" if device.type == "cpu" else "free on the GPU"
    together = (f"its {k} ranks on {host} need {gb(bad['need'])} together (they share its memory), more than "
                if k > 1 else "more than ")
    hints = []
    if variational:
        alt = dwe_sharded_peak_bytes(V, T, d, P, Q, nnz_local, shard.world, False, rows=rows, **kw)["total"]
        hints.append(f"model=dwe_map (about {gb(alt)} per rank)")
    hints.append("a smaller data.vocab_size or model.d")
    if device.type == "cpu":
        hints += ["a GPU per rank (trainer.device=cuda)", "more hosts with fewer ranks each (ranks on one host "
                  "share its RAM, and each holds the (T, V) row sums and the start's draw of all words)"]
    else:
        hints.append("more GPUs (more ranks)")
    msg = (f"{what} needs about {gb(w['need'])} per rank at its peak (rank {bad['worst']}: {parts}): {together}"
           f"{MARGIN:.0%} of the {gb(bad['have'])} {place} there (with what they hold already); use {_join(hints)} "
           f"(trainer.memory_check=false tries anyway)")
    if shard.rank == 0:
        raise DoesNotFit(msg)
    raise PeerRankError(msg, exit_code=2)
