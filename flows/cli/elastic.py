"""CLI: ``matloop elastic FILE`` (elastic constants of any structure file) and ``matloop seed`` (build the seed set)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from tqdm import tqdm

from core.settings import apply_process_defaults
from flows.cli import app, at_least, first_line

_FILE_HELP = "Structure file: CIF, POSCAR/CONTCAR, extxyz (anything ase.io.read reads)."
_FAM_HELP = "Foundation model: auto, mace-mp-0, sevennet-0 or a MACE model file."
_DFT_HELP = "Use DFT with this preset (test, gpaw-tight, ...) instead of a FAM."
_PROTO_HELP = "Comma-separated binary prototypes (B2,L1_0,L1_2,D0_3,D0_19,C15)."


def _calculator(fam: str, dft: str | None, atoms: Any) -> tuple[Any, str, dict[str, Any]]:
    """(ASE calculator, method string, relax options) for a FAM name or a DFT preset."""
    if dft:
        from core.dft import PRESETS, dft_calculator  # imported only when asked for: GPAW is heavy

        settings = PRESETS.resolve(dft)
        relax_options = {
            "fmax": settings.force_tol,
            "steps": settings.relax_steps,
            "optimizer": settings.relax_optimizer,
        }
        return dft_calculator(settings, atoms=atoms), settings.method, relax_options
    from core.fam import fam_calculator
    from core.settings import set_torch_threads

    set_torch_threads()
    calc, name = fam_calculator(fam)
    return calc, f"fam:{name}", {}


def fam_option(name: str) -> str:
    """--fam: a known foundation model or an existing MACE model file, refused before anything loads."""
    from core.fam import FAM_NAMES

    if name in FAM_NAMES or Path(name).expanduser().is_file():
        return name
    raise typer.BadParameter(f"unknown FAM {name!r}: use one of {', '.join(FAM_NAMES)} or an existing MACE model file")


def dft_option(name: str | None) -> str | None:
    """--dft: a named DFT preset (core.dft.PRESETS), refused before anything loads."""
    if name is None:
        return None
    from core.dft import PRESETS

    if name not in PRESETS:
        raise typer.BadParameter(f"unknown DFT preset {name!r}; presets: {', '.join(PRESETS)}")
    return name


def _positive(value: float) -> float:
    if not value > 0 or value == float("inf"):
        raise typer.BadParameter(f"must be a finite number > 0, got {value:g}")
    return value


def _elements(value: str | None) -> str | None:
    """--unary/--binary: comma-separated element symbols, each a real element."""
    if value is None:
        return None
    from pymatgen.core import Element

    bad = [v.strip() for v in value.split(",") if v.strip() and not Element.is_valid_symbol(v.strip())]
    if bad:
        raise typer.BadParameter(f"unknown element {bad[0]!r}")
    return value


def _fmt(value: float | None, unit: str = "GPa") -> str:
    return "n/a" if value is None else f"{value:8.1f} {unit}"


@app.command()
def elastic(
    file: Annotated[Path, typer.Argument(help=_FILE_HELP, exists=True, dir_okay=False, readable=True)],
    fam: Annotated[str, typer.Option("--fam", help=_FAM_HELP, callback=fam_option)] = "auto",
    dft: Annotated[str | None, typer.Option("--dft", help=_DFT_HELP, callback=dft_option)] = None,
    fmax: Annotated[
        float,
        typer.Option(help="Relaxation force threshold, eV/Å (FAM; a DFT preset sets its own).", callback=_positive),
    ] = 0.05,
    steps: Annotated[
        int, typer.Option(callback=at_least(1), help="Maximum relaxation steps (FAM; a DFT preset sets its own).")
    ] = 300,
    no_relax: Annotated[bool, typer.Option("--no-relax", help="Use the structure as given (already relaxed).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Relax a structure, then print K and G (Voigt, Reuss, Hill), the EOS K, Born stability and the model used."""
    apply_process_defaults()  # BLAS threads: MATLOOP_THREADS, before numpy and torch load
    from ase.io import read

    from core.elastic import ElasticSettings, deformations, elastic_constants
    from core.ingest import check_cif_values
    from core.relax import relax

    try:
        if file.suffix.lower() == ".cif":
            check_cif_values(file)  # ASE wraps wild coordinates into the cell and builds a cell from any six numbers
        atoms = read(str(file))
    except Exception as exc:
        raise typer.BadParameter(f"cannot read {file}: {first_line(exc)}", param_hint="FILE") from None
    calc, method, relax_options = _calculator(fam, dft, atoms)
    t0 = time.perf_counter()
    relaxed = None if no_relax else relax(atoms, calc, **{"fmax": fmax, "steps": steps, **relax_options})
    ref = atoms if relaxed is None else relaxed.atoms
    settings = ElasticSettings()
    bar = tqdm(total=len(deformations(ref, settings)), desc="elastic", disable=as_json, leave=False)
    result = elastic_constants(ref, calc, settings, progress=lambda _label: bar.update())
    bar.close()
    out = {
        "file": str(file),
        "formula": ref.get_chemical_formula(),
        "method": method,
        "relaxed": relaxed is not None,
        "relax_converged": None if relaxed is None else relaxed.converged,
        "relax_steps": None if relaxed is None else relaxed.n_steps,
        "volume_per_atom": ref.get_volume() / len(ref),
        "wall_time_s": round(time.perf_counter() - t0, 2),
        **result.model_dump(),
    }
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"{out['formula']}  ({method}; {result.n_calculations} calculations, {out['wall_time_s']} s)")
    if relaxed is not None:
        state = "converged" if relaxed.converged else "NOT converged"
        typer.echo(f"relaxation: {state} in {relaxed.n_steps} steps, {out['volume_per_atom']:.3f} Å^3/atom")
    typer.echo(f"{'':6}{'Voigt':>12}{'Reuss':>12}{'Hill':>12}")
    typer.echo(f"{'K':6}{_fmt(result.k_voigt):>12}{_fmt(result.k_reuss):>12}{_fmt(result.k_vrh):>12}")
    typer.echo(f"{'G':6}{_fmt(result.g_voigt):>12}{_fmt(result.g_reuss):>12}{_fmt(result.g_vrh):>12}")
    typer.echo(f"EOS K (Birch-Murnaghan): {_fmt(result.eos_k).strip()}")
    born = {True: "stable", False: "UNSTABLE", None: "unknown"}[result.born_stable]
    min_eig = "" if result.min_eigenvalue is None else f" (smallest eigenvalue {result.min_eigenvalue:.1f} GPa)"
    typer.echo(f"Born: {born}{min_eig}")
    if method == "fam:sevennet-0":
        typer.echo("note: SevenNet-0's shear constants are too soft; G is indicative only, K is reliable.")
    if result.flags or result.missing:
        typer.echo(f"flags: {', '.join(result.flags)}  missing: {', '.join(result.missing) or '-'}")


