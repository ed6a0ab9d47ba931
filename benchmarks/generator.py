"""Does the generator make what is asked? Conditioning, composition, stability and diversity, per target and preset.

For each preset and each of ``--seeds`` independently trained models (seed k trains with
``config.seed + k``) on the metallic, at most 20-site train split of ../shared/data (both files),
the script prints per target (60 ... 400 GPa), on the raw samples ``sample()`` returns:

- the property head's MAPE against the target, the grader's MAPE (a CGCNN ensemble trained once on
  the same split: the reference work's metric) and its median K, and the rank correlation of the
  head with the grader (the keep-best ranker must agree with an independent grader);
- the fraction of single-element samples, validity, uniqueness, novelty against the training set,
  and the draws per returned sample (``sample()`` returns exactly the n asked, distinct ones, drawing a
  duplicate again: ``max_draws``), and the share
  of samples the template decoder placed (``--sampling decoder=template``; the rest went to Langevin);

then at ``--fam-target`` (350 GPa), on ``--fam-n`` raw samples and on the ``--fam-n`` best of
``--fam-n x --ratio`` samples by the head (the 500:1 keep-best filter), the FAM (SevenNet-0 by
default, relax + elastic tensor, the stage-II code path): the MAPE of FAM K (a sample the FAM
cannot relax or that changes structure counts as 100 % error), the share that still matches after
relaxation (stage II's StructureMatcher, ltol 0.2, stol 0.3, 5 degrees) and its RMS displacement;

and the funnel of the issue's loop run: targets 200 and 350 GPa, 10 kept of 50 samples each, stage I
(grader K within 30 %, not single-element, not a duplicate of a training structure or of another
candidate), then stage II (relaxed structure still matches, Born-stable, FAM K within 20 %).

With several seeds every figure is the mean, and ± the standard deviation over seeds.

Usage (from the repo root)::

    .venv/bin/python benchmarks/generator.py [--preset small] [--seeds 1] [--cgcnn grader.pt] [--json out.json]
    .venv/bin/python benchmarks/generator.py --checkpoint gen.pt --sampling prior_guidance=2   # an ablation

The grader is trained (``default`` CGCNN config, about 12 minutes on one CPU core) and saved as
``<out>/cgcnn-grader.pt`` when ``--cgcnn`` is not given and that file does not exist yet.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.settings import apply_process_defaults

apply_process_defaults()  # one BLAS/OpenMP thread per process and quiet Prefect, unless the environment says otherwise

import numpy as np
import torch
from pymatgen.core import Structure
from scipy.stats import spearmanr

import core.fam as fam
from core.cgcnn import PRESETS as CGCNN_PRESETS
from core.cgcnn import Ensemble, train_ensemble
from core.dedup import find_duplicates
from core.generator import PRESETS, CDVAEGenerator, Generator, keep_best, load_generator
from core.graphs import graph_of_row
from core.metrics import generation_metrics, mape
from core.settings import set_torch_threads
from core.structures import excluded_reason, from_row, split_of, structure_id, to_atoms, to_row

TARGETS = (60.0, 100.0, 200.0, 250.0, 300.0, 350.0, 400.0)
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
FUNNEL_TARGETS = (200.0, 350.0)
GNN_TOLERANCE, FAM_TOLERANCE = 0.30, 0.20


def reference_moduli(
    shared: Path, max_sites: int, with_2015: bool = True
) -> dict[str, tuple[list[Structure], list[float], list[float | None]]]:
    """Metallic structures with K > 0 and at most ``max_sites`` sites from the reference files, by split, with
    K and G (None where a record has no positive G)."""
    records: list[tuple[dict, float, float | None]] = []
    with gzip.open(shared / "mp-binary-elasticity-2025.1-train.json.gz") as fh:
        records += [(r["structure"], r["bulk_modulus_vrh"], r.get("shear_modulus_vrh")) for r in json.load(fh)]
    if with_2015:
        with gzip.open(shared / "elastic_tensor_2015.json.gz") as fh:
            table = json.load(fh)
        cols = table["columns"]
        records += [
            (row[cols.index("structure")], row[cols.index("K_VRH")], row[cols.index("G_VRH")]) for row in table["data"]
        ]
    out: dict[str, tuple[list[Structure], list[float], list[float | None]]] = {
        s: ([], [], []) for s in ("train", "val", "test")
    }
    seen: set[str] = set()
    for d, k, g in records:
        s = Structure.from_dict(d)
        if not k or k <= 0 or len(s) > max_sites or excluded_reason([e.symbol for e in s.composition.elements]):
            continue
        sid = structure_id(s)
        if sid in seen:
            continue
        seen.add(sid)
        split = out[split_of(sid)]
        split[0].append(s)
        split[1].append(float(k))
        split[2].append(float(g) if g and g > 0 else None)
    return out


def reference_data(
    shared: Path, max_sites: int, with_2015: bool = True
) -> dict[str, tuple[list[Structure], list[float]]]:
    """``reference_moduli`` with K alone."""
    return {split: (s, k) for split, (s, k, _) in reference_moduli(shared, max_sites, with_2015).items()}


class Grader:
    """The frozen CGCNN ensemble that grades samples (never the ranker) and the FAM that grades a few of them."""

    def __init__(self, cgcnn: Ensemble, fam_model: str) -> None:
        self.cgcnn = cgcnn
        set_torch_threads()
        self.calculator, self.fam_name = fam.fam_calculator(fam_model)
        self.settings = fam.FamSettings()

    def cgcnn_k(self, structures: Sequence[Structure]) -> np.ndarray:
        if not structures:
            return np.zeros(0)
        return self.cgcnn.predict_rows([to_row(s) for s in structures]).k_vrh

    def fam_outcomes(self, structures: Sequence[Structure]) -> list[fam.FamOutcome]:
        """Stage II's relax (batched) + match check + elastic tensor, per structure."""
        return fam.fam_outcomes([to_atoms(s) for s in structures], self.calculator, self.fam_name, self.settings)

    def fam_figures(self, structures: Sequence[Structure], target: float) -> dict[str, float]:
        """FAM MAPE (failures and changed structures count 100 %), share still matching, median RMS displacement."""
        outcomes = self.fam_outcomes(structures)
        matcher = fam._matcher(self.settings)
        errors, rms = [], []
        for s, o in zip(structures, outcomes, strict=True):
            k = o.elastic.k_vrh if (o.matches_input and o.elastic and o.elastic.k_vrh) else None
            errors.append(1.0 if k is None else abs(k - target) / target)
            if o.matches_input and o.relaxed:
                dist = matcher.get_rms_dist(s, from_row(o.relaxed))
                rms.append(dist[0] if dist else np.nan)
        return {
            "fam_mape": float(np.mean(errors)) if errors else np.nan,
            "still_matches": float(np.mean([bool(o.matches_input) for o in outcomes])) if outcomes else np.nan,
            "rms_median": float(np.nanmedian(rms)) if rms else np.nan,
        }


