"""`goldstone sweep`: many training runs from one command, in parallel, resumable.

A sweep is a *plan*, a list of runs, each a list of Hydra overrides for ``goldstone train``:

- the named sweep ``conf/sweep/<name>.yaml`` (schema :class:`SweepConfig`) gives a grid of
  overrides in Hydra's multirun grammar (``optimizer=gd,goldstone``, ``seed=range(3)``,
  ``choice(...)``, ``glob(...)`` over config group options), optional named ``methods`` (bundles
  of overrides, e.g. Goldstone-GD with the natural vs the Procrustes gauge solver) and ``fixed``
  overrides applied to every run;
- command-line overrides are added to that grid and replace entries with the same key;
- a sweep file's ``model`` names the model its methods, fixed, target and report are written for:
  when the command line picks another model, they are left out (the runs use that model's defaults);
  a command line that picks its model and another one is refused (one plan, one set of settings).

Every combination is composed and validated with :func:`goldstone_cli.config.compose` before
anything is created. The plan is written to ``<sweep_dir>/sweep.json``; every run trains in its own
subprocess (``python -m goldstone_cli train run_dir=<sweep_dir>/<run> ...``, log in
``<run>/train.log``), so a crash in one run cannot take down the others. Re-invoking a sweep
(``--dir``) skips finished runs, resumes runs that have a checkpoint and starts the rest afresh,
with the CPU thread count per run recorded when the sweep first started runs (bit-exact resumes).

Runs are executed by the built-in local runner (``--jobs N`` processes, CPU threads divided among
them) or by a Hydra launcher plugin (``hydra/launcher=joblib|submitit_local|submitit_slurm``) that
receives the same per-run override lists.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from goldstone_cli.checkpoint import has_checkpoint
from goldstone_cli.config import ConfigError, _one_line, compose, conf_dir, group_options, register_schema
from goldstone_cli.io import atomic_write_json
from goldstone_cli.paths import UnsafeNameError, child
from goldstone_cli.runlock import holder

MANIFEST = "sweep.json"
RUN_STATUS = "sweep_status.json"  # written by the sweep next to each run's summary.json
FINISHED = ("completed", "target_reached")
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


# ----------------------------------------------------------------------------- schema
class LauncherName(str, Enum):
    local = "local"  # built-in: --jobs subprocesses on this machine
    joblib = "joblib"  # hydra-joblib-launcher
    submitit_local = "submitit_local"  # hydra-submitit-launcher, local executor (testing)
    submitit_slurm = "submitit_slurm"  # hydra-submitit-launcher, one Slurm array job


class TargetMode(str, Enum):
    min = "min"  # reached when metric <= value
    max = "max"  # reached when metric >= value


@dataclass
class TargetConfig:
    """The target for "steps / time to reach target" in the report."""

    metric: Optional[str] = None  # a metrics.csv column; null: each run's model target metric
    value: Optional[float] = None  # null: no target columns (unless runs set trainer.target)
    mode: TargetMode = TargetMode.min


@dataclass
class LauncherConfig:
    name: LauncherName = LauncherName.local
    # settings of the Hydra launcher plugin (hydra.launcher.<key>), validated against its schema,
    # e.g. {partition: gpu, timeout_min: 600, gpus_per_node: 1, cpus_per_task: 8}
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReportConfig:
    title: str = ""  # heading of report.md (default: the sweep's name)
    metric: Optional[str] = None  # held-out metric to plot; null: the model's target metric


@dataclass
class SweepConfig:
    """Schema of ``conf/sweep/<name>.yaml``."""

    name: str = "sweep"  # the sweep folder is outputs/sweeps/<name>_<date>_<time>
    description: str = ""
    overrides: list[str] = field(default_factory=list)  # the grid (Hydra multirun grammar)
    fixed: list[str] = field(default_factory=list)  # applied to every run
    methods: dict[str, list[str]] = field(default_factory=dict)  # label -> overrides; a grid axis
    seed_keys: list[str] = field(default_factory=lambda: ["seed"])  # repetitions, aggregated in the report
    target: TargetConfig = field(default_factory=TargetConfig)
    jobs: int = 0  # parallel runs; 0: one per CPU core (one per GPU when runs use CUDA)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # the model (model.name) that description, methods, fixed, target and report are written for:
    # runs of another model (model=... on the command line) leave them out; null: they always apply
    model: Optional[str] = None

    def __post_init__(self) -> None:
        if not SAFE_NAME.match(self.name):
            raise ConfigError(f"sweep.name '{self.name}' may contain only letters, digits, '.', '_' and '-'")
        if self.jobs < 0:
            raise ConfigError(f"sweep.jobs must be >= 0 (0: automatic), got {self.jobs}")
        for label, ovs in self.methods.items():
            if not SAFE_NAME.match(label):
                raise ConfigError(f"sweep.methods label '{label}' may contain only letters, digits, '.', '_' and '-'")
            if not ovs:
                raise ConfigError(f"sweep.methods.{label} is empty; give it at least one override")


register_schema("sweep", "base", SweepConfig)


# ----------------------------------------------------------------------------- loading
# mappings that sweep.KEY={...} replaces rather than merges into (sweep.KEY.LABEL=... changes one entry)
_REPLACED = ("sweep.methods", "sweep.launcher.params")


def _compose_sweep(name: str, overrides: list[str]) -> SweepConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            merged = [o for o in overrides if o.split("=", 1)[0] not in _REPLACED]
            cfg = hydra_compose(config_name=f"sweep/{name}", overrides=merged)
        node = cfg.sweep if "sweep" in cfg else cfg
        if OmegaConf.get_type(node) is not SweepConfig:
            raise ConfigError(f"conf/sweep/{name}.yaml must start with `defaults: [/schema/sweep@_here_: base, _self_]`")
        for o in overrides:  # a mapping given whole replaces the file's (Hydra merges: methods={} kept them all)
            key = o.split("=", 1)[0]
            if key in _REPLACED:
                OmegaConf.update(node, key.split(".", 1)[1], _parser().parse_override(o).value(), merge=False)
        return OmegaConf.to_object(node)
    finally:
        GlobalHydra.instance().clear()


def load_sweep(name: str = "default", overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Compose ``conf/sweep/<name>.yaml`` with ``sweep.KEY=VALUE`` overrides and validate it."""
    options = group_options("sweep")
    if name not in options:
        raise ConfigError(f"unknown sweep '{name}'; valid choices: {', '.join(options) or '(none in conf/sweep)'}")
    try:
        return _compose_sweep(name, list(overrides))
    except ConfigError:
        raise
    except Exception as exc:
        first = exc
    # the file alone composes: the fault is on the command line (name the override when one alone fails)
    try:
        _compose_sweep(name, [])
    except Exception as exc:
        raise ConfigError(f"conf/sweep/{name}.yaml: {_one_line(exc)}") from exc
    for o in overrides:
        try:
            _compose_sweep(name, [o])
        except Exception as exc:
            raise ConfigError(_override_error(o, exc)) from exc
    raise ConfigError(f"command line ({' '.join(overrides)}): {_one_line(first)}") from first


def _override_error(override: str, exc: BaseException) -> str:
    """One line for a bad ``sweep.KEY=VALUE`` from the command line; an unknown key lists the valid ones."""
    import dataclasses

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    text, key = _one_line(exc), override.split("=", 1)[0].lstrip("+~")
    for k in (key, key.split(".", 1)[-1]):  # the key is named once
        if text.startswith(k + ": "):
            text = text[len(k) + 2:]
            break
    msg = f"command line '{override}': {text}"
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    if isinstance(inner, (ConfigKeyError, ConfigAttributeError)) or "not in 'SweepConfig'" in msg:
        cls, walked = SweepConfig, []
        for part in override.split("=", 1)[0].lstrip("+~").split(".")[1:-1]:  # down to the misspelled key
            f = {x.name: x for x in dataclasses.fields(cls)}.get(part)
            sub = None if f is None else f.default_factory
            if not (isinstance(sub, type) and dataclasses.is_dataclass(sub)):
                break
            cls, walked = sub, walked + [part]
        prefix = "sweep." + "".join(w + "." for w in walked)
        msg += f"; valid keys: {', '.join(prefix + x.name for x in dataclasses.fields(cls))}"
    return msg


