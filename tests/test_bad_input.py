"""Bad input, everywhere a user can give it (issue 16, item 4): one table of fixture cases per entry point.

Every case asserts (a) a clear one-line reason that names the bad value (CLI exit code 1 or 2; a
ValidationError naming the field for a flow's parameter model, and a ParameterTypeError for a flow run's JSON
parameters as the UI or the API sends them),
(b) no traceback, and (c) nothing written (the lake, the input files and the working folder are
byte-for-byte as before) or exactly the bad record quarantined. No case trains or loads a model: each
is refused before anything heavy runs.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ase import Atoms
from ase.build import bulk
from ase.io import write
from cif_samples import two_site_cif
from pydantic import BaseModel, ValidationError
from typer.testing import CliRunner

from core.ingest import IngestFilters
from flows.active_learning import LoopParams
from flows.cli import app, validation_reason
from flows.generate import GenerateParams
from flows.label import LabelParams
from flows.screen import ScreenParams
from flows.train import TrainParams
from storage import Lake

BAD_FILES: dict[str, Callable[[Path], None]] = {
    "empty.cif": lambda p: p.write_text(""),
    "binary.cif": lambda p: p.write_bytes(bytes(range(256)) * 8),
    "nan.cif": lambda p: p.write_text(two_site_cif(x="nan")),
    "text-coord.cif": lambda p: p.write_text(two_site_cif(x="abc")),
    "wild.cif": lambda p: p.write_text(two_site_cif(x=1e30)),
    "negative.cif": lambda p: p.write_text(two_site_cif(a=-3.1)),
    "flat.cif": lambda p: p.write_text(two_site_cif(alpha=200)),
    "unknown-element.cif": lambda p: p.write_text(two_site_cif().replace("W1 W", "Xx1 Xx")),
    "overlap.cif": lambda p: write(p, Atoms("WMo", positions=[[0, 0, 0], [0.2, 0, 0]], cell=[3.1] * 3, pbc=True)),
    "notes.txt": lambda p: p.write_text("hello, not a structure\n"),
    "plain.json": lambda p: p.write_text("not json at all"),
    "shape.json": lambda p: p.write_text(json.dumps({"a": 1})),
}
"""Bad input files, written into the inputs folder of every CLI case."""


def _inputs(folder: Path) -> Path:
    """The inputs folder: every bad file, a good CIF, a regular file, a truncated gzip source."""
    folder.mkdir()
    for name, make in BAD_FILES.items():
        make(folder / name)
    write(folder / "good.cif", bulk("W", "bcc", a=3.17))
    (folder / "a-file").write_text("I am a regular file\n")
    rows = {"index": [0], "columns": ["structure", "log10(K_VRH)"], "data": [[{"sites": []}, 2.0]] * 40}
    data = gzip.compress(json.dumps(rows).encode())
    (folder / "cut.json.gz").write_bytes(data[:-20])
    return folder


@pytest.fixture(scope="module")
def template_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lake with two structures and their K, copied for every case (the lake a bad input must leave as it was)."""
    from storage.ingest import ingest

    root = tmp_path_factory.mktemp("template")
    folder = root / "seedfiles"
    folder.mkdir()
    write(folder / "w.cif", bulk("W", "bcc", a=3.17))
    write(folder / "cual.cif", bulk("CuAl", "cesiumchloride", a=2.95))
    (folder / "properties.csv").write_text("file,k_vrh\nw.cif,305\ncual.cif,120\n")
    lake = Lake(root / "lake")
    report = ingest(lake, str(folder))
    assert report.landed == 2
    return root / "lake"


