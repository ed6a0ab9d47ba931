"""Where the DFT jobs run: the task runner of the label flow.

``local`` runs jobs on threads of the flow's process; ``dask`` on a local Dask cluster of processes;
``slurm`` submits one SLURM job per Dask worker through prefect-dask's ``DaskTaskRunner`` and a dask-jobqueue
``SLURMCluster`` configured by :class:`core.settings.SlurmOptions` (its defaults are the ``MATLOOP_SLURM_*``
variables that ``deployments/pools.py`` writes into the ``hpc`` pool, so the pool and the flow agree on one set
of names).
"""

from __future__ import annotations

from typing import Literal

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from core.settings import SlurmOptions

Runner = Literal["local", "dask", "slurm"]


def task_runner(runner: Runner, workers: int, slurm: SlurmOptions) -> TaskRunner:
    """The task runner that executes the DFT jobs: threads here, a local Dask cluster, or SLURM jobs via Dask."""
    if runner == "local":
        return ThreadPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner

    if runner == "dask":
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    return DaskTaskRunner(
        cluster_class="dask_jobqueue.SLURMCluster",
        cluster_kwargs=slurm.cluster_kwargs(),
        adapt_kwargs={"minimum_jobs": 0, "maximum_jobs": slurm.max_jobs},
    )