@dataclass
class SweepArgs:
    """Command-line arguments of ``goldstone sweep``, sorted by what they address."""

    sweep: Optional[str] = None  # sweep=NAME
    sweep_overrides: list[str] = field(default_factory=list)  # sweep.KEY=VALUE
    launcher: Optional[str] = None  # hydra/launcher=NAME
    launcher_params: list[str] = field(default_factory=list)  # hydra.launcher.KEY=VALUE
    grid: list[str] = field(default_factory=list)  # everything else: the runs' overrides


def split_args(args: list[str]) -> SweepArgs:
    out = SweepArgs()
    for a in args:
        key, sep, value = a.partition("=")
        bare = key.lstrip("+~")
        if not sep:
            raise ConfigError(f"'{a}' is not an override; write KEY=VALUE (e.g. seed=0,1,2)")
        if bare == "sweep":
            out.sweep = value
        elif bare.startswith("sweep."):
            out.sweep_overrides.append(a)
        elif bare == "hydra/launcher":
            out.launcher = value
        elif bare.startswith("hydra.launcher."):
            out.launcher_params.append(f"{bare}={value}")
        elif bare == "hydra" or bare.startswith(("hydra.", "hydra/")):
            raise ConfigError(f"'{a}': only hydra/launcher=NAME and hydra.launcher.KEY=VALUE are used by goldstone sweep")
        elif bare in ("run_dir", "resume"):
            raise ConfigError(f"'{a}': the sweep chooses each run's folder; use --dir for the sweep folder")
        else:
            out.grid.append(a)
    return out


# ----------------------------------------------------------------------------- override expansion
@dataclass
class Axis:
    """One grid entry expanded: ``key`` (identity) and one override string per value."""

    key: str
    overrides: list[str]
    values: list[str]


def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def expand(entries: list[str]) -> list[Axis]:
    """Expand sweep overrides (comma lists, range, choice, glob over group options) to lists."""
    from hydra.core.override_parser.types import Glob

    parser = _parser()
    axes: list[Axis] = []
    for entry in entries:
        try:
            ov = parser.parse_override(entry)
        except Exception as exc:
            raise ConfigError(f"cannot parse override '{entry}': {_one_line(exc).split(' See https')[0]}") from exc
        elem = ov.get_key_element()
        key = elem.lstrip("+~")
        if not ov.is_sweep_override():
            values = [ov.get_value_element_as_str()]
            axes.append(Axis(key, [entry], values))
            continue
        if not ov.is_discrete_sweep():
            raise ConfigError(f"'{entry}': interval() needs an optimizing sweeper; use range(), choice() or a comma list")
        if isinstance(ov.value(), Glob):
            group = ov.key_or_group
            options = group_options(group)
            if not options:
                raise ConfigError(f"'{entry}': glob() selects config group options, and '{group}' is not a config group "
                                  f"with options in {conf_dir()}")
            values = ov.value().filter(options)
            if not values:
                raise ConfigError(f"'{entry}' matches no option of {group} ({', '.join(options)})")
        else:
            values = list(ov.sweep_string_iterator())
        if not values:
            raise ConfigError(f"'{entry}' expands to no values")
        axes.append(Axis(key, [f"{elem}={v}" for v in values], values))
    return axes


def _key(entry: str) -> str:
    return expand([entry])[0].key


# ----------------------------------------------------------------------------- planning
@dataclass
class RunSpec:
    name: str  # folder name under the sweep folder
    overrides: list[str]  # for `goldstone train`, without run_dir / trainer.progress
    method: str  # label of the method (a line in the report's plots)
    settings: dict[str, str]  # the varying settings of this run, key -> value
    device: str = "auto"  # trainer.device of the composed config

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "settings": self.settings, "overrides": self.overrides,
                "device": self.device}


@dataclass
class Plan:
    name: str
    runs: list[RunSpec]
    config: SweepConfig
    grid: list[str]  # the grid actually used (sweep's overrides merged with the command line)
    fixed: list[str]
    methods: dict[str, list[str]]
    varying: list[str]  # varying keys, "method" first when there are several methods
    command_line: list[str] = field(default_factory=list)  # grid entries given on the command line
    note: str = ""  # printed when the plan is made (e.g. the sweep's settings left out for another model)
    description: str = ""  # the sweep's description, its seed count the plan's (see describe)

    def counts(self) -> str:
        """What the plan runs: ``6 runs (2 methods x 3 seeds)``."""
        return run_counts([(r.method, r.settings) for r in self.runs], self.config.seed_keys)

    def manifest(self) -> dict[str, Any]:
        c = OmegaConf.to_container(OmegaConf.structured(self.config), enum_to_str=True)
        return {
            "format": 1,
            "name": self.name,
            "description": self.description,
            # the seed count the description states (see describe), for a report of fewer or more runs
            "description_seeds": seed_count([(r.method, r.settings) for r in self.runs], self.config.seed_keys),
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "grid": self.grid,
            "command_line": self.command_line,
            "fixed": self.fixed,
            "methods": self.methods,
            "varying": self.varying,
            "seed_keys": list(self.config.seed_keys),
            "target": c["target"],
            "report": c["report"],
            "launcher": c["launcher"],
            "model": self.config.model,
            "runs": [r.to_dict() for r in self.runs],
        }


def seed_count(runs: list[tuple[str, dict[str, str]]], seed_keys: list[str]) -> int:
    """Repetitions per method of runs given as (method, varying settings): the most distinct seeds a method has."""
    return max(_seeds_per_method(runs, seed_keys), default=0)


def _seeds_per_method(runs: list[tuple[str, dict[str, str]]], seed_keys: list[str]) -> list[int]:
    seeds: dict[str, set] = {}
    for method, settings in runs:
        seeds.setdefault(method, set()).add(tuple(settings.get(k) for k in seed_keys))
    return [len(v) for v in seeds.values()]


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'s' if count != 1 else ''}"


def run_counts(runs: list[tuple[str, dict[str, str]]], seed_keys: list[str]) -> str:
    """``6 runs (2 methods x 3 seeds)`` for runs given as (method, varying settings); a grid over other
    settings within a method too: ``8 runs (2 methods x 2 settings of optimizer.lr x 2 seeds)``."""
    methods = len({m for m, _ in runs})
    per_method: dict[str, set] = {}
    keys: list[str] = []
    for method, settings in runs:  # a method's other settings (a labelled method's grid, e.g. optimizer.lr=0.1,0.2)
        other = {k: v for k, v in settings.items() if k != "method" and k not in seed_keys}
        keys += [k for k in other if k not in keys]
        per_method.setdefault(method, set()).add(tuple(sorted(other.items())))
    n_other = max((len(v) for v in per_method.values()), default=1)
    seeds = _seeds_per_method(runs, seed_keys) or [0]
    seed_text = (_n(seeds[0], "seed") if min(seeds) == max(seeds)
                 else f"{min(seeds)}-{max(seeds)} seeds")  # e.g. a report of runs merged from two plans
    middle = f" x {_n(n_other, 'setting')} of {', '.join(keys)}" if n_other > 1 else ""
    return f"{_n(len(runs), 'run')} ({_n(methods, 'method')}{middle} x {seed_text})"


_SEEDS = re.compile(r"(?<![\d.,])\b(\d+|one|two|three|four|five|six|seven|eight|nine|ten)(\s+)seeds?\b", re.IGNORECASE)
_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def file_seed_count(config: SweepConfig) -> int:
    """Seeds per method of a sweep file's own grid (before the command line's entries): the count its
    description states."""
    seed_keys = set(config.seed_keys)
    n = 1
    for a in expand(list(config.overrides)):
        if a.key in seed_keys:
            n *= len(a.values)
    return n


