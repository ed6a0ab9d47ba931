"""Why a calculation failed, whether retrying can help, and deterministic fault injection.

Every failed attempt, DFT or FAM, is classified into one of the classes of :class:`FailureClass`, the
values ``jobs.error_class`` holds. Transient classes (the SCF did not
converge, the ionic relaxation did not converge, the job hit its walltime, the node died or the
process was killed) are worth retrying, with escalated settings where settings can help. Bad
input (an unknown element, overlapping atoms, a malformed cell) fails at once: repeating it
only burns allocation. Classification works on Python exceptions (GPAW, ASE, OS errors) and on
the text of a code's output or a scheduler's log (VASP, Quantum ESPRESSO, SLURM), so the same
taxonomy covers the embedded engine and production clusters.

Fault injection makes a chosen fraction of calculations fail with a chosen class, decided by a
hash of (seed, job key), so tests and benchmarks exercise the real retry path reproducibly.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time
from enum import StrEnum
from typing import Annotated, Literal, NoReturn

from pydantic import BaseModel, ConfigDict, Field


class FailureClass(StrEnum):
    """The failure taxonomy; values are what the ``jobs.error_class`` column holds.

    The first six classify DFT jobs (and ``bad_input`` also a structure the FAM refuses); the last three
    are the FAM's: an element the model was not trained on, non-finite or exploding energies, forces or
    stresses, and any other error the calculator raised. None of the FAM's is retried: the model is
    deterministic.
    """

    SCF_UNCONVERGED = "scf_unconverged"
    RELAX_UNCONVERGED = "relax_unconverged"
    WALLTIME = "walltime"
    NODE_LOST = "node_lost"
    BAD_INPUT = "bad_input"
    SYMMETRY = "symmetry"
    """The code's symmetry analysis failed on the cell (GPAW's SymmetryAnalysisBug): retried without symmetry."""
    UNKNOWN_ELEMENT = "unknown_element"
    UNPHYSICAL = "unphysical"
    CALCULATOR_ERROR = "calculator_error"


TRANSIENT: frozenset[FailureClass] = frozenset(
    {
        FailureClass.SCF_UNCONVERGED,
        FailureClass.RELAX_UNCONVERGED,
        FailureClass.WALLTIME,
        FailureClass.NODE_LOST,
        FailureClass.SYMMETRY,
    }
)
"""Classes a retry can fix. Everything else (bad input) fails at once."""


def is_transient(failure: FailureClass) -> bool:
    """True when another attempt (possibly with escalated settings) may succeed."""
    return failure in TRANSIENT


class DftFailure(RuntimeError):
    """A classified calculation failure; the exception the DFT tasks raise and retry on."""

    def __init__(self, failure: FailureClass, message: str, *, injected: bool = False) -> None:
        super().__init__(f"{failure.value}: {message}")
        self.failure = FailureClass(failure)
        self.message = message
        self.injected = injected

    @property
    def transient(self) -> bool:
        return is_transient(self.failure)

    def __reduce__(self) -> tuple:  # picklable across Dask workers with its keyword argument
        return (_rebuild_failure, (self.failure.value, self.message, self.injected))


def _rebuild_failure(failure: str, message: str, injected: bool) -> DftFailure:
    return DftFailure(FailureClass(failure), message, injected=injected)


# ---------- classification of text (code output, scheduler logs) ----------
_TEXT_PATTERNS: tuple[tuple[FailureClass, re.Pattern[str]], ...] = tuple(
    (cls, re.compile(pattern, re.IGNORECASE))
    for cls, pattern in (
        # scheduler and operating system first: a killed job often also shows an unconverged SCF
        (FailureClass.WALLTIME, r"DUE TO TIME LIMIT|TIMEOUT|time limit exceeded|walltime"),
        (
            FailureClass.NODE_LOST,
            r"NODE_FAIL|DUE TO NODE FAILURE|oom[-_ ]kill|Out Of Memory|Killed|"
            r"Bus error|Segmentation fault|lost connection|NODE FAILURE",
        ),
        (FailureClass.SYMMETRY, r"SymmetryAnalysisBug|Try using spglib\.standardize_cell|inconsistent symmetry"),
        (
            FailureClass.BAD_INPUT,
            r"POTCAR.*not found|No such file.*(POTCAR|pseudo)|Error reading|"
            r"LATTICE VECTORS ARE LINEARLY DEPENDENT|atoms? (are )?too close|"
            r"wrong atomic coordinates|Error in routine (card|read_namelists|cell_base)|"
            r"unknown (element|species|symbol)|Invalid (atomic )?(symbol|input)",
        ),
        (
            FailureClass.SCF_UNCONVERGED,
            r"convergence NOT achieved|electronic (minimi[sz]ation|SCF) not converged|"
            r"Did not converge|KohnShamConvergenceError|EDIFF was not reached|"
            r"EDDDAV|Sub-Space-Matrix is not hermitian|"
            r"Error EDDDAV|too many (SCF )?iterations",
        ),
        (
            FailureClass.RELAX_UNCONVERGED,
            r"ZBRENT|bfgs failed|The maximum number of steps has been reached|"
            r"relaxation not converged|ionic (relaxation|steps) not converged",
        ),
    )
)


def classify_text(text: str) -> FailureClass | None:
    """The failure class a code's output or a scheduler's log shows, or None if it shows none."""
    for cls, pattern in _TEXT_PATTERNS:
        if pattern.search(text):
            return cls
    return None


# ---------- classification of exceptions ----------
def classify_exception(exc: BaseException) -> FailureClass:
    """Map an exception raised by a calculation to a failure class.

    Unknown errors are treated as ``node_lost`` only when they look like the process or
    machine died; anything else that is not recognised is ``bad_input``, so an unexpected bug
    fails at once with its message instead of being retried with escalated settings.
    """
    if isinstance(exc, DftFailure):
        return exc.failure
    names = {t.__name__ for t in type(exc).__mro__}
    if names & {"KohnShamConvergenceError", "ConvergenceError", "SCFError"}:
        return FailureClass.SCF_UNCONVERGED
    if "SymmetryAnalysisBug" in names:
        return FailureClass.SYMMETRY
    if names & {"TimeoutError", "CancelledError"}:
        return FailureClass.WALLTIME
    if names & {"MemoryError", "BrokenProcessPool", "KilledWorker", "CommClosedError", "ConnectionError"}:
        return FailureClass.NODE_LOST
    if names & {"CalledProcessError"}:
        returncode = getattr(exc, "returncode", 0) or 0
        if returncode < 0 and -returncode in (signal.SIGKILL, signal.SIGTERM, signal.SIGBUS, signal.SIGSEGV):
            return FailureClass.NODE_LOST
        output = " ".join(str(getattr(exc, name, "") or "") for name in ("stdout", "stderr", "output"))
        return classify_text(output) or FailureClass.BAD_INPUT
    if names & {"CalculationFailed"}:  # ASE FileIOCalculator: the external code exited non-zero
        return classify_text(str(exc)) or FailureClass.NODE_LOST
    return classify_text(f"{type(exc).__name__}: {exc}") or FailureClass.BAD_INPUT


def as_failure(exc: BaseException) -> DftFailure:
    """``exc`` itself if it is a DftFailure, else a DftFailure of its class carrying its message."""
    if isinstance(exc, DftFailure):
        return exc
    return DftFailure(classify_exception(exc), f"{type(exc).__name__}: {exc}")


# ---------- fault injection ----------
class FaultInjection(BaseModel):
    """Make a deterministic ``fraction`` of calculations fail with ``failure``.

    A job (one calculation of one structure: relax or one strain point) is picked when a hash
    of ``(seed, job key)`` falls below ``fraction``. A picked job fails its first ``n`` attempts,
    where ``n`` is drawn from the same hash between ``min_failed_attempts`` and
    ``max_failed_attempts``: jobs with fewer failing attempts than the retry budget succeed after
    escalation, the others end failed, which is how the retry path is exercised end to end.
    """

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """Share of jobs made to fail (0: none; testing only)."""
    failure: FailureClass = FailureClass.SCF_UNCONVERGED
    """The failure class the picked jobs raise."""
    seed: int = 0
    """Seed of the hash that picks the jobs."""
    min_failed_attempts: Annotated[int, Field(ge=1)] = 1
    """Fewest failing attempts of a picked job."""
    max_failed_attempts: Annotated[int, Field(ge=1)] = 1
    """Most failing attempts of a picked job (above max_attempts: the job ends failed)."""
    only: str = ""
    """Inject only into jobs whose calculation label starts with this (``relax``, ``strain:``, ``eos:``)."""
    effect: Literal["raise", "kill", "hang"] = "raise"
    """raise: the picked attempts raise ``failure``. kill: they die as a lost node or a cancelled job does (their
    SLURM job cancelled with ``scancel`` when they run in one, else their process SIGKILLed). hang: they sleep
    until something kills them (a SLURM walltime)."""

    def _draw(self, key: str) -> tuple[float, int]:
        digest = hashlib.sha256(f"{self.seed}|{key}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        span = max(self.max_failed_attempts - self.min_failed_attempts, 0) + 1
        n_failed = self.min_failed_attempts + int.from_bytes(digest[8:12], "big") % span
        return u, n_failed

    def picks(self, key: str, calculation: str) -> bool:
        """Whether this job (``key`` unique per job, e.g. structure id and calculation) is injected."""
        return self.fraction > 0 and calculation.startswith(self.only) and self._draw(key)[0] < self.fraction

    def check(self, key: str, calculation: str, attempt: int) -> None:
        """Fail this job's (1-based) attempt the chosen way if it is one of the job's failing attempts."""
        n_failed = self._draw(key)[1]
        if not self.picks(key, calculation) or attempt > n_failed:
            return
        if self.effect == "kill":
            lose_this_process()
        if self.effect == "hang":
            time.sleep(24 * 3600)
        raise DftFailure(
            self.failure,
            f"injected fault (seed {self.seed}, attempt {attempt} of {n_failed} failing)",
            injected=True,
        )


def lost_class(host: str | None) -> FailureClass:
    """Why an attempt that died with its process died: ``walltime`` when the SLURM job it ran in (``host`` ends
    in ``slurm:<job id>``) ended in TIMEOUT, as ``scontrol`` still reports for a while; else ``node_lost``."""
    match = re.search(r"slurm:(\d+)", host or "")
    if match:
        try:
            out = subprocess.run(
                ["scontrol", "-o", "show", "job", match.group(1)], capture_output=True, text=True, timeout=20
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        if re.search(r"\bJobState=TIMEOUT\b", out):
            return FailureClass.WALLTIME
    return FailureClass.NODE_LOST


def lose_this_process() -> NoReturn:
    """Die the way a lost node or a cancelled job dies: ``scancel`` of this process's SLURM job (then wait for
    SLURM to kill it), else SIGKILL, so nothing in this process gets to clean up or record anything."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        subprocess.run(["scancel", job], check=False, timeout=30, capture_output=True)
        time.sleep(120)  # SLURM signals the job's processes; SIGKILL below only if it did not
    os.kill(os.getpid(), signal.SIGKILL)
    raise SystemExit(137)  # not reached
