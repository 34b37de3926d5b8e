"""Peak memory of a training step, predicted before the model is made, and the check that refuses
a run that cannot fit (a dense (T, V, d) model at the paper's size needs tens of GB: better a
one-line error at once than an out-of-memory kill, or a swap storm, an hour in).

The DWE model below is the one docs/benchmarks.md ("Peak memory") fits to measured peaks (within 6%
on the CPU; 25.9 vs 26.1 GB on an H200); ``bench/dwe_scale.py --memory-model`` prints its predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

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


# ----------------------------------------------------------------------------- what the machine has
def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


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


def check_dwe_fits(V: int, T: int, nnz: int, cfg, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a DWE run of ``cfg`` (V words, T steps, nnz stored co-occurrence counts) whose step
    would not fit ``device`` (one process; the sharded model splits its rows over the ranks)."""
    m = cfg.model
    variational = str(m.inference) == "variational"
    batch = max(V if int(m.batch_words) <= 0 else min(int(m.batch_words), V),
                V if int(m.batch_contexts) <= 0 else min(int(m.batch_contexts), V))
    moments = optimizer_moments(cfg.optimizer) if cfg.get("optimizer") is not None else 2  # none given: Adam's
    kw = dict(moments=moments, itemsize=torch.finfo(dtype).bits // 8,
              device="cuda" if device.type == "cuda" else "cpu")
    need = dwe_peak_bytes(V, T, int(m.d), batch, nnz, variational, **kw)
    hints = []
    if variational:
        hints.append(f"model=dwe_map (about {dwe_peak_bytes(V, T, int(m.d), batch, nnz, False, **kw)['total'] / 1e9:.1f} GB)")
    hints += ["a smaller data.vocab_size or model.d"]
    if device.type == "cpu":
        hints.append("a GPU (trainer.device=cuda)")
    hints.append("several processes (trainer.distributed=true, docs/scaling.md)")
    check_fits(need, device, f"model=dwe ({m.inference}, V={V:,}, T={T}, d={m.d}, {str(dtype).replace('torch.', '')})",
               ", ".join(hints[:-1]) + " or " + hints[-1])
