"""The ``goldstone`` command line: a thin Typer front end over the library modules."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    name="goldstone",
    help="Goldstone Gradient Descent: train, sweep and inspect dynamic embedding models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Get and prepare data sets (MovieLens, Google Books Ngram, dated corpora).",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
prepare_app = typer.Typer(help="Turn raw corpora into per-time-step co-occurrence matrices.", no_args_is_help=True)
data_app.add_typer(prepare_app, name="prepare")
download_app = typer.Typer(help="Download published data sets, verified against their checksums.", no_args_is_help=True)
data_app.add_typer(download_app, name="download")


def _groups_help() -> str:
    """The config groups and their options, read from conf/ (shown in `goldstone train --help`)."""
    from goldstone_cli.config import GROUPS, group_options

    lines = ["Config groups (select with GROUP=OPTION):\n"]
    for g in GROUPS:
        opts = group_options(g)
        if opts:
            lines.append(f"  {g}: {', '.join(opts)}\n")
    lines.append("\nExamples:\n\n  goldstone train optimizer=adam optimizer.lr=0.01 trainer.steps=5000\n\n"
                 "  goldstone train --cfg model=dense_mf data.T=100\n\n"
                 "  goldstone train resume=outputs/dense_mf/2026-01-01_12-00-00_gd trainer.steps=20000")
    return "".join(lines)


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _config_from(overrides: list[str]):
    """Compose a config from overrides; ``resume=DIR`` loads DIR's config instead."""
    from goldstone_cli.config import ConfigError, compose, load_run_config

    resume = [o for o in overrides if o.startswith("resume=")]
    rest = [o for o in overrides if not o.startswith("resume=")]
    try:
        if resume:
            run_dir = Path(resume[-1].split("=", 1)[1])
            if not (run_dir / "checkpoints" / "last.pt").is_file():
                _fail(f"{run_dir} has no checkpoint to resume from (expected {run_dir / 'checkpoints' / 'last.pt'})")
            return load_run_config(run_dir, rest), run_dir
        return compose(rest), None
    except ConfigError as exc:
        _fail(str(exc))


@app.command(context_settings={"allow_extra_args": False}, epilog=_groups_help())
def train(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Hydra overrides: GROUP=OPTION to pick a config (model=dense_mf), KEY=VALUE to set a value "
                   "(optimizer.lr=0.01, trainer.steps=5000), resume=RUN_DIR to continue a run."),
    cfg: bool = typer.Option(False, "--cfg", help="Print the resolved config and exit without training."),
) -> None:
    """Train one model. With no arguments: the paper's Sec. 5.1 experiment (dense dynamic MF on
    synthetic data), a minute on a CPU. Outputs go to ./outputs/<model>/<date>_<time>_<optimizer>/."""
    from goldstone_cli.config import to_yaml

    conf, run_dir = _config_from(list(overrides or []))
    if cfg:
        typer.echo(to_yaml(conf), nl=False)
        return
    from goldstone_cli.config import ConfigError
    from goldstone_cli.train import TrainingDiverged, train as run_training

    try:
        result = run_training(conf, run_dir=run_dir)
    except ConfigError as exc:
        _fail(str(exc))
    except TrainingDiverged as exc:
        _fail(str(exc), code=3)
    s = result.summary
    typer.echo(f"{result.status}: {s['steps']} steps in {s['wall_time']:.1f} s; outputs in {result.run_dir}")
    if result.status == "interrupted":
        typer.echo(s["message"])
        raise typer.Exit(130)


@app.command("config", epilog=_groups_help())
def show_config(
    overrides: Optional[List[str]] = typer.Argument(None, help="Hydra overrides, as for `goldstone train`."),
) -> None:
    """Print the resolved config for the given overrides (same as `goldstone train --cfg`)."""
    from goldstone_cli.config import to_yaml

    conf, _ = _config_from(list(overrides or []))
    typer.echo(to_yaml(conf), nl=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
