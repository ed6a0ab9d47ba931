"""The ``matloop`` console command: one Typer app, its sub-commands grouped by what they touch."""

from __future__ import annotations

import os
from typing import Annotated

import typer

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


# Sub-command modules register themselves on ``app`` / ``train_app``.
from flows.cli import elastic, generator, lake, predictor, workflow  # noqa: E402,F401
