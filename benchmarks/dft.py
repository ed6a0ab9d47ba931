"""Bulk modulus of bcc W and fcc Ir with GPAW presets, through the platform and raw.

For each element and preset: the ``label`` flow on a throwaway lake (Prefect tasks, cache,
``jobs`` rows, properties) gives K_vrh, the EOS K and the wall time; the same relaxation and
strain/EOS points run raw (core.dft.run_relax/run_point in a plain loop, no Prefect, no lake) give
the platform's overhead, both on one worker and after a warm-up calculation (so neither pays GPAW's
first use). Two overheads are printed: per run (the label flow's wall minus the raw wall: flow and
subflow start and end, candidate selection, result records) and per calculation (from the ``jobs``
rows: the span from the first job's start to the last job's end, less the calculations' own wall
time, per job, as a share of the mean calculation). References: PBE K of W 305.6 GPa and Ir 348.5 GPa
(this machine, GPAW 600 eV, 16^3 k-points, Birch-Murnaghan), Tc 300.2 GPa (Materials Project).

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/dft.py [--presets test gpaw-tight]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from core.settings import apply_process_defaults

apply_process_defaults()  # one BLAS/OpenMP thread per process and quiet Prefect, unless the environment says otherwise

from ase.build import bulk

from core.dft import PRESETS, resolve, run_point, run_relax
from core.elastic import ElasticSettings, deformations, fit
from core.structures import from_atoms, split_of, to_row
from flows.label import LabelParams, label
from storage import Lake
from storage.candidates import advance

CELLS = {"W": ("bcc", 3.172, 305.6), "Ir": ("fcc", 3.875, 348.5), "Tc": ("hcp", 2.7617, 300.2)}
"""element: (lattice, starting lattice constant Å, PBE reference K GPa). Tc: Materials Project mp-113 (in
../shared/data), with the PAW dataset ``core.gpaw_setups`` generates (the gpaw-data wheel has none)."""


def raw(atoms, preset_name: str) -> tuple[float, float | None, float]:
    """K_vrh, EOS K and wall time of the calculation without the platform."""
    start = time.perf_counter()
    settings = resolve(PRESETS.resolve(preset_name), atoms)
    relaxed, _, _ = run_relax(atoms, settings)
    settings = resolve(settings.model_copy(update={"kpts": None}), relaxed)
    es = ElasticSettings()
    plan = deformations(relaxed, es)
    result = fit(relaxed, plan, {d.label: run_point(d.atoms, settings, es) for d in plan}, es)
    return result.k_vrh, result.eos_k, time.perf_counter() - start


def per_calculation_overhead(lake: Lake) -> tuple[float, float]:
    """Seconds the platform adds around each DFT job (task run, cache, ``jobs`` rows), and the mean job's seconds.

    Each attempt writes a ``running`` row when it starts and a final row when it ends; between the first start
    and the last end of the run's jobs, everything that is not a calculation's own ``wall_time_s`` is platform.
    """
    span, compute, n = (
        lake.query(
            """SELECT epoch(max(created_at) FILTER (state <> 'running'))
                    - epoch(min(created_at) FILTER (state = 'running')),
                  sum(wall_time_s) FILTER (state = 'completed'), count(*) FILTER (state = 'completed')
           FROM jobs_history WHERE stage = 'dft'"""
        )
        .to_pylist()[0]
        .values()
    )
    return (span - compute) / n, compute / n


def platform(atoms, preset_name: str) -> tuple[float | None, float | None, float, tuple[float, float]]:
    """K_vrh, EOS K, wall time through the label flow on a fresh lake, and its per-calculation overhead."""
    with tempfile.TemporaryDirectory(prefix="matloop-bench-") as tmp:
        lake = Lake(f"{tmp}/lake")
        row = to_row(from_atoms(atoms))
        lake.append("structures", [{**row, "source": "benchmark", "split": split_of(row["structure_id"])}])
        advance(
            lake,
            [{"iteration": 0, "structure_id": row["structure_id"], "target": 300.0, "status": "fam_pass"}],
            stage="benchmark",
        )
        start = time.perf_counter()
        outcome = label(LabelParams(lake_url=lake.url, preset=preset_name))[0]
        wall = time.perf_counter() - start
        eos = lake.query("SELECT value FROM properties WHERE name = 'eos_k'").column(0).to_pylist()
        return outcome.k_vrh, eos[0] if eos else None, wall, per_calculation_overhead(lake)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["test", "gpaw-tight"])
    parser.add_argument("--elements", nargs="+", default=list(CELLS))
    parser.add_argument("--raw-presets", nargs="*", default=["test"], help="presets also run raw, for the overhead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:  # start the ephemeral Prefect server outside the timings
        label(LabelParams(lake_url=f"{tmp}/lake"))
    warm = args.elements[0]
    raw(bulk(warm, CELLS[warm][0], a=CELLS[warm][1]), args.presets[0])  # GPAW's first use, outside the timings
    print(
        f"{'element':8}{'preset':12}{'K_vrh':>8}{'K_eos':>8}{'ref':>8}{'err %':>7}{'wall s':>8}{'raw s':>7}"
        f"{'run overhead':>15}{'per calculation':>19}"
    )
    for element in args.elements:
        lattice, a, ref = CELLS[element]
        atoms = bulk(element, lattice, a=a)
        for name in args.presets:
            k, k_eos, wall, (job_overhead, job_s) = platform(atoms, name)
            raw_wall = raw(atoms, name)[2] if name in args.raw_presets else None
            err = 100 * (k - ref) / ref if k else float("nan")
            run = f"{wall - raw_wall:6.2f} s {100 * (wall - raw_wall) / raw_wall:4.0f} %" if raw_wall else "-"
            per_job = f"{1000 * job_overhead:5.0f} ms {100 * job_overhead / job_s:5.1f} %"
            print(
                f"{element:8}{name:12}{k or float('nan'):8.1f}{k_eos or float('nan'):8.1f}{ref:8.1f}{err:7.1f}"
                f"{wall:8.1f}{raw_wall or float('nan'):7.1f}{run:>15}{per_job:>19}",
                flush=True,
            )


if __name__ == "__main__":
    main()
