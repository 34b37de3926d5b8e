"""Structured configs (dataclasses) and Hydra composition.

The YAML files in ``conf/`` select and fill these schemas: every option file of a config group
names its schema in its defaults list (``- /schema/optimizer@_here_: base``), so Hydra rejects an
unknown key or a wrong type while composing, before any work starts. Range checks that a type
cannot express (negative steps, unknown choices) live in ``__post_init__`` and run in
:func:`validate`.

The Typer front end calls :func:`compose` itself (Hydra's compose API reads no ``sys.argv`` and
makes no run folder); ``train.py`` creates the run folder.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict


class ConfigError(ValueError):
    """A config or override that cannot work; the message says what to change."""


# ----------------------------------------------------------------------------- enums
class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"


class Schedule(str, Enum):
    constant = "constant"
    decay = "decay"  # rho_s = rho_0 (s_bar / (s + s_bar))^power  (paper Sec. 5.1 / 5.3)


class BaseName(str, Enum):
    gd = "gd"
    adagrad = "adagrad"
    adam = "adam"


class Solver(str, Enum):
    natural = "natural"
    procrustes = "procrustes"


class Rotation(str, Enum):
    linear = "linear"
    expm = "expm"
    cayley = "cayley"


class StateTransform(str, Enum):  # GoldstoneGD(state_transform=...): base second moments under a gauge rotation
    none = "none"
    rotate_diag = "rotate_diag"
    isotropic = "isotropic"
    reset = "reset"


def choice(value) -> str:
    """The string of a config choice: typed configs hold Enum members, plain ones strings."""
    return value.value if isinstance(value, Enum) else str(value)


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


# ----------------------------------------------------------------------------- groups
@dataclass
class OptimizerConfig:
    """Schema of ``conf/optimizer/{gd,adagrad,adam}.yaml``."""

    name: str = "gd"  # gd | adagrad | adam (goldstone: see GoldstoneConfig)
    lr: float = 0.01  # rho_0
    schedule: Schedule = Schedule.constant
    decay_steps: float = 100.0  # s_bar of the decaying schedule
    decay_power: float = 0.7
    clip: Optional[float] = None  # element-wise gradient clipping to [-clip, clip]
    momentum: float = 0.0  # gd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam only
    eps: float = 1e-8  # adam / adagrad
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        valid = ["goldstone"] if isinstance(self, GoldstoneConfig) else [b.value for b in BaseName]
        if self.name not in valid:
            raise ConfigError(f"optimizer.name must be one of {', '.join(valid)}, got '{self.name}'")
        _positive("optimizer.lr", self.lr)
        _positive("optimizer.decay_steps", self.decay_steps)
        _positive("optimizer.decay_power", self.decay_power, allow_zero=True)
        _positive("optimizer.clip", self.clip)
        _positive("optimizer.eps", self.eps)
        _positive("optimizer.weight_decay", self.weight_decay, allow_zero=True)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optimizer.momentum must be in [0, 1), got {self.momentum}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {list(self.betas)}")
        # a setting of another base optimizer would be taken without effect (adagrad has no momentum)
        base = getattr(self, "base", self.name)  # goldstone: its base (None: the model's tuned base, known later)
        base = getattr(base, "value", base)
        for key, users, default in (("momentum", ("gd",), 0.0), ("betas", ("adam",), [0.9, 0.999]),
                                    ("eps", ("adam", "adagrad"), 1e-8)):
            value = list(self.betas) if key == "betas" else getattr(self, key)
            if base is not None and base not in users and value != default:
                what = f"optimizer={base}" if base == self.name else f"optimizer.base={base}"
                raise ConfigError(f"optimizer.{key}={getattr(self, key)} has no effect with {what} (it is a "
                                  f"setting of {' and '.join(users)}); drop it, or choose "
                                  f"{'optimizer.base' if base != self.name else 'optimizer'}={users[0]}")


@dataclass
class GoldstoneConfig(OptimizerConfig):
    """Schema of ``conf/optimizer/goldstone.yaml``: a base optimizer plus gauge steps (Algorithm 1)."""

    name: str = "goldstone"
    # the optimizer for the k1 steps in the full parameter space; null: the model's tuned base
    # (its `tuned.goldstone.base`), gd if it names none
    base: Optional[BaseName] = None
    solver: Solver = Solver.procrustes
    k1: int = 50  # base steps between gauge steps
    k2: int = 10  # natural-gradient steps per gauge step (natural solver)
    lr_scale: float = 1.0  # multiplies rho' of Eq. 17 (natural solver)
    keep_gauge_fields: bool = True  # paper: gauge fields are not reset between rounds
    rotation: Rotation = Rotation.expm  # natural solver: how the rotation is applied (linear: the paper, not exact)
    allow_reflections: bool = True  # full O(d) (True: procrustes per edge, natural flips walls first) or SO(d)
    max_sweeps: int = 100  # procrustes on graphs with cycles
    tol: float = 1e-10  # procrustes sweeps: stop when psi decreases by less (relative)
    state_transform: StateTransform = StateTransform.none  # base second moments under a rotation (GoldstoneGD)
    # GoldstoneGD(balance=model.balance_sides()): each time step balanced over GL(d) before the
    # procrustes rotation; only for models whose local loss sees U, V only through U V^T (dense_mf)
    balance: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k1 < 1:
            raise ConfigError(f"optimizer.k1 must be >= 1, got {self.k1}")
        if self.balance and self.solver != Solver.procrustes:
            raise ConfigError(f"optimizer.balance=true needs optimizer.solver=procrustes, got {self.solver.value}")
        if self.k2 < (1 if self.solver == Solver.natural else 0):
            raise ConfigError(f"optimizer.k2 must be >= {1 if self.solver == Solver.natural else 0}"
                              f"{' with optimizer.solver=natural' if self.solver == Solver.natural else ''}, "
                              f"got {self.k2}")
        if not (math.isfinite(self.tol) and self.tol >= 0):
            raise ConfigError(f"optimizer.tol must be a non-negative number, got {self.tol}")
        if self.balance and self.state_transform == "isotropic":
            raise ConfigError("optimizer.balance=true cannot go with optimizer.state_transform=isotropic (a "
                              "balancing map is not orthogonal); use rotate_diag or none")
        _positive("optimizer.lr_scale", self.lr_scale)
        if self.max_sweeps < 1:
            raise ConfigError(f"optimizer.max_sweeps must be >= 1, got {self.max_sweeps}")


@dataclass
class SyntheticDataConfig:
    """Schema of ``conf/data/synthetic.yaml``: the paper's Sec. 5.1 data."""

    name: str = "synthetic"
    n_rows: int = 10  # X is n_rows x n_cols
    n_cols: int = 10
    rank: int = 3  # rank of the true factors Ub, Vb (3 x 10 in the paper)
    noise_var: float = 1e-3
    T: int = 30
    time_dependent: bool = False  # False: the same X at every t (paper); True: rotating true factors
    drift: float = 0.05  # radians per time step of the true item factors when time_dependent
    seed: int = 0  # the data's own seed (runs with different `seed` share the same data)

    def __post_init__(self) -> None:
        for k in ("n_rows", "n_cols", "rank", "T"):
            if getattr(self, k) < 1:
                raise ConfigError(f"data.{k} must be >= 1, got {getattr(self, k)}")
        if self.rank > min(self.n_rows, self.n_cols):
            raise ConfigError(f"data.rank={self.rank} exceeds min(n_rows, n_cols)={min(self.n_rows, self.n_cols)}")
        _positive("data.noise_var", self.noise_var, allow_zero=True)