def describe(description: str, n_seeds: int, file_seeds: Optional[int]) -> str:
    """A sweep file's description with the seed count it states made the plan's: the command line may
    give other seeds (``seed=0,1``) than the file's grid, which has ``file_seeds`` per method.

    Unchanged when the plan runs the file's count; the one phrase that states the file's count ("3
    seeds") is rewritten, else (no such phrase, or several) the plan's count is appended. ``file_seeds``
    None (a sweep.json of an older version, whose description kept the file's count): the one seed count
    it states is rewritten when it differs."""
    found = list(_SEEDS.finditer(description))
    if file_seeds is None:
        if len(found) != 1 or _count(found[0]) == n_seeds:
            return description
        file_seeds = _count(found[0])
    if n_seeds == file_seeds:
        return description
    stating = [m for m in found if _count(m) == file_seeds]
    if len(stating) == 1:
        m = stating[0]
        return f"{description[:m.start()]}{n_seeds}{m.group(2)}seed{'s' if n_seeds != 1 else ''}{description[m.end():]}"
    return f"{description} (this sweep: {_n(n_seeds, 'seed')})" if description else description


def _count(match: re.Match) -> int:
    word = match.group(1).lower()
    return int(word) if word.isdigit() else _WORDS[word]


def _sanitize(text: str) -> str:
    text = text.replace("\\", "").strip("'\"")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def make_plan(config: SweepConfig, cli_grid: list[str] = ()) -> Plan:
    """The runs of a sweep: methods x grid (cartesian product), fixed overrides on every run.

    Command-line entries replace sweep entries (grid, fixed or methods) with the same key."""
    cli_axes = expand(list(cli_grid))
    cli_keys = {a.key for a in cli_axes}
    if len(cli_keys) != len(cli_axes):
        keys = [a.key for a in cli_axes]
        twice = next(k for k in keys if keys.count(k) > 1)
        raise ConfigError(f"'{twice}' is given twice on the command line; give it once (a comma list sweeps "
                          f"several values: {twice}=A,B)")
    # a command-line entry takes the place of the sweep's entry with the same key, or is appended
    by_key = {a.key: a for a in cli_axes}
    sweep_axes = expand(list(config.overrides))
    grid_axes = [by_key.get(a.key, a) for a in sweep_axes]
    grid_axes += [a for a in cli_axes if a.key not in {s.key for s in sweep_axes}]
    fixed_axes = [a for a in expand(list(config.fixed)) if a.key not in cli_keys]
    for a in fixed_axes:
        if len(a.values) != 1:
            raise ConfigError(f"sweep.fixed entry '{a.overrides}' has several values; move it to sweep.overrides")
    keys = [a.key for a in grid_axes] + [a.key for a in fixed_axes]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ConfigError(f"key '{dup[0]}' appears twice in the sweep (overrides/fixed); give it once")

    methods = dict(config.methods)
    if methods:
        method_keys = set()
        for label, ovs in methods.items():
            for a in expand(list(ovs)):
                if len(a.values) != 1:
                    raise ConfigError(f"sweep.methods.{label}: '{a.overrides[0]}' has several values; "
                                      "a method is one setting (put grids in sweep.overrides)")
                method_keys.add(a.key)
        if method_keys & cli_keys:
            methods = {}  # the command line now defines the compared settings
        elif method_keys & set(keys):
            k = sorted(method_keys & set(keys))[0]
            raise ConfigError(f"key '{k}' is set both by sweep.methods and by sweep.overrides/fixed")
    method_items = list(methods.items()) or [("", [])]

    varying = [a.key for a in grid_axes if len(a.values) > 1]
    seed_keys = set(config.seed_keys)
    runs: list[RunSpec] = []
    import itertools

    for label, movs in method_items:
        for combo in itertools.product(*[list(zip(a.overrides, a.values)) for a in grid_axes]):
            settings = {a.key: v for a, (_, v) in zip(grid_axes, combo) if a.key in varying}
            overrides = [a.overrides[0] for a in fixed_axes] + list(movs) + [o for o, _ in combo]
            non_seed = {k: v for k, v in settings.items() if k not in seed_keys}
            if label:
                method = label
            elif len(non_seed) == 1:  # e.g. "adam" for optimizer=adam
                method = next(iter(non_seed.values()))
            else:
                method = ",".join(f"{k}={v}" for k, v in non_seed.items()) or "run"
            ordered = [k for k in settings if k not in seed_keys] + [k for k in settings if k in seed_keys]
            parts = ([label] if label and len(method_items) > 1 else []) + [
                f"{_sanitize(k)}-{_sanitize(settings[k])}" for k in ordered]
            name = "__".join(parts) or "run"
            if len(name) > 120:
                import hashlib

                name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
            runs.append(RunSpec(name, overrides, method, ({"method": label} if len(method_items) > 1 else {}) | settings))
    seen: dict[str, int] = {}
    for r in runs:  # unique folder names (two values can sanitize to the same text)
        n = seen.get(r.name, 0)
        seen[r.name] = n + 1
        if n:
            r.name = f"{r.name}__{n + 1}"
    # the file's description states its comparison: not what runs when the command line replaced its methods
    description = "" if config.methods and not methods else describe(
        config.description, seed_count([(r.method, r.settings) for r in runs], list(config.seed_keys)),
        file_seed_count(config))
    return Plan(config.name, runs, config, [o for a in grid_axes for o in _entry(a)],
                [a.overrides[0] for a in fixed_axes], methods,
                (["method"] if len(method_items) > 1 else []) + varying, list(cli_grid), description=description)


# settings of a sweep file that assume its model (SweepConfig.model)
_MODEL_SPECIFIC = ("description", "methods", "fixed", "target.metric", "target.value", "target.mode",
                   "report.title", "report.metric")


def grid_models(grid: list[str]) -> set[str]:
    """The models (model.name) that the command line's model=... / experiment=... entries choose;
    empty when it chooses none. A combination that does not compose is left to validate_plan."""
    import itertools

    axes = [a for a in expand(list(grid)) if a.key in ("model", "experiment")]
    if not axes:
        return set()
    models = set()
    for combo in itertools.product(*[a.overrides for a in axes]):
        try:
            models.add(str(compose(list(combo)).model.name))
        except ConfigError:
            pass
    return models


def mixed_models_error(config: SweepConfig, grid: list[str], models: set[str]) -> str:
    """One line for a command line that trains the sweep's own model and another one.

    A plan has one set of methods, fixed settings, target and report for all its runs (and one
    target in sweep.json), so the sweep's settings cannot apply to some runs and not to others:
    the runs of its own model would lose them (or the other model's runs would get settings made for
    another model). Two sweeps, one per model, each get their model's settings."""
    axes = expand(list(grid))
    chooser = [a for a in axes if a.key in ("model", "experiment")]
    entries = [o for a in chooser for o in _entry(a)]
    rest = " ".join(o for a in axes if a not in chooser for o in _entry(a))
    others = sorted(models - {config.model})
    per_model = {m: f"model={m}" for m in [config.model] + others}
    if len(chooser) == 1:  # split that one entry by model: experiment=fig2,fig3 -> experiment=fig2 / experiment=fig3
        a, by = chooser[0], {}
        for ov, v in zip(a.overrides, a.values):
            try:
                by.setdefault(str(compose([ov]).model.name), []).append(v)
            except ConfigError:
                pass
        elem = a.overrides[0].split("=", 1)[0]
        per_model.update({m: f"{elem}={','.join(vs)}" for m, vs in by.items() if m in per_model})
    commands = " and ".join(f"`goldstone sweep {' '.join(x for x in (per_model[m], rest) if x)}`"
                            for m in [config.model] + others)
    return (f"{' '.join(entries)} mixes model={config.model}, which sweep {config.name}'s methods, fixed settings, "
            f"target and report are written for, with model={', model='.join(others)}; one sweep applies its "
            f"settings to all its runs, so run one sweep per model: {commands} (or add sweep.model=null to "
            "apply the sweep's settings to every model)")


