"""Design targets as data: conditions parsed from text, dicts and files, checked per stage, recorded per condition."""

from __future__ import annotations

import json

import pytest
import typer
from pydantic import ValidationError
from pymatgen.core import Lattice, Structure

from core.elastic import ElasticResult
from core.fam import FamOutcome
from core.labeling import StructureOutcome
from core.screening import fam_verdicts, gnn_verdicts
from core.structures import to_row
from core.targets import Condition, DesignError, DesignTarget, parse_condition, parse_design, stage_values
from flows.active_learning import LoopParams
from flows.cli.workflow import _design
from storage.candidates import advance, current, record_label

DUCTILE = "k_vrh in [330, 370] and g_vrh/k_vrh <= 0.57"


@pytest.mark.parametrize(
    ("text", "canonical", "low", "high"),
    [
        ("k_vrh in [330, 370]", "k_vrh in [330, 370]", 330.0, 370.0),
        ("g_vrh / k_vrh <= 0.57", "g_vrh/k_vrh <= 0.57", None, 0.57),
        ("g_vrh >= 100", "g_vrh >= 100", 100.0, None),
        ("k_vrh = 350 +- 10%", "k_vrh in [315, 385]", 315.0, 385.0),
        ("k_vrh = 350 ± 20", "k_vrh in [330, 370]", 330.0, 370.0),
        ("k_vrh = 350", "k_vrh = 350", 350.0, 350.0),
        ("born_stable", "born_stable", 1.0, None),
        ("e_above_hull <= 0.05", "e_above_hull <= 0.05", None, 0.05),
    ],
)
def test_each_condition_form(text, canonical, low, high):
    c = parse_condition(text)
    assert (c.text, c.low, c.high) == (canonical, low, high)
    assert parse_condition(c.text) == c  # the canonical text reads back the same


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("k_vrh in [370, 330]", "'k_vrh in [370, 330]': k_vrh: lower bound 370 above upper bound 330"),
        ("k_vrh in [330, 370] and hardness <= 5", "'hardness <= 5': unknown property 'hardness'"),
        ("k_vrh in [330, 370] and e_above_hull < 0.05", "'e_above_hull < 0.05' is not of the form"),
        ("k_vrh in [330, 370] and g_vrh/k_vrh < 0.57", "'g_vrh/k_vrh < 0.57' is not of the form"),
        ("g_vrh/k_vrh <= 0.57", "needs a k_vrh window with both bounds"),
        ("", "empty design"),
        ({"conditions": [{"property": "k_vrh", "low": 330}]}, "needs a k_vrh window"),
        ({"conditions": [{"property": "k_vrh", "lo": 330, "high": 370}]}, "Extra inputs"),
    ],
)
def test_a_malformed_design_is_refused_naming_the_bad_condition(spec, message):
    with pytest.raises(DesignError, match=None) as info:
        parse_design(spec)
    assert message in str(info.value)


def test_design_from_a_dict_a_list_and_the_generator_condition():
    design = parse_design({"conditions": [{"property": "k_vrh", "low": 300, "high": 400}, "born_stable"]})
    assert design.text == "k_vrh in [300, 400] and born_stable" and design.generator_k == 350.0
    bound = parse_design(["g_vrh/k_vrh <= 0.57", "k_vrh in [330, 370]"])
    assert [c.feeds_generator for c in bound.conditions] == [False, True]  # a bound has no centre to ask for
    assert bound.generator_conditions == {"k_vrh": 350.0}
    ratio = parse_design("k_vrh in [330, 370] and g_vrh/k_vrh in [0.3, 0.5] and g_vrh in [100, 200]")
    assert [c.feeds_generator for c in ratio.conditions] == [True, True, False]  # the first G window feeds
    assert ratio.generator_conditions == pytest.approx({"k_vrh": 350.0, "g_vrh": 140.0})  # G = 0.4 x 350
    assert parse_design("k_vrh = 350 +- 20 and g_vrh in [100, 200]").generator_conditions == {
        "k_vrh": 350,
        "g_vrh": 150,
    }
    with pytest.raises(ValueError, match="only a k_vrh, g_vrh or g_vrh/k_vrh window"):
        Condition(property="e_above_hull", low=0, high=0.1, feeds_generator=True)
    with pytest.raises(ValueError, match="only one condition on g_vrh"):
        DesignTarget(
            conditions=[
                Condition(property="k_vrh", low=300, high=400),
                Condition(property="g_vrh", low=100, high=200, feeds_generator=True),
                Condition(property="g_vrh/k_vrh", low=0.3, high=0.5, feeds_generator=True),
            ]
        )