@app.command()
def seed(
    out: Annotated[Path, typer.Option(help="Parquet file to write.")] = Path("core/data/seed.parquet"),
    fam: Annotated[str, typer.Option(help="Foundation model labeling the seed set.", callback=fam_option)] = "auto",
    unary: Annotated[
        str | None,
        typer.Option(help="Comma-separated elements for fcc/bcc/hcp (default: 30 metals).", callback=_elements),
    ] = None,
    binary: Annotated[
        str | None, typer.Option(help="Comma-separated elements for binary prototypes.", callback=_elements)
    ] = None,
    prototypes: Annotated[str | None, typer.Option(help=_PROTO_HELP)] = None,
    limit: Annotated[
        int | None, typer.Option(help="Label only the first N structures (quick checks).", callback=at_least(1))
    ] = None,
    load: Annotated[bool, typer.Option("--load", help="Also append the seed set to the lake.")] = False,
) -> None:
    """Enumerate alloy prototypes, relax and label them with a FAM, and write the offline seed set."""
    apply_process_defaults()  # BLAS threads: MATLOOP_THREADS, before numpy and torch load
    from core import seed as seedlib
    from core.fam import fam_calculator
    from core.settings import set_torch_threads

    set_torch_threads()

    def _split(value: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
        return default if value is None else tuple(v.strip() for v in value.split(",") if v.strip())

    items = list(
        seedlib.prototypes(
            _split(unary, seedlib.UNARY_ELEMENTS),
            _split(binary, seedlib.BINARY_ELEMENTS),
            binary_prototypes=_split(prototypes, seedlib.DEFAULT_BINARY_PROTOTYPES),
        )
    )[:limit]
    calc, name = fam_calculator(fam)
    typer.echo(f"labeling {len(items)} prototypes with {name}")
    t0 = time.perf_counter()
    with tqdm(total=len(items), desc="seed") as bar:
        rows, dropped = seedlib.label(items, calc, name, progress=lambda *_: bar.update())
    path = seedlib.write_seed(rows, out)
    minutes = (time.perf_counter() - t0) / 60
    size_kb = path.stat().st_size / 1e3
    typer.echo(f"kept {len(rows)}, dropped {len(dropped)} in {minutes:.1f} min -> {path} ({size_kb:.0f} kB)")
    reasons: dict[str, int] = {}
    for reason in dropped.values():
        key = reason.split(" (")[0] if not reason.startswith("K_vrh") else "K_vrh out of range"
        reasons[key] = reasons.get(key, 0) + 1
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        typer.echo(f"  dropped {n:4d}: {reason}")
    if load:
        from storage.ingest import seed_rows
        from storage.lake import Lake

        lake = Lake()
        tables = seed_rows(path)
        for table in ("structures", "properties"):
            typer.echo(f"{table}: {lake.append(table, tables[table])} rows appended to {lake.url}")