def own_model_only(config: SweepConfig, sweep_overrides: list[str], grid: list[str]) -> tuple[SweepConfig, str]:
    """A sweep written for ``config.model`` whose command line trains another model: drop the
    settings made for its model (methods, fixed, target, report, description) unless the command line
    sets them (sweep.KEY=...), so the runs use their model's own defaults. Returns (config, note)."""
    models = grid_models(grid) if config.model else set()
    if not models or models == {config.model}:
        return config, ""
    if config.model in models:  # some runs on the sweep's model, some on another: refuse (see below)
        raise ConfigError(mixed_models_error(config, grid, models))
    given = [o.split("=", 1)[0].lstrip("+~").split(".", 1)[1] for o in sweep_overrides]
    fresh = SweepConfig()
    dropped = []
    for path in _MODEL_SPECIFIC:
        if path == "methods":  # keep only methods named on the command line
            if "methods" not in given:
                labels = {g.split(".")[1] for g in given if g.startswith("methods.")}
                if set(config.methods) - labels:
                    dropped.append("methods")
                config.methods = {k: v for k, v in config.methods.items() if k in labels}
            continue
        if any(g == path or g.startswith(path + ".") or path.startswith(g + ".") for g in given):
            continue
        head, _, leaf = path.rpartition(".")
        obj, ref = (getattr(config, head), getattr(fresh, head)) if head else (config, fresh)
        if getattr(obj, leaf) != getattr(ref, leaf):
            if path != "description":
                dropped.append({"fixed": "fixed settings", "report": "report title"}.get(head or path, head or path))
            setattr(obj, leaf, getattr(ref, leaf))
    if not any(g.startswith("report.title") or g == "report" for g in given):
        config.report.title = (f"{', '.join(f'model={m}' for m in sorted(models))} on "
                               f"{'its' if len(models) == 1 else 'their'} own defaults (sweep {config.name})")
    dropped = list(dict.fromkeys(dropped))
    note = ""
    if dropped:
        listed = ", ".join(dropped[:-1]) + (" and " if len(dropped) > 1 else "") + dropped[-1]
        note = (f"note: sweep {config.name}'s {listed} are written for model={config.model} and are left out, as the "
                f"command line picks model={', model='.join(sorted(models))}: the runs use their model's own "
                "defaults (sweep.KEY=VALUE sets any of them)")
    return config, note


def run_metrics(cfg) -> Optional[tuple[list[str], Optional[str]]]:
    """(metrics.csv columns a run of ``cfg`` can be judged by, its model's target metric), read from
    the model class without building the model (no data is read); None for a model not known here."""
    from types import SimpleNamespace

    name = str(cfg.model.name)
    try:
        if name == "dense_mf":  # suboptimality needs L*, known only for data that do not drift
            from goldstone_cli.models.dense_mf import DenseDynamicMF as cls

            probe = SimpleNamespace(L_star=None if cfg.data.get("time_dependent") else 0.0)
        elif name == "movielens":
            from goldstone_cli.models.movielens import SparseDynamicBernoulliMF as cls

            probe = SimpleNamespace()
        elif name == "dwe":  # ll_val with a validation set (model.val_mass > 0)
            from goldstone_cli.models.dwe import DynamicWordEmbeddings as cls

            probe = SimpleNamespace(_val_sets=[None] if float(cfg.model.get("val_mass") or 0) > 0 else [])
        else:
            return None
        # dwe: trainer.target stops on the validation likelihood when there is one (as best.pt picks)
        target = "ll_val" if getattr(probe, "_val_sets", None) else cls.target_metric
        return ["total", "local", "psi"] + list(cls.metric_names(probe)), target
    except Exception:  # a model that reads more of itself: not checked here
        return None


def check_metrics(config: SweepConfig, runs: list[tuple[RunSpec, Any]]) -> None:
    """sweep.target.metric (with a target value) and sweep.report.metric name a metric that every
    model of the sweep reports; with a value and no metric, each model's own target metric must be."""
    by_model: dict[str, tuple[list[str], Optional[str], str]] = {}
    for run, cfg in runs:
        known = run_metrics(cfg)
        if known is not None:
            m = str(cfg.model.name)
            names, target = known
            if m in by_model:  # e.g. dwe with and without a validation set: what every run reports
                names = [n for n in by_model[m][0] if n in names]
            by_model[m] = (names, target, by_model.get(m, (None, None, run.name))[2])
    target = config.target.metric if config.target.value is not None else None  # no value: no target
    for key, metric in (("sweep.target.metric", target), ("sweep.report.metric", config.report.metric)):
        if metric is None:
            continue
        for m, (names, _, run) in by_model.items():
            if metric not in names:
                fix = " or sweep.target.value=null (no target)" if key == "sweep.target.metric" else " or to null"
                raise ConfigError(f"{key}={metric} is not a metric of model {m} (run '{run}'); it reports "
                                  f"{', '.join(names)}: set {key} to one of them{fix}")
    if config.target.metric is None and config.target.value is not None:
        for m, (names, target, run) in by_model.items():
            if target not in names:
                raise ConfigError(f"sweep.target.value={config.target.value:g} with no sweep.target.metric, but model {m} "
                                  f"does not report its target metric {target} here (run '{run}'); set "
                                  f"sweep.target.metric to one of {', '.join(names)} or sweep.target.value=null")


def _entry(axis: Axis) -> list[str]:
    """A grid axis back as one override string (for the manifest and report)."""
    if len(axis.overrides) == 1:
        return axis.overrides
    elem = axis.overrides[0].split("=", 1)[0]
    return [f"{elem}={','.join(axis.values)}"]


def validate_plan(plan: Plan, progress: bool = True) -> None:
    """Compose every run's config and check that its data exist; the first invalid one raises
    ConfigError naming the run."""
    from goldstone_cli.data.check import missing_data

    bar = tqdm(plan.runs, desc="validating", unit="run", disable=not progress or len(plan.runs) < 20, leave=False)
    checked: dict[str, Optional[str]] = {}
    cfgs = []
    for run in bar:
        try:
            cfg = compose(run.overrides)
        except ConfigError as exc:
            raise ConfigError(f"run '{run.name}' ({' '.join(run.overrides)}): {exc}") from None
        cfgs.append((run, cfg))
        run.device = str(getattr(cfg.trainer.device, "value", cfg.trainer.device))
        key = OmegaConf.to_yaml(cfg.data)
        if key not in checked:
            checked[key] = missing_data(cfg)
        if checked[key]:
            raise ConfigError(f"run '{run.name}' needs data that is not there: {checked[key]}")
    check_metrics(plan.config, cfgs)


def check_plan_data(runs: list[RunSpec]) -> None:
    """The data of every run exists (composing each run's config); else ConfigError naming the run."""
    from goldstone_cli.data.check import missing_data

    checked: dict[str, Optional[str]] = {}
    for run in runs:
        cfg = compose(run.overrides)
        key = OmegaConf.to_yaml(cfg.data)
        if key not in checked:
            checked[key] = missing_data(cfg)
        if checked[key]:
            raise ConfigError(f"run '{run.name}' needs data that is not there: {checked[key]}")


# ----------------------------------------------------------------------------- manifest
def read_manifest(sweep_dir: Path) -> dict[str, Any]:
    """``sweep.json``, checked (types, run names that stay inside the folder): ConfigError, one line."""
    path = Path(sweep_dir) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{sweep_dir} is not a sweep folder (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); it is written atomically, so it was edited by hand") from None
    return check_manifest(m, path)


