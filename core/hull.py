"""Energy above the convex hull from one model's energies: the stability condition of a design (``e_above_hull``).

A candidate's hull is that of its chemical system: each element in three prototypes (fcc, bcc, hcp), and the
system's known phases (the lake's structures made of those elements only), all relaxed by the same foundation
model as the candidate, so much of the model's own error cancels in the difference. pymatgen's ``PhaseDiagram``
gives the distance in eV/atom. A candidate below the hull of the known phases gets a negative value (more stable
than anything known in its system), which a condition ``e_above_hull <= x`` passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ase import Atoms
from ase.build import bulk
from ase.data import atomic_numbers, covalent_radii
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition

PROTOTYPES = ("fcc", "bcc", "hcp")
"""The lattices each element of a system is tried in; the lowest-energy one is the element's hull vertex."""


def chemical_system(formula: str) -> tuple[str, ...]:
    """The elements of a formula, sorted: the key of a hull."""
    return tuple(sorted(el.symbol for el in Composition(formula).elements))


def element_prototypes(element: str) -> dict[str, Atoms]:
    """fcc, bcc and hcp cells of one element, sized by its covalent radius (relaxing the cell fixes the volume)."""
    r = float(covalent_radii[atomic_numbers[element]])
    return {
        "fcc": bulk(element, "fcc", a=2 * math.sqrt(2) * r),
        "bcc": bulk(element, "bcc", a=4 * r / math.sqrt(3)),
        "hcp": bulk(element, "hcp", a=2 * r, c=2 * r * math.sqrt(8 / 3)),
    }


def e_above_hull(formula: str, energy_per_atom: float, references: Sequence[tuple[str, float]]) -> float:
    """eV/atom of ``formula`` at ``energy_per_atom`` above the hull of ``references`` (formula, eV/atom), which
    must hold every element of the formula; negative when it lies below that hull."""
    entries = [PDEntry(Composition(f), e * Composition(f).num_atoms) for f, e in references]
    missing = set(chemical_system(formula)) - {el.symbol for entry in entries for el in entry.composition.elements}
    if missing:
        raise ValueError(f"no reference energy for {', '.join(sorted(missing))}: the hull of {formula} is not closed")
    diagram = PhaseDiagram(entries)
    composition = Composition(formula)
    candidate = PDEntry(composition, energy_per_atom * composition.num_atoms)
    _, distance = diagram.get_decomp_and_e_above_hull(candidate, allow_negative=True)
    return float(distance)