def test_a_stage_widens_each_window_by_its_tolerance_and_a_label_is_strict():
    design = parse_design(DUCTILE + " and born_stable")
    loose = design.evaluate(stage_values(k_vrh=280.0, g_vrh=180.0, born_stable=False), tolerance=0.2)
    assert loose["k_vrh in [330, 370]"]["verdict"] == "pass"  # 280 >= 330 * 0.8
    assert loose["g_vrh/k_vrh <= 0.57"] == {"value": 180 / 280, "verdict": "pass", "why": "0.643"}  # <= 0.684
    assert loose["born_stable"]["verdict"] == "fail"  # a flag is never widened
    strict = design.evaluate(stage_values(k_vrh=280.0, g_vrh=180.0, born_stable=True))
    assert strict["k_vrh in [330, 370]"] == {"value": 280.0, "verdict": "fail", "why": "280 < 330"}
    assert design.evaluate(stage_values(k_vrh=350.0))["g_vrh/k_vrh <= 0.57"]["verdict"] == "unknown"
    point = DesignTarget.point(350.0).evaluate(stage_values(k_vrh=420.0), 0.2)  # the single-K case: 350 +- 20 %
    assert point["k_vrh = 350"]["verdict"] == "pass"


def test_the_loop_form_takes_a_design_and_refuses_a_bad_one():
    params = LoopParams(design="k_vrh = 350 +- 20 and g_vrh / k_vrh <= 0.57", size="demo")
    assert params.design == DUCTILE and params.targets == [350.0] and params.focus_target == 350.0
    with pytest.raises(ValidationError, match="unknown property 'hardness'"):
        LoopParams(design="k_vrh in [330, 370] and hardness <= 5")


def test_the_cli_takes_a_design_file_and_refuses_a_bad_condition(tmp_path):
    path = tmp_path / "design.yaml"
    path.write_text("conditions:\n  - k_vrh in [330, 370]\n  - {property: g_vrh/k_vrh, high: 0.57}\n")
    assert _design(str(path)) == DUCTILE
    (tmp_path / "design.json").write_text(json.dumps(["k_vrh in [330, 370]", "g_vrh/k_vrh <= 0.57"]))
    assert _design(str(tmp_path / "design.json")) == DUCTILE
    with pytest.raises(typer.BadParameter, match="unknown property 'g/k'"):  # exit 2: tests/test_bad_input.py
        _design("k_vrh in [330, 370] and g/k <= 0.57")
    (tmp_path / "broken.yaml").write_text("conditions: [k_vrh in [330")
    with pytest.raises(typer.BadParameter, match="not YAML or JSON"):
        _design(str(tmp_path / "broken.yaml"))