def _type_name(t) -> str:
    names = {str: "string", list: "list", dict: "object", int: "integer", float: "number", bool: "boolean"}
    return " or ".join(names.get(x, x.__name__) for x in (t if isinstance(t, tuple) else (t,)))


def check_manifest(m: Any, path: Path) -> dict[str, Any]:
    """Every field ``plan_from_manifest`` and the report use, with its type; run names must be plain
    folder names (``..``, ``/`` or an absolute path would let a hand-edited file reach outside the sweep)."""
    def bad(msg: str):
        raise ConfigError(f"{path}: {msg}; this file is written by goldstone sweep, so it was edited or damaged "
                          "(restore it, or start the sweep in a new folder)")

    def need(obj: dict, key: str, typ, where: str = "", optional: bool = False):
        if key not in obj:
            if optional:
                return None
            bad(f"missing key '{where}{key}'")
        v = obj[key]
        if not isinstance(v, typ) or (isinstance(v, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,))):
            bad(f"'{where}{key}' must be a {_type_name(typ)}, got {type(v).__name__} {json.dumps(v)[:40]}")
        return v

    def strings(obj: dict, key: str, where: str = "", optional: bool = False):
        v = need(obj, key, list, where, optional)
        if v is not None and not all(isinstance(x, str) for x in v):
            bad(f"'{where}{key}' must be a list of strings")

    if not isinstance(m, dict):
        bad(f"expected a JSON object, got {type(m).__name__}")
    need(m, "name", str)
    strings(m, "grid")
    strings(m, "fixed")
    need(m, "description", str, optional=True)
    for key in ("seed_keys", "varying", "command_line"):
        strings(m, key, optional=True)
    methods = need(m, "methods", dict, optional=True) or {}
    for label in methods:
        strings(methods, label, "methods.")
    for key in ("target", "launcher", "report"):
        if key not in m:
            bad(f"missing key '{key}'")
        need(m, key, dict)
    t = m["target"]
    need(t, "metric", (str, type(None)), "target.")
    need(t, "value", (int, float, type(None)), "target.")
    if need(t, "mode", str, "target.") not in [x.value for x in TargetMode]:
        bad(f"'target.mode' must be one of {', '.join(x.value for x in TargetMode)}, got {t['mode']!r}")
    if need(m["launcher"], "name", str, "launcher.") not in [x.value for x in LauncherName]:
        bad(f"'launcher.name' must be one of {', '.join(x.value for x in LauncherName)}, got {m['launcher']['name']!r}")
    need(m["launcher"], "params", dict, "launcher.")
    need(m, "model", (str, type(None)), optional=True)
    threads = need(m, "threads", (int, type(None)), optional=True)
    if threads is not None and threads < 1:
        bad(f"'threads' must be >= 1, got {threads}")
    need(m["report"], "title", str, "report.", optional=True)
    need(m["report"], "metric", (str, type(None)), "report.", optional=True)
    unknown = sorted(set(m["report"]) - {"title", "metric"})
    if unknown:
        bad(f"unknown key 'report.{unknown[0]}'")
    runs = need(m, "runs", list)
    seen = set()
    for i, r in enumerate(runs):
        where = f"runs[{i}]."
        if not isinstance(r, dict):
            bad(f"'runs[{i}]' must be an object, got {type(r).__name__}")
        name = need(r, "name", str, where)
        if not SAFE_NAME.match(name) or name in (".", ".."):
            bad(f"run name {name!r} is not a plain folder name (letters, digits, '.', '_', '-'; not '..')")
        if name in seen:
            bad(f"run name {name!r} appears twice")
        seen.add(name)
        strings(r, "overrides", where)
        need(r, "method", str, where)
        settings = need(r, "settings", dict, where)
        if not all(isinstance(v, str) for v in settings.values()):
            bad(f"'{where}settings' must map names to strings")
        need(r, "device", str, where, optional=True)
    return m


def run_folder(sweep_dir: Path, name: str) -> Path:
    """``sweep_dir/name`` for a run name read from sweep.json: a real folder inside ``sweep_dir``
    (never a symbolic link), else ConfigError."""
    try:
        return child(sweep_dir, name, "run name", source=Path(sweep_dir) / MANIFEST, allow_symlink=False)
    except UnsafeNameError as exc:
        raise ConfigError(str(exc)) from None


def plan_from_manifest(m: dict[str, Any]) -> Plan:
    cfg = SweepConfig(name=m["name"], description=m.get("description", ""), overrides=list(m["grid"]),
                      fixed=list(m["fixed"]), methods=dict(m.get("methods") or {}),
                      seed_keys=list(m.get("seed_keys", ["seed"])),
                      target=TargetConfig(m["target"]["metric"], m["target"]["value"], TargetMode(m["target"]["mode"])),
                      launcher=LauncherConfig(LauncherName(m["launcher"]["name"]), dict(m["launcher"]["params"])),
                      report=ReportConfig(**m["report"]), model=m.get("model"))
    runs = [RunSpec(r["name"], list(r["overrides"]), r["method"], dict(r["settings"]), r.get("device", "auto"))
            for r in m["runs"]]
    return Plan(m["name"], runs, cfg, cfg.overrides, cfg.fixed, cfg.methods, list(m.get("varying", [])),
                list(m.get("command_line", [])),
                description=describe(cfg.description, seed_count([(r.method, r.settings) for r in runs], cfg.seed_keys),
                                     m.get("description_seeds")))


def _same_runs(a: Plan, b: Plan) -> Optional[str]:
    """None when two plans have the same runs, else a short description of the first difference."""
    ra = {r.name: r.overrides for r in a.runs}
    rb = {r.name: r.overrides for r in b.runs}
    if ra == rb:
        return None
    only_a, only_b = sorted(set(ra) - set(rb)), sorted(set(rb) - set(ra))
    if only_a or only_b:
        return (f"{len(ra)} runs planned there vs {len(rb)} now"
                + (f"; e.g. '{only_b[0]}' is new" if only_b else "")
                + (f"; e.g. '{only_a[0]}' is no longer in the plan" if only_a else ""))
    name = next(n for n in ra if ra[n] != rb[n])
    return f"run '{name}' had overrides {' '.join(ra[name])}, now {' '.join(rb[name])}"


# ----------------------------------------------------------------------------- run state
def run_state(run_dir: Path) -> str:
    """What a re-invoked sweep does with a run folder: ``busy`` (a live process still holds its
    lock, e.g. a run left behind by a sweep killed with SIGKILL: never start a second one there),
    ``skip`` (finished or diverged: a rerun would diverge the same way), ``resume`` (has a checkpoint)
    or ``fresh``."""
    if holder(run_dir) is not None:
        return "busy"
    summary = _read_json(run_dir / "summary.json")
    status = _read_json(run_dir / RUN_STATUS)
    if summary and summary.get("status") in FINISHED + ("diverged",) and (status or {}).get("outcome") != "failed":
        return "skip"
    if has_checkpoint(run_dir):
        return "resume"
    return "fresh"


def warn_damaged(sweep_dir: Path, name: str, write=print) -> str:
    """Say in one line, when a run's metrics.csv or summary.json is damaged, what is wrong and what to do
    (the report's check: such a run is ``damaged`` there and left out of its tables and plots); return the line."""
    from goldstone_cli.sweep_report import run_problem

    problem = run_problem(sweep_dir / name, sweep_dir)
    line = f"warning: run {name} ({sweep_dir / name}): {problem}" if problem else ""
    if line:
        write(line)
    return line


def _busy_message(run_dir: Path) -> str:
    pid = holder(run_dir)
    who = f"process {pid}" if pid and pid > 0 else "another process"
    return (f"run {run_dir.name} is still running in {who} (it holds {run_dir / 'run.lock'}); not starting it "
            "again: wait for it to finish (or stop it), then re-invoke the sweep")


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        d = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return d if isinstance(d, dict) else None


