"""Goldstone Gradient Descent (paper Algorithm 1) as a wrapper around any ``torch.optim`` optimizer."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from goldstone_cli.distributed import collective

from . import gauge as G
from .coupling import Coupling, quadratic_terms_

# Per-parameter optimizer state that transforms like the parameter itself under Z_t <- Z_t R_t^T
# (SGD / RMSprop momentum, Adam-family first moments, centered RMSprop's mean gradient).
ROTATED_STATE_KEYS = ("momentum_buffer", "exp_avg", "grad_avg")
# Per-parameter state that IS a parameter value (ASGD's running average ``ax``, the model its user
# takes at the end): mapped like the parameter (the same R_t; under ``balance`` by Z -> Z A, where
# gradient-like first moments take A^{-1}).
PARAMETER_STATE_KEYS = ("ax",)
# Per-coordinate second moments (diagonal preconditioners): Adam / AdamW / NAdam / RAdam exp_avg_sq,
# AMSGrad's max_exp_avg_sq, AdaGrad's sum, RMSprop's and Adadelta's square_avg, Adadelta's acc_delta
# (its running mean of squared updates). ``state_transform`` says what happens to them under a gauge
# rotation.
SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg", "acc_delta")
STATE_TRANSFORMS = ("none", "rotate_diag", "isotropic", "reset")
# natural solver, exact rotation: halvings of the gauge field (1/1024) before a step that would raise psi is dropped
MAX_BACKTRACKS = 10
# natural solver, exact rotation: after k2 has fallen to 1, at most this many halvings of rho' (Eq. 17) in the
# fallback that follows dropped gauge steps (with the 10 backtracks a first-order step of 2^-40 of rho': rounding)
MAX_FALLBACK_LR_HALVINGS = 30
# natural solver, Cayley rotation: a generator whose largest singular value exceeds this turns by more than
# 2 atan(50) = pi - 0.04, where the Cayley map saturates; with psi falling by less than SATURATED_GAIN of what
# Eq. 14 promised, the step is applied, its fields are not kept and the next solve is shorter
CAYLEY_SATURATED = 100.0
SATURATED_GAIN = 1e-6


def fallback_step(k2: int, level: int) -> tuple[int, float]:
    """(k2, factor on rho') of the natural solver's gauge step at fallback ``level`` (the number of
    gauge steps in a row that were dropped because every halving still raised psi): k2 halves per
    level down to 1, then rho' halves. Level 0 is the configured step (k2, 1.0)."""
    k2_levels = max(int(k2), 1).bit_length() - 1  # levels until k2 >> level == 1
    if level <= k2_levels:
        return max(int(k2) >> level, 1), 1.0
    return 1, 0.5 ** (level - k2_levels)


def max_fallback_level(k2: int) -> int:
    return max(int(k2), 1).bit_length() - 1 + MAX_FALLBACK_LR_HALVINGS


class NonFiniteGaugeInput(FloatingPointError):
    """A gauge step met NaN or infinite parameters or pair moments (the base steps diverged).
    The training loop reports it like a non-finite loss ("diverged")."""


class GoldstoneGD(torch.optim.Optimizer):
    """Goldstone-GD: a base optimizer plus, after every ``k1`` base steps, one *gauge step* that
    rotates each symmetric group per time step (``Z_t <- Z_t @ R_t.T``) to lower the coupling psi.

    Args:
        base: the optimizer that takes the ordinary steps (SGD, Adam, ...). ``GoldstoneGD`` shares
            its ``param_groups``, ``state`` and ``defaults``, so LR schedulers built on the wrapper
            change the base's learning rates.
        groups: symmetric groups, each a list of parameters of shape (T, N_k, d) that rotate together
            (e.g. ``[[U, V]]``); every tensor must be a parameter of ``base``. A gauge step rotates
            every tensor of a group, also one with ``requires_grad=False`` or a learning rate of 0
            (the local loss is invariant only if the whole group rotates): leave a tensor that must
            stay fixed out of the groups, and then its partners too.
        coupling: the graph over the T time steps that defines psi (the same one the loss uses).
        k1: base steps between gauge steps (Algorithm 1, line 4).
        solver: ``"natural"`` (paper Sec. 4.1: gauge fields, Eq. 14, natural gradient Eq. 16) or
            ``"procrustes"`` (exact minimization of psi over rotations; see ``gauge.py``).
        k2: natural-gradient steps per gauge step (Algorithm 1, line 7; ``natural`` only).
        lr_scale: factor on the automatic gauge learning rate rho' of Eq. 17 (``natural`` only).
        keep_gauge_fields: ``natural`` only. True (paper): the gauge fields G~ are *not* reset after
            they have been applied; the next gauge step starts its k2 steps from them and applies
            the full resulting Gamma again. Whatever part of the previous rotation the k2 steps do not
            undo is applied once more, which acts like momentum in the symmetry subspace. False:
            G~ starts from zero at every gauge step (only the new rotation is applied).
        rotation: how ``natural`` applies Gamma = G~ - G~^T: ``"linear"`` Z_t (I + Gamma_t)^T
            (paper, Algorithm 1 line 9; first order, changes the local loss slightly and can raise
            psi at large angles, more so after reflection flips), ``"expm"`` (default: exact
            rotation, Eq. 12, with a psi check) or ``"cayley"`` (exact rotation, cheaper).
            ``procrustes`` always applies exact orthogonal matrices.
        allow_reflections: optimize over O(d) (default; the local losses are invariant under
            reflections too, and only O(d) removes reflection domain walls) or over SO(d).
            ``procrustes`` then solves each edge over O(d); ``natural`` (whose gradient lives in
            so(d), the paper's setting being SO(d)) first flips the walls with exact Householder
            reflections (``gauge.reflection_flips``), then takes its k2 steps.
        max_sweeps, tol: ``procrustes`` on graphs with cycles: block-coordinate sweeps until psi
            drops by at most ``tol`` (relative) in a sweep, at most ``max_sweeps`` sweeps.
        state_transform: what happens to the base optimizer's per-coordinate second moments under
            a gauge rotation (:func:`transform_state_`): ``"none"`` (default: left in the old
            coordinates), ``"rotate_diag"`` (v <- (R o R) v, the diagonal of R diag(v) R^T), ``"isotropic"``
            (v <- its mean over the d coordinates on every rotated time step) or ``"reset"`` (the
            parameter's whole base state starts afresh). docs/benchmarks.md ("Goldstone-GD on
            adaptive base optimizers") compares them.
        process_group: a ``torch.distributed`` process group over which the ROWS of every group
            tensor are sharded (each rank passes its own rows, any split, empty shards allowed;
            T and d are the same everywhere). The gauge step then all-reduces psi and every sum
            over rows (the pair and self moments M_tt' of Eq. 15, sum ||z||^2 of Eq. 17) in float64,
            so every rank runs the same solver on the same numbers and applies the same rotations
            to its own rows and its own base optimizer state. Communication per gauge step and group:
            one all-reduce of 2 + (E + T) d^2 float64 numbers (E coupling edges; T d^2 only for
            ``procrustes`` or when ``natural`` flips reflection walls) and one of the psi values
            after it: independent of the number of rows. Every rank must call ``step`` /
            ``gauge_step`` in the same order (they are collective). ``None`` (default): one
            process, nothing is communicated.
        replicated: tensors of the groups that every rank of ``process_group`` holds in full (the
            same values everywhere, e.g. an item table whose gradients the model all-reduces).
            Their rows enter psi and the moments once (rank 0 of the group counts them); every rank
            rotates its copy by the same R_t, so the copies stay equal. Ignored without a process group.
        balance: ``None`` (default) or one entry per symmetric group: ``None`` or one sign per
            tensor of the group, +1 for Z -> Z A and -1 for Z -> Z A^{-T} (e.g. ``[[1, -1]]`` for
            ``[[U, V]]``). Only for models whose local losses see the group only through products
            ``Z_+[t] Z_-[t]^T`` (no prior or penalty on the tensors themselves, e.g. the dense MF of
            Sec. 5.1; not MovieLens's gamma term or DWE's priors): their local losses are invariant
            under every invertible A_t per time step, not only orthogonal ones. Before the rotation
            each time step is then *balanced* (:func:`balancing`: A_t symmetric positive definite
            with sum_+ (Z A)^T (Z A) = sum_- (Z A^{-T})^T (Z A^{-T})), which leaves the local losses
            unchanged and makes all time steps with the same products equal up to O(d), so that the
            rotation can align them. Adaptive bases break the balance that GD keeps (their
            per-coordinate steps do not conserve U^T U - V^T V), and then psi between unbalanced
            time steps can only relax through psi's own small-curvature gradient (docs/benchmarks.md,
            "Why Adam and AdaGrad + procrustes were slow on the Sec. 5.1 problem"). The balanced candidate is used
            only if it ends with a lower psi than the rotation alone (predicted from the pair
            moments), so the gauge step still never raises psi. First moments are mapped like
            gradients (m -> m A^{-1} on the +1 side, m A on the -1 side), second moments by
            ``state_transform`` with that map. ``procrustes`` only, without ``process_group``.

    Optimizer state: the base state that transforms like the parameters is rotated with them by the
    same matrices in every mode: SGD's and RMSprop's ``momentum_buffer``, the first moment
    ``exp_avg`` of Adam / AdamW / NAdam / RAdam / Adamax, centered RMSprop's ``grad_avg`` and
    ASGD's parameter average ``ax``.
    Per-coordinate second moments (``exp_avg_sq`` and AMSGrad's ``max_exp_avg_sq`` of Adam / AdamW
    / NAdam / RAdam, AdaGrad's ``sum``, RMSprop's ``square_avg``, Adadelta's ``square_avg`` and
    ``acc_delta``) follow ``state_transform``: a
    diagonal preconditioner has no exact image under a rotation (R diag(v) R^T is not diagonal);
    ``rotate_diag`` keeps its diagonal and is exact for signed permutations and for isotropic v.
    Other state (Adamax's ``exp_inf``, Rprop's step sizes, LBFGS's history, ...) is left as it is,
    except under ``reset``, which empties the parameter's whole state.
    None of this changes the gauge step itself: it never changes a local loss and never raises psi.
    After ``gauge_step`` the attributes ``last_gauge`` (diagnostics of the last
    gauge step), ``num_gauge_steps`` and ``gauge_seconds`` (cumulative wall time) are updated.

    Numerical notes:
        ``natural`` is a second-order (local) method: L'' (Eq. 14) is a good model only while
        neighbouring time steps are roughly aligned. From a random start, M_tt' is far from positive
        definite, L'' is indefinite and the gauge fields can run away. With an exact rotation
        (``expm``, ``cayley``) the step is therefore checked: psi(RZ) - psi(Z) follows from the
        pair moments alone, and the generator is halved until psi does not rise (``backtracks`` in
        the diagnostics), so an exact gauge step never raises psi. If all ``MAX_BACKTRACKS`` halvings
        still raise psi, the step is dropped (``rejected``: nothing rotates, the gauge fields are reset),
        and the following gauge steps of that group fall back to a shorter solve (``fallback`` level s:
        k2 >> s steps of Eq. 16, then, once that is 1, rho' (Eq. 17) times 2^-(s - floor(log2 k2))),
        one level more after each dropped step and one level less after each accepted one (back to the
        configured k2 and rho' at level 0). The same moments would otherwise give the same dropped step
        for ever; the fallback ends at a single small first-order step, L^+ times the gradient of psi
        over the rotations, which lowers psi unless that gradient vanishes (there the tiny step is
        accepted). Runs without a dropped step are not changed. A step that passes the check only because
        psi did not move although L'' (Eq. 14) promised a decrease beyond rounding is dropped the same way
        (``restarted`` in the group's diagnostics): runaway fields whose Cayley transform saturates at a
        rotation by pi everywhere (kept fields: they grew x1e8 per gauge step with psi stuck) start again
        from zero. A Cayley generator beyond ``CAYLEY_SATURATED`` (a rotation within 0.04 of pi) that
        lowered psi by less than ``SATURATED_GAIN`` of the promise is applied, its fields start again
        from zero, and the next gauge step is one fallback level shorter (``saturated``). With
        ``rotation="linear"`` (the
        paper's update, not a rotation) there is no such check, and with kept gauge fields every
        gauge step also scales the rotated planes by sqrt(1 + angle^2) again: a randomly
        initialized dense MF (T=20, d=3) reached NaN after 70 base steps. ``procrustes`` has no such
        failure mode. Only O(d) (``allow_reflections=True``) removes reflection "domain walls"
        between time steps; with ``allow_reflections=False`` both solvers leave them in place.
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        groups: Sequence[Sequence[Tensor]],
        coupling: Coupling,
        k1: int = 50,
        solver: str = "natural",
        k2: int = 10,
        lr_scale: float = 1.0,
        keep_gauge_fields: bool = True,
        rotation: str = "expm",
        allow_reflections: bool = True,
        max_sweeps: int = 100,
        tol: float = 1e-10,
        state_transform: str = "none",
        process_group=None,
        replicated: Sequence[Tensor] = (),
        balance: Sequence[Sequence[int] | None] | None = None,
    ):
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        if isinstance(base, GoldstoneGD):
            raise ValueError("base is already a GoldstoneGD; wrap the underlying optimizer once")
        if not isinstance(coupling, Coupling):
            raise TypeError(f"coupling must be a goldstone_cli.optim.Coupling, got {type(coupling).__name__}")
        _check_int("k1", k1, 1)
        _check_int("k2", k2, 1 if solver == "natural" else 0)
        _check_int("max_sweeps", max_sweeps, 0)
        if solver not in G.SOLVERS:
            raise ValueError(f"unknown gauge solver {solver!r}; valid solvers: {', '.join(G.SOLVERS)}")
        if rotation not in G.ROTATIONS:
            raise ValueError(f"unknown rotation {rotation!r}; valid rotations: {', '.join(G.ROTATIONS)}")
        if not (isinstance(lr_scale, (int, float)) and math.isfinite(lr_scale) and lr_scale > 0):
            raise ValueError(f"lr_scale must be a positive finite number, got {lr_scale!r}")
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise ValueError(f"tol must be a non-negative finite number, got {tol!r}")
        if state_transform not in STATE_TRANSFORMS:
            raise ValueError(
                f"unknown state_transform {state_transform!r}; valid: {', '.join(STATE_TRANSFORMS)}"
            )
        self.base = base
        self.groups = _check_groups(groups, base, coupling)
        self.coupling = coupling
        self.k1, self.k2, self.solver = int(k1), int(k2), solver
        self.lr_scale, self.keep_gauge_fields, self.rotation = float(lr_scale), bool(keep_gauge_fields), rotation
        self.allow_reflections, self.max_sweeps, self.tol = bool(allow_reflections), int(max_sweeps), float(tol)
        self.state_transform = state_transform
        self.process_group = process_group
        self._replicated = _check_replicated(replicated, self.groups)
        self._rank = 0
        if process_group is not None:
            dist = torch.distributed
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("process_group was given but torch.distributed is not initialized; call "
                                 "torch.distributed.init_process_group first (or pass process_group=None)")
            self._rank = dist.get_rank(process_group)
            if self._rank < 0:
                raise ValueError("this process is not a member of process_group; every rank that holds rows of "
                                 "the groups must pass the same group")
        self.balance = _check_balance(balance, self.groups, solver)
        if state_transform == "isotropic" and any(b is not None for b in self.balance):
            raise ValueError("state_transform='isotropic' cannot follow a balancing map (it is not orthogonal, so "
                             "the mean of v is not kept); use state_transform='rotate_diag' or 'none' with balance")
        if process_group is not None and any(b is not None for b in self.balance):
            raise ValueError("balance is not supported with a process_group yet (its sums over rows are not "
                             "all-reduced): set optimizer.balance=false (balance=None), or train on one "
                             "process (trainer.distributed=false)")

        # what torch.optim.Optimizer.__init__ sets up, minus the parameter groups (shared with base)
        torch._C._log_api_usage_once("python.optimizer")
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

        self.gauge_fields: list[Tensor | None] = [None] * len(self.groups)  # (T, d, d) float64 each
        # natural, exact rotation: per group, how many gauge steps in a row were dropped (fallback_step)
        self.gauge_fallback: list[int] = [0] * len(self.groups)
        self.base_steps = 0
        self.num_gauge_steps = 0
        self.gauge_seconds = 0.0
        self.last_gauge: dict | None = None
        self._cache: dict[Any, Any] = {}  # device -> L^+ or Procrustes plan (built once)
        if solver == "procrustes" or allow_reflections:  # graph setup (spanning forest, colouring) once
            self._cache["plan"] = G.procrustes_plan(coupling)
        if solver == "natural":  # L^+ once (paper, below Eq. 16), on the parameters' device
            self._pinv(self.groups[0][0].device)

    # ----------------------------------------------------------- shared with the base optimizer
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.base.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.base.state

    @state.setter
    def state(self, value) -> None:
        self.base.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base.defaults

    @defaults.setter
    def defaults(self, value) -> None:
        self.base.defaults = value

    # ----------------------------------------------------------- optimizer interface
    def step(self, closure: Callable[[], Any] | None = None):  # type: ignore[override]
        """One base step; after every k1-th base step, one gauge step. Returns the closure's loss."""
        loss = self.base.step() if closure is None else self.base.step(closure)
        self.base_steps += 1
        if self.base_steps % self.k1 == 0:
            self.gauge_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        # the hooks of register_state_dict_pre_hook / _post_hook, as torch.optim.Optimizer runs them
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        out = self._state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            changed = hook(self, out)
            out = out if changed is None else changed
        return out

    def _state_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.state_dict(),
            "goldstone": {
                "base_steps": self.base_steps,
                "num_gauge_steps": self.num_gauge_steps,
                "gauge_seconds": self.gauge_seconds,
                "gauge_fields": [None if g is None else g.detach().clone() for g in self.gauge_fields],
                "gauge_fallback": list(self.gauge_fallback),
                "last_gauge": None if self.last_gauge is None else dict(self.last_gauge),
                "config": self._config(),
                "group_shapes": self._group_shapes(),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore what :meth:`state_dict` saved: the base optimizer's state, the gauge fields, the
        fallback levels and the step counters (nothing changes if a check below fails).

        The settings are this optimizer's own (the constructor's), not the saved ones; the state
        dict's ``config`` is checked only for the settings whose change breaks the saved state, and a
        mismatch raises ``ValueError`` naming the setting, its saved and current values:

        - ``solver``: the state of one solver means nothing to the other (``natural`` keeps gauge
          fields and fallback levels, ``procrustes`` none).
        - the symmetric groups: their number, and per group T, d and the number of tensors (the gauge
          fields are (T, d, d) per group; a state dict from before the shapes were saved is checked
          through its gauge fields only).
        - ``rotation``, where the state holds kept gauge fields (``natural``): they are generators, and
          the same generator is another rotation under ``expm`` (Eq. 12), ``cayley`` or ``linear``,
          so the next gauge step would apply a rotation that was never solved for. Without saved
          fields the rotation may change.

        All other settings may change on a resume, like a learning rate after ``torch.optim``'s
        ``load_state_dict``: ``k1`` and ``k2`` (step counts; a fallback level above what the new k2
        allows is capped at :func:`max_fallback_level`), ``lr_scale`` (a factor on Eq. 17),
        ``keep_gauge_fields`` (saved fields are used only if they are kept; a state without them
        starts from zero fields, as the first gauge step does), ``allow_reflections``, ``max_sweeps``,
        ``tol``, ``balance`` and ``state_transform`` (they act on each gauge step afresh; the base
        state has the same form under all of them). State dicts written before a key existed
        (``gauge_fallback``, ``group_shapes``, ``config``) still load."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():  # as torch.optim.Optimizer runs them
            changed = hook(self, state_dict)
            state_dict = state_dict if changed is None else changed
        self._load_state_dict(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", "goldstone"}:
            raise ValueError(
                "not a GoldstoneGD state dict (expected the keys 'base' and 'goldstone'); to load a plain "
                "optimizer's state use goldstone_opt.base.load_state_dict(...)"
            )
        gs = state_dict["goldstone"]
        saved = gs.get("config") if isinstance(gs.get("config"), dict) else {}  # absent: no settings to check
        self._check_saved_setting(saved, "solver", self.solver)
        fields = gs["gauge_fields"]
        if len(fields) != len(self.groups):
            raise ValueError(
                f"the state dict was saved with {len(fields)} symmetric groups (gauge fields for each), this optimizer "
                f"has {len(self.groups)}: construct GoldstoneGD with the groups it was saved with"
            )
        shapes = gs.get("group_shapes")  # absent in state dicts written before it existed
        if shapes is not None:
            for k, (was, now) in enumerate(zip(shapes, self._group_shapes())):
                if list(was) != now:
                    raise ValueError(
                        f"symmetric group {k} was saved with (T, d, tensors) = {tuple(was)}, this optimizer's is "
                        f"{tuple(now)}: construct GoldstoneGD with the groups (and coupling) it was saved with"
                    )
        if any(f is not None for f in fields):
            self._check_saved_setting(saved, "rotation", self.rotation,
                                      "or drop the saved gauge fields first (state['goldstone']['gauge_fields'] = "
                                      "[None] * number of groups: the gauge steps start from zero fields)")
        loaded: list[Tensor | None] = []
        for k, (f, tensors) in enumerate(zip(fields, self.groups)):
            if f is None:
                loaded.append(None)
                continue
            want = (self.coupling.T, tensors[0].shape[-1], tensors[0].shape[-1])
            if tuple(f.shape) != want:
                raise ValueError(f"gauge fields of group {k} have shape {tuple(f.shape)}, expected {want}")
            loaded.append(f.detach().to(device=tensors[0].device, dtype=torch.float64).clone())
        fallback = gs.get("gauge_fallback")  # absent in state dicts written before the fallback existed
        fallback = [0] * len(self.groups) if fallback is None else [int(x) for x in fallback]
        if len(fallback) != len(self.groups) or any(x < 0 for x in fallback):
            raise ValueError(f"gauge_fallback {gs.get('gauge_fallback')!r} must hold one level >= 0 per symmetric "
                             f"group ({len(self.groups)})")
        fallback = [min(x, max_fallback_level(self.k2)) for x in fallback]  # k2 may have changed
        self.base.load_state_dict(state_dict["base"])
        self.gauge_fields = loaded
        self.gauge_fallback = fallback
        self.base_steps = int(gs["base_steps"])
        self.num_gauge_steps = int(gs["num_gauge_steps"])
        self.gauge_seconds = float(gs["gauge_seconds"])
        self.last_gauge = None if gs.get("last_gauge") is None else dict(gs["last_gauge"])

    @staticmethod
    def _check_saved_setting(saved: dict[str, Any], name: str, current: Any, alternative: str = "") -> None:
        """Raise if the state dict's config has another value of a setting whose change breaks the state."""
        if name in saved and saved[name] != current:
            raise ValueError(
                f"the state dict was saved with {name}={saved[name]!r}, this optimizer has {name}={current!r}; "
                f"its state does not carry over: construct GoldstoneGD with {name}={saved[name]!r} (the setting it "
                f"was saved with) to load it{', ' + alternative if alternative else ''}"
            )

    def _group_shapes(self) -> list[list[int]]:
        """[T, d, number of tensors] per symmetric group (what the saved gauge state depends on; not the
        rows N, which the base state checks and which differ between the ranks of a process group)."""
        return [[self.coupling.T, int(g[0].shape[-1]), len(g)] for g in self.groups]

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy / pickle: the whole wrapper
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"GoldstoneGD(base={type(self.base).__name__}, solver={self.solver}, k1={self.k1}, "
            f"groups={len(self.groups)}, coupling={self.coupling!r})"
        )

    # ----------------------------------------------------------- the gauge step
    @torch.no_grad()
    def gauge_step(self) -> dict:
        """Rotate every symmetric group by the solver's R_t (in place) and the rotation-equivariant
        base state with it. Returns (and stores in ``last_gauge``) the diagnostics
        {"step", "psi_before", "psi_after", "max_angle", "seconds", "groups": [per-group info]}, and
        for ``natural`` the totals "flips" (reflection walls flipped) and "backtracks" (halvings); with an
        exact rotation also "rejected" (groups whose step was dropped: every halving raised psi, or psi
        did not fall although Eq. 14 promised it would: then the group's info has "restarted") and
        "fallback" (the largest fallback level used, 0 for the configured k2 and rho'; per group with
        the "k2" and "lr" it used)."""
        t0 = time.perf_counter()
        psi_before = psi_after = max_angle = 0.0
        per_group = []
        p_after_local = []
        for k, tensors in enumerate(self.groups):
            device = tensors[0].device
            M_self = None
            if self.process_group is None:
                # psi and (natural: sum ||z||^2 of Eq. 17) in one cache-blocked pass per tensor, in float64
                vals = [quadratic_terms_(Z, self.coupling, sum_squares=self.solver == "natural") for Z in tensors]
                p_before = float(sum(v[1] for v in vals))
                sq = float(sum(v[0] for v in vals)) if self.solver == "natural" else None
            else:  # psi, M, M_self and sum ||z||^2 summed over the ranks' rows in one all-reduce
                p_before, M, M_self, sq = self._reduced_sums(tensors, self.solver == "procrustes",
                                                             self.solver == "natural")
            if not math.isfinite(p_before):  # NaN / inf parameters: no SVD or solve can use them
                raise NonFiniteGaugeInput(f"psi became {p_before} before gauge step {self.num_gauge_steps + 1} "
                                          f"(symmetric group {k}): the parameters are not finite")
            if self.process_group is None:
                M = self.coupling.pair_moments(tensors, torch.float64)  # (E, d, d), Eq. 15
            # finite parameters whose products overflow; the solvers also need ||M_tt'|| (polar tie-break)
            if M.numel() and not bool(torch.isfinite(torch.linalg.matrix_norm(M)).all()):
                raise NonFiniteGaugeInput(f"the pair moments M_tt' (Eq. 15) of symmetric group {k} overflow "
                                          f"(parameters too large) before gauge step {self.num_gauge_steps + 1}")
            if self.solver == "procrustes" and self.process_group is None:
                M_self = self.coupling.self_moments(tensors, torch.float64)  # (T, d, d)
            with G.serial_cpu(M):  # only (T, d, d) / (E, d, d) work in here: one CPU thread is fastest
                if self.solver == "natural":
                    R, info, gamma = self._natural(k, M, sq, tensors)
                else:
                    R, info = G.procrustes_solve(
                        M, M_self, self._plan(device), self.allow_reflections, self.max_sweeps, self.tol,
                        psi0=p_before,
                    )
                    gamma = None
                    if self.balance[k] is not None:
                        R, info = self._balanced_procrustes(k, tensors, M, R, info, p_before)
                angle = float(G.rotation_angles(R, gamma).max()) if R.numel() else 0.0
                if info.get("flips"):  # a reflection counts as an angle of pi
                    angle = math.pi
            p_after = 0.0  # this rank's part of psi of the rotated rows, taken in the same pass
            counted = {id(Z) for Z in self._counted(tensors)}
            for Z in tensors:
                p_z = float(G.rotate_rows_psi_(Z, R, self.coupling))
                if id(Z) in counted:
                    p_after += p_z
                transform_state_(self.base.state.get(Z), Z, R, self.state_transform, self._param_group(Z))
            if self.process_group is not None:  # all-reduced once for all groups below
                p_after_local.append(torch.tensor(p_after, dtype=torch.float64, device=device))
                p_after = 0.0
            psi_before, psi_after, max_angle = psi_before + p_before, psi_after + p_after, max(max_angle, angle)
            per_group.append({"psi_before": p_before, "psi_after": p_after, "max_angle": angle, **info})
        if self.process_group is not None:
            p_after_all = _all_reduce_sum(torch.stack(p_after_local), self.process_group).tolist()
            for g, p in zip(per_group, p_after_all):
                g["psi_after"] = p
            psi_after = sum(p_after_all)
        if any(t.is_cuda for group in self.groups for t in group):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        self.num_gauge_steps += 1
        self.gauge_seconds += seconds
        self.last_gauge = {
            "step": self.base_steps,
            "psi_before": psi_before,
            "psi_after": psi_after,
            "max_angle": max_angle,
            "seconds": seconds,
            "groups": per_group,
        }
        for key in ("flips", "backtracks", "rejected"):  # natural only: walls flipped, halvings, dropped steps
            if any(key in g for g in per_group):
                self.last_gauge[key] = sum(g.get(key, 0) for g in per_group)
        if any("fallback" in g for g in per_group):  # natural, exact rotation: the shortened solve in use
            self.last_gauge["fallback"] = max(g.get("fallback", 0) for g in per_group)
        return self.last_gauge

    def _natural(self, k: int, M: Tensor, sq: float, tensors: list[Tensor]) -> tuple[Tensor, dict, Tensor | None]:
        """Algorithm 1, lines 6-9 for one group: rho' (Eq. 17) from sq = sum ||z||^2, k2 steps of
        Eq. 16, the rotation (line 9). Over O(d) the reflection walls are first removed exactly
        (``gauge.reflection_flips``), R = rotation @ A. Returns R, info and Gamma for the linear
        update's angle."""
        device, T, d = M.device, self.coupling.T, tensors[0].shape[-1]
        src, dst = self.coupling.edge_index(device)
        w = self.coupling.edge_weights(torch.float64, device)
        lr = G.natural_learning_rate(sq, d, self.lr_scale)
        exact = self.rotation != "linear"
        level = self.gauge_fallback[k] if exact else 0
        k2, lr_factor = fallback_step(self.k2, level)
        if lr_factor != 1.0:
            lr = lr * lr_factor
        gauge = self.gauge_fields[k] if self.keep_gauge_fields else None
        if gauge is None or gauge.device != device:
            gauge = torch.zeros(T, d, d, dtype=torch.float64, device=device)  # G~ (T, d, d)
        flips = G.reflection_flips(M, self._plan(device)) if self.allow_reflections else None
        A = None
        if flips is not None:
            M_self = self._self_moments(tensors)
            A = G.global_fix(flips[0], M_self, self._plan(device))  # the flipped frame that moves Z least
            M = torch.bmm(torch.bmm(A[src], M), A[dst].transpose(1, 2))  # moments of z -> A_t z
            gauge = torch.bmm(torch.bmm(A, gauge), A.transpose(1, 2))  # kept fields, in the new frame
        gauge = G.natural_solve(gauge, M, src, dst, w, self._pinv(device), lr, k2)
        R = G.rotation_from_generator(G.skew(gauge), self.rotation)  # (T, d, d), Eq. 13 and line 9
        backtracks, rejected, restarted = 0, False, False
        if exact:
            # An exact rotation must never raise psi. L'' (Eq. 14) is only a local model: far from
            # alignment it can send the fields past the minimum (we saw psi x4 on word embeddings at
            # lr_scale=1). psi(RZ) - psi(Z) = -(f(R) - f(I)) by (*) costs O(E d^3), so halve the
            # generator until psi does not rise (at most MAX_BACKTRACKS times, then rotate nothing).
            eye = torch.eye(d, dtype=M.dtype, device=device).expand(T, d, d)
            f_id = G.coupling_gain(eye, M, src, dst, w)
            margin = 64 * torch.finfo(M.dtype).eps * (w * torch.linalg.matrix_norm(M)).sum()  # rounding
            f_id_exact, f_id = f_id, f_id - margin
            # a generator far too large (fields run away where L'' is indefinite) gives a rotation
            # that is not orthogonal in floating point, or not finite: (*) does not hold, so it is
            # refused too (a NaN gain fails the comparison)
            f_R = G.coupling_gain(R, M, src, dst, w)
            while not (f_R >= f_id and _orthogonal(R)):
                if backtracks == MAX_BACKTRACKS or not bool(torch.isfinite(gauge).all()):
                    # still rising or not a rotation: rotate nothing, forget the fields
                    gauge, R = torch.zeros_like(gauge), eye.clone()
                    rejected = True
                    break
                backtracks += 1
                gauge = 0.5 * gauge
                R = G.rotation_from_generator(G.skew(gauge), self.rotation)
                f_R = G.coupling_gain(R, M, src, dst, w)
            # Restart of the gauge fields. Eq. 14 is psi's change to second order in Gamma, exact only as
            # the fields go to zero (Sec. 4.1); where it is indefinite, the k2 steps of Eq. 16 diverge
            # geometrically, and the more so from kept fields (the paper's "momentum in the symmetry
            # subspace"): on a 2-step chain (d=2, weight 1.5, k2=50, Cayley, kept fields) x1.1e8 per
            # gauge step, 9 -> 1e9 -> 1e17 -> ... -> inf. expm of such a generator is refused above
            # (not orthogonal), but the Cayley transform stays orthogonal: its angle 2 atan(theta/2)
            # saturates at pi (the singular set of the Cayley map), every R_t tends to the same
            # rotation by pi, R_s^T R_t -> I, and the step was accepted with psi unchanged (29.14 for
            # ~40 gauge steps against the minimum 17.40, until the fields overflowed). So a step whose
            # model L''(G~) promised a decrease of psi beyond rounding while (*) shows none is dropped
            # like one whose halvings all failed: rotate nothing, fields to zero (Eq. 16 starts afresh,
            # as at the first gauge step; the momentum is restarted, like an accelerated gradient
            # method's when the objective stops falling), one fallback level up. A step that lowers
            # psi, or near convergence fields so small that Eq. 14 promises nothing, are as before.
            if not rejected and not bool(f_R > f_id_exact + margin):
                promised = -G.natural_objective(gauge, M, src, dst, w)  # psi(Z) - psi(expm(Gamma) Z), Eq. 14
                if bool(promised > margin):
                    gauge, R = torch.zeros_like(gauge), eye.clone()
                    rejected = restarted = True
            # In d >= 3 saturated kept fields need not stall psi exactly: they settle near a rotation by pi
            # that still lowers psi a little at every gauge step (d=3, T=2: psi 76.58 after 100 gauge
            # steps against the minimum 43.34, fields at 4e5, each step keeping 1e-18 of Eq. 14's promise);
            # without kept fields, k2=50 steps from zero can saturate at every gauge step the same way
            # (d=3, T=2: psi 64.36 after 100 gauge steps, minimum 33.82; now reached after 37).
            # Near the Cayley map's singular set R hardly depends on the fields, so Eq. 16's steps from
            # them (Eq. 14 is the model at small fields) cannot turn R. A saturated generator that kept
            # less than SATURATED_GAIN of the promise (healthy steps keep 1e-4 to 1) is applied, its
            # fields are not kept, and the next gauge step solves from zero one fallback level shorter
            # (from zero at the full k2 the fields saturated again: a d=2 chain then crept from psi 99.8
            # to 93.0 in 100 gauge steps, minimum 80.6; with the shorter solve it gets there in 6).
            saturated = (not rejected and self.rotation == "cayley"
                         and float(torch.linalg.matrix_norm(G.skew(gauge), ord=2).max()) > CAYLEY_SATURATED
                         and bool(f_R - f_id_exact < SATURATED_GAIN * -G.natural_objective(gauge, M, src, dst, w)))
            if saturated:
                gauge = torch.zeros_like(gauge)
            # The next step would meet (nearly) the same moments from reset fields and be dropped the
            # same way for ever: it takes a shorter solve (fallback_step), one level shorter after each drop,
            # one level longer after each accepted step (a single drop: one step at k2 // 2). Back to
            # the configured step at once would drop 3 of 4 steps with lr_scale=30 on the test MF.
            self.gauge_fallback[k] = (min(level + 1, max_fallback_level(self.k2)) if rejected or saturated
                                      else max(level - 1, 0))
        self.gauge_fields[k] = gauge if self.keep_gauge_fields else None
        if A is not None:
            R = torch.bmm(R, A)
        info = {"lr": lr, "flips": 0 if flips is None else int(flips[1].sum()), "backtracks": backtracks}
        if exact:
            info.update(rejected=int(rejected), fallback=level, k2=k2)
            if restarted:
                info["restarted"] = 1
            if saturated:
                info["saturated"] = 1
        return R, info, (G.skew(gauge) if self.rotation == "linear" and A is None else None)

    def _balanced_procrustes(self, k: int, tensors: list[Tensor], M: Tensor, R: Tensor, info: dict,
                             p_before: float) -> tuple[Tensor, dict]:
        """``balance``: the balanced candidate for group k. Pair moments split by side, M = M+ + M-;
        after Z+ -> Z+ A, Z- -> Z- A^{-1} (A symmetric) they are A_s M+ A_t + A_s^{-1} M- A_t^{-1}.
        psi of either candidate after its rotation follows from the moments by (*); the balanced one
        is applied (parameters and base state) only if it is lower. Returns the rotation to apply."""
        device = M.device
        sides = self.balance[k]
        plus = [Z for Z, s in zip(tensors, sides) if s > 0]
        minus = [Z for Z, s in zip(tensors, sides) if s < 0]
        P = self.coupling.self_moments(plus, torch.float64)  # (T, d, d)
        Q = self.coupling.self_moments(minus, torch.float64)
        A, A_inv, ok = balancing(P, Q)
        info = {**info, "balanced": 0}
        if not bool(ok.any()):
            return R, info
        plan = self._plan(device)
        src, dst = self.coupling.edge_index(device)
        w = self.coupling.edge_weights(torch.float64, device)
        M_plus = self.coupling.pair_moments(plus, torch.float64)
        Mb = torch.bmm(torch.bmm(A[src], M_plus), A[dst]) + torch.bmm(torch.bmm(A_inv[src], M - M_plus), A_inv[dst])
        Mb_self = torch.bmm(torch.bmm(A, P), A) + torch.bmm(torch.bmm(A_inv, Q), A_inv)
        tr_self = torch.diagonal(Mb_self, dim1=-2, dim2=-1).sum(-1)  # (T,)
        # psi = 1/2 sum_e w_e ||Z_s - Z_t||^2 from the moments (Eq. 3)
        psi_b = float((w * (0.5 * (tr_self[src] + tr_self[dst]) - torch.diagonal(Mb, dim1=-2, dim2=-1).sum(-1))).sum())
        Rb, info_b = G.procrustes_solve(Mb, Mb_self, plan, self.allow_reflections, self.max_sweeps, self.tol,
                                        psi0=psi_b)
        eye = torch.eye(A.shape[-1], dtype=torch.float64, device=device).expand_as(A)
        psi_plain = p_before - float(G.coupling_gain(R, M, src, dst, w) - G.coupling_gain(eye, M, src, dst, w))
        psi_bal = psi_b - float(G.coupling_gain(Rb, Mb, src, dst, w) - G.coupling_gain(eye, Mb, src, dst, w))
        # only a clear win: the moment formulas round at 64 eps of the coupling's terms
        margin = 64 * torch.finfo(torch.float64).eps * float((w * tr_self[src]).sum() + (w * tr_self[dst]).sum())
        if not psi_bal < psi_plain - margin:
            return R, info
        for Z, s in zip(tensors, sides):
            B, B_grad = (A, A_inv) if s > 0 else (A_inv, A)  # Z -> Z B; gradients (first moments) -> g B^{-1}
            G.rotate_rows_(Z, B)  # Z_t B_t^T = Z_t B_t (B symmetric)
            transform_state_(self.base.state.get(Z), Z, B_grad, self.state_transform, self._param_group(Z), R_param=B)
        return Rb, {**info_b, "balanced": int(ok.sum())}

    # ----------------------------------------------------------- sums over rows across ranks
    def _counted(self, tensors: list[Tensor]) -> list[Tensor]:
        """The tensors whose rows this rank contributes to the sums over rows: all of them, except
        replicated ones on ranks other than 0 (their rows are counted once)."""
        if self._rank == 0:
            return tensors
        return [Z for Z in tensors if id(Z) not in self._replicated]

    def _local_moments(self, tensors: list[Tensor], self_moments: bool) -> Tensor:
        """This rank's part of the pair moments (E, d, d) (Eq. 15) or of the self moments (T, d, d), float64."""
        counted = self._counted(tensors)
        if counted:
            if self_moments:
                return self.coupling.self_moments(counted, torch.float64)
            return self.coupling.pair_moments(counted, torch.float64)
        d = tensors[0].shape[-1]
        n = self.coupling.T if self_moments else self.coupling.num_edges
        return torch.zeros(n, d, d, dtype=torch.float64, device=tensors[0].device)

    def _reduced_sums(self, tensors: list[Tensor], self_moments: bool, sq_norm: bool):
        """psi, M (E, d, d), M_self (T, d, d) or None and sum ||z||^2 (Eq. 17; None unless asked)
        of one group, each summed over the rows of every rank: one float64 all-reduce of
        2 + E d^2 (+ T d^2) numbers."""
        device = tensors[0].device
        counted = self._counted(tensors)
        # psi and sum ||z||^2 of this rank's rows: the same float64 pass as without a process group
        vals = [quadratic_terms_(Z, self.coupling, sum_squares=sq_norm) for Z in counted]
        zero = torch.zeros((), dtype=torch.float64, device=device)
        parts = [sum((v[1] for v in vals), zero).reshape(1), sum((v[0] for v in vals), zero).reshape(1)]
        M = self._local_moments(tensors, False)
        parts.append(M.reshape(-1))
        M_self = self._local_moments(tensors, True) if self_moments else None
        if M_self is not None:
            parts.append(M_self.reshape(-1))
        buf = _all_reduce_sum(torch.cat(parts), self.process_group)
        E, T, d = M.shape[0], self.coupling.T, tensors[0].shape[-1]
        psi = float(buf[0])
        sq_out = float(buf[1]) if sq_norm else None
        M = buf[2:2 + E * d * d].reshape(E, d, d)
        if M_self is not None:
            M_self = buf[2 + E * d * d:].reshape(T, d, d)
        return psi, M, M_self, sq_out

    def _self_moments(self, tensors: list[Tensor]) -> Tensor:
        """M_tt = sum over all rows (of every rank) of z_t z_t^T: (T, d, d), float64."""
        if self.process_group is None:
            return self.coupling.self_moments(tensors, torch.float64)
        return _all_reduce_sum(self._local_moments(tensors, True), self.process_group)

    def _pinv(self, device) -> G.LaplacianPinv:
        key = ("pinv", str(device))
        if key not in self._cache:
            self._cache[key] = G.LaplacianPinv(self.coupling, device=device)
        return self._cache[key]

    def _plan(self, device) -> G.ProcrustesPlan:
        if "plan" not in self._cache:
            self._cache["plan"] = G.procrustes_plan(self.coupling)
        key = ("plan", str(device))
        if key not in self._cache:
            self._cache[key] = self._cache["plan"].to(device)
        return self._cache[key]

    def _config(self) -> dict[str, Any]:
        return {
            "k1": self.k1, "k2": self.k2, "solver": self.solver, "lr_scale": self.lr_scale,
            "keep_gauge_fields": self.keep_gauge_fields, "rotation": self.rotation,
            "allow_reflections": self.allow_reflections, "max_sweeps": self.max_sweeps, "tol": self.tol,
            "state_transform": self.state_transform,
            "balance": (None if all(b is None for b in self.balance)
                        else [None if b is None else list(b) for b in self.balance]),
        }

    def _param_group(self, Z: Tensor) -> dict[str, Any]:
        return next(g for g in self.base.param_groups if any(p is Z for p in g["params"]))


@torch.no_grad()
def transform_state_(st: dict | None, Z: Tensor, R: Tensor, mode: str, group: dict | None = None,
                     R_param: Tensor | None = None) -> None:
    """Carry one parameter's base-optimizer state ``st`` through the rotation ``Z_t <- Z_t R_t^T``
    (in place; ``Z`` is the parameter, (T, N, d), R is (T, d, d) orthogonal).

    First moments (``ROTATED_STATE_KEYS``) transform like the parameter: they are rotated by R_t in
    every mode. State that is itself a parameter value (``PARAMETER_STATE_KEYS``: ASGD's average
    ``ax``) is mapped by ``R_param`` (default R; ``balance`` passes the parameter's own map where R is
    the gradients'). Per-coordinate second moments v (``SECOND_MOMENT_KEYS``) stand for the diagonal of
    a d x d second-moment matrix S of each row, which rotates as R S R^T; ``mode`` says what is kept:

    - ``"none"``: v is left in the old coordinates.
    - ``"rotate_diag"``: v <- diag(R diag(v) R^T) = (R o R) v per row (o: element-wise product).
      Exact for signed permutations (v is permuted), exact for S = c I, and it keeps sum_j v_j
      (= Tr S) for every R since R o R is doubly stochastic.
    - ``"isotropic"``: on every time step that rotated, v of each row is replaced by its mean over
      the d coordinates (the rotation-invariant part Tr S / d I).
    - ``"reset"``: the whole state of the parameter starts afresh (moments zero, AdaGrad's sum at its
      initial value, step counters zero, Rprop's step sizes at lr), as if the base optimizer had just
      been created for it: the state is emptied and the base optimizer makes it again at its next
      step, as every torch.optim optimizer does for a parameter without state.

    AMSGrad's max_exp_avg_sq is transformed like exp_avg_sq (both maps are monotone, so max >= v
    stays true); for centered RMSprop square_avg is kept >= grad_avg^2 so that the variance stays
    non-negative. Other state (Adamax's exp_inf, Rprop's step sizes, ...) is left as it is
    (``reset`` empties it too)."""
    if not st:
        return
    if mode == "reset":  # torch.optim makes a parameter's state at its next step when there is none
        st.clear()  # (zeroing it instead froze Rprop: its step sizes fell to their minimum)
        return
    for key in ROTATED_STATE_KEYS:
        buf = st.get(key)
        if isinstance(buf, Tensor) and buf.shape == Z.shape:
            G.rotate_rows_(buf, R)
    for key in PARAMETER_STATE_KEYS:
        buf = st.get(key)
        if isinstance(buf, Tensor) and buf.shape == Z.shape:
            G.rotate_rows_(buf, R if R_param is None else R_param)
    for key in SECOND_MOMENT_KEYS if mode != "none" else ():
        buf = st.get(key)
        if not (isinstance(buf, Tensor) and buf.shape == Z.shape):
            continue
        if mode == "rotate_diag":
            G.rotate_rows_(buf, R * R)  # v_t,i <- (R_t o R_t) v_t,i
            buf.clamp_(min=0)  # rounding
        else:  # isotropic, on the time steps that moved
            eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
            moved = (R - eye).abs().amax(dim=(1, 2)) > 0  # (T,)
            if bool(moved.any()):
                mean = buf.mean(dim=-1, keepdim=True).expand_as(buf)
                buf.copy_(torch.where(moved.to(buf.device)[:, None, None], mean, buf))
    avg, sq = st.get("grad_avg"), st.get("square_avg")
    if isinstance(avg, Tensor) and isinstance(sq, Tensor) and avg.shape == sq.shape:
        torch.maximum(sq, avg * avg, out=sq)  # centered RMSprop: square_avg - grad_avg^2 >= 0


@torch.no_grad()
def balancing(P: Tensor, Q: Tensor, rcond: float = 1e-10) -> tuple[Tensor, Tensor, Tensor]:
    """Per time step the symmetric positive definite A with A P A = A^{-1} Q A^{-1} (``balance``).

    P = sum_+ Z^T Z and Q = sum_- Z^T Z (T, d, d): after Z+ -> Z+ A, Z- -> Z- A^{-1} both Gram
    matrices equal A P A. With S = A^2 the condition is S P S = Q, whose positive definite solution
    is S = P^{-1/2} (P^{1/2} Q P^{1/2})^{1/2} P^{-1/2} (the geometric mean of P^{-1} and Q); A = S^{1/2}.
    Returns A, A^{-1} (float64) and ok (T,) bool; A = I where P or Q is singular to ``rcond``
    (relative to its largest eigenvalue) or not finite."""
    P, Q = P.to(torch.float64), Q.to(torch.float64)
    T, d = P.shape[0], P.shape[-1]
    eye = torch.eye(d, dtype=torch.float64, device=P.device).expand(T, d, d)
    ok = torch.isfinite(P).all(dim=(1, 2)) & torch.isfinite(Q).all(dim=(1, 2))
    P, Q = torch.where(ok[:, None, None], P, eye), torch.where(ok[:, None, None], Q, eye)
    P, Q = 0.5 * (P + P.transpose(1, 2)), 0.5 * (Q + Q.transpose(1, 2))

    def sym_pow(X: Tensor, p: float) -> tuple[Tensor, Tensor]:
        e, W = torch.linalg.eigh(X)
        good = e.amin(-1) > rcond * e.amax(-1).clamp(min=torch.finfo(X.dtype).tiny)
        return (W * e.clamp(min=torch.finfo(X.dtype).tiny).pow(p)[:, None, :]) @ W.transpose(1, 2), good

    with G.serial_cpu(P):
        P_h, good_p = sym_pow(P, 0.5)
        P_ih, _ = sym_pow(P, -0.5)
        _, good_q = sym_pow(Q, 0.5)
        C_h, _ = sym_pow(P_h @ Q @ P_h, 0.5)
        S = P_ih @ C_h @ P_ih
        S = 0.5 * (S + S.transpose(1, 2))
        A, good_s = sym_pow(S, 0.5)
        A_inv, _ = sym_pow(S, -0.5)
    ok = ok & good_p & good_q & good_s & torch.isfinite(A).all(dim=(1, 2)) & torch.isfinite(A_inv).all(dim=(1, 2))
    return torch.where(ok[:, None, None], A, eye), torch.where(ok[:, None, None], A_inv, eye), ok


def _check_balance(balance, groups: list[list[Tensor]], solver: str) -> list[tuple[int, ...] | None]:
    """``balance``: None, or per group None or one sign (+1 / -1) per tensor, both signs present."""
    if balance is None:
        return [None] * len(groups)
    if isinstance(balance, (str, Tensor)) or not isinstance(balance, (list, tuple)) or len(balance) != len(groups):
        raise ValueError(f"balance must be None or a list with one entry per symmetric group ({len(groups)}), "
                         f"e.g. [[1, -1]] for [[U, V]]; got {balance!r}")
    out: list[tuple[int, ...] | None] = []
    for k, (sides, group) in enumerate(zip(balance, groups)):
        if sides is None:
            out.append(None)
            continue
        sides = tuple(sides) if isinstance(sides, (list, tuple)) else None
        if (sides is None or len(sides) != len(group)
                or any(isinstance(s, bool) or s not in (1, -1) for s in sides) or set(sides) != {1, -1}):
            raise ValueError(f"balance[{k}] must give +1 or -1 for each of the {len(group)} tensors of group {k} "
                             f"(both signs at least once, e.g. [1, -1] for [U, V]); got {balance[k]!r}")
        if solver != "procrustes":
            raise ValueError(f"balance needs solver='procrustes' (got {solver!r})")
        out.append(tuple(int(s) for s in sides))
    return out


def _all_reduce_sum(buf: Tensor, group) -> Tensor:
    """Sum ``buf`` (float64) over the ranks of ``group``, in place; returns it. Every rank gets the
    same numbers (gloo and NCCL reduce each chunk once and then copy it to every rank), which is
    what makes the solvers' rotations identical across ranks. Through ``collective.run``: a script
    whose last act is a gauge step must not die at exit freeing ``buf`` on a gloo thread."""
    collective.run(torch.distributed.all_reduce, buf, op=torch.distributed.ReduceOp.SUM, group=group)
    return buf


def _check_replicated(replicated, groups: list[list[Tensor]]) -> set[int]:
    """ids of the replicated tensors; each must be a tensor of one of the groups."""
    if isinstance(replicated, Tensor) or not isinstance(replicated, (list, tuple, set)):
        raise ValueError("replicated must be a list of tensors of the groups (e.g. [V]), or empty")
    in_groups = {id(Z) for g in groups for Z in g}
    out = set()
    for j, Z in enumerate(replicated):
        if not isinstance(Z, Tensor) or id(Z) not in in_groups:
            raise ValueError(f"replicated[{j}] is not one of the tensors in groups; list only tensors that "
                             "rotate in a symmetric group and that every rank holds in full")
        out.add(id(Z))
    return out


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _orthogonal(R: Tensor, tol: float | None = None) -> bool:
    """Every (d, d) matrix of R is finite and orthogonal to ``tol`` (max |R^T R - I|; default 5e4 eps,
    1.1e-11 in float64: expm of a generator of norm 100 is orthogonal to 3e-13, Cayley's to 1e-14; one
    at 8e-10 changed U V^T by 9e-10 of its size)."""
    tol = 5e4 * torch.finfo(R.dtype).eps if tol is None else tol
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    err = (R.transpose(-1, -2) @ R - eye).abs().amax()
    return bool(err <= tol)  # False for NaN


def _check_groups(groups, base: torch.optim.Optimizer, coupling: Coupling) -> list[list[Tensor]]:
    """Validate the symmetric groups: shapes (T, N_k, d) with T = coupling.T and one d per group,
    one device and a floating dtype, every tensor a parameter of ``base`` and in one group only
    (any strides: a non-contiguous one is rotated through a contiguous copy)."""
    if isinstance(groups, Tensor) or not isinstance(groups, (list, tuple)) or len(groups) == 0:
        raise ValueError("groups must be a non-empty list of symmetric groups, e.g. [[U, V]]")
    base_params = {id(p) for g in base.param_groups for p in g["params"]}
    seen: set[int] = set()
    out = []
    for k, group in enumerate(groups):
        if isinstance(group, Tensor):
            raise ValueError(f"group {k} is a tensor; each group must be a list of tensors, e.g. [[U, V]]")
        group = list(group)
        if not group:
            raise ValueError(f"group {k} is empty")
        for j, Z in enumerate(group):
            where = f"group {k}, tensor {j}"
            if not isinstance(Z, Tensor):
                raise ValueError(f"{where} is a {type(Z).__name__}, not a tensor")
            if Z.dim() != 3:
                raise ValueError(f"{where} has shape {tuple(Z.shape)}; expected (T, N, d) with T={coupling.T}")
            if Z.shape[0] != coupling.T:
                raise ValueError(
                    f"{where} has T={Z.shape[0]} time steps but the coupling has T={coupling.T}"
                )
            if Z.shape[-1] != group[0].shape[-1]:
                raise ValueError(
                    f"{where} has embedding dimension d={Z.shape[-1]} but tensor 0 of the group has "
                    f"d={group[0].shape[-1]}; tensors that rotate together must share d"
                )
            if not Z.is_floating_point():
                raise ValueError(f"{where} has dtype {Z.dtype}; gauge steps need floating point parameters")
            if Z.device != group[0].device:
                raise ValueError(f"{where} is on {Z.device} but tensor 0 of the group is on {group[0].device}")
            if id(Z) not in base_params:
                raise ValueError(f"{where} is not a parameter of the base optimizer; pass the same tensors to both")
            if id(Z) in seen:
                raise ValueError(f"{where} appears twice in the groups; each tensor belongs to one group")
            seen.add(id(Z))
        out.append(group)
    return out