@dataclass
class DenseMFConfig:
    """Schema of ``conf/model/dense_mf.yaml``: dense dynamic Gaussian MF (paper Eqs. 4-7)."""

    name: str = "dense_mf"
    d: int = 3
    coupling: float = 10.0  # lambda of Eq. 6
    init_scale: float = 0.1  # std of the random initialization

    def __post_init__(self) -> None:
        if self.d < 1:
            raise ConfigError(f"model.d must be >= 1, got {self.d}")
        _positive("model.coupling", self.coupling, allow_zero=True)
        _positive("model.init_scale", self.init_scale)


@dataclass
class MovieLensDataConfig:
    """Schema of ``conf/data/movielens.yaml``: MovieLens ratings preprocessed as in Sec. 5.2."""

    name: str = "movielens"
    path: str = "data/ml-20m"  # a MovieLens folder or ratings file (any layout), or a variant name under data/
    T: int = 100  # equal-duration time bins
    seed: int = 0  # the train/validation/test split's seed (runs with different `seed` share the split)
    split: list[float] = field(default_factory=lambda: [0.5, 0.2, 0.3])  # train, validation, test
    cache_dir: Optional[str] = None  # processed-array cache (null: $GOLDSTONE_CACHE_DIR or data/cache/movielens)
    use_cache: bool = True
    # [start, end]: use only the ratings in this range (unix seconds or ISO dates, UTC) and bin it; null: all
    time_range: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if self.T < 1:
            raise ConfigError(f"data.T must be >= 1, got {self.T}")
        fr = list(self.split)
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-9 or fr[0] == 0:
            raise ConfigError(f"data.split must be three fractions (train > 0, validation, test) summing to 1, got {fr}")
        if self.time_range is not None:
            from goldstone_cli.data.movielens import check_time_range

            try:
                check_time_range(self.time_range)
            except ValueError as exc:
                raise ConfigError(f"data.{exc}; e.g. data.time_range=[1995-01-01,2016-01-01]") from None


@dataclass
class MovieLensModelConfig:
    """Schema of ``conf/model/movielens.yaml``: sparse dynamic Bernoulli MF (paper Eqs. 6, 8, 9)."""

    name: str = "movielens"
    d: int = 30  # embedding dimension
    coupling: float = 10.0  # lambda of Eq. 6
    gamma: float = 1.0  # local regularizer of Eq. 9
    init_scale: float = 0.1  # std of the random initialization
    batch_size: Optional[int] = None  # null: full batch (paper); else training ratings per step
    chunk_size: int = 1048576  # ratings gathered at once (memory ~ 4 * chunk_size * d numbers)
    # trainer.distributed: item rows "sharded" (gathered each step) or "replicated" (gradient all-reduced)
    items: str = "sharded"

    def __post_init__(self) -> None:
        if self.d < 1:
            raise ConfigError(f"model.d must be >= 1, got {self.d}")
        if self.items not in ("sharded", "replicated"):
            raise ConfigError(f"model.items must be 'sharded' or 'replicated', got {self.items!r}")
        _positive("model.coupling", self.coupling, allow_zero=True)
        _positive("model.gamma", self.gamma, allow_zero=True)
        _positive("model.init_scale", self.init_scale)
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"model.batch_size must be >= 1 or null (full batch), got {self.batch_size}")
        if self.chunk_size < 1:
            raise ConfigError(f"model.chunk_size must be >= 1, got {self.chunk_size}")


