"""Design targets as data: a set of conditions on named properties, each a window, one of them fed to the generator.

    k_vrh in [330, 370] and g_vrh/k_vrh <= 0.57          # stiff and ductile (Pugh's ratio)
    k_vrh = 350 +- 10% and born_stable                    # the reference case, and mechanically stable

A condition is a property name (``PROPERTIES``) with a window: ``in [a, b]``, ``<= b``, ``>= a``, ``= v +- t`` (``t``
absolute, or ``t%`` of ``v``), or a bare ``born_stable``. Two-sided windows feed the generator at their centre
(``DesignTarget.generator_conditions``): the first ``k_vrh`` window always (``generator_k``), and the first
``g_vrh`` or ``g_vrh/k_vrh`` window (a ratio as G = ratio x K) for a generator conditioned on G as well; a
one-sided condition (``g_vrh/k_vrh <= 0.57``) only screens, as a bound has no centre to ask for.

Each stage checks every condition it can evaluate with what it has (stage I: the predictor's K; stage II: FAM K,
G, G/K and Born stability; stage III: the DFT values) on the condition's window widened by that stage's tolerance
(a screen is loose, the label is strict: tolerance 0), and records per condition why a candidate failed. The
single-K target of today is the point window ``k_vrh = 350``, which a stage's tolerance widens to ``350 ± 30 %``
(stage I) and ``± 20 %`` (stage II) as before.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

PropertyName = Literal["k_vrh", "g_vrh", "g_vrh/k_vrh", "born_stable", "e_above_hull"]
PROPERTIES: dict[str, str] = {
    "k_vrh": "bulk modulus K_vrh, GPa",
    "g_vrh": "shear modulus G_vrh, GPa",
    "g_vrh/k_vrh": "Pugh's ratio G/K (below about 0.57: ductile)",
    "born_stable": "Born (mechanical) stability, 1 if stable",
    "e_above_hull": "energy above the convex hull of the chemical system, eV/atom (FAM energies, stage II)",
}
"""The properties a condition may name, and what they are."""

FEEDS: dict[str, str] = {"k_vrh": "k_vrh", "g_vrh": "g_vrh", "g_vrh/k_vrh": "g_vrh"}
"""Condition properties that can feed a generator, and the modulus each one asks the generator for."""

UNWIDENED = frozenset({"born_stable", "e_above_hull"})
"""Properties a stage checks strictly: its tolerance widens modulus windows (a predictor's error), not these."""

Verdict = Literal["pass", "fail", "unknown"]


class DesignError(ValueError):
    """A design target that cannot be read; the message names the bad condition."""


class Condition(BaseModel):
    """One property within a window (``low`` and/or ``high``, inclusive)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    property: PropertyName
    low: float | None = None
    high: float | None = None
    feeds_generator: bool = False

    @model_validator(mode="after")
    def _a_window(self) -> Condition:
        if self.low is None and self.high is None:
            raise ValueError(f"{self.property}: a condition needs a lower bound, an upper bound or both")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"{self.property}: lower bound {self.low:g} above upper bound {self.high:g}")
        if self.feeds_generator and (self.property not in FEEDS or self.low is None or self.high is None):
            raise ValueError(
                "only a k_vrh, g_vrh or g_vrh/k_vrh window with both bounds can feed the generator (it is asked "
                "for the window's centre)"
            )
        return self

    @property
    def text(self) -> str:
        """The condition as a user writes it (the key of its verdicts in ``candidates.conditions_json``)."""
        if self.property == "born_stable":
            return "born_stable"
        if self.low is not None and self.high is not None:
            return (
                f"{self.property} = {self.low:g}"
                if self.low == self.high
                else f"{self.property} in [{self.low:g}, {self.high:g}]"
            )
        return f"{self.property} >= {self.low:g}" if self.low is not None else f"{self.property} <= {self.high:g}"

    def check(self, value: float | None, tolerance: float = 0.0) -> tuple[Verdict, str]:
        """Pass or fail of ``value`` on the window widened by ``tolerance`` (relative, each bound outward);
        ``unknown`` when the stage has no value for this property."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "unknown", "not evaluated"
        widen = 0.0 if self.property in UNWIDENED else tolerance
        low = None if self.low is None else self.low * (1 - widen)
        high = None if self.high is None else self.high * (1 + widen)
        if low is not None and value < low:
            return "fail", f"{value:.3g} < {low:.3g}"
        if high is not None and value > high:
            return "fail", f"{value:.3g} > {high:.3g}"
        return "pass", f"{value:.3g}"


class DesignTarget(BaseModel):
    """What a run looks for: every condition met. Two-sided K and G (or G/K) windows feed the generator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    conditions: list[Condition] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _generator_conditions(cls, data: Any) -> Any:
        """Per modulus (K; G, asked directly or as G/K) one condition feeds the generator: the marked one, else the
        first two-sided window; K must have one."""
        if not isinstance(data, Mapping):
            return data
        conditions = [
            c if isinstance(c, Condition) else Condition.model_validate(c) for c in data.get("conditions", [])
        ]
        for modulus in ("k_vrh", "g_vrh"):
            kind = [i for i, c in enumerate(conditions) if FEEDS.get(c.property) == modulus]
            marked = [i for i in kind if conditions[i].feeds_generator]
            if len(marked) > 1:
                raise ValueError(f"only one condition on {modulus} can feed the generator")
            if marked:
                continue
            window = next((i for i in kind if None not in (conditions[i].low, conditions[i].high)), None)
            if window is None and modulus == "k_vrh":
                raise ValueError("a design needs a k_vrh window with both bounds (k_vrh in [a, b] or k_vrh = v +- t)")
            if window is not None:
                conditions[window] = conditions[window].model_copy(update={"feeds_generator": True})
        return {**data, "conditions": conditions}

    @classmethod
    def point(cls, k_vrh: float) -> DesignTarget:
        """The single-K target (the reference case): ``k_vrh = value``, widened by each stage's tolerance."""
        return cls(conditions=[Condition(property="k_vrh", low=k_vrh, high=k_vrh, feeds_generator=True)])

    @property
    def generator_conditions(self) -> dict[str, float]:
        """What the generator is asked for, modulus -> GPa: each feeding window's centre (G/K as G = ratio x K)."""
        centre = {c.property: (c.low + c.high) / 2 for c in self.conditions if c.feeds_generator}  # type: ignore[operator]
        out = {"k_vrh": centre["k_vrh"]}
        if "g_vrh" in centre:
            out["g_vrh"] = centre["g_vrh"]
        elif "g_vrh/k_vrh" in centre:
            out["g_vrh"] = centre["g_vrh/k_vrh"] * out["k_vrh"]
        return out

    @property
    def generator_k(self) -> float:
        """The K_vrh (GPa) the generator is conditioned on: the centre of the design's K window."""
        return self.generator_conditions["k_vrh"]

    @property
    def text(self) -> str:
        return " and ".join(c.text for c in self.conditions)

    @property
    def properties(self) -> frozenset[str]:
        """The property names the conditions are on."""
        return frozenset(c.property for c in self.conditions)

    @property
    def asks_for_g(self) -> bool:
        """Whether a condition is on G (``g_vrh`` or ``g_vrh/k_vrh``): stage I then needs the shear predictor."""
        return bool({"g_vrh", "g_vrh/k_vrh"} & self.properties)

    def evaluate(self, values: Mapping[str, float | None], tolerance: float = 0.0) -> dict[str, dict[str, Any]]:
        """Per condition (by its text): the value, the verdict and why, for the values a stage has."""
        out = {}
        for c in self.conditions:
            verdict, why = c.check(values.get(c.property), tolerance)
            out[c.text] = {"value": values.get(c.property), "verdict": verdict, "why": why}
        return out


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PROPERTY = r"[a-z_]+(?:\s*/\s*[a-z_]+)?"
_FORMS = (
    (re.compile(rf"^({_PROPERTY})\s+in\s+\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]$"), "range"),
    (re.compile(rf"^({_PROPERTY})\s*(<=|>=)\s*({_NUMBER})$"), "bound"),
    (re.compile(rf"^({_PROPERTY})\s*=\s*({_NUMBER})(?:\s*(?:\+-|±)\s*({_NUMBER})\s*(%?))?$"), "value"),
    (re.compile(r"^(born_stable)$"), "flag"),
)


def parse_condition(text: str) -> Condition:
    """One condition from its text; a DesignError names it and says what is expected."""
    clean = " ".join(text.strip().split())
    for pattern, form in _FORMS:
        m = pattern.match(clean)
        if not m:
            continue
        name = re.sub(r"\s+", "", m.group(1))
        if name not in PROPERTIES:
            raise DesignError(f"condition {clean!r}: unknown property {name!r}; known: {', '.join(PROPERTIES)}")
        try:
            if form == "range":
                return Condition(property=name, low=float(m.group(2)), high=float(m.group(3)))
            if form == "bound":
                bound = float(m.group(3))
                return Condition(property=name, **({"high": bound} if m.group(2) == "<=" else {"low": bound}))
            if form == "value":
                v, t = float(m.group(2)), float(m.group(3) or 0)
                t = abs(v) * t / 100 if m.group(4) else t
                return Condition(property=name, low=v - t, high=v + t)
            return Condition(property="born_stable", low=1.0)
        except ValueError as err:
            raise DesignError(f"condition {clean!r}: {_first_error(err)}") from None
    raise DesignError(
        f"condition {clean!r} is not of the form 'name in [a, b]', 'name <= b', 'name >= a', 'name = v +- t[%]' "
        f"or 'born_stable' (names: {', '.join(PROPERTIES)})"
    )


def parse_design(spec: str | Mapping[str, Any] | list[Any] | DesignTarget) -> DesignTarget:
    """A design from its text (conditions joined by ``and``), a dict (``{"conditions": [...]}``, each condition a
    text or a dict) or a list of conditions, as a form, the CLI or a YAML/JSON file gives it."""
    if isinstance(spec, DesignTarget):
        return spec
    if isinstance(spec, str):
        if not spec.strip():
            raise DesignError("empty design: give at least one condition, e.g. 'k_vrh in [330, 370]'")
        items: list[Any] = re.split(r"\s+and\s+", spec.strip())
    elif isinstance(spec, Mapping):
        items = list(spec.get("conditions", []))
    else:
        items = list(spec)
    conditions = []
    for item in items:
        if isinstance(item, str):
            conditions.append(parse_condition(item))
            continue
        try:
            conditions.append(Condition.model_validate(item))
        except ValueError as err:
            raise DesignError(f"condition {item!r}: {_first_error(err)}") from None
    try:
        return DesignTarget(conditions=conditions)
    except ValueError as err:
        raise DesignError(f"design {spec!r}: {_first_error(err)}") from None


def _first_error(err: ValueError) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        first = errors()[0]
        return str(first.get("msg", err)).removeprefix("Value error, ")
    return str(err)


def stage_values(
    k_vrh: float | None = None,
    g_vrh: float | None = None,
    born_stable: bool | None = None,
    e_above_hull: float | None = None,
) -> dict[str, float | None]:
    """The property values a stage has, by ``PROPERTIES`` name (G/K derived where both are known)."""
    ratio = g_vrh / k_vrh if g_vrh is not None and k_vrh else None
    return {
        "k_vrh": k_vrh,
        "g_vrh": g_vrh,
        "g_vrh/k_vrh": ratio,
        "born_stable": None if born_stable is None else float(born_stable),
        "e_above_hull": e_above_hull,
    }


POINT_LABEL_TOLERANCE = 0.2
"""A single-K target (a candidate without a design) is met by a label within 20 % of it (the funnel's
``n_within_20``); a design's conditions are windows already, so its label is checked strictly."""


def label_tolerance(candidate: Mapping[str, Any]) -> float:
    """The tolerance a label is checked with: ``POINT_LABEL_TOLERANCE`` for a single-K target, 0 for a design."""
    return 0.0 if candidate.get("design") else POINT_LABEL_TOLERANCE


@functools.lru_cache(maxsize=64)
def _parsed(text: str) -> DesignTarget:
    return parse_design(text)


def design_of(candidate: Mapping[str, Any]) -> DesignTarget:
    """A candidate's design (``candidates.design``, parsed once per text), or the point window at its target K
    (the single-K case)."""
    return _parsed(candidate["design"]) if candidate.get("design") else DesignTarget.point(candidate["target"])


def stage_checks(
    candidate: Mapping[str, Any], stage: str, values: Mapping[str, float | None], tolerance: float
) -> tuple[str, list[str]]:
    """One stage's verdict on each of a candidate's conditions: the candidate's new ``conditions_json`` (the
    earlier stages' verdicts kept) and the failed conditions, each as ``"<condition>: <why>"``."""
    checks = design_of(candidate).evaluate(values, tolerance)
    recorded = json.loads(candidate.get("conditions_json") or "{}")
    recorded[stage] = checks
    failed = [f"{text}: {c['why']}" for text, c in checks.items() if c["verdict"] == "fail"]
    return json.dumps(recorded, sort_keys=True), failed


def _canonical(text: str) -> str:
    return parse_design(text).text if text.strip() else ""


DesignText = Annotated[str, AfterValidator(_canonical)]
"""A design target as a form field or CLI option: its conditions' text, checked and written canonically
(empty: no design, the K targets alone)."""
