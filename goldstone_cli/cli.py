"""The ``goldstone`` command line: a thin Typer front end over the library modules."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from goldstone_cli.omp import prefer_passive_wait

prefer_passive_wait()  # before anything imports torch (goldstone_cli/omp.py says why)

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
plot_app = typer.Typer(help="Plots of finished runs: Fig. 2 trajectories, Fig. 4 cosine histograms (every run also writes its own loss.png).",
                       no_args_is_help=True)
app.add_typer(plot_app, name="plot")


def _groups_help() -> str:
    """The config groups and their options, read from conf/ (shown in `goldstone train --help`)."""
    from goldstone_cli.config import GROUPS, describe_tuned, group_options, tuned_tables

    lines = ["Config groups (select with GROUP=OPTION):\n"]
    for g in GROUPS:
        if g == "sweep":  # named sweeps belong to `goldstone sweep` (see its --help)
            continue
        opts = group_options(g)
        if opts:
            lines.append(f"  {g}: {', '.join(opts)}\n")
    lines.append("\nmodel=X optimizer=Y is optimizer Y with model X's tuned settings (conf/model/X.yaml, `tuned:`); "
                 "an explicit optimizer.KEY=VALUE or experiment wins, tuned=none keeps the optimizer file's own:\n")
    for model, table in tuned_tables().items():
        if table:
            lines.append(f"  {model}: {describe_tuned(table)}\n")
    lines.append("  goldstone: optimizer.base=gd|adagrad|adam, optimizer.solver=procrustes|natural\n")
    lines.append("\nExamples:\n\n  goldstone train model=movielens optimizer=adagrad data.path=data/ml-latest-small\n\n"
                 "  goldstone train optimizer=goldstone optimizer.solver=natural\n\n"
                 "  goldstone train experiment=fig2_gd_paper       (the paper's exact Sec. 5.1 baseline)\n\n"
                 "  goldstone train --cfg model=dwe optimizer=goldstone optimizer.base=adagrad\n\n"
                 "  goldstone train resume=outputs/dense_mf/2026-01-01_12-00-00_gd trainer.steps=20000")
    return "".join(lines)


def _launcher_rank() -> int:
    """This process's rank as its launcher set it (torchrun's RANK, Slurm's SLURM_PROCID, submitit's
    local task id; the same variables as goldstone_cli/distributed/env.py reads); 0 without one."""
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"),
                        ("SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_NTASKS")):
        if rank in os.environ and world in os.environ:
            value = os.environ[rank].strip()
            return int(value) if value.isdigit() else 0
    return 0


def _fail(msg: str, code: int = 2, every_rank: bool = True) -> None:
    """Print ``error: msg`` and exit with ``code``. Under a launcher that started several ranks, an
    error that every rank raises alike (``every_rank``: a setting, or rank 0's error told to the
    others) is printed by rank 0 only; the other ranks exit with the same code in silence."""
    if not every_rank or _launcher_rank() == 0:
        typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _option_hint(args: list[str], k: int) -> str:
    """The error for an option-like argument ``args[k]`` (``--steps 10``, ``--lr=0.1``): settings are
    Hydra overrides; names the config key it most likely means."""
    from goldstone_cli.config import compose

    name, _, value = args[k].lstrip("-").partition("=")
    if not value and k + 1 < len(args) and "=" not in args[k + 1] and not args[k + 1].startswith("-"):
        value = args[k + 1]
    leaf = name.replace("-", "_")
    keys: list[str] = []

    def walk(node, prefix=""):
        for key, v in node.items():
            path = f"{prefix}{key}"
            if isinstance(v, dict):
                walk(v, path + ".")
            else:
                keys.append(path)

    from omegaconf import OmegaConf

    walk(OmegaConf.to_container(compose([])))
    match = [key for key in keys if key.rsplit(".", 1)[-1] == leaf]
    hint = f" (did you mean {match[0]}={value or 'VALUE'}?)" if len(match) == 1 else ""
    return (f"{args[k]} is not an option: settings are Hydra overrides KEY=VALUE{hint}, e.g. trainer.steps=100 "
            "model.d=5 (goldstone train --help lists the config groups, goldstone config prints every key)")


def _config_from(overrides: list[str]):
    """Compose a config from overrides; ``resume=DIR`` loads DIR's config instead."""
    from goldstone_cli.config import ConfigError, compose, load_run_config

    options = [k for k, o in enumerate(overrides) if o.startswith("-")]
    if options:  # e.g. --steps 10: the command takes Hydra overrides, not options
        _fail(_option_hint(overrides, options[0]))
    resume = [o for o in overrides if o.startswith("resume=")]
    rest = [o for o in overrides if not o.startswith("resume=")]
    for o in rest:
        if o.split("=", 1)[0].lstrip("+~").split(".", 1)[0] == "sweep":
            _fail(f"'{o}': named sweeps are run by `goldstone sweep {o}`; `goldstone train` runs a single model")
    try:
        if resume:
            from goldstone_cli.checkpoint import has_checkpoint

            run_dir = Path(resume[-1].split("=", 1)[1])
            if not run_dir.is_dir():
                _fail(f"resume={run_dir}: no such folder; give a run folder (outputs/<model>/<name>_<date>_<time>, "
                      "printed as 'outputs in ...' when the run started)")
            if not has_checkpoint(run_dir):
                _fail(f"{run_dir} has no checkpoint to resume from (expected {run_dir / 'checkpoints' / 'last.pt'}); "
                      f"a run killed before its first checkpoint can be started again with run_dir={run_dir}")
            return load_run_config(run_dir, rest), run_dir
        return compose(rest), None
    except ConfigError as exc:
        _fail(str(exc))