@dataclass
class CorpusDataConfig:
    """Schema of ``conf/data/{sotu,cooc}.yaml``: a prepared co-occurrence folder (``data/cooc.py``),
    prepared on first use from ``source`` when ``path`` does not exist yet."""

    name: str = "sotu"
    path: str = "data/sotu-10y-v3000-relfreq"  # the prepared folder (manifest.json, vocab.tsv, times.tsv, cooc_*.npz)
    source: Optional[str] = "sotu"  # what to prepare it from if missing: sotu, a folder of YEAR*.txt files, or null
    bin_years: int = 10  # width of the time bins (years) when preparing
    vocab_size: int = 3000  # vocabulary size when preparing
    rank: str = "relfreq"  # relfreq | count: how the vocabulary is chosen when preparing
    keep_words: list[str] = field(default_factory=list)  # always in the vocabulary when the corpus has them
    verify: bool = False  # check every file's sha256 against the manifest when loading

    def __post_init__(self) -> None:
        if self.bin_years < 1:
            raise ConfigError(f"data.bin_years must be >= 1, got {self.bin_years}")
        if self.vocab_size < 2:
            raise ConfigError(f"data.vocab_size must be >= 2, got {self.vocab_size}")
        if self.rank not in ("relfreq", "count"):
            raise ConfigError(f"data.rank must be relfreq or count, got '{self.rank}'")


@dataclass
class DWEConfig:
    """Schema of ``conf/model/dwe.yaml``: Dynamic Word Embeddings (paper Sec. 3.2 model 3, Sec. 5.3)."""

    name: str = "dwe"
    inference: str = "variational"  # variational (smoothing, paper) | map (point estimates, cheaper)
    d: int = 100  # embedding dimension
    D: float = 1.0e-3  # diffusion constant per year: transition variance D * tau_t
    sigma0: float = 1.0  # std of the zero-mean prior term
    neg_ratio: float = 1.0  # r: negative counts per positive count
    neg_exponent: float = 0.75  # context distribution exponent of the negatives
    coupled: bool = True  # false: no chain prior (the alignment baseline before Procrustes)
    batch_words: int = 1000  # words (rows) per minibatch; 0: all
    batch_contexts: int = 1000  # contexts (columns) per minibatch; 0: all
    init_mean_std: float = 0.1  # std of the random initial means
    init_std: float = 0.1  # initial posterior std of every coordinate (variational)
    test_steps: float = 0.1  # fraction of time steps held out entirely (interior steps)
    test_mass: float = 0.1  # fraction of the co-occurrence counts of training steps held out
    split_seed: int = 0  # seed of the held-out split (runs with different `seed` share it)
    eval_chunk: int = 4194304  # logits formed at once during evaluation
    val_mass: float = 0.0  # fraction of the remaining training counts held out for validation (picks best.pt)

    def __post_init__(self) -> None:
        if self.inference not in ("variational", "map"):
            raise ConfigError(f"model.inference must be variational or map, got '{self.inference}'")
        if self.d < 1:
            raise ConfigError(f"model.d must be >= 1, got {self.d}")
        for k in ("D", "sigma0", "init_mean_std", "init_std"):
            _positive(f"model.{k}", getattr(self, k))
        _positive("model.neg_ratio", self.neg_ratio, allow_zero=True)
        for k in ("batch_words", "batch_contexts"):
            if getattr(self, k) < 0:
                raise ConfigError(f"model.{k} must be >= 0 (0: all), got {getattr(self, k)}")
        for k in ("test_steps", "test_mass", "val_mass"):
            if not 0 <= getattr(self, k) < 1:
                raise ConfigError(f"model.{k} must be in [0, 1), got {getattr(self, k)}")
        if self.eval_chunk < 1:
            raise ConfigError(f"model.eval_chunk must be >= 1, got {self.eval_chunk}")


@dataclass
class TrainerConfig:
    steps: int = 5000
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 1000
    device: Device = Device.auto
    dtype: DType = DType.float64
    progress: bool = True  # tqdm progress bar
    target: Optional[float] = None  # stop early once the model's target metric reaches this value
    # row-sharded training on torch.distributed: launch with torchrun (or srun); each rank holds its
    # rows of every (T, N, d) tensor; NCCL on GPUs, gloo on CPUs (README "Training on several GPUs or nodes")
    distributed: bool = False
    # run the model's step through torch.compile where the model has a compiled path (MovieLens:
    # the gamma / psi pass and the ratings pass; DWE: the likelihood's softplus/sigmoid pass over the logits), falling back
    # to the eager step with a warning; off by default: on the 2-core CPU it did not pay for MovieLens
    # and made the DWE step 7-11% faster (docs/benchmarks.md, "Roofline (issue 16)")
    compile: bool = False
    # refuse a model whose predicted peak memory exceeds what the device has (model=dwe, also on several
    # ranks, and model=movielens in one process; goldstone_cli/models/memory.py), before it is made
    memory_check: bool = True

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"trainer.steps must be >= 0, got {self.steps}")
        for k in ("log_every", "eval_every", "checkpoint_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"trainer.{k} must be >= 1, got {getattr(self, k)}")


@dataclass
class Config:
    model: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0  # initialization (and minibatch) seed
    output_dir: str = "outputs"  # runs go to <output_dir>/<model option>/<date>_<time>_<name>
    run_dir: Optional[str] = None  # explicit run folder (overrides the naming scheme)
    resume: Optional[str] = None  # a run folder to continue
    # what ran: names the run folder, summary.json and the plot title; null: set when composing
    # (the experiment's name, else the optimizer's: gd, adam, goldstone-adagrad-natural, ...)
    name: Optional[str] = None
    # the config group options this run was composed from (model, data, optimizer, experiment);
    # recorded when composing: runs go to <output_dir>/<choices.model>/...
    choices: dict[str, Optional[str]] = field(default_factory=dict)
    # the model option's tuned optimizer settings (a `tuned:` block in conf/model/*.yaml); compose()
    # applies the part for the chosen optimizer and removes the table from the composed config
    tuned: dict[str, Any] = field(default_factory=dict)


_SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"dense_mf": DenseMFConfig, "movielens": MovieLensModelConfig, "dwe": DWEConfig},
    "data": {"synthetic": SyntheticDataConfig, "movielens": MovieLensDataConfig,
             "sotu": CorpusDataConfig, "cooc": CorpusDataConfig},
    "optimizer": {"base": OptimizerConfig, "goldstone": GoldstoneConfig},
}