def grader_ensemble(
    path: Path | None,
    out: Path,
    data: dict[str, tuple[list[Structure], list[float]]],
    name: str = "cgcnn-grader.pt",
    target: str = "k_vrh",
) -> Ensemble:
    """The CGCNN grader from ``path``, else from ``<out>/<name>``, else trained there on the train split's labels
    (``data`` maps split -> structures and their ``target`` modulus; a None label is left out)."""
    cached = out / name
    if path or cached.exists():
        return Ensemble.load(path or cached)
    config = CGCNN_PRESETS.resolve("default", {"target": target})

    def graphs(split: str) -> tuple[list, np.ndarray]:
        pairs = [(s, v) for s, v in zip(*data[split], strict=True) if v]
        return [graph_of_row(to_row(s), config.graph) for s, _ in pairs], np.log10([v for _, v in pairs])

    t0 = time.perf_counter()
    ensemble = train_ensemble(graphs("train"), graphs("val"), config, log=print)
    print(f"trained the {target} CGCNN grader in {time.perf_counter() - t0:.0f} s -> {cached}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    ensemble.save(cached)
    return ensemble


def target_rows(
    generator: Generator, grader: Grader, n: int, train: Sequence[Structure], seed: int
) -> list[dict[str, Any]]:
    """Per target, figures of the ``n`` raw samples ``sample()`` returns."""
    rows = []
    for target in TARGETS:
        t0 = time.perf_counter()
        batch = generator.sample([target], n, seed=seed)
        seconds = time.perf_counter() - t0
        quality = generation_metrics(batch.structures, train)
        graded = grader.cgcnn_k(batch.structures)
        rows.append(
            {
                "target": target,
                "n": len(batch),
                "draws_per_sample": (batch.draws or len(batch)) / len(batch),
                "templated": float(np.mean([d == "template" for d in batch.decoders or ()])) if batch.decoders else 0.0,
                "mape_head": mape(batch.scores, target),
                "mape_cgcnn": mape(graded, target),
                "median_cgcnn_k": float(np.median(graded)),
                "head_vs_cgcnn_spearman": float(spearmanr(batch.scores, graded).statistic),
                "single_element": float(np.mean([len(s.composition.elements) == 1 for s in batch.structures])),
                "validity": quality.validity,
                "uniqueness": quality.uniqueness,
                "novelty": quality.novelty,
                "samples_per_s": len(batch) / seconds,
                "valid_per_s": sum(p is None for p in batch.problems or []) / seconds,
            }
        )
        print(_line(rows[-1], TARGET_COLUMNS), flush=True)
    return rows


def fam_rows(generator: Generator, grader: Grader, target: float, n: int, ratio: int, seed: int) -> dict[str, Any]:
    """FAM figures at ``target`` on ``n`` raw samples and on the ``n`` best of ``n * ratio`` by the head."""
    raw = generator.sample([target], n, seed=seed + 1)
    t0 = time.perf_counter()
    figures = {f"raw_{k}": v for k, v in grader.fam_figures(raw.structures, target).items()}
    figures["fam_seconds_per_structure"] = (time.perf_counter() - t0) / max(n, 1)
    kept = keep_best(generator.sample([target], n * ratio, seed=seed + 2), n)
    figures["kept_n"] = len(kept)
    figures["kept_mape_head"] = mape(kept.scores, target)
    figures["kept_mape_cgcnn"] = mape(grader.cgcnn_k(kept.structures), target)
    figures |= {f"kept_{k}": v for k, v in grader.fam_figures(kept.structures, target).items()}
    return figures


def funnel_rows(
    generator: Generator, grader: Grader, train: Sequence[Structure], seed: int, n_kept: int = 10, ratio: int = 5
) -> dict[str, Any]:
    """The issue's loop run: per target keep ``n_kept`` of ``n_kept * ratio``, then stage I and stage II."""
    kept = {t: keep_best(generator.sample([t], n_kept * ratio, seed=seed + 3), n_kept) for t in FUNNEL_TARGETS}
    candidates = [(t, s) for t, batch in kept.items() for s in batch.structures]
    graded = grader.cgcnn_k([s for _, s in candidates])
    stage1 = [
        i
        for i, ((t, s), k) in enumerate(zip(candidates, graded, strict=True))
        if abs(k - t) / t <= GNN_TOLERANCE and len(s.composition.elements) > 1
    ]
    known = [(structure_id(s), s) for s in train]
    duplicates = find_duplicates([(structure_id(candidates[i][1]), candidates[i][1]) for i in stage1], known)
    stage1 = [i for j, i in enumerate(stage1) if j not in duplicates]
    outcomes = grader.fam_outcomes([candidates[i][1] for i in stage1])
    verdicts = [fam.verdict(o, candidates[i][0], FAM_TOLERANCE)[0] for i, o in zip(stage1, outcomes, strict=True)]
    return {
        "funnel_kept": len(candidates),
        "funnel_stage1": len(stage1),
        "funnel_stage1_still_match": sum(bool(o.matches_input) for o in outcomes),
        "funnel_stage2": verdicts.count("pass"),
    }


TARGET_COLUMNS = (
    ("target", "target", "{:.0f}"),
    ("mape_head", "head MAPE", "{:.3f}"),
    ("mape_cgcnn", "CGCNN MAPE", "{:.3f}"),
    ("median_cgcnn_k", "CGCNN K med", "{:.0f}"),
    ("head_vs_cgcnn_spearman", "rho head/CGCNN", "{:.2f}"),
    ("single_element", "single-el", "{:.1%}"),
    ("validity", "valid", "{:.3f}"),
    ("uniqueness", "unique", "{:.3f}"),
    ("novelty", "novel", "{:.3f}"),
    ("draws_per_sample", "draws/sample", "{:.2f}"),
    ("templated", "template", "{:.1%}"),
    ("samples_per_s", "samples/s", "{:.0f}"),
    ("valid_per_s", "valid/s", "{:.0f}"),
)


def _line(row: dict[str, Any], columns: Sequence[tuple[str, str, str]]) -> str:
    return "  ".join(f"{fmt.format(row[key]):>{max(len(title), 7)}}" for key, title, fmt in columns)


def _header(columns: Sequence[tuple[str, str, str]]) -> str:
    return "  ".join(f"{title:>{max(len(title), 7)}}" for _, title, _ in columns)


def _mean_std(values: Sequence[float], fmt: str) -> str:
    arr = np.asarray(values, dtype=float)
    text = fmt.format(np.nanmean(arr))
    return text if len(arr) < 2 else f"{text}±{fmt.format(np.nanstd(arr)).lstrip('0') or '0'}"


def summarize(preset: str, runs: list[dict[str, Any]]) -> None:
    """Mean (± std over seeds) of each figure, per target, then the FAM and funnel figures."""
    print(f"\n== {preset}: {len(runs)} seed(s), mean{' ± std over seeds' if len(runs) > 1 else ''}")
    print(_header(TARGET_COLUMNS))
    for i, target in enumerate(TARGETS):
        cells = [f"{target:>7.0f}"]
        for key, title, fmt in TARGET_COLUMNS[1:]:
            cells.append(f"{_mean_std([r['targets'][i][key] for r in runs], fmt):>{max(len(title), 7)}}")
        print("  ".join(cells))
    for key in runs[0]["fam"]:
        print(f"{key:>32}: {_mean_std([r['fam'][key] for r in runs], '{:.3f}')}")
    for key in runs[0]["funnel"]:
        print(f"{key:>32}: {_mean_std([r['funnel'][key] for r in runs], '{:.1f}')}")


def parse_sampling(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` sampling overrides (values parsed as JSON where they can be, else kept as strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", help="generator preset(s) to train (default: small)")
    parser.add_argument("--seeds", type=int, default=1, help="independently trained models per preset")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        help="benchmark these trained generators instead of training (repeat: one per seed, seeded as --seeds is)",
    )
    parser.add_argument("--cgcnn", type=Path, help="CGCNN grader checkpoint (default: train or reuse one in --out)")
    parser.add_argument("--fam-model", default="sevennet-0")
    parser.add_argument("--n", type=int, default=300, help="raw samples per target")
    parser.add_argument("--fam-target", type=float, default=350.0)
    parser.add_argument("--fam-n", type=int, default=20, help="raw samples and kept candidates graded by the FAM")
    parser.add_argument("--ratio", type=int, default=500, help="samples per kept candidate (keep-best filter)")
    parser.add_argument("--no-funnel", action="store_true", help="skip the 200/350 GPa funnel")
    parser.add_argument("--sampling", nargs="*", default=[], help="sampling overrides, e.g. prior_guidance=2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--json", type=Path, help="write every figure as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    sampling = parse_sampling(args.sampling)

    data = reference_data(args.shared, PRESETS["small"].max_atoms)
    train = data["train"][0]
    print("reference structures by split:", {k: len(v[0]) for k, v in data.items()})
    grader = Grader(grader_ensemble(args.cgcnn, args.out, data), args.fam_model)
    print(f"grader: CGCNN ensemble of {len(grader.cgcnn.members)}; FAM {grader.fam_name}; sampling {sampling or '-'}")

    results: dict[str, list[dict[str, Any]]] = {}
    presets = ["checkpoint"] if args.checkpoint else (args.preset or ["small"])
    for preset in presets:
        results[preset] = []
        for k in range(len(args.checkpoint) if args.checkpoint else args.seeds):
            if args.checkpoint:
                generator = load_generator(args.checkpoint[k], device=args.device)
            else:
                config = PRESETS[preset]
                generator = CDVAEGenerator(config.model_copy(update={"seed": config.seed + k}), device=args.device)
                t0 = time.perf_counter()
                generator.train(*data["train"], progress=False)
                print(f"\n{preset} seed {k}: trained in {time.perf_counter() - t0:.0f} s on {generator.device}")
                generator.save(args.out / f"generator-{preset}-{k}.pt")
            if sampling:
                generator = generator.with_sampling(**sampling)
            print(json.dumps(generator.metrics))
            print(_header(TARGET_COLUMNS))
            run: dict[str, Any] = {"seed": k, "train_metrics": generator.metrics}
            run["targets"] = target_rows(generator, grader, args.n, train, seed=100 * k)
            t0 = time.perf_counter()
            run["fam"] = fam_rows(generator, grader, args.fam_target, args.fam_n, args.ratio, seed=100 * k)
            run["funnel"] = {} if args.no_funnel else funnel_rows(generator, grader, train, seed=100 * k)
            print(f"FAM and funnel figures in {time.perf_counter() - t0:.0f} s: {run['fam']} {run['funnel']}")
            results[preset].append(run)
        summarize(preset, results[preset])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