@app.command(context_settings={"allow_extra_args": False, "ignore_unknown_options": True}, epilog=_groups_help())
def train(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Hydra overrides: GROUP=OPTION to pick a config (model=dense_mf), KEY=VALUE to set a value "
                   "(optimizer.lr=0.01, trainer.steps=5000), resume=RUN_DIR to continue a run."),
    cfg: bool = typer.Option(False, "--cfg", help="Print the resolved config and exit without training."),
) -> None:
    """Train one model. With no arguments: the paper's Sec. 5.1 experiment (dense dynamic MF on
    synthetic data), about 20 s on a 2-core CPU. After the first steps it prints how long the run will
    take; at the end, the headline numbers and the run folder. Outputs go to
    ./outputs/<model>/<date>_<time>_<name>/ (name: the experiment,
    else the optimizer)."""
    from goldstone_cli.config import to_yaml

    conf, run_dir = _config_from(list(overrides or []))
    if cfg:
        typer.echo(to_yaml(conf), nl=False)
        return
    from goldstone_cli.distributed.errors import PeerRankError, RankError
    from goldstone_cli.train import TrainingDiverged, train as run_training

    try:
        # a process of its own (main()): the stop-signal handlers stay until it exits, so that a signal
        # after a complete run's files are written gets a note, not a traceback or death by the signal
        result = run_training(conf, run_dir=run_dir, hold_signals=_PROCESS["own"])
    except TrainingDiverged as exc:
        _fail(str(exc), code=3)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:  # ConfigError, missing or malformed data,
        # a bad checkpoint, a file where a folder belongs, a failure inside the loop (TrainingStopped); on several
        # ranks: rank 0 prints it (PeerRankError: another rank's error, printed by rank 0 only), unless it is
        # one rank's own (RankError)
        _fail(str(exc), code=exc.exit_code if isinstance(exc, PeerRankError) else 2,
              every_rank=not isinstance(exc, RankError))
    from goldstone_cli.train import format_result

    s = result.summary
    if result.rank == 0:  # trainer.distributed: the other ranks' output is in the run's logs/
        typer.echo(format_result(result))
    if result.status == "interrupted":
        if result.rank == 0:
            typer.echo(s["message"])
        raise typer.Exit(int(s.get("exit_code", 130)))  # 128 + the signal: 130 Ctrl-C, 143 SIGTERM
    if result.late_signal and result.rank == 0:  # came during or after the last step: nothing to resume
        typer.echo(f"{result.late_signal} received after the last step: the run completed anyway "
                   "(its files are complete; nothing to resume)")


@app.command("config", context_settings={"ignore_unknown_options": True}, epilog=_groups_help())
def show_config(
    overrides: Optional[List[str]] = typer.Argument(None, help="Hydra overrides, as for `goldstone train`."),
) -> None:
    """Print the resolved config for the given overrides (same as `goldstone train --cfg`)."""
    from goldstone_cli.config import to_yaml

    conf, _ = _config_from(list(overrides or []))
    typer.echo(to_yaml(conf), nl=False)


def _sweeps_help() -> str:
    from goldstone_cli.config import group_options

    return ("Named sweeps (conf/sweep/, select with sweep=NAME): " + ", ".join(group_options("sweep")) + "\n\n"
            "Examples:\n\n  goldstone sweep                      (GD vs Goldstone-GD on the Sec. 5.1 data, 3 seeds)\n\n"
            "  goldstone sweep sweep=fig2 --jobs 2\n\n"
            "  goldstone sweep model=movielens optimizer=adagrad,goldstone seed=0,1,2\n\n"
            "  goldstone sweep optimizer=gd,goldstone optimizer.lr=0.01,0.02 'seed=range(3)'\n\n"
            "  goldstone sweep --dir outputs/sweeps/default_2026-01-01_12-00-00     (resume; skips finished runs)\n\n"
            "  goldstone sweep sweep=fig3 hydra/launcher=submitit_slurm hydra.launcher.partition=gpu")


@app.command(epilog=_sweeps_help())
def sweep(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Hydra overrides added to the sweep's grid: comma lists (seed=0,1,2), range(3), choice(a,b), "
                   "glob(gd*) over a config group's options; sweep=NAME picks a named sweep, sweep.KEY=VALUE "
                   "changes its settings (sweep.target.value=1e-6), hydra/launcher=NAME and "
                   "hydra.launcher.KEY=VALUE choose a Hydra launcher plugin (joblib, submitit_slurm)."),
    dir: Optional[Path] = typer.Option(
        None, "--dir", help="Sweep folder (default: outputs/sweeps/<name>_<date>_<time>). An existing sweep folder "
                            "is continued: finished runs are skipped, interrupted ones resumed."),
    jobs: Optional[int] = typer.Option(
        None, "--jobs", "-j", min=1, help="Runs at a time, each in its own process with cores/N CPU threads "
                                          "(default: the sweep's `jobs` setting; 0 there means one per CPU core, or one per GPU)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the planned runs; start nothing."),
) -> None:
    """Run many trainings from one command (every combination of the overrides), in parallel and
    resumable, then write a comparison report (summary.csv, report.md, plots) into the sweep folder."""
    from goldstone_cli.config import ConfigError
    from goldstone_cli.sweep import run_sweep

    try:
        result = run_sweep(list(overrides or []), sweep_dir=dir, jobs=jobs, dry_run=dry_run, echo=typer.echo)
    except ConfigError as exc:
        _fail(str(exc))
    typer.echo(result.message)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command("report")