@pytest.fixture
def workspace(tmp_path: Path, template_lake: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A copy of the template lake, the inputs folder, and the working folder (a stray default --out lands here)."""
    lake = tmp_path / "lake"
    shutil.copytree(template_lake, lake)
    inputs = _inputs(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MATLOOP_LAKE", str(lake))  # restored after the test (the CLI's --lake sets it)
    return {"root": tmp_path, "lake": lake, "in": inputs}


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file and folder under root with its bytes: equal snapshots mean nothing was written."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


_NOT_REASON = re.compile(r"^(Usage: |Try '.* --help' for help\.)")


def reason_lines(output: str) -> list[str]:
    """The output's message lines: panel borders, the usage line and the --help hint removed."""
    lines = []
    for raw in output.splitlines():
        line = raw.strip().strip("│╭╮╰╯─ ").strip()
        if line and line != "Error" and not _NOT_REASON.match(line):
            lines.append(line)
    return lines


@dataclass(frozen=True)
class CliCase:
    """One bad CLI invocation: its arguments ({in} is the inputs folder), what its one reason line must name."""

    id: str
    args: tuple[str, ...]
    names: tuple[str, ...]
    code: int = 2


CLI_CASES = [
    # predict: bad files are refused before any model loads
    CliCase("predict-missing-file", ("predict", "{in}/missing.cif"), ("missing.cif", "does not exist")),
    CliCase("predict-empty-file", ("predict", "{in}/empty.cif"), ("empty.cif", "no structures")),
    CliCase("predict-binary-file", ("predict", "{in}/binary.cif"), ("binary.cif", "cannot read")),
    CliCase("predict-nan-coordinate", ("predict", "{in}/nan.cif"), ("nan.cif", "'nan' is not a number")),
    CliCase("predict-text-coordinate", ("predict", "{in}/text-coord.cif"), ("'abc' is not a number",)),
    CliCase("predict-coordinate-1e30", ("predict", "{in}/wild.cif"), ("wild.cif", "1e+30 is outside")),
    CliCase("predict-negative-length", ("predict", "{in}/negative.cif"), ("-3.1", "must be positive")),
    CliCase("predict-impossible-angle", ("predict", "{in}/flat.cif"), ("200", "do not make a cell")),
    CliCase("predict-not-a-structure", ("predict", "{in}/notes.txt"), ("notes.txt", "cannot read")),
    CliCase("predict-a-folder", ("predict", "{in}"), ("is a directory",)),
    CliCase("predict-one-bad-among-good", ("predict", "{in}/good.cif", "{in}/nan.cif"), ("nan.cif",)),
    CliCase("predict-nothing-to-predict", ("predict",), ("give structure FILEs or --sql",)),
    CliCase("predict-files-and-sql", ("predict", "{in}/good.cif", "--sql", "SELECT * FROM structures"), ("not both",)),
    CliCase("predict-unknown-element", ("predict", "{in}/unknown-element.cif"), ("unknown element 'Xx'",)),
    CliCase("predict-unknown-model", ("predict", "{in}/good.cif", "--model", "nosuch-id"), ("'nosuch-id'",)),
    CliCase("predict-sql-write", ("predict", "--sql", "DROP TABLE structures"), ("DROP", "read-only")),
    CliCase("predict-sql-syntax-error", ("predict", "--sql", "SELEC * FROM structures"), ("SELEC",)),
    CliCase(
        "predict-sql-no-structure-columns",
        ("predict", "--sql", "SELECT structure_id FROM structures"),
        ("missing", "lattice"),
    ),
    # elastic: an unknown model or preset, a bad file or a bad number, refused before any calculator loads
    CliCase("elastic-missing-file", ("elastic", "{in}/missing.cif"), ("missing.cif", "does not exist")),
    CliCase("elastic-a-folder", ("elastic", "{in}"), ("is a directory",)),
    CliCase("elastic-unknown-fam", ("elastic", "{in}/good.cif", "--fam", "bogus-fam"), ("'bogus-fam'", "unknown FAM")),
    CliCase("elastic-unknown-dft", ("elastic", "{in}/good.cif", "--dft", "bogus-dft"), ("'bogus-dft'", "presets")),
    CliCase("elastic-unknown-element", ("elastic", "{in}/unknown-element.cif"), ("unknown-element.cif", "Xx")),
    CliCase("elastic-empty-file", ("elastic", "{in}/empty.cif"), ("empty.cif", "cannot read")),
    CliCase("elastic-nan-coordinate", ("elastic", "{in}/nan.cif"), ("nan.cif", "'nan' is not a number")),
    CliCase("elastic-coordinate-1e30", ("elastic", "{in}/wild.cif"), ("wild.cif", "1e+30")),
    CliCase("elastic-negative-fmax", ("elastic", "{in}/good.cif", "--fmax", "-1"), ("got -1",)),
    CliCase("elastic-nan-fmax", ("elastic", "{in}/good.cif", "--fmax", "nan"), ("got nan",)),
    CliCase("elastic-zero-steps", ("elastic", "{in}/good.cif", "--steps", "0"), ("'--steps'", "got 0")),
    # generate: bad targets, counts and --out, refused before the generator loads; nothing written
    CliCase("generate-negative-target", ("generate", "--target", "-5"), ("got -5",)),
    CliCase("generate-zero-target", ("generate", "--target", "0"), ("got 0",)),
    CliCase("generate-nan-target", ("generate", "--target", "nan"), ("got nan",)),
    CliCase("generate-inf-target", ("generate", "--target", "inf"), ("got inf",)),
    CliCase("generate-second-target-bad", ("generate", "--target", "350", "--target", "-1"), ("got -1",)),
    CliCase("generate-text-target", ("generate", "--target", "abc"), ("'--target'", "valid number")),
    CliCase("generate-no-target", ("generate",), ("Missing option '--target'",)),
    CliCase("generate-zero-n", ("generate", "--target", "350", "--n", "0"), ("'--n'", "got 0")),
    CliCase(
        "generate-zero-samples",
        ("generate", "--target", "350", "--samples-per-kept", "0"),
        ("'--samples-per-kept'", "got 0"),
    ),
    CliCase("generate-out-is-a-file", ("generate", "--target", "350", "--out", "{in}/a-file"), ("exists and is not",)),
    CliCase(
        "generate-out-under-a-file",
        ("generate", "--target", "350", "--out", "{in}/a-file/sub"),
        ("a-file/sub", "a file stands in its path"),
    ),
    CliCase(
        "generate-unknown-model",
        ("generate", "--target", "350", "--model-id", "nosuch-id", "--out", "{in}/gen"),
        ("'nosuch-id'",),
    ),
    # train and seed: an unknown config, override, model or element, refused before anything loads
    CliCase("train-predictor-unknown-config", ("train", "predictor", "--config", "huge"), ("'huge'", "choose from")),
    CliCase("train-predictor-bad-override", ("train", "predictor", "--set", "n_models"), ("'n_models'", "key=value")),
    CliCase("train-generator-unknown-config", ("train", "generator", "--config", "huge"), ("'huge'", "choose from")),
    CliCase("seed-unknown-fam", ("seed", "--fam", "bogus-fam", "--unary", "W"), ("'bogus-fam'", "unknown FAM")),
    CliCase("seed-unknown-element", ("seed", "--unary", "W,Xx", "--binary", ""), ("'--unary'", "unknown element 'Xx'")),
    CliCase("seed-zero-limit", ("seed", "--limit", "0"), ("'--limit'", "got 0")),
    # run: every bad loop value is one line naming it, before any flow (or Prefect server) starts
    CliCase("run-unknown-size", ("run", "--size", "huge"), ("'huge'", "demo, laptop, paper")),
    CliCase("run-negative-iterations", ("run", "--iterations", "-1"), ("iterations = -1",)),
    CliCase("run-unknown-labels", ("run", "--labels", "xyz"), ("label_source = 'xyz'",)),
    CliCase("run-negative-target", ("run", "--target", "-350", "--focus", "-350"), ("targets.0 = -350.0",)),
    CliCase("run-nan-target", ("run", "--target", "nan", "--focus", "350"), ("targets.0 = nan", "finite")),
    CliCase("run-focus-not-a-target", ("run", "--focus", "123"), ("focus_target 123 is not one of the targets",)),
    CliCase("run-unknown-fam", ("run", "--fam", "bogus-fam"), ("'bogus-fam'", "unknown FAM")),
    CliCase("run-unknown-dft-preset", ("run", "--dft-preset", "bogus"), ("label.preset = 'bogus'",)),
    CliCase("run-bad-design", ("run", "--design", "k_vrh in [330, 370] and g/k <= 0.57"), ("'--design'", "'g/k'")),
    CliCase("run-unknown-acquisition", ("run", "--acquisition", "random"), ("label.acquisition.policy = 'random'",)),
    CliCase("run-negative-dft-budget", ("run", "--dft-budget", "-1"), ("label.acquisition.budget_cpu_hours = -1",)),
    CliCase("run-unknown-predictor-config", ("run", "--predictor-config", "huge"), ("predictor_config = 'huge'",)),
    CliCase("run-unknown-generator-config", ("run", "--generator-config", "huge"), ("generator_config = 'huge'",)),
    CliCase("run-negative-n-kept", ("run", "--n-kept", "-1"), ("n_kept = -1",)),
    CliCase("run-negative-samples", ("run", "--samples-per-kept", "-3"), ("samples_per_kept = -3",)),
    CliCase("run-zero-label-weight", ("run", "--new-label-weight", "0"), ("new_label_weight = 0.0",)),
    CliCase("run-negative-dft-limit", ("run", "--dft-limit", "-1"), ("'--dft-limit'", "got -1")),
    CliCase("run-negative-first-iteration", ("run", "--first-iteration", "-2"), ("first_iteration = -2",)),
    CliCase("run-missing-grader", ("run", "--grader", "{in}/missing.pt"), ("missing.pt", "no such checkpoint")),
    CliCase("serve-port-out-of-range", ("serve", "--port", "70000"), ("'--port'", "got 70000")),
    CliCase("serve-port-zero", ("serve", "--port", "0"), ("'--port'", "got 0")),
    # sql: the lake changes only through the flows; a bad query or output path is one line
    CliCase("sql-delete", ("sql", "DELETE FROM structures"), ("DELETE", "read-only")),
    CliCase("sql-copy-to-file", ("sql", "COPY structures TO 'dump.csv'"), ("COPY", "read-only")),
    CliCase("sql-write-after-a-read", ("sql", "SELECT 1; DROP TABLE structures"), ("DROP", "read-only")),
    CliCase("sql-attach", ("sql", "ATTACH 'other.db'"), ("ATTACH", "read-only")),
    CliCase("sql-missing-csv", ("sql", "SELECT * FROM read_csv('{in}/nope.csv')"), ("nope.csv",)),
    CliCase("sql-syntax-error", ("sql", "SELEC * FROM"), ("SELEC", "syntax error")),
    CliCase("sql-unknown-table", ("sql", "SELECT * FROM nosuch"), ("nosuch", "does not exist")),
    CliCase("sql-parquet-without-output", ("sql", "SELECT 1", "-f", "parquet"), ("needs --output",)),
    CliCase("sql-output-in-missing-folder", ("sql", "SELECT 1", "-o", "{in}/no/x.csv"), ("no/x.csv", "no such folder")),
    CliCase("sql-output-is-a-folder", ("sql", "SELECT 1", "-f", "csv", "-o", "{in}"), ("it is a folder",)),
    CliCase("sql-unknown-format", ("sql", "SELECT 1", "-f", "xml"), ("'xml'",)),
    # ingest: an unreadable source is one line, exit 1, and the lake is as it was
    CliCase("ingest-missing-path", ("ingest", "{in}/nosuch.json.gz"), ("nosuch.json.gz", "unknown source"), 1),
    CliCase("ingest-unknown-source-name", ("ingest", "matbench_kvhr"), ("'matbench_kvhr'", "unknown source"), 1),
    CliCase("ingest-not-json", ("ingest", "{in}/plain.json"), ("plain.json", "not readable JSON"), 1),
    CliCase("ingest-wrong-json-shape", ("ingest", "{in}/shape.json"), ("shape.json", "expected a matbench"), 1),
    CliCase("ingest-truncated-gzip", ("ingest", "{in}/cut.json.gz"), ("cut.json.gz", "truncated"), 1),
    CliCase("ingest-name-escapes-the-lake", ("ingest", "{in}", "--name", "../../x"), ("'../../x'", "no '/'"), 1),
    CliCase("ingest-name-with-space", ("ingest", "{in}", "--name", "my data"), ("'my data'",), 1),
    CliCase("ingest-negative-max-sites", ("ingest", "{in}", "--max-sites", "-1"), ("'--max-sites'", "got -1")),
    CliCase("ingest-empty-k-window", ("ingest", "{in}", "--k-min", "500", "--k-max", "100"), ("k_vrh_min 500",)),
    CliCase("ingest-nan-k-max", ("ingest", "{in}", "--k-max", "nan"), ("k_vrh_max = nan", "finite")),
    CliCase(
        "ingest-missing-properties-csv", ("ingest", "{in}", "--properties", "{in}/nope.csv"), ("nope.csv", "not exist")
    ),
]


LAKE_CASES = [
    CliCase("lake-is-a-file", ("--lake", "{in}/a-file", "ingest", "{in}"), ("a-file", "is a file, not a lake")),
    CliCase("lake-is-a-file-for-status", ("--lake", "{in}/a-file", "status"), ("a-file", "is a file, not a lake")),
    CliCase("lake-unknown-protocol", ("--lake", "nosuchproto://x", "status"), ("nosuchproto",)),
]
"""--lake itself bad: given before the command, so these replace the lake the other cases get."""


@pytest.mark.parametrize("case", CLI_CASES + LAKE_CASES, ids=[c.id for c in CLI_CASES + LAKE_CASES])
def test_cli_refuses_bad_input_with_one_line_and_writes_nothing(case: CliCase, workspace: dict[str, Path]) -> None:
    root = workspace["root"]
    args = [a.replace("{in}", str(workspace["in"])) for a in case.args]
    before = snapshot(root)
    lake = [] if case in LAKE_CASES else ["--lake", str(workspace["lake"])]
    result = CliRunner().invoke(app, [*lake, *args], env={"COLUMNS": "400"})
    output = result.output
    assert result.exit_code == case.code, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output and "Aborted" not in output, output
    lines = reason_lines(output)
    assert len(lines) == 1, f"expected one reason line, got {lines}"
    for name in case.names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"
    assert snapshot(root) == before, "a refused command changed the lake, the inputs or the working folder"


@dataclass(frozen=True)
class ModelCase:
    """Bad values for a flow's parameter model, the field the error must name, and what its reason must show."""

    id: str
    model: type[BaseModel]
    values: dict[str, Any]
    field: str
    shows: str


MODEL_CASES = [
    ModelCase("loop-focus-not-a-target", LoopParams, {"focus_target": 123.0}, "LoopParams", "focus_target 123"),
    ModelCase("loop-negative-target", LoopParams, {"targets": [-350.0], "focus_target": 350.0}, "targets.0", "-350"),
    ModelCase("loop-zero-target", LoopParams, {"targets": [0.0, 350.0]}, "targets.0", "0.0"),
    ModelCase("loop-nan-target", LoopParams, {"targets": [float("nan"), 350.0]}, "targets.0", "nan"),
    ModelCase("loop-no-targets", LoopParams, {"targets": []}, "targets", "at least 1 item"),
    ModelCase("loop-negative-focus", LoopParams, {"focus_target": -350.0}, "focus_target", "-350"),
    ModelCase(
        "loop-negative-gnn-tolerance", LoopParams, {"screen": {"gnn_tolerance": -0.1}}, "screen.gnn_tolerance", "-0.1"
    ),
    ModelCase("loop-zero-fam-tolerance", LoopParams, {"screen": {"fam_tolerance": 0.0}}, "screen.fam_tolerance", "0.0"),
    ModelCase("loop-negative-n-kept", LoopParams, {"n_kept": -1}, "n_kept", "-1"),
    ModelCase("loop-negative-iterations", LoopParams, {"iterations": -2}, "iterations", "-2"),
    ModelCase("loop-unknown-size", LoopParams, {"size": "huge"}, "size", "'huge'"),
    ModelCase("loop-unknown-dft-preset", LoopParams, {"label": {"preset": "bogus"}}, "label.preset", "'bogus'"),
    ModelCase("loop-unknown-label-source", LoopParams, {"label_source": "xyz"}, "label_source", "'xyz'"),
    ModelCase("loop-unknown-generator", LoopParams, {"generator_config": "huge"}, "generator_config", "'huge'"),
    ModelCase(
        "loop-unknown-fam", LoopParams, {"screen": {"fam_model": "bogus-fam"}}, "screen.fam_model", "'bogus-fam'"
    ),
    ModelCase("loop-zero-label-weight", LoopParams, {"train": {"new_label_weight": 0}}, "train.new_label_weight", "0"),
    ModelCase("loop-unknown-runner", LoopParams, {"label": {"runner": "cloud"}}, "label.runner", "'cloud'"),
    ModelCase("loop-misspelled-field", LoopParams, {"itertions": 3}, "itertions", "Extra inputs"),
    ModelCase("loop-text-iterations", LoopParams, {"iterations": "many"}, "iterations", "'many'"),
    ModelCase("generate-zero-target", GenerateParams, {"targets": [0.0]}, "targets.0", "0.0"),
    ModelCase("generate-inf-target", GenerateParams, {"targets": [float("inf")]}, "targets.0", "inf"),
    ModelCase("generate-zero-n-kept", GenerateParams, {"n_kept": 0}, "n_kept", "0"),
    ModelCase("generate-zero-samples", GenerateParams, {"samples_per_kept": 0}, "samples_per_kept", "0"),
    ModelCase("generate-negative-iteration", GenerateParams, {"iteration": -1}, "iteration", "-1"),
    ModelCase("screen-negative-tolerance", ScreenParams, {"gnn_tolerance": -1.0}, "gnn_tolerance", "-1.0"),
    ModelCase("screen-stages-out-of-order", ScreenParams, {"stages": ["fam", "gnn"]}, "stages", "funnel order"),
    ModelCase("screen-stage-twice", ScreenParams, {"stages": ["gnn", "gnn"]}, "stages", "distinct"),
    ModelCase("screen-no-stages", ScreenParams, {"stages": []}, "stages", "at least 1 item"),
    ModelCase("screen-unknown-stage", ScreenParams, {"stages": ["dft"]}, "stages.0", "'dft'"),
    ModelCase("screen-zero-batch", ScreenParams, {"fam_batch_size": 0}, "fam_batch_size", "0"),
    ModelCase("screen-unknown-fam", ScreenParams, {"fam_model": "bogus-fam"}, "fam_model", "'bogus-fam'"),
    ModelCase("label-unknown-preset", LabelParams, {"preset": "bogus"}, "preset", "'bogus'"),
    ModelCase("label-zero-attempts", LabelParams, {"max_attempts": 0}, "max_attempts", "0"),
    ModelCase("label-too-many-attempts", LabelParams, {"max_attempts": 11}, "max_attempts", "11"),
    ModelCase("label-zero-workers", LabelParams, {"workers": 0}, "workers", "0"),
    ModelCase("label-negative-limit", LabelParams, {"limit": -1}, "limit", "-1"),
    ModelCase("label-negative-iteration", LabelParams, {"iteration": -1}, "iteration", "-1"),
    ModelCase("label-negative-ecut-override", LabelParams, {"overrides": {"ecut": -5}}, "ecut", "-5"),
    ModelCase("label-unknown-override", LabelParams, {"overrides": {"ecutt": 400}}, "ecutt", "Extra inputs"),
    ModelCase("label-unknown-runner", LabelParams, {"runner": "cloud"}, "runner", "'cloud'"),
    ModelCase("label-unknown-source", LabelParams, {"source": "xyz"}, "source", "'xyz'"),
    ModelCase("train-unknown-model", TrainParams, {"what": ["xyz"]}, "what.0", "'xyz'"),
    ModelCase("train-negative-label-weight", TrainParams, {"new_label_weight": -1.0}, "new_label_weight", "-1.0"),
    ModelCase("train-unknown-config", TrainParams, {"predictor_config": "huge"}, "predictor_config", "'huge'"),
    ModelCase("ingest-filters-zero-sites", IngestFilters, {"max_sites": 0}, "max_sites", "0"),
    ModelCase(
        "ingest-filters-empty-window", IngestFilters, {"k_vrh_min": 500, "k_vrh_max": 100}, "IngestFilters", "500"
    ),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c.id for c in MODEL_CASES])
