"""PAW datasets for every element GPAW is asked to compute: the ``gpaw-data`` wheel's, and the missing ones generated.

The wheel ships no dataset for radioactive Tc (nor Po, At, Fr, Ra and the actinides), yet Tc is one of the five
elements of the reference work's stiffest alloys (Re, Tc, Os, Ru, Ir). A missing dataset is generated once with
GPAW's own generator (``gpaw.atom.generator2``, with the parameters GPAW publishes for the element; the smallest
valence it offers, scalar-relativistic), written atomically to ``$MATLOOP_CACHE_DIR/gpaw-setups`` (outside the
checkout, shared by the processes of one machine) and put on GPAW's setup path. Which datasets were generated, and
by which GPAW, is part of the settings' physics hash (``DftSettings.generated_setups``), so a number computed with a
generated dataset never shares a method with one from the wheel. An element GPAW cannot generate either is refused
before any calculation (``refusal``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from core.settings import get_settings


def cache_dir() -> Path:
    """Where generated datasets live: one folder per machine, outside any checkout."""
    return Path(get_settings().cache_dir).expanduser() / "gpaw-setups"


_CACHES_ON_PATH: set[str] = set()
"""The cache folders ``ensure`` put on GPAW's setup path: not the wheel's, so ``in_wheel`` looks past them."""


def _search_path() -> list[Path]:
    """GPAW's own setup path: the wheel's and the user's folders, without the caches of generated datasets."""
    from gpaw import setup_paths

    return [Path(p) for p in setup_paths if p not in _CACHES_ON_PATH]


def _found(symbol: str, xc: str, folders: Iterable[Path]) -> bool:
    return any((d / f"{symbol}.{xc}{ext}").is_file() for d in folders for ext in ("", ".gz"))


def in_wheel(symbol: str, xc: str = "PBE") -> bool:
    """Whether GPAW's own setup path has a PAW dataset of ``symbol`` for ``xc``."""
    return _found(symbol, xc, _search_path())


def has_dataset(symbol: str, xc: str = "PBE") -> bool:
    """Whether GPAW finds a PAW dataset of ``symbol`` for ``xc``: the wheel's, or one generated before."""
    return _found(symbol, xc, [*_search_path(), cache_dir()])


def generator_valence(symbol: str) -> int | None:
    """The valence of the dataset ``gpaw.atom.generator2`` makes for ``symbol`` (the smallest it has), or None."""
    from gpaw.atom.generator2 import parameters

    return min((int(key[len(symbol) :]) for key in parameters if re.fullmatch(rf"{symbol}\d+", key)), default=None)


def generated_tags(symbols: Iterable[str], xc: str = "PBE") -> tuple[str, ...]:
    """For the elements the wheel has no dataset of: ``<symbol>:generator2-<xc>-<valence>e-gpaw<version>``, sorted
    (what the settings' physics hash records); an element nothing can make is left out (``refusal``)."""
    import gpaw

    tags = []
    for symbol in sorted(set(symbols)):
        if in_wheel(symbol, xc):
            continue
        valence = generator_valence(symbol)
        if valence is not None:
            tags.append(f"{symbol}:generator2-{xc}-{valence}e-gpaw{gpaw.__version__}")
    return tuple(tags)


def refusal(symbols: Iterable[str], xc: str = "PBE") -> str | None:
    """Why GPAW cannot compute these elements: the ones it has no dataset of and cannot generate one for."""
    missing = [s for s in sorted(set(symbols)) if not in_wheel(s, xc) and generator_valence(s) is None]
    return f"GPAW has no PAW dataset for {', '.join(missing)} ({xc}) and cannot generate one" if missing else None


def ensure(symbols: Iterable[str], xc: str = "PBE") -> None:
    """Generate (once per machine) every missing dataset of ``symbols`` and put the cache on GPAW's setup path.

    Raises ValueError naming an element that GPAW can neither find nor generate."""
    from gpaw import setup_paths

    problem = refusal(symbols, xc)
    if problem:
        raise ValueError(problem)
    target = cache_dir()
    if str(target) not in map(str, setup_paths):
        setup_paths.append(str(target))
        _CACHES_ON_PATH.add(str(target))
    for symbol in sorted(set(symbols)):
        if not has_dataset(symbol, xc):
            _generate(symbol, xc, target)


def _generate(symbol: str, xc: str, target: Path) -> None:
    """Write ``<symbol>.<xc>`` (and its basis) into ``target`` atomically: generated in a temporary folder, renamed."""
    from gpaw.atom.generator2 import CLICommand, main

    target.mkdir(parents=True, exist_ok=True)
    parser = argparse.ArgumentParser()
    CLICommand.add_arguments(parser)
    args = parser.parse_args([symbol, "-f", xc, "-w", "-b", "-e", str(generator_valence(symbol))])
    with tempfile.TemporaryDirectory(dir=target, prefix=f".{symbol}-") as tmp:
        here = os.getcwd()
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            os.chdir(tmp)
            try:
                main(args)
            finally:
                os.chdir(here)
        for made in Path(tmp).iterdir():  # the dataset last: a reader that sees it finds its basis too
            if not made.name.endswith(f".{xc}"):
                shutil.move(made, target / made.name)
        os.replace(Path(tmp) / f"{symbol}.{xc}", target / f"{symbol}.{xc}")