def report_cmd(
    sweep_dir: Path = typer.Argument(..., help="A sweep folder (with sweep.json) or any folder of run folders."),
) -> None:
    """Rebuild a sweep's report from its run folders: summary.csv (one row per run), report.md
    (tables per model, mean and spread over seeds) and plots/<model>.png."""
    from goldstone_cli.sweep_report import build_report

    try:
        paths = build_report(sweep_dir)
    except (FileNotFoundError, ValueError) as exc:  # ValueError: ConfigError for a malformed sweep.json
        _fail(str(exc))
    typer.echo(f"report: {paths.report_md}\nsummary: {paths.summary_csv}"
               + "".join(f"\nplot: {p}" for p in paths.plots))


@download_app.command("movielens")
def download_movielens_cmd(
    variant: str = typer.Option(
        "ml-20m", "--variant", help="Which data set: ml-20m (the paper's), ml-25m, ml-1m, ml-100k, ml-latest-small."),
    dest: Path = typer.Option(Path("data"), "--dest", help="Folder to unpack into (creates DEST/VARIANT/)."),
    base_url: Optional[str] = typer.Option(
        None, "--base-url", envvar="GOLDSTONE_MOVIELENS_URL",
        help="Where VARIANT.zip and VARIANT.zip.md5 are served (default: GroupLens, https://files.grouplens.org/datasets/movielens)."),
    md5: Optional[str] = typer.Option(
        None, "--md5", help="Expected MD5 of the zip; overrides the published VARIANT.zip.md5 and the pinned value."),
    force: bool = typer.Option(False, "--force", help="Download and replace DEST/VARIANT even if it exists."),
    keep_zip: bool = typer.Option(False, "--keep-zip", help="Keep DEST/VARIANT.zip after unpacking."),
) -> None:
    """Download a MovieLens zip from GroupLens, verify its MD5, unpack it into DEST/VARIANT/."""
    from goldstone_cli.data.download import DownloadError
    from goldstone_cli.data.movielens import MovieLensVariant, download_movielens

    choices = [v.value for v in MovieLensVariant]
    if variant not in choices:
        _fail(f"unknown --variant {variant!r}; choose one of {', '.join(choices)}")
    import warnings

    with warnings.catch_warnings(record=True) as notes:  # shown as plain lines, and only if the download works
        warnings.simplefilter("always")
        try:
            folder, downloaded = download_movielens(variant, dest, base_url=base_url, md5=md5, force=force,
                                                    keep_zip=keep_zip)
        except (DownloadError, FileNotFoundError, ValueError) as exc:
            _fail(str(exc), code=1)
    for w in notes:
        typer.echo(f"note: {w.message}", err=True)
    typer.echo(f"{'downloaded and verified' if downloaded else 'already present (use --force to replace)'}: {folder}")


@plot_app.command("trajectories")
def plot_trajectories_cmd(
    runs: List[Path] = typer.Argument(..., help="One or two run folders (e.g. a GD run and a Goldstone-GD run)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write (default: trajectories.png in the first run folder)."),
    steps: Optional[str] = typer.Option(None, "--steps", help="Comma-separated training steps to show (default: up to four log-spaced snapshot steps)."),
    tensor: str = typer.Option("U", "--tensor", help="Which embedding tensor to draw (U: users/rows, V: items/columns)."),
) -> None:
    """Fig. 2: 3-D trajectories of every embedding vector over time steps, at a few training steps,
    side by side for up to two runs (d > 3 is projected onto the top three principal directions)."""
    from goldstone_cli.report import plot_trajectories

    if not 1 <= len(runs) <= 2:
        _fail("give one or two run folders")
    try:
        step_list = [int(s) for s in steps.split(",")] if steps else None
    except ValueError:
        _fail(f"--steps must be training steps separated by commas, e.g. --steps 0,100,1000; got {steps!r}")
    out = out or runs[0] / "trajectories.png"
    try:
        path = plot_trajectories(runs, out, steps=step_list, tensor=tensor)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {path}")


_PREPARE_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, ValueError)
# the defaults of `data prepare corpus` are those of conf/data/sotu.yaml (tests/test_corpus.py checks it)
_DWE_BIN_YEARS, _DWE_VOCAB = 1, 1000
_TABLE2_WORDS = ("car", "computer", "electricity", "tuberculosis", "dna")


