"""Named run sizes of the active-learning loop: how much work one run does, with what it was measured to cost.

A size fixes the knobs that set a run's cost (iterations, candidates kept and sampled per target,
which predictor and generator presets, who labels) and leaves the science (targets, tolerances,
models, DFT preset) to the user. The loop's form and ``matloop run --size`` take a name; a field
given explicitly wins over its size. Costs are what the named benchmark printed, so a user pressing
Run knows what they start.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RunSize(BaseModel):
    """The cost-setting knobs of a loop run and its measured cost."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    iterations: int = Field(ge=1)
    """Iterations to run."""
    n_kept: int = Field(ge=1)
    """Candidates kept per target and iteration."""
    samples_per_kept: int = Field(ge=1)
    """Generator samples per kept candidate."""
    predictor_config: str
    """CGCNN config."""
    generator_config: str
    """Generator preset."""
    label_source: Literal["dft", "fam"]
    """Who labels the stage-II survivors."""
    cost: str
    """What a run of this size was measured to cost, and by what."""

    def describe(self) -> str:
        """One line: the knobs and the cost."""
        return (
            f"{self.iterations} iteration(s), {self.n_kept} kept of {self.n_kept * self.samples_per_kept} samples "
            f"per target, {self.predictor_config} CGCNN, {self.generator_config} generator, "
            f"{self.label_source.upper()} labels: {self.cost}"
        )


SIZES: dict[str, RunSize] = {
    "demo": RunSize(
        iterations=1,
        n_kept=12,
        samples_per_kept=20,
        predictor_config="small",
        generator_config="small",
        label_source="dft",
        cost="about 6 min on 2 CPU cores for 2 targets with 1 DFT label (make demo: 362 s)",
    ),
    "laptop": RunSize(
        iterations=3,
        n_kept=10,
        samples_per_kept=50,
        predictor_config="small",
        generator_config="small",
        label_source="fam",
        cost="about 1 h on 2 CPU cores for 7 targets (benchmarks/loop.py --labels fam: 3,057 s)",
    ),
    "paper": RunSize(
        iterations=3,
        n_kept=10,
        samples_per_kept=500,
        predictor_config="default",
        generator_config="paper",
        label_source="dft",
        cost="the reference work's scale: a GPU pool for training and screening, an HPC pool for hours of DFT "
        "per iteration (not measured end to end)",
    ),
}
"""The run sizes by name; ``laptop`` is the loop's default."""

SizeName = Literal[tuple(SIZES)]  # type: ignore[valid-type]
"""The size names, as a type: a form shows them as choices."""

DEFAULT_SIZE = "laptop"


def size_help() -> str:
    """Every size with its knobs and cost, for a form's description and ``--help``."""
    return "; ".join(f"{name}: {size.describe()}" for name, size in SIZES.items())
