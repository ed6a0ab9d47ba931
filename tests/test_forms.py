"""The Run forms of the deployed flows: every field, nested ones too, has a description and shows its default."""

from __future__ import annotations

from typing import Any

import pytest
from prefect.utilities.callables import parameter_schema

from flows.active_learning import active_learning
from flows.generate import generate
from flows.label import label
from flows.screen import screen
from flows.train import train


def _fields(schema: dict[str, Any], definitions: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any], bool]]:
    """(dotted name, property schema, is a nested model) of every field, depth first."""
    out = []
    for name, prop in schema.get("properties", {}).items():
        refs = [prop.get("$ref")] + [a.get("$ref") for a in prop.get("allOf", []) + prop.get("anyOf", [])]
        ref = next((r for r in refs if r), None)
        out.append((f"{path}.{name}", prop, ref is not None))
        if ref:
            out += _fields(definitions[ref.split("/")[-1]], definitions, f"{path}.{name}")
    return out


@pytest.mark.parametrize("flow", [active_learning, generate, label, screen, train], ids=lambda f: f.name)
def test_every_form_field_is_described_and_shows_its_default(flow) -> None:
    schema = parameter_schema(flow.fn).model_dump_for_openapi()
    fields = _fields(schema, schema.get("definitions", {}), flow.name)
    assert len(fields) > 5
    assert [name for name, prop, _ in fields if not prop.get("description")] == []
    assert [name for name, prop, nested in fields if not nested and "default" not in prop] == []


def test_the_loop_form_shows_the_seven_default_targets() -> None:
    schema = parameter_schema(active_learning.fn).model_dump_for_openapi()
    loop = schema["definitions"]["LoopParams"]["properties"]
    assert loop["targets"]["default"] == [60.0, 100.0, 200.0, 250.0, 300.0, 350.0, 400.0]


def test_named_configs_and_presets_are_choices() -> None:
    from core.cgcnn import PRESETS as CGCNN_PRESETS
    from core.dft import PRESETS as DFT_PRESETS
    from core.generator.configs import PRESETS as GENERATOR_PRESETS

    definitions = parameter_schema(active_learning.fn).model_dump_for_openapi()["definitions"]
    loop = definitions["LoopParams"]["properties"]
    assert loop["predictor_config"]["enum"] == ["size", *CGCNN_PRESETS]
    assert loop["generator_config"]["enum"] == ["size", *GENERATOR_PRESETS]
    assert definitions["LabelSettings"]["properties"]["preset"]["enum"] == list(DFT_PRESETS)


def test_the_loop_form_holds_every_stage_setting() -> None:
    """Each stage's settings model is reachable from the loop's form, whole (no field copied, none left out)."""
    from flows.generate import GenerateSettings
    from flows.label import LabelSettings
    from flows.screen import ScreenSettings
    from flows.train import TrainSettings

    definitions = parameter_schema(active_learning.fn).model_dump_for_openapi()["definitions"]
    loop = definitions["LoopParams"]["properties"]
    for stage, model in (
        ("train", TrainSettings),
        ("generate", GenerateSettings),
        ("screen", ScreenSettings),
        ("label", LabelSettings),
    ):
        assert loop[stage]["description"]
        assert set(definitions[model.__name__]["properties"]) == set(model.model_fields)
        assert not set(model.model_fields) & set(loop), f"{stage} settings copied onto the loop's form"


def test_the_loop_form_offers_run_sizes_with_their_measured_cost() -> None:
    from core.sizes import SIZES

    loop = parameter_schema(active_learning.fn).model_dump_for_openapi()["definitions"]["LoopParams"]["properties"]
    assert loop["size"]["enum"] == ["demo", "laptop", "paper"] and loop["size"]["default"] == "laptop"
    assert all(size.cost in loop["size"]["description"] for size in SIZES.values())


def test_a_size_fills_what_is_left_and_an_explicit_field_wins() -> None:
    from core.sizes import SIZES
    from flows.active_learning import SIZED_FIELDS, LoopParams

    default = LoopParams()
    assert default.size == "laptop"
    laptop = SIZES["laptop"].model_dump(include=set(SIZED_FIELDS))
    assert {name: getattr(default, name) for name in SIZED_FIELDS} == laptop
    demo = LoopParams(size="demo", n_kept=3, label_source="fam")
    assert (demo.iterations, demo.samples_per_kept, demo.n_kept, demo.label_source) == (1, 20, 3, "fam")
    # what the run records (its parameters) keeps the size and resolves the same way on a resume
    assert LoopParams.model_validate(demo.model_dump()) == demo
    with pytest.raises(ValueError, match="size"):
        LoopParams(size="huge")