def _hydra_value(path: Path) -> str:
    """A path as a Hydra override value (quoted when it has characters the grammar treats specially)."""
    s = str(path)
    if re.match(r"^[A-Za-z0-9_./:+@-]+$", s):
        return s
    if "'" in s or s.endswith("\\"):
        raise ConfigError(f"the sweep folder path {s!r} contains quote characters; choose another --dir")
    return f"'{s}'"


def train_args(run: RunSpec, run_dir: Path, action: str) -> list[str]:
    """Arguments of ``goldstone train`` for one run: start in ``run_dir`` or continue it."""
    if action == "resume":
        return [f"resume={run_dir}", "trainer.progress=false"]
    return [f"run_dir={_hydra_value(run_dir)}", "trainer.progress=false", *run.overrides]


def _child_env(threads: int, gpu: Optional[str]) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    env["GOLDSTONE_CONF"] = str(conf_dir())  # the configs the plan was validated against
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries."""
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:
        return []
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in vis.split(",") if v.strip()] if vis else [str(i) for i in range(n)]
    return ids[:n]


def outcome_of(run_dir: Path, returncode: int) -> str:
    """done | diverged | interrupted | failed, from the exit code and the run's summary.json."""
    summary = _read_json(run_dir / "summary.json") or {}
    status = summary.get("status")
    if returncode == 0 and status in FINISHED:
        return "done"
    if returncode == 3 and status == "diverged":
        return "diverged"
    if returncode != 0 and status == "interrupted":  # 128 + SIGINT/SIGTERM/SIGHUP/SIGUSR1
        return "interrupted"
    return "failed"


def log_tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    " + ln for ln in text[-lines:])


def _exit_text(rc: int) -> str:
    """``exit code 1``, or for a process ended by a signal (negative return code) ``killed by SIGKILL``."""
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


# ----------------------------------------------------------------------------- local runner
class _Stop:
    """Ctrl-C (or SIGTERM, SIGHUP, SIGUSR1) while the sweep runs: stop launching and forward SIGINT to the runs
    (each saves a checkpoint and exits); a second Ctrl-C is forwarded too (runs stop at once)."""

    def __init__(self):
        self.count = 0
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):  # as `goldstone train` does
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        self.count += 1
        if self.count == 1:
            tqdm.write("Interrupt: no new runs; running ones save a checkpoint and stop (Ctrl-C again to abort them).")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


@dataclass
class _Running:
    run: RunSpec
    proc: subprocess.Popen
    log: Any
    slot: int


def run_threads(jobs: int, n_todo: int) -> int:
    """CPU threads per run when ``n_todo`` runs start, ``jobs`` at a time: the cores shared out."""
    return max(1, cpu_cores() // max(1, min(jobs, n_todo or 1)))


def run_local(sweep_dir: Path, todo: list[tuple[RunSpec, str]], jobs: int, n_total: int, n_skipped: int,
              desc: str, progress: bool = True, threads: Optional[int] = None) -> dict[str, str]:
    """Run ``todo`` (run, action) with at most ``jobs`` subprocesses of ``threads`` CPU threads each
    (default: the cores shared out); return run name -> outcome."""
    if threads is None:
        threads = run_threads(jobs, len(todo))
    jobs = max(1, min(jobs, len(todo) or 1))
    gpus = visible_gpus() if any(r.device != "cpu" for r, _ in todo) else []
    pending = deque(todo)
    running: list[_Running] = []
    free = list(range(jobs))
    outcomes: dict[str, str] = {}
    counts = {"done": n_skipped, "failed": 0}
    bar = tqdm(total=n_total, initial=n_skipped, desc=desc, unit="run", disable=not progress, dynamic_ncols=True)

    def postfix():
        bar.set_postfix_str(f"done={counts['done']} failed={counts['failed']} running={len(running)}")

    postfix()
    forwarded = 0
    with _Stop() as stop:
        while running or (pending and not stop.count):
            while stop.count > forwarded:
                forwarded += 1
                for r in running:
                    if r.proc.poll() is None:
                        try:
                            r.proc.send_signal(signal.SIGINT)
                        except ProcessLookupError:
                            pass
            while pending and free and not stop.count:
                run, action = pending.popleft()
                run_dir = run_folder(sweep_dir, run.name)
                if holder(run_dir) is not None:  # started by now by someone else
                    outcomes[run.name] = "busy"
                    tqdm.write(_busy_message(run_dir))
                    continue
                slot = free.pop(0)
                if action == "fresh" and run_dir.exists():
                    shutil.rmtree(run_dir)  # a failed start without checkpoint: begin again
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / RUN_STATUS).unlink(missing_ok=True)
                log = open(run_dir / "train.log", "a" if action == "resume" else "w")
                cmd = [sys.executable, "-m", "goldstone_cli", "train", *train_args(run, run_dir, action)]
                log.write(f"# {_dt.datetime.now().isoformat(timespec='seconds')} {action}: {' '.join(cmd)}\n")
                log.flush()
                gpu = gpus[slot % len(gpus)] if len(gpus) > 1 else None
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=_child_env(threads, gpu), start_new_session=True)
                running.append(_Running(run, proc, log, slot))
                postfix()
            for r in list(running):
                rc = r.proc.poll()
                if rc is None:
                    continue
                running.remove(r)
                r.log.close()
                free.append(r.slot)
                run_dir = sweep_dir / r.run.name
                outcome = outcome_of(run_dir, rc)
                if stop.count and outcome == "failed":
                    outcome = "interrupted"  # e.g. stopped while still importing, before its Ctrl-C handler
                outcomes[r.run.name] = outcome
                atomic_write_json(run_dir / RUN_STATUS, {"outcome": outcome, "returncode": rc,
                                                         "finished": _dt.datetime.now().isoformat(timespec="seconds")})
                if outcome in ("done", "failed", "diverged"):
                    counts["done" if outcome == "done" else "failed"] += 1
                    postfix()
                    bar.update(1)
                if outcome in ("failed", "diverged"):
                    tqdm.write(f"run {r.run.name} {outcome} ({_exit_text(rc)}); log {run_dir / 'train.log'}:\n"
                               f"{log_tail(run_dir / 'train.log')}")
                warn_damaged(sweep_dir, r.run.name, tqdm.write)
                postfix()
            if running:
                time.sleep(0.05)
        if stop.count:
            for r, _ in pending:
                outcomes.setdefault(r.name, "not started")
    bar.close()
    return outcomes


# ----------------------------------------------------------------------------- Hydra launcher plugins
_PLUGIN = {"joblib": "hydra-joblib-launcher", "submitit_local": "hydra-submitit-launcher",
           "submitit_slurm": "hydra-submitit-launcher"}


def launcher_config(name: str, params: dict[str, Any], sweep_dir: Path):
    """Compose Hydra's multirun config with ``hydra/launcher=<name>`` and the plugin settings;
    Hydra validates them against the plugin's schema (e.g. submitit's ``SlurmQueueConf``).
    Returns ``(hydra_object, config)``; call inside an initialized Hydra context."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    hydra = GlobalHydra.instance().hydra
    overrides = [f"hydra/launcher={name}", f"hydra.sweep.dir={_hydra_value(sweep_dir / '.launcher')}",
                 "hydra.sweep.subdir=${hydra.job.num}", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                 "hydra.job.chdir=false"]
    for k, v in params.items():
        if isinstance(v, dict):  # e.g. additional_parameters: its keys are free, so force-add them
            overrides += [f"++hydra.launcher.{k}.{kk}={_hydra_literal(vv)}" for kk, vv in v.items()]
        else:  # a top-level key must exist in the plugin's schema: a typo is an error
            overrides.append(f"hydra.launcher.{k}={_hydra_literal(v)}")
    try:
        cfg = hydra.compose_config(config_name="config", overrides=overrides, run_mode=RunMode.MULTIRUN,
                                   with_log_configuration=False)
    except Exception as exc:
        msg = _one_line(exc)
        if f"Could not find 'hydra/launcher/{name}'" in str(exc):
            raise ConfigError(f"hydra/launcher={name} needs the {_PLUGIN.get(name, name)} plugin: "
                              "pip install 'goldstone[cluster]'") from exc
        raise ConfigError(f"launcher {name}: {msg}") from exc
    return hydra, cfg


def _hydra_literal(v: Any) -> str:
    """A Python value as a value in Hydra's override grammar."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_hydra_literal(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_hydra_literal(x)}" for k, x in v.items()) + "}"
    s = str(v)
    if re.match(r"^[A-Za-z0-9_./:+@-]+$", s) and s not in ("null", "true", "false"):
        return s
    return "'" + s.replace("'", "\\'") + "'"


