"""Ingest: the two reference files, every source format, filters, quarantine, idempotence."""

from __future__ import annotations

import gzip
import hashlib
import json
import math

import pytest
from ase.build import bulk
from ase.io import write
from cif_samples import two_site_cif
from pymatgen.core import Lattice, Structure

from core.ingest import IngestError, IngestFilters, fetch_matbench
from storage.ingest import ingest, source_name


def test_reference_files_with_default_filters(lake, shared_data):
    r2015 = ingest(lake, str(shared_data / "elastic_tensor_2015.json.gz"))
    rmp = ingest(lake, str(shared_data / "mp-binary-elasticity-2025.1-train.json.gz"))
    for report in (r2015, rmp):
        print("\n".join(report.lines()))
    assert (r2015.read, r2015.landed, r2015.filtered["metals_only"], r2015.filtered["max_sites"]) == (
        1181,
        852,
        180,
        147,
    )
    assert (rmp.read, rmp.landed, rmp.filtered["metals_only"], rmp.filtered["max_sites"]) == (3144, 1766, 1328, 47)
    assert not r2015.quarantined and not rmp.quarantined
    assert (r2015.already_present, r2015.repeated_in_source) == (0, 2)  # two crystals appear twice in the file
    assert "repeated within the source 2" in r2015.lines()[0] and "already in the lake 0" in r2015.lines()[0]
    counts = lake.counts()
    print("lake after both:", counts)
    assert counts["structures"] == 2583  # 35 crystals carry labels from both files
    k = lake.query("SELECT min(value) lo, max(value) hi, count(*) n FROM properties WHERE name = 'k_vrh'").to_pylist()[
        0
    ]
    assert k["lo"] > 0 and k["hi"] <= 500 and k["n"] == 852 + 1766
    tensors = lake.query("SELECT count(*) n FROM properties WHERE name = 'elastic_tensor'").column("n")[0].as_py()
    assert tensors == 852
    # every structure passes the metal filter and the size cap
    bad = lake.query("SELECT count(*) n FROM structures WHERE nsites > 20").column("n")[0].as_py()
    assert bad == 0
    # a second ingest adds nothing
    before = lake.query("SELECT count(*) n FROM properties_history").column("n")[0].as_py()
    again = ingest(lake, str(shared_data / "elastic_tensor_2015.json.gz"))
    assert again.landed == 0 and again.already_present == 854
    assert lake.query("SELECT count(*) n FROM properties_history").column("n")[0].as_py() == before
    assert lake.counts() == counts


def _structure_dict(species, coords, a=3.0):
    return Structure(Lattice.cubic(a), species, coords).as_dict()


def _write_matbench(path, rows, columns=("structure", "log10(K_VRH)")):
    with gzip.open(path, "wt") as fh:
        json.dump({"index": list(range(len(rows))), "columns": list(columns), "data": rows}, fh)


def test_bad_records_are_quarantined_and_the_rest_lands(lake, tmp_path):
    good = _structure_dict(["Cu", "Zn"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    overlapping = _structure_dict(["Cu", "Zn"], [[0, 0, 0], [0.05, 0, 0]])
    unknown = json.loads(json.dumps(good))
    unknown["sites"][0]["species"][0]["element"] = "Xx"
    rows = [
        [good, math.log10(150.0)],
        ["not a structure", 2.0],
        [overlapping, 2.0],
        [unknown, 2.0],
        [_structure_dict(["Ni", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]]), None],
        [_structure_dict(["Fe", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]]), float("nan")],
    ]
    path = tmp_path / "bad.json.gz"
    _write_matbench(path, rows)
    report = ingest(lake, str(path))
    assert report.landed == 1
    assert dict(report.quarantined) == {
        "unreadable": 1,
        "overlapping_atoms": 1,
        "unknown_element": 1,
        "bad_property": 2,
    }
    reasons = sorted(lake.query("SELECT reason FROM quarantine").column("reason").to_pylist())
    assert reasons == ["bad_property", "bad_property", "overlapping_atoms", "unknown_element", "unreadable"]
    k = lake.query("SELECT value FROM properties WHERE name = 'k_vrh'").column("value").to_pylist()
    assert k == [pytest.approx(150.0)]  # log10 column converted to GPa
    ingest(lake, str(path))
    assert lake.counts()["quarantine"] == 5  # re-ingest does not repeat quarantine rows