def test_flow_parameters_refuse_bad_values_naming_the_field(case: ModelCase) -> None:
    with pytest.raises(ValidationError) as info:
        case.model(**case.values)
    reason = validation_reason(info.value)
    assert "\n" not in reason
    assert case.field in reason, reason
    assert case.shows in reason, reason
    fields = {".".join(str(p) for p in e["loc"]) for e in info.value.errors()}
    assert case.field in fields or (not any(fields - {""}) and case.field == case.model.__name__), fields


def test_every_parameter_model_builds_from_its_defaults() -> None:
    """The cases fail for their bad value alone: without it, each model builds from its defaults."""
    for model in {c.model for c in MODEL_CASES}:
        assert isinstance(model(), model)


@dataclass(frozen=True)
class ApiCase:
    """A flow run's parameters as the UI or the API sends them (JSON), and the field path its refusal names."""

    id: str
    flow: str
    params: dict[str, Any]
    names: str


API_CASES = [
    ApiCase("loop-negative-target", "active_learning", {"targets": [-350], "focus_target": 350}, "params.targets.0"),
    ApiCase("loop-focus-not-a-target", "active_learning", {"focus_target": 123}, "focus_target 123 is not one of"),
    ApiCase("loop-unknown-fam", "active_learning", {"screen": {"fam_model": "bogus-fam"}}, "unknown FAM 'bogus-fam'"),
    ApiCase("loop-text-iterations", "active_learning", {"iterations": "many"}, "params.iterations"),
    ApiCase("generate-zero-n-kept", "generate", {"n_kept": 0}, "params.n_kept"),
    ApiCase("screen-stages-out-of-order", "screen", {"stages": ["fam", "gnn"]}, "funnel order"),
    ApiCase("label-unknown-preset", "label", {"preset": "bogus"}, "params.preset"),
    ApiCase("label-negative-ecut", "label", {"overrides": {"ecut": -5}}, "ecut"),
    ApiCase("train-unknown-model", "train", {"what": ["xyz"]}, "params.what.0"),
]


