"""The ``matloop`` console command: one Typer app, its sub-commands grouped by what they touch."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="matloop",
    help="Active-learning inverse design of crystals: ingest data, train, generate, screen, label, query.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
train_app = typer.Typer(help="Train the property predictor or the generator.", no_args_is_help=True)
app.add_typer(train_app, name="train")


@app.callback()
def main(
    lake_url: Annotated[
        str | None,
        typer.Option(
            "--lake", help="Lake root: a path or fsspec URL (default: $MATLOOP_LAKE, else ./lake)", show_default=False
        ),
    ] = None,
) -> None:
    """matloop: every structure, property, verdict and job is a Parquet row you can query with SQL."""
    if lake_url:
        os.environ["MATLOOP_LAKE"] = lake_url


_IN_TERMINAL = sys.stdout.isatty()
console = Console(width=None if _IN_TERMINAL or "COLUMNS" in os.environ else 120, safe_box=True)
"""Every command's output: the terminal's width, or 120 columns in a log (rich would assume 80 and cut)."""


def new_table(title: str | None = None, **options: object) -> Table:
    """A rich table; in a log, with ASCII borders (box-drawing characters cut or mis-decoded read as noise)."""
    return Table(title=title, box=box.HEAVY_HEAD if _IN_TERMINAL else box.ASCII2, **options)


@contextmanager
def heavy_imports() -> Iterator[None]:
    """Import what a command needs (torch, pymatgen, prefect: seconds) only once it runs, with a status line.

    Arguments are parsed and checked first, so ``--help`` and a bad argument answer at once.
    """
    if "torch" in sys.modules and "prefect" in sys.modules:
        yield
        return
    if sys.stderr.isatty():
        print("loading models and libraries ...", end="\r", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        if sys.stderr.isatty():
            print(" " * 40, end="\r", file=sys.stderr, flush=True)


# Sub-command modules register themselves on ``app`` / ``train_app``.
from flows.cli import elastic, generator, lake, predictor, workflow  # noqa: E402,F401