def launcher_params(name: str, params: dict[str, Any], jobs: int) -> dict[str, Any]:
    """The plugin settings with ``--jobs`` as its parallelism unless the settings give one."""
    params = dict(params)
    if name == "joblib":
        params.setdefault("n_jobs", jobs)
    elif name == "submitit_slurm":
        params.setdefault("array_parallelism", jobs)
    return params


def check_launcher(name: str, params: dict[str, Any], sweep_dir: Path) -> None:
    """Validate a plugin launcher's settings without launching anything."""
    if name == "local":
        if params:
            raise ConfigError(f"the local launcher takes no hydra.launcher settings (got {', '.join(params)}); use --jobs")
        return
    if name not in _PLUGIN:
        raise ConfigError(f"unknown launcher '{name}'; valid: local, {', '.join(_PLUGIN)}")
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            launcher_config(name, params, sweep_dir)
    finally:
        GlobalHydra.instance().clear()


def _hydra_job(cfg) -> int:
    """Task function of a Hydra launcher job: run ``goldstone train`` for one run in a subprocess
    (the job's overrides are exactly the train arguments), log to the run's train.log."""
    from hydra.core.hydra_config import HydraConfig

    args = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
    if cfg.get("resume"):
        run_dir = Path(str(cfg.resume))
        args = [f"resume={run_dir}", *args]
        mode = "a"
    else:
        run_dir = Path(str(cfg.run_dir))
        mode = "w"
    run_dir.mkdir(parents=True, exist_ok=True)
    threads = int(os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("GOLDSTONE_SWEEP_THREADS") or 1)
    cmd = [sys.executable, "-m", "goldstone_cli", "train", *args]
    # a job of several tasks (hydra.launcher.tasks_per_node / nodes, with trainer.distributed=true): every
    # task runs one rank of the same run; rank 0 logs to train.log, the others to train.rank<r>.log
    task = int(os.environ.get("SLURM_PROCID") or os.environ.get("SUBMITIT_LOCAL_GLOBALID") or 0)
    with open(run_dir / ("train.log" if task == 0 else f"train.rank{task}.log"), mode) as log:
        log.write(f"# {_dt.datetime.now().isoformat(timespec='seconds')}: {' '.join(cmd)}\n")
        log.flush()
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=_child_env(threads, None))


def run_with_launcher(sweep_dir: Path, todo: list[tuple[RunSpec, str]], name: str, params: dict[str, Any],
                      jobs: int, threads: Optional[int] = None) -> dict[str, str]:
    """Hand the runs to a Hydra launcher plugin (joblib, submitit); block until they finish.
    ``threads``: CPU threads per joblib run (default: the cores shared out)."""
    from hydra import initialize_config_dir
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.core.utils import JobStatus
    from hydra.types import HydraContext

    if name == "joblib":
        os.environ["GOLDSTONE_SWEEP_THREADS"] = str(threads or run_threads(jobs, len(todo)))
    for run, action in todo:
        run_dir = run_folder(sweep_dir, run.name)
        if holder(run_dir) is not None:
            raise ConfigError(_busy_message(run_dir))
        if action == "fresh" and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_STATUS).unlink(missing_ok=True)
    job_overrides = [train_args(run, (sweep_dir / run.name).resolve(), action) for run, action in todo]
    # resume=DIR is read verbatim by `goldstone train`, but composed by Hydra here: quote it
    job_overrides = [[f"resume={_hydra_value(Path(o.split('=', 1)[1]))}" if o.startswith("resume=") else o for o in ovs]
                     for ovs in job_overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            hydra, cfg = launcher_config(name, params, sweep_dir.resolve())
            launcher = Plugins.instance().instantiate_launcher(
                hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=Callbacks(cfg)),
                task_function=_hydra_job, config=cfg)
            tqdm.write(f"handing {len(todo)} runs to the Hydra launcher '{name}'; waiting for them to finish")
            returns = launcher.launch(job_overrides, initial_job_idx=0)
    finally:
        GlobalHydra.instance().clear()
    outcomes = {}
    for (run, _), ret in zip(todo, returns):
        run_dir = sweep_dir / run.name
        rc = ret._return_value if ret.status == JobStatus.COMPLETED else 1
        if not isinstance(rc, int):
            rc = 1
        outcome = outcome_of(run_dir, rc)
        outcomes[run.name] = outcome
        atomic_write_json(run_dir / RUN_STATUS, {"outcome": outcome, "returncode": rc,
                                                 "finished": _dt.datetime.now().isoformat(timespec="seconds")})
        if outcome != "done":
            err = "" if ret.status == JobStatus.COMPLETED else f" ({type(ret._return_value).__name__}: {ret._return_value})"
            tqdm.write(f"run {run.name} {outcome}{err}; log {run_dir / 'train.log'}:\n{log_tail(run_dir / 'train.log')}")
        warn_damaged(sweep_dir, run.name, tqdm.write)
    return outcomes


# ----------------------------------------------------------------------------- the command
@dataclass
class SweepResult:
    sweep_dir: Path
    outcomes: dict[str, str]  # every run of the plan: done | skipped | diverged | failed | interrupted | not started | busy
    report: Optional[Path]
    exit_code: int
    message: str