def register_schema(group: str, name: str, node: type) -> None:
    """Register a dataclass schema; YAML option files refer to it as ``/schema/<group>@_here_: <name>``."""
    _SCHEMAS.setdefault(group, {})[name] = node
    ConfigStore.instance().store(group=f"schema/{group}", name=name, node=node)


def _register_all() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="tuned", name="none", node={})  # the defaults list's `tuned` entry (see compose())
    for group, nodes in _SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


_register_all()


def keep_words_tag(words) -> str:
    """The part of a prepared corpus's folder name that stands for its ``keep_words``: empty for
    none, else ``-k`` and 8 hex digits of their hash (conf/data/sotu.yaml: ``${keep_tag:...}``)."""
    import hashlib

    keep = sorted({str(w).lower().replace("\u2019", "'") for w in (words or ()) if str(w).strip()})
    return "-k" + hashlib.sha256("\n".join(keep).encode()).hexdigest()[:8] if keep else ""


if not OmegaConf.has_resolver("keep_tag"):
    OmegaConf.register_new_resolver("keep_tag", keep_words_tag)


# ----------------------------------------------------------------------------- conf/ location
def conf_dir() -> Path:
    """The folder with ``config.yaml``: $GOLDSTONE_CONF, the copy shipped in the installed package
    (``goldstone_cli/conf``), or the repository's top-level ``conf/`` (source checkout)."""
    env = os.environ.get("GOLDSTONE_CONF")
    if env:
        path = Path(env)
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"GOLDSTONE_CONF={env} has no config.yaml")
        return path.resolve()
    candidates = []
    try:
        candidates.append(Path(str(resources.files("goldstone_cli.conf"))))
    except (ModuleNotFoundError, TypeError):
        pass
    candidates.append(Path(__file__).resolve().parent / "conf")
    candidates.append(Path(__file__).resolve().parent.parent / "conf")
    for path in candidates:
        if (path / "config.yaml").is_file():
            return path.resolve()
    raise ConfigError(
        "cannot find the goldstone configs (config.yaml); reinstall the package or set GOLDSTONE_CONF to a conf/ folder"
    )


def group_options(group: str) -> list[str]:
    """The options of a config group, from the YAML files in ``conf/<group>/``."""
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


GROUPS = ("model", "data", "optimizer", "experiment", "sweep")

# The optimizer presets of earlier versions, and what replaced each (one line each).
REMOVED_OPTIMIZERS = {
    "gd_paper": "experiment=fig2_gd_paper (the paper's clipped, decaying GD on the Sec. 5.1 data) "
                "or optimizer=gd (each model's tuned GD)",
    "adagrad_paper": "optimizer=adagrad model=movielens (tuned: the paper's lr 1) or experiment=fig3_adagrad",
    "goldstone_adagrad": "optimizer=goldstone model=movielens (tuned: AdaGrad lr 1, natural solver, k1=100, k2=10) "
                         "or experiment=fig3",
    "adam_dwe": "optimizer=adam model=dwe (tuned: rho_0=0.1, s_bar=1000, power 0.7) or experiment=dwe_paper_adam",
    "goldstone_adam_dwe": "optimizer=goldstone model=dwe (tuned: the same Adam, k1=10) or experiment=dwe_paper",
}
TUNED_KEYS = ("gd", "adagrad", "adam", "goldstone")  # the sections of a model's `tuned:` block
_NO_TUNING = "none"  # `tuned=none`: the optimizer option's own settings, not the model's tuned ones
_ACTIVE = "_active"  # the ConfigStore node compose() fills with the tuned settings of one composition