def _flow(name: str) -> Any:
    from flows.active_learning import active_learning
    from flows.generate import generate
    from flows.label import label
    from flows.screen import screen
    from flows.train import train

    return {"active_learning": active_learning, "generate": generate, "screen": screen, "label": label, "train": train}[
        name
    ]


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_a_flow_run_with_bad_parameters_is_refused_before_it_starts(case: ApiCase) -> None:
    """Prefect validates a run's JSON parameters against the flow's model before the flow body runs."""
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError) as info:
        _flow(case.flow).validate_parameters({"params": case.params})
    assert case.names in str(info.value)
    assert "Traceback" not in str(info.value)


@dataclass(frozen=True)
class QuarantineCase:
    """One bad record among good ones in a source: the record quarantined, and the reason (and detail) it gets."""

    id: str
    bad: str
    reason: str
    detail: str


QUARANTINE_CASES = [
    QuarantineCase("nan-coordinate", "nan.cif", "unreadable", "not a number"),
    QuarantineCase("text-coordinate", "text-coord.cif", "unreadable", "not a number"),
    QuarantineCase("coordinate-1e30", "wild.cif", "unreadable", "outside"),
    QuarantineCase("negative-length", "negative.cif", "unreadable", "must be positive"),
    QuarantineCase("impossible-angle", "flat.cif", "unreadable", "do not make a cell"),
    QuarantineCase("empty-file", "empty.cif", "unreadable", ""),
    QuarantineCase("binary-file", "binary.cif", "unreadable", ""),
    QuarantineCase("unknown-element", "unknown-element.cif", "unreadable", "Xx"),
    QuarantineCase("overlapping-atoms", "overlap.cif", "overlapping_atoms", ""),
]


