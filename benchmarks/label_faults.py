"""Fault injection at scale: the label flow with a fraction of its jobs failing, on the real retry path.

Seeds fam_pass candidates (fcc metals and ordered alloys that ASE's EMT covers: a cheap stand-in
calculator through exactly the same tasks, retry condition, escalation and jobs rows as DFT),
injects transient SCF failures into a fraction of the jobs (each picked job fails its first 1-3
attempts; with 3 attempts allowed, those failing 3 times end failed), runs the flow, and counts:
jobs that succeeded first time, succeeded after escalation, ended failed with a reason; structures
labeled or failed; candidates left without a terminal state (must be 0); and that a rerun
computes nothing.

    .venv/bin/python benchmarks/label_faults.py [--fraction 0.3] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter

from core.settings import apply_process_defaults

apply_process_defaults()  # one BLAS/OpenMP thread per process and quiet Prefect, unless the environment says otherwise

from ase.build import bulk

from core.failures import FailureClass, FaultInjection
from core.structures import from_atoms, split_of, to_row
from flows.label import LabelParams, label
from storage import Lake
from storage.candidates import advance, n_open

FCC = {"Cu": 3.61, "Ni": 3.52, "Pd": 3.89, "Al": 4.05, "Ag": 4.09, "Au": 4.08, "Pt": 3.92}


def cells() -> list:
    """Seven fcc metals, two L1_2 alloys (Cu3Au, Ni3Al) and one L1_0 (CuAu, tetragonal: more strain points)."""
    out = [bulk(el, "fcc", a=a * 1.01) for el, a in FCC.items()]
    for (major, minor), a in ((("Cu", "Au"), 3.75), (("Ni", "Al"), 3.57)):
        cell = bulk(major, "fcc", a=a, cubic=True)  # 4 sites: the corner becomes the minority element
        cell[0].symbol = minor
        out.append(cell)
    cuau = bulk("Cu", "fcc", a=3.85, cubic=True)
    cuau[0].symbol = cuau[1].symbol = "Au"
    out.append(cuau)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-attempts", type=int, default=3)
    args = parser.parse_args()
    faults = FaultInjection(
        fraction=args.fraction,
        failure=FailureClass.SCF_UNCONVERGED,
        seed=args.seed,
        min_failed_attempts=1,
        max_failed_attempts=args.max_attempts,
    )
    with tempfile.TemporaryDirectory(prefix="matloop-faults-") as tmp:
        lake = Lake(f"{tmp}/lake")
        rows = [to_row(from_atoms(a)) for a in cells()]
        lake.append("structures", [{**r, "source": "benchmark", "split": split_of(r["structure_id"])} for r in rows])
        advance(
            lake,
            [{"iteration": 0, "structure_id": r["structure_id"], "target": 150.0, "status": "fam_pass"} for r in rows],
            stage="benchmark",
        )
        params = LabelParams(lake_url=lake.url, preset="emt", faults=faults, max_attempts=args.max_attempts)
        start = time.perf_counter()
        outcomes = label(params)
        wall = time.perf_counter() - start

        final = lake.query(
            "SELECT job_id, attempt, state FROM jobs QUALIFY row_number() OVER "
            "(PARTITION BY job_id ORDER BY attempt DESC) = 1"
        ).to_pylist()
        first_ok = sum(j["state"] == "completed" and j["attempt"] == 1 for j in final)
        escalated_ok = sum(j["state"] == "completed" and j["attempt"] > 1 for j in final)
        failed = sum(j["state"] == "failed" for j in final)
        attempts = lake.counts()["jobs"]
        injected = (
            lake.query("SELECT count(DISTINCT job_id) FROM jobs_history WHERE error_message LIKE 'injected%'")
            .column(0)[0]
            .as_py()
        )
        not_terminal = n_open(lake, 0)
        reasons_ok = all(o.reason for o in outcomes if o.verdict == "failed")
        before = lake.counts()["jobs"]
        rerun = label(params)
        print(
            f"jobs: {len(final)} ({attempts} attempt rows), injected into {injected} "
            f"({100 * injected / len(final):.0f} %)"
        )
        print(f"jobs succeeded first time: {first_ok}; after escalation: {escalated_ok}; failed with reason: {failed}")
        print(f"jobs with no final state: {len(final) - first_ok - escalated_ok - failed}")
        print(
            f"structures: {len(outcomes)}: {dict(Counter(o.verdict for o in outcomes))}; every failure has a "
            f"reason: {reasons_ok}"
        )
        for o in outcomes:
            if o.verdict == "failed":
                print(f"  {o.structure_id}: {o.reason[:160]}")
        print(f"candidates without a terminal state: {not_terminal}")
        print(f"rerun: {len(rerun)} structures picked up, {lake.counts()['jobs'] - before} new job rows")
        print(f"wall time: {wall:.1f} s")


if __name__ == "__main__":
    main()