def test_filters_are_configurable_and_counted(lake, tmp_path):
    rows = [
        [_structure_dict(["Cu", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]), 2.0],  # non-metal
        [_structure_dict(["Ar", "Cu"], [[0, 0, 0], [0.5, 0.5, 0.5]]), 2.0],  # noble gas
        [_structure_dict(["U", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]]), 2.0],  # actinide
        [_structure_dict(["W", "Re"], [[0, 0, 0], [0.5, 0.5, 0.5]]), math.log10(600)],  # K too high
        [_structure_dict(["W", "Ta"], [[0, 0, 0], [0.5, 0.5, 0.5]]), 2.0, 0.4],  # unstable
        [_structure_dict(["Mo", "Nb"], [[0, 0, 0], [0.5, 0.5, 0.5]]), 2.0, 0.01],
    ]
    rows[:4] = [[*r, None] for r in rows[:4]]
    path = tmp_path / "filters.json.gz"
    _write_matbench(path, rows, columns=("structure", "log10(K_VRH)", "formation_energy_per_atom"))
    report = ingest(lake, str(path))
    assert dict(report.filtered) == {"metals_only": 3, "k_vrh_range": 1, "formation_energy": 1}
    assert report.landed == 1
    loose = IngestFilters(metals_only=False, k_vrh_max=None, max_formation_energy=None)
    report = ingest(lake, str(path), filters=loose, name="filters-off")
    assert report.landed == 6 and not report.filtered