@prepare_app.command("ngrams")
def prepare_ngrams_cmd(
    onegrams: List[str] = typer.Option(
        ..., "--onegrams", help="Google Books 1-gram file(s), v2 (2012) or v3 (2020), gzip or plain: they give the "
                                "vocabulary and the yearly token totals. Repeat the option, or give a quoted glob "
                                "('data/googlebooks-eng-all-1gram-*.gz')."),
    fivegrams: List[str] = typer.Option(
        ..., "--fivegrams", help="Google Books 5-gram file(s), v2 or v3, gzip or plain: they give the co-occurrences. "
                                 "Repeat the option, or give a quoted glob. Processed in parallel, one file per process."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: vocab.tsv, times.tsv, cooc_00000.npz ... (one "
                                                      "sparse matrix per year), manifest.json (written last)."),
    years: str = typer.Option("1800-2008", "--years", help="Inclusive year range FIRST-LAST; one time step per year "
                                                           "(years without data are kept as empty steps)."),
    vocab: int = typer.Option(10_000, "--vocab", help="Vocabulary size: the top words of the 1-grams by --rank."),
    rank: str = typer.Option("relfreq", "--rank", help="Vocabulary ranking. relfreq (default): mean yearly relative "
                                                       "frequency, so every year counts equally and 19th-century words "
                                                       "are not crowded out by the far larger recent years; count: total "
                                                       "count over --years."),
    totalcounts: Optional[Path] = typer.Option(
        None, "--totalcounts", help="Google's totalcounts file (e.g. googlebooks-eng-all-totalcounts-20120701.txt): the "
                                    "yearly totals for --rank relfreq and times.tsv. Without it they are summed from the "
                                    "1-grams, which are then read twice."),
    vocab_file: Optional[Path] = typer.Option(
        None, "--vocab-file", help="Use this vocabulary instead of ranking the 1-grams: one word per line, or the "
                                   "vocab.tsv of a prepared corpus (to compare corpora on one vocabulary); lowercased "
                                   "like the tokens unless --keep-case."),
    lowercase: bool = typer.Option(True, "--lowercase/--keep-case", help="Lowercase tokens, merging 'The' and 'the' "
                                                                         "(default), or keep Google's case."),
    pos: str = typer.Option("drop", "--pos", help="Part-of-speech rule. drop (default): skip POS-annotated ngrams "
                                                  "('cat_NOUN', '_ADJ_'), Google's tagged copies of the untagged text, "
                                                  "and keep _START_/_END_ out of the vocabulary; keep: every token verbatim."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Parallel processes (default: the number of "
                                                                        "CPUs); each counts one input file at a time."),
    block_mb: float = typer.Option(8.0, "--block-mb", help="Uncompressed block size read and parsed at a time (MB); "
                                                            "memory per process grows with it."),
    max_malformed: float = typer.Option(0.01, "--max-malformed", help="Fail if more than this fraction of the lines "
                                                                      "of a file (or of all files) is malformed."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it already holds a prepared corpus."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Google Books Ngram 1-grams + 5-grams -> one word co-occurrence matrix per year (window weights 4,3,2,1).

    An interrupted run resumes: rerun the same command; input files already counted (kept in .OUT.work/ next to OUT) are skipped."""
    from goldstone_cli.data.cooc import read_word_list
    from goldstone_cli.data.ngrams import parse_years, prepare_ngrams

    try:
        y = parse_years(years)
        words = read_word_list(vocab_file) if vocab_file is not None else None
        r = prepare_ngrams(onegrams, fivegrams, out, years=y, vocab_size=vocab, rank=rank, totalcounts=totalcounts,
                           vocab_words=words, lowercase=lowercase, pos=pos, workers=workers, block_mb=block_mb,
                           max_malformed=max_malformed, force=force, progress=not quiet)
    except _PREPARE_ERRORS as exc:
        _fail(str(exc), code=1)
    typer.echo(f"wrote {r.out}: {r.n_steps} years x {r.vocab_size} words, total weight {r.total_weight:,}")
    if r.reused_parts:
        typer.echo(f"resumed: {r.reused_parts} of {r.reused_parts + r.processed_parts} file passes were already done")
    if r.malformed_lines:
        ex = r.malformed_examples[0]
        typer.echo(f"malformed lines skipped: {r.malformed_lines:,} of {r.total_lines:,}, e.g. {ex['file']}:{ex['line']}: "
                   f"{ex['text']!r} ({ex['why']})")


@prepare_app.command("corpus")
def prepare_corpus_cmd(
    source: str = typer.Option("sotu", "--source", help="'sotu' (the State of the Union package: 249 addresses, "
                                                        "1790-2026), a folder of UTF-8 text files whose names begin "
                                                        "with a year (1850-title.txt), or semeval:DIR, a SemEval-2020 "
                                                        "Task 1 folder (corpus1/lemma/*.txt.gz, corpus2/lemma/*.txt.gz, "
                                                        "targets.txt: one step per corpus, one sentence per line, "
                                                        "targets always in the vocabulary)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output folder: vocab.tsv, times.tsv, cooc_00000.npz ... (one sparse matrix per time "
                                  "bin), manifest.json (written last). Default (sotu or a folder of dated files): "
                                  "data/<source>[-only]-<N>y-v<V>-<rank>[-k<hash of --keep-words>] (-only: "
                                  "--sotu-only), the folder `goldstone train model=dwe` prepares and reads (without "
                                  "-only); semeval:DIR and --years need --out."),
    bin_years: int = typer.Option(_DWE_BIN_YEARS, "--bin-years", help="Width of a time bin in years (1: one step per "
                                                                      "year, as model=dwe; 10: calendar decades). Bins "
                                                                      "without text are kept as empty time steps."),
    vocab: Optional[int] = typer.Option(None, "--vocab", help="Vocabulary size (digit-only tokens are never in it; "
                                                              f"default {_DWE_VOCAB}, as model=dwe; semeval: 3000)."),
    keep_words: str = typer.Option(
        ",".join(_TABLE2_WORDS), "--keep-words", help="Comma-separated words kept in the vocabulary whenever the corpus "
                                                      "has them, in place of the lowest-ranked others (default: the "
                                                      "paper's Table 2 queries); '' for none. Not for semeval (its "
                                                      "targets are always kept)."),
    years: Optional[str] = typer.Option(None, "--years", help="Only documents in FIRST-LAST; the first bin starts at "
                                                              "FIRST (default: all, bins aligned to multiples of "
                                                              "--bin-years)."),
    rank: str = typer.Option("relfreq", "--rank", help="Vocabulary ranking. relfreq (default): mean over the bins of "
                                                       "the relative frequency, so every period counts equally; count: "
                                                       "total count."),
    sotu_all: bool = typer.Option(True, "--sotu-all/--sotu-only", help="sotu: all 249 texts (default), or only the "
                                                                       "237 canonical addresses (is_sotu)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it already holds a prepared corpus."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """A dated text corpus -> one word co-occurrence matrix per time bin (lowercased tokens, window weights 4,3,2,1)."""
    from goldstone_cli.data.corpus import prepare_corpus
    from goldstone_cli.data.ngrams import parse_years

    from goldstone_cli.data.corpus import default_corpus_dir

    keep = [w.strip() for w in keep_words.split(",") if w.strip()]
    semeval = source.startswith("semeval:")
    if vocab is None:
        vocab = 3000 if semeval else _DWE_VOCAB
    try:
        y = parse_years(years) if years else None
        if out is None:
            if semeval or years:
                _fail(f"{'a semeval: source' if semeval else '--years'} needs --out (the default folder name is for "
                      "sotu or a folder of dated files over all their years)")
            out = default_corpus_dir(source, bin_years, vocab, rank, keep, include_related=sotu_all)
        r = prepare_corpus(source, out, bin_years=bin_years, vocab_size=vocab, years=y, rank=rank,
                           include_related=sotu_all, keep_words=keep, force=force, progress=not quiet)
    except _PREPARE_ERRORS as exc:
        _fail(str(exc), code=1)
    typer.echo(f"wrote {r.out}: {r.n_steps} bins x {r.vocab_size} words from {r.n_documents} documents "
               f"({r.n_tokens:,} tokens), total weight {r.total_weight:,}")
    if r.empty_steps:
        typer.echo(f"empty bins (kept as empty time steps): {', '.join(r.empty_steps)}")
    if r.keep_words_missing:
        given = "--keep-words" if keep_words != ",".join(_TABLE2_WORDS) else "the default --keep-words (Table 2's queries)"
        typer.echo(f"{given} not in the corpus (left out): {', '.join(r.keep_words_missing)}")
    if source.startswith("semeval:"):
        from goldstone_cli.data.cooc import read_manifest

        missing = read_manifest(r.out).get("settings", {}).get("targets_missing", [])
        if missing:
            typer.echo(f"warning: {len(missing)} targets never occur in the corpora: {', '.join(missing[:10])}")


# ----------------------------------------------------------------------------- word embeddings
def _align_choice(value: str) -> Optional[bool]:
    if value not in ("auto", "yes", "no"):
        _fail(f"--align must be auto, yes or no, got {value!r}")
    return None if value == "auto" else value == "yes"


@app.command("age-words")
def age_words_cmd(
    words: List[str] = typer.Argument(..., help="Query words (lowercase, as in the corpus vocabulary)."),
    run: Optional[Path] = typer.Option(None, "--run", help="A word-embedding run folder (default: the newest "
                                                           "model=dwe run under --outputs)."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="A second run shown side by side "
                                                                   "(e.g. the Adam or the aligned baseline)."),
    from_year: Optional[int] = typer.Option(None, "--from", help="Year of the query embeddings (default: the last step)."),
    to_year: Optional[int] = typer.Option(None, "--to", help="Year whose vocabulary is searched (default: the first step)."),
    top: int = typer.Option(5, "--top", "-k", help="Number of words to show per query."),
    align: str = typer.Option("auto", "--align", help="Procrustes-align each run's time steps first: auto (only runs "
                                                      "trained without the chain prior), yes or no."),
    include_query: bool = typer.Option(False, "--include-query", help="Allow the query word itself in the answer."),
    show_cos: bool = typer.Option(False, "--cos", help="Also print each answer's cosine."),
    min_count: float = typer.Option(1.0, "--min-count", help="Only answers with at least this co-occurrence mass "
                                                             "(row sum of the corpus matrix) in the --to step. Default 1: "
                                                             "the word occurs there (a word absent from a step has only "
                                                             "its prior-smoothed embedding, e.g. 'inflation' in 1790); "
                                                             "0 allows every word. Reads the run's corpus folder "
                                                             "(data.path of its config) unless 0."),
    outputs: Path = typer.Option(Path("outputs"), "--outputs", help="Where to look for the newest run when --run is not given."),
) -> None:
    """Word aging (paper Table 2): for each WORD, the words whose embedding at --to has the largest
    cosine with WORD's embedding at --from (default: last step -> first step)."""
    from goldstone_cli.words import WordsError, age_words, find_latest_run, format_age_words, load_run

    how = _align_choice(align)
    try:
        if run is None:
            run = find_latest_run(outputs)
            typer.echo(f"using the newest word-embedding run: {run}")
        runs = [load_run(run, align=how)] + ([load_run(compare, align=how)] if compare is not None else [])
        results = [age_words(r, words, from_year, to_year, top=top, exclude_query=not include_query,
                             min_count=min_count) for r in runs]
    except WordsError as exc:
        _fail(str(exc))
    r0 = runs[0]
    s = r0.step_of_year(from_year) if from_year is not None else len(r0.labels) - 1
    targets = [r.labels[r.step_of_year(to_year) if to_year is not None else 0] for r in runs]  # each run's own steps
    typer.echo(format_age_words(results, runs, r0.labels[s], targets))
    if show_cos:
        for r, res in zip(runs, results):
            typer.echo(f"\n{r.label} ({r.run_dir}):")
            for w, nb in res:
                typer.echo(f"  {w}: " + ", ".join(f"{x} ({c:.3f})" for x, c in nb))


@plot_app.command("cosines")
def plot_cosines_cmd(
    runs: List[Path] = typer.Argument(..., help="One or more word-embedding run folders (e.g. Goldstone-GD, Adam, "
                                                "and the uncoupled baseline)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write (default: first_last_cosine.png in the first run folder)."),
    align: str = typer.Option("auto", "--align", help="Procrustes-align each run first: auto (only uncoupled runs), yes or no."),
    min_count: float = typer.Option(0.0, "--min-count", help="Only words with at least this co-occurrence mass in both "
                                                             "the first and the last step (needs the run's corpus folder)."),
) -> None:
    """Fig. 4: histogram of cos(u_i,first, u_i,last) over the vocabulary for each run; prints the
    quantiles and records them in each run's summary.json (key first_last_cosine)."""
    from goldstone_cli.words import (WordsError, cosine_summary, first_last_cosines, load_run, plot_first_last,
                                     record_cosine_summary)

    how = _align_choice(align)
    try:
        loaded = [load_run(r, align=how) for r in runs]
    except WordsError as exc:
        _fail(str(exc))
    try:
        for r in loaded:
            cos = first_last_cosines(r, min_count)
            summ = cosine_summary(cos)
            record_cosine_summary(r, summ, min_count)
            typer.echo(f"{r.label} ({r.run_dir}): {cos.numel()} words, median {summ['median']:.3f}, "
                       f"q10 {summ['q10']:.3f}, q90 {summ['q90']:.3f}, negative {100 * summ['frac_negative']:.1f}%")
        path = plot_first_last(loaded, out or loaded[0].run_dir / "first_last_cosine.png", min_count=min_count)
    except WordsError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {path}")


# ----------------------------------------------------------------------------- analysis (goldstone_cli/analysis/)
eval_app = typer.Typer(help="Evaluate word-embedding runs: SemEval-2020 Task 1, planted semantic changes.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")

_RUN_HELP = "A word-embedding run folder (outputs/dwe/...) or a folder written by `goldstone export`."
_ALIGN_HELP = ("Chain-Procrustes-align the steps first: auto (only runs trained without the chain prior, "
               "model.coupled=false), yes or no.")
_MIN_COUNT_HELP = ("A word counts as present in a step when its co-occurrence mass there (row sum of the corpus "
                   "matrix; steps held out of training count as empty) is at least this; 0: every word everywhere "
                   "(needed when the run's corpus folder cannot be read).")
_STEP_HELP = "a year inside the step, the step's label (1790-1799) or #INDEX (#0 first, #-1 last)"


def _analysis(fn, *args, **kwargs):
    from goldstone_cli.words import WordsError

    try:
        return fn(*args, echo=typer.echo, **kwargs)
    except WordsError as exc:  # AnalysisError is a WordsError
        _fail(str(exc))
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc), code=1)


@app.command("changes")
def changes_cmd(
    run: Path = typer.Argument(..., help=_RUN_HELP),
    t_from: Optional[str] = typer.Option(None, "--from", help=f"First step: {_STEP_HELP} (default: the first trained step)."),
    t_to: Optional[str] = typer.Option(None, "--to", help=f"Second step: {_STEP_HELP} (default: the last trained step)."),
    top: int = typer.Option(20, "--top", "-k", help="Words shown in each table (most changed, most stable); the CSV has all."),
    min_count: float = typer.Option(1.0, "--min-count", help=_MIN_COUNT_HELP + " Words absent from either step are "
                                                             "listed as not ranked."),
    by: str = typer.Option("mean", "--by", help="Ranking key: mean (1-cos of the posterior means) or posterior (the "
                                                "posterior mean of 1-cos, variational runs; larger for uncertain words)."),
    samples: int = typer.Option(200, "--samples", help="Posterior samples for the credible intervals (variational runs)."),
    level: float = typer.Option(0.9, "--level", help="Probability mass of the equal-tailed credible interval."),
    seed: int = typer.Option(0, "--seed", help="Seed of the posterior samples."),
    align: str = typer.Option("auto", "--align", help=_ALIGN_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for changes_<from>_<to>.csv/.json (default: RUN/analysis/)."),
) -> None:
    """Words ranked by how much they changed between two steps (cosine distance), with the posterior
    mean and credible interval of that distance for variational runs; also the most stable words."""
    from goldstone_cli.analysis import commands

    _analysis(commands.changes, run, t_from=t_from, t_to=t_to, top=top, min_count=min_count, by=by, samples=samples,
              level=level, seed=seed, align=_align_choice(align), out=out)


@app.command("neighbors")
def neighbors_cmd(
    words: List[str] = typer.Argument(..., help="Query words (as in the vocabulary)."),
    run: Optional[Path] = typer.Option(None, "--run", help=_RUN_HELP + " Default: the newest model=dwe run under --outputs."),
    steps: Optional[str] = typer.Option(None, "--steps", help=f"Comma-separated steps, each {_STEP_HELP} (default: up "
                                                              "to 5 evenly spaced trained steps)."),
    top: int = typer.Option(10, "--top", "-k", help="Neighbours per step."),
    min_count: float = typer.Option(1.0, "--min-count", help=_MIN_COUNT_HELP + " Only present words are neighbours."),
    show_cos: bool = typer.Option(False, "--cos", help="Print each neighbour's cosine."),
    align: str = typer.Option("auto", "--align", help=_ALIGN_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for neighbors_<words>.csv/.json (default: RUN/analysis/)."),
    outputs: Path = typer.Option(Path("outputs"), "--outputs", help="Where to look for the newest run when --run is not given."),
) -> None:
    """Nearest neighbours of each WORD at several steps (cosine of the embeddings), among the words
    present in that step."""
    from goldstone_cli.analysis import commands

    if run is None:
        run = _newest_run(outputs)
    _analysis(commands.neighbors, words, run, steps=steps, top=top, min_count=min_count, show_cos=show_cos,
              align=_align_choice(align), out=out)


def _newest_run(outputs: Path) -> Path:
    from goldstone_cli.words import WordsError, find_latest_run

    try:
        run = find_latest_run(outputs)
    except WordsError as exc:
        _fail(str(exc))
    typer.echo(f"using the newest word-embedding run: {run}")
    return run


@plot_app.command("word")
def plot_word_cmd(
    words: List[str] = typer.Argument(..., help="Words to draw (one panel each in the path plot, one curve each in the distance plot)."),
    run: Optional[Path] = typer.Option(None, "--run", help=_RUN_HELP + " Default: the newest model=dwe run under --outputs."),
    t_from: Optional[str] = typer.Option(None, "--from", help=f"Reference step (distance plot) and the step whose "
                                                              f"neighbours are drawn: {_STEP_HELP} (default: first trained step)."),
    t_to: Optional[str] = typer.Option(None, "--to", help=f"The other step whose neighbours are drawn: {_STEP_HELP} "
                                                          "(default: last trained step)."),
    top: int = typer.Option(6, "--top", "-k", help="Neighbours drawn at each of the two steps."),
    min_count: float = typer.Option(1.0, "--min-count", help=_MIN_COUNT_HELP + " Steps where the word is absent are drawn hollow."),
    samples: int = typer.Option(200, "--samples", help="Posterior path samples for the credible band (variational runs)."),
    level: float = typer.Option(0.9, "--level", help="Probability mass of the credible band."),
    seed: int = typer.Option(0, "--seed", help="Seed of the posterior samples."),
    align: str = typer.Option("auto", "--align", help=_ALIGN_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for path_<words>.png, distance_<words>.png "
                                                                 "and distance_<words>.csv/.json (default: RUN/analysis/)."),
    outputs: Path = typer.Option(Path("outputs"), "--outputs", help="Where to look for the newest run when --run is not given."),
) -> None:
    """Each word's path through time among its neighbours (2-D projection of the aligned space, step
    labels), and its cosine distance to the first step against time with the credible band."""
    from goldstone_cli.analysis import commands

    if run is None:
        run = _newest_run(outputs)
    _analysis(commands.plot_word, words, run, top=top, min_count=min_count, samples=samples, level=level, seed=seed,
              align=_align_choice(align), out=out, t_from=t_from, t_to=t_to)


@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., help="A word-embedding run folder (outputs/dwe/...)."),
    fmt: str = typer.Option("word2vec", "--format", "-f", help="word2vec: one text file per step (gensim "
                                                               "KeyedVectors.load_word2vec_format reads it); npy: one "
                                                               "float32 (V, d) array per step."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write: the step files, vocab.txt, steps.tsv, counts.npy, "
                                                      "std_*.npy (variational runs), export.json (written last)."),
    align: str = typer.Option("auto", "--align", help=_ALIGN_HELP + " The rotations go to rotations.npy."),
    force: bool = typer.Option(False, "--force", help="Write into a folder that is not empty (replacing its files)."),
) -> None:
    """The run's word embeddings, one file per step, plus vocabulary, step labels, co-occurrence mass
    per word and step, and (variational runs) the posterior standard deviations."""
    from goldstone_cli.analysis import commands

    _analysis(commands.export, run, out, fmt=fmt, align=_align_choice(align), force=force)


@app.command("align")
def align_cmd(
    embeddings: List[Path] = typer.Argument(..., help="One file per period, in time order: word2vec text (.txt, .vec, "
                                                      ".w2v) or binary (.bin), or HistWords-style NAME.npy with its "
                                                      "vocabulary as text (NAME.vocab.txt, NAME-vocab.txt, or "
                                                      "PREFIX-vocab.txt for PREFIX-w.npy; one word per line; pickled "
                                                      "vocabularies are refused)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the aligned files (same names and formats) and alignment.json."),
    skip: int = typer.Option(1, "--skip", help="Couple each period to the next SKIP periods (1: a chain, solved "
                                               "exactly; > 1 adds cycles, solved by block-coordinate sweeps)."),
    anchor: str = typer.Option("first", "--anchor", help="first: the first period keeps its axes; least: the global "
                                                         "rotation that moves all periods least."),
    reflections: bool = typer.Option(True, "--reflections/--rotations-only", help="Solve over O(d) (default; a mirror-"
                                                                                  "image period is undone) or SO(d) only."),
    force: bool = typer.Option(False, "--force", help="Write into a folder that is not empty."),
) -> None:
    """Align time-sliced embeddings trained elsewhere with the exact gauge step (chain Procrustes over
    O(d), the optimizer's own solver) over the words shared by neighbouring periods."""
    from goldstone_cli.analysis import commands

    _analysis(commands.align, embeddings, out, skip=skip, anchor=anchor, reflections=reflections, force=force)


@eval_app.command("lsc")
def eval_lsc_cmd(
    run: Path = typer.Argument(..., help=_RUN_HELP + " Trained on a corpus prepared with --source semeval:DIR."),
    targets: Path = typer.Option(..., "--targets", help="targets.txt: one target word per line."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="The truth folder (binary.txt, graded.txt) or the folder "
                                                               "holding truth/: then prints accuracy and Spearman's rho."),
    t_from: Optional[str] = typer.Option(None, "--from", help=f"Period 1: {_STEP_HELP} (default: first step)."),
    t_to: Optional[str] = typer.Option(None, "--to", help=f"Period 2: {_STEP_HELP} (default: last step)."),
    threshold: str = typer.Option("mean", "--threshold", help="Binary decision: graded score above mean or median of the "
                                                              "targets' scores, or above a number."),
    score: str = typer.Option("mean", "--score", help="Graded score: mean (1-cos of the posterior means) or posterior "
                                                      "(posterior mean of 1-cos; variational runs)."),
    samples: int = typer.Option(200, "--samples", help="Posterior samples for --score posterior."),
    seed: int = typer.Option(0, "--seed", help="Seed of the posterior samples."),
    align: str = typer.Option("auto", "--align", help=_ALIGN_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for lsc.csv/.json and answer/task1|task2/<language>.txt "
                                                                 "(default: RUN/analysis/lsc/)."),
) -> None:
    """SemEval-2020 Task 1: each target's graded change score (subtask 2) and binary decision
    (subtask 1); with --truth, accuracy and Spearman's rho."""
    from goldstone_cli.analysis import commands

    _analysis(commands.eval_lsc, run, targets, truth=truth, t_from=t_from, t_to=t_to, threshold=threshold,
              score=score, samples=samples, seed=seed, align=_align_choice(align), out=out)


@eval_app.command("changes")
def eval_changes_cmd(
    run: Path = typer.Argument(..., help=_RUN_HELP + " Trained on a corpus from `goldstone data make-planted`."),
    planted: Path = typer.Option(..., "--planted", help="The generated folder (holding planted.tsv) or planted.tsv itself."),
    min_count: float = typer.Option(1.0, "--min-count", help=_MIN_COUNT_HELP),
    align: str = typer.Option("auto", "--align", help=_ALIGN_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for eval_changes.csv/.json (default: RUN/analysis/)."),
) -> None:
    """How well a run recovers planted semantic changes: precision of the top K of `goldstone changes`
    (K = number of planted words, first vs last step) and the change year read off each planted
    word's distance curve."""
    from goldstone_cli.analysis import commands

    _analysis(commands.eval_changes, run, planted, min_count=min_count, align=_align_choice(align), out=out)


@data_app.command("make-planted")
def make_planted_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write."),
    layout: str = typer.Option("dated", "--layout", help="dated: OUT/texts/<year>.txt + OUT/planted.tsv (prepare with "
                                                         "--source OUT/texts); semeval: the SemEval-2020 Task 1 layout "
                                                         "(prepare with --source semeval:OUT)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (the corpus is a deterministic function of it)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a corpus generated there before."),
) -> None:
    """Generate a corpus with planted semantic changes (topics of words; a few words switch topic at a
    known year), for `goldstone eval changes` and `goldstone eval lsc`."""
    from goldstone_cli.analysis.planted import make_dated_corpus, make_semeval_corpus

    if layout not in ("dated", "semeval"):
        _fail(f"--layout must be dated or semeval, got {layout!r}")
    path = _analysis(lambda echo: (make_dated_corpus if layout == "dated" else make_semeval_corpus)(out, seed=seed, force=force))
    typer.echo(f"wrote {path}")


def _one_line_summaries(typer_app: typer.Typer) -> None:
    """Each command's first docstring paragraph as one line in the command lists of --help (Rich kept the
    docstring's line breaks there, so the list wrapped raggedly); the command's own --help is unchanged."""
    import inspect

    for info in typer_app.registered_commands:
        if info.short_help is None and info.help is None and info.callback is not None:
            doc = inspect.getdoc(info.callback) or ""
            info.short_help = " ".join(doc.split("\n\n", 1)[0].split()) or None
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _one_line_summaries(group.typer_instance)


_one_line_summaries(app)

# whether this process runs the command line as its own (main(), the `goldstone` script and
# `python -m goldstone_cli`) and exits when the command returns; not under CliRunner or another caller
_PROCESS = {"own": False}


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Our own UserWarnings as ``warning: <message>``; any other (a library's, or another category) keeps
    its category, and a library's its origin: ``warning: DeprecationWarning: <message> (torch/x.py:12)``."""
    own = Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent)
    if own and category is UserWarning:
        return f"warning: {message}\n"
    return f"warning: {category.__name__}: {message}" + ("" if own else f" ({filename}:{lineno})") + "\n"


def _plain_warnings() -> None:
    """The command line's warnings as one line each (not Python's ``file.py:123: UserWarning: <message>``
    followed by the source line that raised it); see ``_format_warning``."""
    import warnings

    warnings.formatwarning = _format_warning


def main() -> None:
    _PROCESS["own"] = True
    _plain_warnings()
    app()


if __name__ == "__main__":
    main()
