"""CIF text the ingest and bad-input tests share: a two-site W-Mo cell whose values a test can spoil."""

from __future__ import annotations

_CIF = """data_x
_cell_length_a {a}
_cell_length_b 3.1
_cell_length_c 3.1
_cell_angle_alpha {alpha}
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
W1 W 0 0 0
Mo1 Mo {x} 0.5 0.5
"""


def two_site_cif(a: float = 3.1, alpha: float = 90, x: object = 0.5) -> str:
    """The W-Mo cell with cell length ``a``, angle ``alpha`` and the Mo site's x coordinate ``x`` (any text)."""
    return _CIF.format(a=a, alpha=alpha, x=x)