# ----------------------------------------------------------------------------- composition
def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose ``config.yaml`` with Hydra overrides and validate it; raise ConfigError on a bad override.

    ``model=X optimizer=Y`` is optimizer Y with model X's tuned settings: the model option's
    ``tuned:`` block has a section per optimizer (``gd``, ``adagrad``, ``adam``: learning rate,
    schedule, clip, ...; ``goldstone``: base, solver, k1, k2, ...). Goldstone-GD takes the section of
    its base and then its own. They are applied as a config of the defaults list (``tuned``) after
    the model and before the experiment and the command line, so an experiment's settings and every
    explicit override win. ``tuned=none`` turns this off."""
    overrides = list(overrides)
    _check_group_choices(overrides)
    # experiment=null: no experiment (Hydra takes null for a group only as `~experiment`)
    overrides = ["~experiment" if ov == "experiment=null" else ov for ov in overrides]
    if _tuned_choice(overrides):
        # one composition in the common case: the tuned settings predicted from the overrides are
        # checked against what was composed (an experiment may pick another model, optimizer or base)
        node = _predict_tuned(overrides)
        for attempt in range(3):
            try:
                cfg = _compose_tuned(overrides, node)
            except ConfigError:
                if attempt or not node:
                    raise
                node = {}  # a wrong guess (e.g. an experiment picks another optimizer): compose without
                cfg = _compose_tuned(overrides, node)
            actual = tuned_settings(cfg)
            if actual == node:
                break
            node = actual
        else:  # pragma: no cover - the tuned settings cannot change the model, optimizer or base twice
            raise ConfigError(f"the tuned optimizer settings of {' '.join(overrides)} do not settle; set optimizer.base")
    else:
        cfg = _hydra_compose(overrides)
    choices = {g: cfg.hydra.runtime.choices.get(g) for g in ("model", "data", "optimizer", "experiment")}
    with open_dict(cfg):
        del cfg["hydra"]
        del cfg["tuned"]
    if cfg.optimizer.get("name") == "goldstone" and cfg.optimizer.get("base") is None:
        cfg.optimizer.base = BaseName.gd.value
    cfg.choices = choices
    if cfg.name is None:
        cfg.name = choices["experiment"] or optimizer_label(cfg.optimizer)
    validate(cfg)
    return cfg


def _hydra_compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra/OmegaConf errors: keep their message, make it one line
        raise ConfigError(_one_line(exc) + (_experiment_hint(exc) or _sweep_hint(exc)
                                            or _did_you_mean(exc, overrides))) from exc
    finally:
        GlobalHydra.instance().clear()


def _tuned_choice(overrides: list[str]) -> bool:
    """False when the command line says ``tuned=none``; reject any other ``tuned=`` value."""
    tuning = True
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if sep and key.lstrip("+~") == "tuned":
            if value != _NO_TUNING:
                raise ConfigError(f"tuned={value}: the only choice is tuned=none (the optimizer option's own "
                                  "settings instead of the model's tuned ones)")
            tuning = False
    return tuning


def tuned_settings(cfg: DictConfig) -> dict[str, Any]:
    """The optimizer settings that the composed model's ``tuned:`` block gives the composed optimizer."""
    table = OmegaConf.to_container(cfg.tuned, resolve=True) if cfg.get("tuned") else {}
    model = cfg.hydra.runtime.choices.get("model") if "hydra" in cfg else cfg.model.get("name")
    base = cfg.optimizer.get("base")
    return _tuned_node(table, str(cfg.optimizer.get("name")), choice(base) if base is not None else None, str(model))


def _tuned_node(table: dict[str, Any], name: str, base: Optional[str], model: str) -> dict[str, Any]:
    """Model ``tuned:`` table -> the settings for optimizer ``name`` (goldstone: on ``base``, or on
    the table's ``goldstone.base`` when None)."""
    bad = sorted(set(table) - set(TUNED_KEYS))
    if bad:
        raise ConfigError(f"conf/model/{model}.yaml: tuned.{bad[0]} is not an optimizer; "
                          f"the sections of `tuned:` are {', '.join(TUNED_KEYS)}")
    for k, v in table.items():
        if not isinstance(v, dict):
            raise ConfigError(f"conf/model/{model}.yaml: tuned.{k} must be a mapping of optimizer settings")
    if name != "goldstone":
        return dict(table.get(name) or {})
    gauge = dict(table.get("goldstone") or {})
    base = base if base is not None else str(gauge.get("base") or BaseName.gd.value)
    if base not in [b.value for b in BaseName]:
        raise ConfigError(f"conf/model/{model}.yaml: tuned.goldstone.base must be one of gd, adagrad, adam, got '{base}'")
    # the base option's own eps first (adagrad 1e-10, adam 1e-8), so that Goldstone-GD on a base runs
    # that base as `optimizer=<base>` does, the gauge steps aside; then the model's tuned settings
    return {**_option_eps(base), **dict(table.get(base) or {}), **gauge, "base": base}