def prepare(args: list[str], sweep_dir: Optional[Path] = None) -> tuple[Plan, Path, bool, SweepArgs]:
    """Parse, plan and validate; nothing is written. Returns (plan, sweep folder, folder exists, args)."""
    a = split_args(list(args))
    existing = None
    if sweep_dir is not None:
        _check_dir(Path(sweep_dir))
    if sweep_dir is not None and Path(sweep_dir).exists():
        if (Path(sweep_dir) / MANIFEST).is_file():
            existing = plan_from_manifest(read_manifest(sweep_dir))
        elif any(Path(sweep_dir).iterdir()):
            raise ConfigError(f"--dir {sweep_dir} exists but is not a sweep folder (no {MANIFEST}); pick an empty or new folder")
    reuse = existing is not None and a.sweep is None and not a.grid
    if reuse:
        plan = existing
        if a.sweep_overrides:  # report/target/launcher settings may change; the runs may not
            cfg = OmegaConf.structured(plan.config)
            for o in a.sweep_overrides:
                try:
                    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+").split(".", 1)[1]]))
                except Exception as exc:
                    raise ConfigError(_override_error(o, exc)) from exc
            try:
                plan.config = OmegaConf.to_object(cfg)
            except ConfigError:
                raise
            except Exception as exc:
                raise ConfigError(f"command line ({' '.join(a.sweep_overrides)}): {_one_line(exc)}") from exc
            new = make_plan(plan.config, [])
            if _same_runs(existing, new) is not None:
                raise ConfigError(f"{sweep_dir}: these sweep.* settings change the runs; start a new sweep instead")
            if any(o.lstrip("+~").startswith(("sweep.target.", "sweep.report.")) for o in a.sweep_overrides):
                check_metrics(plan.config, [(r, compose(r.overrides)) for r in plan.runs])
    else:
        name = a.sweep or (existing.name if existing is not None else "default")
        config = load_sweep(name, a.sweep_overrides)
        config, note = own_model_only(config, a.sweep_overrides, a.grid)
        plan = make_plan(config, a.grid)
        plan.note = note
        if config.methods and not plan.methods:  # the command line replaced the file's methods: the file's
            given = {o.split("=", 1)[0].lstrip("+~") for o in a.sweep_overrides}  # words name another comparison
            if not given & {"sweep.report", "sweep.report.title"}:
                plan.config.report.title = f"Sweep {config.name}: {' '.join(a.grid)}"
            if "sweep.description" in given:  # the user's own words for this sweep (make_plan drops the file's)
                plan.description = config.description
        if existing is not None:
            diff = _same_runs(existing, plan)
            if diff:
                raise ConfigError(f"{sweep_dir} holds a different sweep plan ({diff}); re-run it with "
                                  f"`goldstone sweep --dir {sweep_dir}` and no overrides, or start a new sweep")
    if not plan.runs:
        raise ConfigError("the sweep has no runs")
    if a.launcher is not None:
        plan.config.launcher.name = LauncherName(_launcher_name(a.launcher))
    if a.launcher_params:
        params = dict(plan.config.launcher.params)
        params.update(OmegaConf.to_container(OmegaConf.from_dotlist([p.split(".", 2)[2] for p in a.launcher_params])))
        plan.config.launcher.params = params
    if not reuse:  # a plan read back from sweep.json was validated when the sweep was created
        validate_plan(plan)
    if sweep_dir is None:
        stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        sweep_dir = Path("outputs") / "sweeps" / f"{plan.name}_{stamp}"
        n = 1
        while sweep_dir.exists():
            n += 1
            sweep_dir = Path("outputs") / "sweeps" / f"{plan.name}_{stamp}_{n}"
    return plan, Path(sweep_dir), existing is not None, a


def _check_dir(sweep_dir: Path) -> None:
    """--dir must be a folder or a path that can become one (no file in the way)."""
    for p in (sweep_dir, *sweep_dir.parents):
        if p.is_dir():
            return
        if p.exists() or p.is_symlink():
            raise ConfigError(f"--dir {sweep_dir}: {p} exists and is not a folder; give a sweep folder, an empty "
                              "folder or a new path")


def _launcher_name(value: str) -> str:
    valid = [x.value for x in LauncherName]
    if value not in valid:
        raise ConfigError(f"unknown hydra/launcher '{value}'; valid: {', '.join(valid)}")
    return value


def run_sweep(args: list[str] = (), sweep_dir: Optional[Path] = None, jobs: Optional[int] = None,
              dry_run: bool = False, progress: bool = True, echo=print) -> SweepResult:
    """``goldstone sweep``: plan, validate, run what is not finished, write the report."""
    plan, sweep_dir, exists, _ = prepare(list(args), sweep_dir)
    states = {r.name: run_state(run_folder(sweep_dir, r.name)) if exists else "fresh" for r in plan.runs}
    busy = [r.name for r in plan.runs if states[r.name] == "busy"]
    todo = [(r, states[r.name]) for r in plan.runs if states[r.name] not in ("skip", "busy")]
    skipped = [r.name for r in plan.runs if states[r.name] == "skip"]
    if exists and todo:  # a continued plan was validated when it was made; its data may have moved since
        check_plan_data([r for r, _ in todo])
    launcher = plan.config.launcher.name.value
    gpus_needed = any(r.device != "cpu" for r, _ in todo)
    if jobs is None:
        jobs = plan.config.jobs
    if jobs == 0:
        gpus = visible_gpus() if gpus_needed else []
        jobs = len(gpus) if gpus else cpu_cores()
    params = launcher_params(launcher, plan.config.launcher.params, jobs)
    check_launcher(launcher, params, sweep_dir.resolve())
    before = read_manifest(sweep_dir) if exists else {}
    # CPU threads per run: fixed when the sweep first starts runs, so a resumed run uses the threads of
    # its checkpoint (bit-exact) however many runs are left; slurm/submitit give their own
    threads = None
    if launcher in ("local", "joblib"):
        threads = before.get("threads") or run_threads(jobs, len(todo))
    threads_text = f", {threads} CPU thread{'s' * (threads > 1)} each" if threads else ""
    if plan.note:
        echo(plan.note)
    if plan.description:
        echo(f"sweep {plan.name}: {plan.description}")
    if dry_run:
        echo(f"sweep {plan.name}: {plan.counts()} in {sweep_dir} (varying: {', '.join(plan.varying) or 'nothing'}); "
             f"launcher {launcher}, jobs {jobs}" + threads_text)
        for r in plan.runs:
            echo(f"  [{states[r.name]:6}] {r.name}: {' '.join(r.overrides)}")
        return SweepResult(sweep_dir, {r.name: "planned" for r in plan.runs}, None, 0, "dry run: nothing was started")

    sweep_dir.mkdir(parents=True, exist_ok=True)
    manifest = plan.manifest()
    if exists:  # keep when the sweep was planned; note when it was continued
        manifest["created"] = before.get("created", manifest["created"])
        manifest["continued"] = _dt.datetime.now().isoformat(timespec="seconds")
    if before.get("threads") or (threads and todo):  # kept once recorded, recorded once runs start
        manifest["threads"] = before.get("threads") or threads
    atomic_write_json(sweep_dir / MANIFEST, manifest)
    n_resume = sum(1 for _, s in todo if s == "resume")
    echo(f"sweep {plan.name}: {plan.counts()} in {sweep_dir}: {len(skipped)} finished (skipped), "
         f"{n_resume} to resume, {len(todo) - n_resume} to start; "
         + (f"{jobs} at a time" if launcher == "local" else f"launcher {launcher}")
         + threads_text)
    outcomes = {name: "skipped" for name in skipped}
    for name in busy:
        outcomes[name] = "busy"
        echo(_busy_message(sweep_dir / name))
    for name in skipped:  # a diverged run stays diverged
        if (_read_json(sweep_dir / name / "summary.json") or {}).get("status") == "diverged":
            outcomes[name] = "diverged"
        warn_damaged(sweep_dir, name, echo)
    if todo:
        if launcher == "local":
            outcomes.update(run_local(sweep_dir, todo, jobs, len(plan.runs), len(skipped), f"sweep {plan.name}",
                                      progress=progress, threads=threads))
        else:
            outcomes.update(run_with_launcher(sweep_dir, todo, launcher, params, jobs, threads))

    report = None
    try:
        from goldstone_cli.sweep_report import build_report

        report = build_report(sweep_dir).report_md
    except Exception as exc:  # the runs are safe on disk; the report can be rebuilt
        echo(f"warning: could not build the report ({type(exc).__name__}: {exc}); "
             f"retry with: goldstone report {sweep_dir}")
    counts = {k: sum(1 for v in outcomes.values() if v == k) for k in
              ("done", "skipped", "diverged", "failed", "interrupted", "not started", "busy")}
    parts = [f"{v} {k}" for k, v in counts.items() if v]
    interrupted = counts["interrupted"] + counts["not started"]
    if interrupted:
        code, hint = 130, f"; resume with: goldstone sweep --dir {sweep_dir}"
    elif counts["busy"]:
        code, hint = 75, f"; re-invoke goldstone sweep --dir {sweep_dir} when the busy runs have finished"
    elif counts["failed"]:
        code, hint = 1, (f"; after fixing the cause, goldstone sweep --dir {sweep_dir} retries the failed runs "
                         "(from their last checkpoint) and skips the rest")
    elif counts["diverged"]:
        code, hint = 1, ""
    else:
        code, hint = 0, ""
    msg = f"sweep {plan.name}: {', '.join(parts)}{hint}" + (f"\nreport: {report}" if report else "")
    return SweepResult(sweep_dir, outcomes, report, code, msg)