def test_folder_of_structure_files_with_csv(lake, tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir()
    write(folder / "w.cif", bulk("W", "bcc", a=3.17))
    write(folder / "POSCAR_ir", bulk("Ir", "fcc", a=3.87), format="vasp")
    write(folder / "cual.extxyz", bulk("CuAl", "cesiumchloride", a=2.95))
    (folder / "broken.cif").write_text("this is not a CIF")
    (folder / "properties.csv").write_text("file,k_vrh,g_vrh\nw.cif,305,150\nPOSCAR_ir,348,210\ncual.extxyz,,\n")
    report = ingest(lake, str(folder))
    assert source_name(str(folder)) == "folder-mydata"
    assert report.landed == 2
    assert dict(report.quarantined) == {"unreadable": 1, "bad_property": 1}
    got = lake.query(
        "SELECT s.reduced_formula f, p.value k FROM structures s JOIN properties p USING (structure_id) "
        "WHERE p.name = 'k_vrh' ORDER BY f"
    ).to_pylist()
    assert got == [{"f": "Ir", "k": 348.0}, {"f": "W", "k": 305.0}]


def test_matbench_download_is_cached_and_checksummed(lake, tmp_path, monkeypatch):
    src = tmp_path / "matbench_log_kvrh.json.gz"
    _write_matbench(src, [[_structure_dict(["Cu", "Zn"], [[0, 0, 0], [0.5, 0.5, 0.5]]), 2.0]])
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    path = fetch_matbench(cache, url=src.as_uri(), sha256=digest)
    assert path.parent == cache and path.read_bytes() == src.read_bytes()
    src.unlink()  # cached: a second call does not download
    assert fetch_matbench(cache, url=src.as_uri(), sha256=digest) == path
    with pytest.raises(IngestError, match="checksum mismatch"):
        fetch_matbench(cache, url=src.as_uri(), sha256="0" * 64)


def test_matbench_without_network_fails_clearly(tmp_path):
    with pytest.raises(IngestError, match=r"could not download .* Without network access"):
        fetch_matbench(tmp_path, url="http://127.0.0.1:9/matbench_log_kvrh.json.gz", timeout=5)


def test_named_matbench_source_reads_from_the_cache(lake, tmp_path, monkeypatch):
    from core import ingest as core_ingest

    src = tmp_path / "dl" / "matbench_log_kvrh.json.gz"
    src.parent.mkdir()
    _write_matbench(src, [[_structure_dict(["Cu", "Zn"], [[0, 0, 0], [0.5, 0.5, 0.5]]), 2.0]])
    monkeypatch.setenv("MATLOOP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(core_ingest, "MATBENCH_LOG_KVRH_URL", src.as_uri())
    monkeypatch.setattr(core_ingest, "MATBENCH_LOG_KVRH_SHA256", hashlib.sha256(src.read_bytes()).hexdigest())
    report = ingest(lake, "matbench_log_kvrh")
    assert report.source == "matbench_log_kvrh" and report.landed == 1
    assert lake.query("SELECT method FROM properties").column("method").to_pylist() == ["dataset:matbench_log_kvrh"]


def test_unknown_source_is_a_clear_error(lake):
    with pytest.raises(IngestError, match="unknown source"):
        ingest(lake, "/no/such/file.json")


@pytest.mark.parametrize(
    ("fields", "reason", "words"),
    [
        ({"a": -3.1}, "unreadable", "must be positive"),
        ({"x": 1e30}, "unreadable", "outside ±10"),
        ({"x": "nan"}, "unreadable", "not a number"),
        ({"x": 12.5}, "unreadable", "outside ±10"),
        ({"alpha": 200}, "unreadable", "do not make a cell"),
    ],
    ids=["negative-length", "coordinate-1e30", "coordinate-nan", "coordinate-12.5", "impossible-angle"],
)
def test_non_physical_cif_cells_are_quarantined_with_a_reason(lake, tmp_path, fields, reason, words):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "bad.cif").write_text(two_site_cif(**fields))
    (folder / "properties.csv").write_text("file,k_vrh\nbad.cif,300\n")
    report = ingest(lake, str(folder))
    assert report.landed == 0 and dict(report.quarantined) == {reason: 1}
    detail = lake.query("SELECT detail FROM quarantine").column("detail").to_pylist()[0]
    assert words in detail and lake.counts()["structures"] == 0


def test_matrix_sources_refuse_left_handed_cells_and_wild_coordinates(lake, tmp_path):
    left = _structure_dict(["Cu", "Zn"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    left["lattice"]["matrix"][0] = [-3.0, 0.0, 0.0]
    wild = _structure_dict(["Cu", "Zn"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    wild["sites"][1]["abc"] = [1e30, 0.5, 0.5]
    path = tmp_path / "odd.json.gz"
    _write_matbench(path, [[left, 2.0], [wild, 2.0]])
    report = ingest(lake, str(path))
    assert report.landed == 0 and dict(report.quarantined) == {"bad_cell": 1, "bad_coordinates": 1}


def test_a_truncated_gzip_source_fails_with_one_clear_line(lake, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    path = tmp_path / "cut.json.gz"
    _write_matbench(path, [[_structure_dict(["Cu", "Zn"], [[0, 0, 0], [0.5, 0.5, 0.5]]), 2.0]] * 50)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(IngestError, match="truncated"):
        ingest(lake, str(path))
    result = CliRunner().invoke(app, ["--lake", lake.url, "ingest", str(path)])
    assert result.exit_code == 1 and "Aborted" not in result.output and "truncated" in result.output
    assert lake.counts()["structures"] == 0


def test_concurrent_ingests_of_overlapping_sources_land_each_structure_once(lake, tmp_path, monkeypatch):
    """Four writers at once, each holding a structure another also holds: no twin rows anywhere.

    ``prepare`` is slowed so that, without the lake's ingest lock, every writer would read an empty
    lake and append the shared structures again.
    """
    import threading
    import time

    import storage.ingest as storage_ingest

    real_prepare = storage_ingest.prepare

    def slow_prepare(*args, **kwargs):
        time.sleep(0.3)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(storage_ingest, "prepare", slow_prepare)
    shared = _structure_dict(["Cu", "Zn"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    paths = []
    for k in range(4):
        own = _structure_dict(["Ni", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]], a=2.8 + 0.1 * k)
        paths.append(tmp_path / f"part{k}.json.gz")
        _write_matbench(paths[-1], [[shared, 2.0], [own, 2.1]])
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def writer(path):
        barrier.wait()
        try:
            ingest(lake, str(path), name="parts")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    history = lake.query("SELECT structure_id, count(*) n FROM structures_history GROUP BY 1").to_pylist()
    assert len(history) == 5 and all(r["n"] == 1 for r in history)
    labels = lake.query("SELECT structure_id, count(*) n FROM properties_history WHERE name = 'k_vrh' GROUP BY 1")
    assert all(n == 1 for n in labels.column("n").to_pylist())