def _good_folder(folder: Path) -> None:
    folder.mkdir()
    write(folder / "w.cif", bulk("W", "bcc", a=3.17))
    write(folder / "ir.cif", bulk("Ir", "fcc", a=3.87))


@pytest.mark.parametrize("case", QUARANTINE_CASES, ids=[c.id for c in QUARANTINE_CASES])
def test_ingest_quarantines_exactly_the_bad_file_of_a_folder(case: QuarantineCase, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    _good_folder(folder)
    BAD_FILES[case.bad](folder / case.bad)
    (folder / "properties.csv").write_text(f"file,k_vrh\nw.cif,305\nir.cif,348\n{case.bad},200\n")
    lake = tmp_path / "lake"
    result = CliRunner().invoke(app, ["--lake", str(lake), "ingest", str(folder)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    got = Lake(lake)
    rows = got.query("SELECT record_id, reason, detail FROM quarantine").to_pylist()
    assert [(r["record_id"], r["reason"]) for r in rows] == [(case.bad, case.reason)]
    assert case.detail in rows[0]["detail"] and "\n" not in rows[0]["detail"]
    formulas = got.query("SELECT reduced_formula f FROM structures ORDER BY f").column("f").to_pylist()
    assert formulas == ["Ir", "W"]  # the good files landed, the bad one did not
    assert f"quarantined ({case.reason}): 1" in result.output


def _matbench(path: Path, rows: list[Any]) -> None:
    from pymatgen.core import Lattice, Structure

    good = Structure(Lattice.cubic(3.0), ["Cu", "Zn"], [[0, 0, 0], [0.5, 0.5, 0.5]]).as_dict()
    data = [[good, 2.0], *rows]
    with gzip.open(path, "wt") as fh:
        json.dump({"index": list(range(len(data))), "columns": ["structure", "log10(K_VRH)"], "data": data}, fh)


@pytest.mark.parametrize(
    ("bad_row", "detail"),
    [(["a structure?"], "1 values for 2 columns"), ("just text", "1 values for 2 columns")],
    ids=["short-row", "row-not-a-list"],
)
def test_ingest_quarantines_exactly_a_malformed_table_row(
    bad_row: Any, detail: str, tmp_path: Path, lake: Lake
) -> None:
    from storage.ingest import ingest

    path = tmp_path / "odd.json.gz"
    _matbench(path, [bad_row])
    report = ingest(lake, str(path))
    assert report.landed == 1 and dict(report.quarantined) == {"unreadable": 1}
    rows = lake.query("SELECT record_id, detail FROM quarantine").to_pylist()
    assert [r["record_id"] for r in rows] == ["1"] and detail in rows[0]["detail"]


def test_ingest_quarantines_exactly_a_non_record_entry_of_a_list(tmp_path: Path, lake: Lake) -> None:
    from pymatgen.core import Lattice, Structure

    from storage.ingest import ingest

    good = Structure(Lattice.cubic(3.0), ["Cu", "Zn"], [[0, 0, 0], [0.5, 0.5, 0.5]]).as_dict()
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"material_id": "mp-1", "structure": good, "k_vrh": 120.0}, 42]))
    report = ingest(lake, str(path))
    assert report.landed == 1 and dict(report.quarantined) == {"unreadable": 1}
    rows = lake.query("SELECT record_id, detail FROM quarantine").to_pylist()
    assert [r["record_id"] for r in rows] == ["1"] and "not a record" in rows[0]["detail"]


def test_the_table_has_at_least_50_cases() -> None:
    n = len(CLI_CASES) + len(LAKE_CASES) + len(MODEL_CASES) + len(API_CASES) + len(QUARANTINE_CASES) + 3
    assert n >= 50
    for table in (CLI_CASES + LAKE_CASES, MODEL_CASES, API_CASES, QUARANTINE_CASES):
        ids = [c.id for c in table]
        assert len(ids) == len(set(ids)), "case ids must be unique within a table"
