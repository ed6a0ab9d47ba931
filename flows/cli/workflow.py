"""CLI commands that run the loop: `run` (any size), `demo` (one small iteration), `serve` (the UI)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flows.cli import app, at_least, build_params, console, first_line, heavy_imports
from flows.cli.elastic import fam_option
from flows.cli.lake import print_table

if TYPE_CHECKING:
    from storage import Lake


DEMO_QUERIES = {
    "the funnel of the last iteration": (
        "SELECT target, n_kept, n_gnn_pass, n_fam_pass, n_labeled, mape_gnn, dft_k_mean "
        "FROM iterations ORDER BY iteration DESC, target LIMIT 7"
    ),
    "candidates and their verdicts": (
        "SELECT target, left(structure_id, 11) AS id, round(gnn_k) AS gnn_k, gnn_verdict AS gnn, round(fam_k) fam_k, "
        "fam_verdict AS fam, round(dft_k) AS dft_k, status FROM candidates ORDER BY target, status LIMIT 10"
    ),
    "why candidates were rejected": (
        "SELECT coalesce(fam_reason, gnn_reason, dft_reason) AS reason, count(*) AS n "
        "FROM candidates WHERE status IN ('rejected', 'failed') GROUP BY 1 ORDER BY 2 DESC LIMIT 8"
    ),
    "every DFT attempt": (
        "SELECT left(structure_id, 11) AS id, calculation, attempt, state, error_class, round(wall_time_s, 1) AS s "
        "FROM jobs WHERE stage = 'dft' ORDER BY created_at LIMIT 10"
    ),
    "each condition of the last iteration, met/checked per stage": (
        "SELECT target, condition, n_candidates AS n, n_gnn_pass || '/' || n_gnn_checked AS stage_1, "
        "n_fam_pass || '/' || n_fam_checked AS stage_2, n_label_met || '/' || n_label_checked AS label "
        "FROM condition_funnel WHERE iteration = (SELECT max(iteration) FROM candidates) ORDER BY target, condition"
    ),
    "what the last iteration cost": (
        "SELECT stage, n_jobs, n_failed, round(wall_s, 1) AS wall_s, round(cpu_s, 1) AS cpu_s, "
        "round(gpu_s, 1) AS gpu_s FROM cost_per_stage "
        "WHERE iteration = (SELECT max(iteration) FROM cost_per_stage) ORDER BY stage"
    ),
}


def _run_loop(params: object) -> None:
    """Run the loop; a lake another loop holds is one line naming that loop, exit 1 (nothing written)."""
    from flows.active_learning import active_learning
    from storage import LakeLockedError

    try:
        active_learning(params)
    except LakeLockedError as exc:
        console.print(f"[red]refused:[/red] {exc}; wait for it to finish or use another lake (--lake)", soft_wrap=True)
        raise typer.Exit(1) from None


def _size(name: str) -> str:
    """A known run size, refused before anything loads."""
    from core.sizes import SIZES

    if name not in SIZES:
        raise typer.BadParameter(f"unknown size {name!r}; sizes: {', '.join(SIZES)}")
    return name


def _grader(path: str | None) -> str | None:
    """--grader: an existing checkpoint file, refused before anything loads."""
    if path is not None and not Path(path).expanduser().is_file():
        raise typer.BadParameter(f"no such checkpoint file: {path}")
    return path


def _design(value: str) -> str:
    """--design: the conditions' text, or a YAML/JSON file of them; a bad condition exits 2 naming it."""
    if not value:
        return ""
    import yaml

    from core.targets import DesignError, parse_design

    path = Path(value).expanduser()
    try:
        return parse_design(yaml.safe_load(path.read_text()) if path.is_file() else value).text
    except yaml.YAMLError as err:
        raise typer.BadParameter(f"{path}: not YAML or JSON ({first_line(err)})") from None
    except DesignError as err:
        raise typer.BadParameter(str(err)) from None