def _option_eps(name: str) -> dict[str, Any]:
    """``{"eps": value}`` as conf/optimizer/<name>.yaml sets it, else ``{}``."""
    import yaml

    try:
        doc = yaml.safe_load((conf_dir() / "optimizer" / f"{name}.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return {"eps": doc["eps"]} if isinstance(doc, dict) and "eps" in doc else {}


def _predict_tuned(overrides: list[str]) -> dict[str, Any]:
    """The tuned settings for the model, optimizer and base named on the command line (or the
    defaults of config.yaml), read from the YAML files; compose() checks the guess."""
    import yaml

    def load(path: Path) -> dict[str, Any]:
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            return {}
        return doc if isinstance(doc, dict) else {}

    picked: dict[str, Optional[str]] = {"model": None, "optimizer": None, "optimizer.base": None}
    experiment = None
    for ov in overrides:  # the command line first: it wins
        key, sep, value = ov.partition("=")
        key = key.lstrip("+~")
        if sep and key in picked:
            picked[key] = value
        elif sep and key == "experiment" and value != "null":
            experiment = value
    if experiment:  # then the experiment's choices (`- override /model: X`) and its optimizer.base
        doc = load(conf_dir() / "experiment" / f"{experiment}.yaml")
        for entry in doc.get("defaults") or []:
            for g in ("model", "optimizer"):
                if isinstance(entry, dict) and picked[g] is None and f"override /{g}" in entry:
                    picked[g] = entry[f"override /{g}"]
        base = (doc.get("optimizer") or {}).get("base") if isinstance(doc.get("optimizer"), dict) else None
        if picked["optimizer.base"] is None and base is not None:
            picked["optimizer.base"] = str(base)
    for entry in load(conf_dir() / "config.yaml").get("defaults") or []:  # then config.yaml's defaults
        if isinstance(entry, dict):
            for g in ("model", "optimizer"):
                if picked[g] is None and g in entry:
                    picked[g] = entry[g]
    table = tuned_tables().get(str(picked["model"]), {})
    try:
        return _tuned_node(table, str(picked["optimizer"]), picked["optimizer.base"], str(picked["model"]))
    except ConfigError:
        return {}  # composing says what is wrong


def _compose_tuned(overrides: list[str], node: dict[str, Any]) -> DictConfig:
    if not node:
        return _hydra_compose(overrides)
    ConfigStore.instance().store(group="tuned", name=_ACTIVE, package="_global_", node={"optimizer": node})
    return _hydra_compose(overrides + [f"tuned={_ACTIVE}"])


def optimizer_label(opt) -> str:
    """A short name for an optimizer config: ``gd``, ``adam``, ``goldstone-adagrad-natural``, ..."""
    name = str(opt.get("name"))
    if name != "goldstone":
        return name
    return f"goldstone-{choice(opt.get('base') or 'gd')}-{choice(opt.get('solver'))}"


def run_names(cfg: DictConfig) -> dict[str, str]:
    """What a run is called: ``model`` (the model option, e.g. dwe_map: the folder under output_dir),
    ``name`` (the run's name, e.g. fig2_gd_paper) and ``method`` (the optimizer, e.g. gd).
    Configs saved before these were recorded fall back to the model's and the optimizer's names."""
    choices = cfg.get("choices") or {}
    method = optimizer_label(cfg.optimizer)
    return {"model": str(choices.get("model") or cfg.model.name), "name": str(cfg.get("name") or method),
            "method": method}


def tuned_tables() -> dict[str, dict[str, Any]]:
    """Each model option's ``tuned:`` block, read from ``conf/model/*.yaml`` without composing (for
    ``--help``; a parent option named in a file's defaults list, as ``dwe_map`` names ``dwe``, is followed)."""
    import yaml

    folder = conf_dir() / "model"
    options = group_options("model")

    def table(option: str, depth: int = 0) -> dict[str, Any]:
        try:
            doc = yaml.safe_load((folder / f"{option}.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            return {}
        if isinstance(doc.get("tuned"), dict):
            return doc["tuned"]
        for entry in doc.get("defaults") or []:
            if isinstance(entry, str) and entry in options and entry != option and depth < 5:
                return table(entry, depth + 1)
        return {}

    return {o: table(o) for o in options}


def tuned_cells(table: dict[str, Any]) -> list[str]:
    """What ``optimizer=gd|adagrad|adam|goldstone`` means under a model's tuned table, one short text
    each (``goldstone train --help`` and the README's table)."""
    def base(name: str) -> str:
        t = table.get(name) or {}
        parts = [f"lr {t['lr']}"] if "lr" in t else []
        if t.get("schedule") == "decay":
            parts.append(f"decay({t.get('decay_steps')}, {t.get('decay_power')})")
        if t.get("clip") is not None:
            parts.append(f"clip {t['clip']}")
        return ", ".join(parts) if parts else "(defaults)"

    g = table.get("goldstone") or {}
    gauge = (f"on {g.get('base', 'gd')}, {g.get('solver', 'procrustes')}, k1={g.get('k1', 50)}"
             + (f", k2={g['k2']}" if g.get("solver") == "natural" and "k2" in g else ""))
    return [base(b.value) for b in BaseName] + [gauge]


def describe_tuned(table: dict[str, Any]) -> str:
    """One line for ``--help``: what each optimizer option means for a model's tuned table."""
    names = [b.value for b in BaseName] + ["goldstone"]
    return " | ".join(f"{n} {c}" for n, c in zip(names, tuned_cells(table)))


#: the data options each model option trains on (the model builders check it too)
MODEL_DATA = {"dense_mf": ("synthetic",), "movielens": ("movielens",), "dwe": ("sotu", "cooc")}
#: model options with a balancing map for optimizer.balance (models.dense_mf.balance_sides)
BALANCED_MODELS = ("dense_mf",)


def check_model_data(model: str, data: str) -> None:
    """ConfigError unless model option ``model`` trains on data option ``data`` (:data:`MODEL_DATA`)."""
    ok = MODEL_DATA.get(model)
    if ok is not None and data not in ok:
        raise ConfigError(f"model={model} needs data={' or data='.join(ok)}, got data={data}"
                          + (" (a co-occurrence corpus)" if model == "dwe" else ""))


def validate(cfg: DictConfig) -> DictConfig:
    """Reject keys a schema does not know (also those forced in with ``+key=``), then instantiate
    the dataclasses, running their ``__post_init__`` range checks."""
    for group in ("model", "data", "optimizer", "trainer"):
        node = cfg.get(group)
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if schema is not None and schema is not dict:
            known = set(schema.__dataclass_fields__)
            unknown = sorted(set(node.keys()) - known)
            if unknown:
                raise ConfigError(
                    f"unknown key {group}.{unknown[0]} for {group} '{node.get('name', group)}'"
                    f"{_close(unknown[0], known, group + '.')}; valid keys: {', '.join(sorted(known))}"
                )
    top = set(Config.__dataclass_fields__) - {"tuned", "choices"}  # both set by compose()
    unknown = sorted(set(cfg.keys()) - set(Config.__dataclass_fields__))
    if unknown:  # forced in with +KEY=VALUE (without the +, Hydra refuses it)
        raise ConfigError(f"unknown top-level key {unknown[0]}{_close(unknown[0], top)}; valid keys: "
                          f"{', '.join(sorted(top))}, and the groups' settings as GROUP.KEY (model.d=5)")
    _check_finite(cfg)
    try:
        OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(_one_line(exc)) from exc
    model, data = str(cfg.model.get("name")), str(cfg.data.get("name"))
    check_model_data(model, data)
    if cfg.optimizer.get("balance") and model not in BALANCED_MODELS:
        raise ConfigError(f"optimizer.balance=true: model={model} has priors or penalties on its embeddings that a "
                          f"balancing map would change (it is there for {', '.join(BALANCED_MODELS)}); drop "
                          "optimizer.balance")
    if cfg.get("name") is not None and not _plain_name(str(cfg.name)):
        raise ConfigError(f"name={cfg.name!r} becomes part of the run folder's name: give a plain name without "
                          "'/' or '\\' (and not '.' or '..'), e.g. name=adagrad-lr1")
    return cfg


def _plain_name(name: str) -> bool:
    """A name that stays one folder-name fragment: no separators, not '.' or '..', printable."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and name.isprintable()


def _close(word: str, candidates, prefix: str = "", suffix: str = "") -> str:
    """``" (did you mean PREFIX<closest>SUFFIX?)"`` (difflib), or "" when nothing is close."""
    import difflib

    match = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{match[0]}{suffix}?)" if match else ""


def _experiment_hint(exc: BaseException) -> str:
    """An experiment's settings that do not fit the model/optimizer chosen on the command line."""
    import re

    m = re.search(r"In 'experiment/([^']+)'", str(exc))
    if not m:
        return ""
    return (f" (experiment={m.group(1)} sets up its own model, data and optimizer; a model=, data= or optimizer= "
            "override that does not fit them fails: drop it or choose another experiment)")


def _sweep_hint(exc: BaseException) -> str:
    """Hydra's "Ambiguous value for argument 'optimizer=goldstone,adam'": a comma list is a sweep."""
    if "Ambiguous value for argument" not in str(exc):
        return ""
    return (" (a comma list runs one model per value: `goldstone sweep KEY=A,B`; `goldstone train` runs one; a "
            "list value is written in brackets, KEY=[A,B])")


def _did_you_mean(exc: BaseException, overrides: list[str]) -> str:
    """For Hydra's "Key 'stepz' not in 'TrainerConfig'": the closest key of that schema."""
    import re

    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    text = "\n".join(str(e) for e in chain)
    m = re.search(r"Key '([^']+)' not in '([A-Za-z_]\w*)'", text)
    if not m:
        return ""
    key, schema_name = m.groups()
    full = re.search(r"full_key: (\S+)", text)
    prefix = full.group(1).rsplit(".", 1)[0] + "." if full and "." in full.group(1) else ""
    schemas = [Config, TrainerConfig] + [t for nodes in _SCHEMAS.values() for t in nodes.values()]
    schema = next((t for t in schemas if t.__name__ == schema_name), None)
    if schema is None:
        return ""
    fields = set(schema.__dataclass_fields__) - {"tuned", "choices"}
    if schema is Config:
        if key == "experiment":  # experiment.KEY=VALUE: an experiment is chosen, it has no keys of its own
            return (" (an experiment is chosen with experiment=NAME; it sets model.*, data.*, optimizer.* and "
                    "trainer.* keys, which are overridden by those names, e.g. trainer.steps=100)")
        groups = [g for g in GROUPS if g != "sweep"]
        match = _close(key, groups)
        value = _given(overrides, key)
        if match and value is not None:  # optimizr=adam -> optimizer=adam
            return match[:-2] + f"={value}?)"
        return match or _close(key, fields) or _other_group(key, None, value) or (
            f" (valid: {', '.join(g + '=OPTION' for g in groups)}, {', '.join(sorted(fields - set(groups) - {'trainer'}))}"
            ", and each group's settings as GROUP.KEY, e.g. trainer.steps=100; `goldstone config` prints them all)")
    group = prefix.split(".", 1)[0] or None
    value = _given(overrides, prefix + key)
    if schema is OptimizerConfig and key in GoldstoneConfig.__dataclass_fields__:  # optimizer=adam optimizer.k1=10
        name = _given(overrides, "optimizer") or "BASE"
        if key == "base":
            return f" (optimizer.base is the base optimizer of optimizer=goldstone: optimizer=goldstone optimizer.base={value or name})"
        return (f" (optimizer.{key} is a setting of optimizer=goldstone, which takes this optimizer's steps as its "
                f"base: optimizer=goldstone optimizer.base={name} optimizer.{key}={value or 'VALUE'})")
    return _close(key, fields, prefix) or _other_group(key, group, value)


def _given(overrides: list[str], key: str) -> Optional[str]:
    """The value the command line gives ``key`` (``+key=`` and ``~key=`` too), or None."""
    return next((v for k, _, v in (ov.partition("=") for ov in overrides) if k.lstrip("+~") == key), None)


# what users coming from other trainers type for our keys
_ALIASES = {"learning_rate": "lr", "num_steps": "steps", "max_steps": "steps", "iterations": "steps",
            "dim": "d", "embedding_dim": "d"}


def _other_group(key: str, group: Optional[str], value: Optional[str]) -> str:
    """``" (did you mean trainer.steps=10?)"`` for a key of another group (``steps=10``, ``model.lr=0.1``,
    ``optimizer.learning_rate=0.1``): the first group, in the order trainer, optimizer, model, data, whose
    schema has ``key`` (or what ``_ALIASES`` maps it to); "" when none has."""
    schemas = {"trainer": [TrainerConfig], "optimizer": [OptimizerConfig, GoldstoneConfig],
               "model": list(_SCHEMAS["model"].values()), "data": list(_SCHEMAS["data"].values())}
    for name in (key, _ALIASES.get(key)):
        if name is None:
            continue
        for g, types in schemas.items():
            if g != group and any(name in t.__dataclass_fields__ for t in types) and name != "name":
                return f" (did you mean {g}.{name}{'=' + value if value is not None else ''}?)"
        if group is not None and name != key and any(name in t.__dataclass_fields__ for t in schemas[group]):
            return f" (did you mean {group}.{name}{'=' + value if value is not None else ''}?)"
    return ""


def _check_finite(cfg: DictConfig) -> None:
    """NaN and +-inf are valid YAML and Hydra floats (``optimizer.lr=nan``, ``trainer.target=inf``)
    but meaningless for every number in these schemas (learning rates, clip values, powers, scales,
    weights, targets, fractions, time ranges); they would also slip past range checks like
    ``value < 0``. Reject them for every float (and every float in a list) of every group."""
    import math

    for group in ("model", "data", "optimizer", "trainer"):
        node = cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        for key in node.keys():
            try:
                value = node[key]
            except Exception:  # an unresolved interpolation: reported by to_object below
                continue
            items = list(value) if OmegaConf.is_list(value) else [value]
            for v in items:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{group}.{key} must be a finite number, got {value if items == [value] else list(value)}")


def _check_group_choices(overrides: list[str]) -> None:
    """A clear one-line error for ``group=unknown`` that names the valid choices (and the closest)."""
    for ov in overrides:
        key, sep, value = ov.partition("=")
        key = key.lstrip("+~")
        if sep and key in GROUPS and "," not in value and not value.startswith(("glob(", "choice(", "range(")):
            if key == "experiment" and value == "null":
                continue
            if key == "optimizer" and value in REMOVED_OPTIMIZERS:
                raise ConfigError(f"optimizer={value} was removed; use {REMOVED_OPTIMIZERS[value]}")
            options = group_options(key)
            if options and value not in options:
                raise ConfigError(f"unknown {key} '{value}'{_close(value, options, key + '=')}; "
                                  f"valid choices: {', '.join(options)}")


def _one_line(exc: BaseException) -> str:
    """Hydra wraps the useful OmegaConf error ("Value 'abc' ... full_key: trainer.steps") in a
    generic one ("Error merging override ..."): report the innermost message with its key."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    inner = chain[-1]
    lines = [ln.strip() for ln in str(inner).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else type(inner).__name__
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    first = first.rstrip(":")
    return f"{key}: {first}" if key else first


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def _schema_for(group: str, name: str) -> type:
    if group == "optimizer":
        return GoldstoneConfig if name == "goldstone" else OptimizerConfig
    try:
        return _SCHEMAS[group][name]
    except KeyError:
        raise ConfigError(f"no schema for {group} '{name}'; known: {', '.join(sorted(_SCHEMAS.get(group, {})))}") from None


def load_run_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config a run was started with (``<run_dir>/config.yaml``), with ``key=value`` overrides
    (e.g. ``trainer.steps=20000`` to train longer), validated against the schemas."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml); pass resume=<a folder under outputs/>")
    try:
        saved = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax, not UTF-8
        raise ConfigError(f"{path} is not a valid run config ({_one_line(exc)}); restore it (it is rewritten by "
                          "every start of the run) or start a new run") from None
    missing = [g for g in ("model", "data", "optimizer", "trainer")
               if not isinstance(saved, DictConfig) or not isinstance(saved.get(g), DictConfig) or
               (g != "trainer" and not isinstance(saved[g].get("name"), str))]
    if missing:
        what = "is empty" if not isinstance(saved, DictConfig) or not len(saved) else \
            f"lacks the section(s) {', '.join(missing)} (each with its name)"
        raise ConfigError(f"{path} {what}: not a run config; restore it (it is rewritten by every start of the "
                          "run) or start a new run")
    base = OmegaConf.structured(Config)
    for group in ("model", "data", "optimizer"):
        base[group] = OmegaConf.structured(_schema_for(group, str(saved[group].name)))
    try:
        cfg = OmegaConf.merge(base, saved)
        OmegaConf.set_struct(cfg, True)
        for ov in overrides:
            key, sep, value = ov.partition("=")
            if not sep:
                raise ConfigError(f"override '{ov}' is not of the form key=value")
            if key in GROUPS:
                raise ConfigError(f"cannot switch {key} when resuming; start a new run instead")
            OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=True)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(_one_line(exc)) from exc
    cfg.resume = None
    if "tuned" in cfg:  # the schema's table, not part of a composed run's config
        with open_dict(cfg):
            del cfg["tuned"]
    validate(cfg)
    return cfg
