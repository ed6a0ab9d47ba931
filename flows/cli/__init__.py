"""The ``matloop`` console command: one Typer app, its sub-commands grouped by what they touch."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound="BaseModel")

app = typer.Typer(
    name="matloop",
    help="Active-learning inverse design of crystals: ingest data, train, generate, screen, label, query.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
train_app = typer.Typer(help="Train the property predictor or the generator.", no_args_is_help=True)
app.add_typer(train_app, name="train")


def lake_option(url: str | None) -> str | None:
    """--lake: a folder (or a path to create) or an fsspec URL whose protocol is installed, refused at once."""
    if not url:
        return url
    protocol, sep, _ = url.partition("://")
    if not sep:
        if os.path.exists(url) and not os.path.isdir(url):
            raise typer.BadParameter(f"{url} is a file, not a lake folder")
        return url
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as exc:
        raise typer.BadParameter(f"cannot open {url}: {first_line(exc)}") from None
    return url


@app.callback()
def main(
    lake_url: Annotated[
        str | None,
        typer.Option(
            "--lake",
            help="Lake root: a path or fsspec URL (default: $MATLOOP_LAKE, else ./lake)",
            show_default=False,
            callback=lake_option,
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


def at_least(low: int) -> Callable[[int | None], int | None]:
    """A typer callback refusing an integer below ``low`` (None: not given), with a message showing the value."""

    def check(value: int | None) -> int | None:
        if value is not None and value < low:
            raise typer.BadParameter(f"must be at least {low}, got {value}")
        return value

    return check


def refuse(message: str, code: int = 2) -> NoReturn:
    """Print ``refused: <message>`` as one line (never wrapped) and exit with ``code`` (nothing was written)."""
    console.print(f"[red]refused:[/red] {message}", soft_wrap=True, markup=True, highlight=False)
    raise typer.Exit(code)


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first non-empty line (readers' errors can span a page)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else f"not a file this reader understands ({type(exc).__name__})"


def validation_reason(exc: ValidationError) -> str:
    """A pydantic ValidationError as one line naming each bad field and the value it got."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or exc.title
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{field}{shown}: {message}")
    return "; ".join(parts)


def build_params(model: type[M], **values: object) -> M:
    """Build a flow's parameter model from CLI values; a bad value exits 2 with one line naming it."""
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as exc:
        refuse(validation_reason(exc))


# Sub-command modules register themselves on ``app`` / ``train_app``.
from flows.cli import elastic, generator, lake, predictor, workflow  # noqa: E402,F401