@app.command()
def run(
    size: Annotated[
        str, typer.Option(help="Run size: demo, laptop or paper (sets what is left at 0 or size)", callback=_size)
    ] = "laptop",
    iterations: Annotated[int, typer.Option(help="Iterations to run (0: the size's)")] = 0,
    target: Annotated[list[float] | None, typer.Option(help="Target K_vrh, GPa (repeat for several)")] = None,
    focus: Annotated[float, typer.Option(help="Focus target, GPa")] = 350.0,
    design: Annotated[
        str,
        typer.Option(
            help="Design target instead of --target: conditions, e.g. 'k_vrh in [330, 370] and g_vrh/k_vrh <= 0.57',"
            " or a YAML/JSON file of them",
            callback=_design,
        ),
    ] = "",
    n_kept: Annotated[int, typer.Option(help="Candidates kept per target (0: the size's)")] = 0,
    samples_per_kept: Annotated[int, typer.Option(help="Generator samples per kept candidate (0: the size's)")] = 0,
    fam: Annotated[
        str,
        typer.Option(help="Foundation atomic model: auto, mace-mp-0, sevennet-0 or a model file", callback=fam_option),
    ] = "auto",
    labels: Annotated[
        str, typer.Option(help="Who labels the stage-II survivors: dft, fam (the FAM's K, marked as such), size")
    ] = "size",
    new_label_weight: Annotated[
        float, typer.Option(help="Draws of a loop-labeled structure in training per draw of a seed row")
    ] = 10.0,
    warm_start: Annotated[bool, typer.Option(help="Fine-tune the previous iteration's models")] = True,
    grader: Annotated[
        str | None,
        typer.Option(
            help="Frozen CGCNN checkpoint that grades every raw sample (MAPE per iteration)", callback=_grader
        ),
    ] = None,
    dft_preset: Annotated[str, typer.Option(help="DFT preset: test, gpaw-tight, vasp, qe")] = "test",
    dft_limit: Annotated[
        int, typer.Option(callback=at_least(0), help="Label at most this many survivors per iteration (0: all)")
    ] = 0,
    acquisition: Annotated[
        str, typer.Option(help="Which survivors are labeled first: closest, uncertain, expected_improvement")
    ] = "closest",
    dft_budget: Annotated[
        float, typer.Option(help="DFT budget per iteration in CPU-hours, priced from the lake's DFT jobs (0: none)")
    ] = 0.0,
    predictor_config: Annotated[str, typer.Option(help="CGCNN config: small, default, size")] = "size",
    generator_config: Annotated[str, typer.Option(help="Generator config: small, paper, size")] = "size",
    first_iteration: Annotated[int, typer.Option(help="Index of the first iteration")] = 0,
    deployed: Annotated[bool, typer.Option(help="Dispatch stages to their work pools (needs `matloop serve`)")] = False,
) -> None:
    """Run the active-learning loop in this process (or, with --deployed, on the work pools).

    --size sets the cost: demo (one small iteration, minutes), laptop (the default: three iterations
    with FAM labels, about an hour on 2 cores), paper (the reference work's scale: GPU and HPC pools)."""
    with heavy_imports():
        from flows.active_learning import LoopParams
        from flows.generate import DEFAULT_TARGETS
        from storage import Lake

    targets = target or list(DEFAULT_TARGETS)
    params = build_params(  # a bad value: one line naming it, exit 2, before any flow starts
        LoopParams,
        size=size,
        lake_url=Lake().url,
        targets=targets,
        focus_target=focus,
        design=design,
        iterations=iterations,
        n_kept=n_kept,
        samples_per_kept=samples_per_kept,
        label_source=labels,
        warm_start=warm_start,
        predictor_config=predictor_config,
        generator_config=generator_config,
        first_iteration=first_iteration,
        mode="deployed" if deployed else "embedded",
        train={"new_label_weight": new_label_weight},
        generate={"grader": grader},
        screen={"fam_model": fam},
        label={
            "preset": dft_preset,
            "limit": dft_limit,
            "acquisition": {"policy": acquisition, "budget_cpu_hours": dft_budget},
        },
    )
    _run_loop(params)
    _summary(Lake())


@app.command()
def demo() -> None:
    """One small active-learning iteration on the committed seed set: train, generate, screen with the
    FAM, label with GPAW's `test` preset; then the iteration summary and a few SQL queries."""
    with heavy_imports():
        from flows.active_learning import LoopParams
        from storage import Lake
        from storage.ingest import ingest

    lake = Lake()
    t0 = time.perf_counter()
    for line in ingest(lake, "seed").lines():
        console.print(line)
    params = LoopParams(
        lake_url=lake.url,
        targets=[250.0, 350.0],
        focus_target=350.0,
        size="demo",
        screen={"gnn_tolerance": 0.5, "fam_tolerance": 0.5},
        label={"limit": 1},
    )
    _run_loop(params)
    _summary(lake)
    console.print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; lake: {lake.url}")


def _summary(lake: Lake) -> None:
    for title, query in DEMO_QUERIES.items():
        console.print(f'\n[bold]{title}[/bold]  matloop sql "{query}"')
        print_table(lake.query(query))


def _port(port: int) -> int:
    """--port: a TCP port number, refused before anything starts."""
    if not 1 <= port <= 65535:
        raise typer.BadParameter(f"a TCP port is 1-65535, got {port}")
    return port


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="Port of the Prefect server on 127.0.0.1", callback=_port)] = 4200,
) -> None:
    """Start a Prefect server on 127.0.0.1, create the gpu/hpc/default pools, deploy every flow from
    this checkout, start a worker per pool; Ctrl-C stops everything it started."""
    with heavy_imports():
        from deployments.stack import Stack
        from storage import Lake

    lake = Lake()
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    with Stack(lake.url, port=port, progress=console.print) as stack:
        console.print(f"Prefect UI: {stack.ui_url}   (lake {lake.url}; logs in {stack.log_dir})")
        console.print("deployments: train/gpu, generate/gpu, screen/gpu, label/hpc, active-learning/default")
        console.print(f"in another shell:  export PREFECT_API_URL={stack.api_url}")
        console.print("                   prefect deployment run active-learning/default --watch")
        console.print("Ctrl-C stops the workers, then the server")
        try:
            while not stopping:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    console.print("stopped the workers, then the server")
