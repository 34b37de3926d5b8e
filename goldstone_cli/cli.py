"""The ``goldstone`` command line: a thin Typer front end over the library modules."""

from __future__ import annotations

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