def _nial(a: float) -> Structure:
    return Structure(Lattice.cubic(a), ["Ni", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_stage_one_and_two_check_each_condition_and_say_which_failed():
    rows = {to_row(s)["structure_id"]: to_row(s) for s in (_nial(2.9), _nial(3.1))}
    near, far = sorted(rows)
    todo = [{"iteration": 0, "structure_id": sid, "target": 350.0, "design": DUCTILE} for sid in (near, far)]
    preds = {near: {"k_vrh": 300.0, "k_vrh_std": 5.0}, far: {"k_vrh": 200.0, "k_vrh_std": 5.0}}
    (passed, o1), (failed, o2) = gnn_verdicts(todo, rows, preds, [], tolerance=0.3, model_id="m")
    assert (o1, o2) == ("passed", "off_target")
    assert "k_vrh in [330, 370]: 200 < 231" in failed["gnn_reason"]
    checks = json.loads(passed["conditions_json"])["gnn"]
    assert checks["g_vrh/k_vrh <= 0.57"]["verdict"] == "unknown"  # stage I has no G

    def outcome(k: float, g: float) -> FamOutcome:
        elastic = ElasticResult(k_vrh=k, g_vrh=g, born_stable=True, min_eigenvalue=50.0)
        return FamOutcome(model_name="fam", relax_converged=True, matches_input=True, elastic=elastic)

    stage_two = [{**todo[0], "conditions_json": passed["conditions_json"]}]
    [(update, result)] = fam_verdicts(stage_two, {near: outcome(340.0, 250.0)}, tolerance=0.2)
    assert result == "pass"  # by default the FAM's (soft) G decides nothing: G/K stays unknown at stage II
    assert json.loads(update["conditions_json"])["fam"]["g_vrh/k_vrh <= 0.57"]["verdict"] == "unknown"
    [(update, result)] = fam_verdicts(stage_two, {near: outcome(340.0, 250.0)}, tolerance=0.2, fam_shear=True)
    assert result == "condition not met" and update["status"] == "rejected"  # the outcome the flow counts
    assert update["fam_reason"] == "condition not met: g_vrh/k_vrh <= 0.57: 0.735 > 0.684"
    assert set(json.loads(update["conditions_json"])) == {"gnn", "fam"}  # stage I's verdicts kept
    [(update, result)] = fam_verdicts(stage_two, {near: outcome(340.0, 150.0)}, tolerance=0.2, fam_shear=True)
    assert result == "pass" and "every condition met" in update["fam_reason"]
    stable = [{**stage_two[0], "design": DUCTILE + " and e_above_hull <= 0.05"}]
    above = fam_verdicts(stable, {near: outcome(340.0, 150.0)}, tolerance=0.2, e_above_hull={near: 0.055})
    [(update, result)] = above  # the hull's bound is not widened by the stage's tolerance, unlike the moduli's
    assert result == "condition not met" and "e_above_hull <= 0.05: 0.055 > 0.05" in update["fam_reason"]
    [(update, result)] = fam_verdicts(stable, {near: outcome(340.0, 150.0)}, tolerance=0.2)
    assert result == "pass"  # no hull distance: the condition is unknown at this stage, not failed
    assert json.loads(update["conditions_json"])["fam"]["e_above_hull <= 0.05"]["verdict"] == "unknown"
    single = [{"iteration": 0, "structure_id": near, "target": 350.0}]  # no design: today's K check and text
    [(update, result)] = fam_verdicts(single, {near: outcome(500.0, 150.0)}, tolerance=0.2)
    assert update["fam_reason"] == "K_vrh 500.0 GPa is +43% off target 350 GPa (tolerance 20%)"
    assert json.loads(update["conditions_json"])["fam"]["k_vrh = 350"]["verdict"] == "fail"


def test_the_label_checks_every_condition_strictly_and_the_funnel_counts_them(lake):
    sid = "x" * 16
    advance(
        lake,
        [{"iteration": 0, "structure_id": sid, "target": 350.0, "design": DUCTILE, "status": "fam_pass"}],
        stage="fam",
    )
    [cand] = current(lake, 0)
    labeled = StructureOutcome(structure_id=sid, verdict="labeled", k_vrh=360.0, g_vrh=216.0, born_stable=True)
    record_label(lake, 0, [cand], labeled, None)
    checks = json.loads(current(lake, 0)[0]["conditions_json"])["label"]
    assert checks["k_vrh in [330, 370]"]["verdict"] == "pass"
    assert checks["g_vrh/k_vrh <= 0.57"] == {"value": 0.6, "verdict": "fail", "why": "0.6 > 0.57"}  # strict
    # A single-K target's label is met within 20 % (the funnel's n_within_20), not only at exactly 350 GPa.
    for sid_k, k in (("y" * 16, 415.0), ("z" * 16, 425.0)):
        advance(lake, [{"iteration": 0, "structure_id": sid_k, "target": 350.0, "status": "fam_pass"}], stage="fam")
        single = next(c for c in current(lake, 0) if c["structure_id"] == sid_k)
        record_label(lake, 0, [single], StructureOutcome(structure_id=sid_k, verdict="labeled", k_vrh=k), None)
    singles = [c for c in current(lake, 0) if c["design"] is None]
    met = {c["structure_id"]: json.loads(c["conditions_json"])["label"]["k_vrh = 350"]["verdict"] for c in singles}
    assert met == {"y" * 16: "pass", "z" * 16: "fail"}
    assert lake.query("SELECT n_discovered FROM cost_per_discovery WHERE iteration IS NULL").column(0)[0].as_py() == 1
    funnel = {r["condition"]: r for r in lake.query("SELECT * FROM condition_funnel").to_pylist()}
    assert funnel["k_vrh in [330, 370]"]["n_label_met"] == 1 and funnel["g_vrh/k_vrh <= 0.57"]["n_label_met"] == 0
    assert funnel["g_vrh/k_vrh <= 0.57"]["n_label_checked"] == 1


def test_e_above_hull_is_the_distance_to_the_hull_of_the_references():
    from core.hull import chemical_system, e_above_hull, element_prototypes

    refs = [("Ni", -5.0), ("Al", -3.7), ("NiAl", -5.2), ("Ni3Al", -5.4)]
    assert e_above_hull("AlNi", -5.2, refs) == pytest.approx(0.0)  # a hull vertex
    assert e_above_hull("NiAl3", -4.0, refs) == pytest.approx(0.45)  # 0.45 above the NiAl-Al tie line at -4.45
    assert e_above_hull("NiAl", -5.5, refs) == pytest.approx(-0.3)  # below every known phase
    with pytest.raises(ValueError, match="no reference energy for Ti"):
        e_above_hull("NiTi", -5.0, refs)
    assert chemical_system("Al3Ni") == ("Al", "Ni")
    cells = element_prototypes("Mo")
    assert sorted(cells) == ["bcc", "fcc", "hcp"] and [len(cells[k]) for k in ("bcc", "fcc", "hcp")] == [1, 1, 2]


def test_the_loop_trains_the_shear_predictor_only_for_a_design_that_asks_for_g(lake):
    from flows.active_learning import LoopParams, _stage_params

    def what(design: str) -> list[str]:
        return _stage_params(LoopParams(lake_url=lake.url, design=design, size="demo"), lake, 0)["train"].what

    assert what(DUCTILE) == ["predictor", "shear_predictor", "generator"]
    assert what("k_vrh in [330, 370] and born_stable") == ["predictor", "generator"]
    assert what("") == ["predictor", "generator"]
