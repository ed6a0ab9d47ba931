"""Kill the loop anywhere: SIGKILL the embedded active-learning loop N times at seeded points, rerun after each.

A tiny loop (seed set, ``small`` CGCNN and generator, a few samples per target, FAM labels from
SevenNet-0) runs first uninterrupted on its own lake (the reference), then on a second lake where
each run is SIGKILLed at a planned point and rerun, until a last run finishes it. Every run is a
child process (``--child``) that reports where it is to ``events.jsonl``: the stage it is in
(train, generate, screen, label, record), each Parquet write of the lake and each write of a cached
task's result. A kill is one of:

- ``stage``: the parent SIGKILLs the child a seeded fraction of the reference's stage time after the
  child enters that stage of that iteration (at the stage's end, when a resumed stage ends sooner);
- ``parquet`` / ``result``: the child SIGKILLs itself in the middle of its k-th Parquet write
  (half of the file's bytes in its temporary file) or cached-result write (half the bytes in the
  result file) from that stage on: windows of milliseconds that a timer would never hit.

The plan holds at least one kill of each kind and stage (N >= 7), the rest drawn at random (stage
kills weighted by the stage's time), sorted along the loop's timeline. Both lakes share one Prefect
server (it outlives the kills, as a deployed server would). Then it prints where each kill landed
and checks the chaos lake: iterations completed; rows per table in ``<table>_history`` against the
reference, keys with several rows, and duplicate rows (same key and same payload, provenance aside);
committed Parquet files that do not read, stray temporary files; result files that do not load;
candidates without a terminal status; finished tasks recomputed after a resume (a cached result
written completely by one run and written again by a later run), beside the cache hits Prefect
logged; and the final ``iterations`` rows against the reference's apart from times and run ids.

The children import the code afresh at each rerun: run it on a tree nobody edits meanwhile (a
``git archive`` copy), or a changed generator file changes a cache key mid-run and the final rows differ.

Usage (from the repo root)::

    .venv/bin/python benchmarks/chaos.py [--kills 20] [--seed 0] [--iterations 1] [--json summary.json]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from core.settings import apply_process_defaults

apply_process_defaults()  # one BLAS/OpenMP thread per process and quiet Prefect, unless the environment says otherwise

STAGES = ("train", "generate", "screen", "label", "record")
PROVENANCE = ("run_id", "created_at", "code_version")
VOLATILE = {"iterations": ("wall_times_json",)}
"""Columns that differ between two runs of the same work by design (times), besides provenance."""


# ---------------------------------------------------------------- the child: one run of the loop


def loop_params(lake_url: str, args: argparse.Namespace) -> Any:
    """The tiny loop both lakes run (the shape of tests/test_active_learning.py's, FAM-labeled)."""
    from core.fam import FamSettings
    from flows.active_learning import LoopParams

    return LoopParams(
        lake_url=lake_url,
        targets=args.targets,
        focus_target=args.targets[-1],
        iterations=args.iterations,
        n_kept=args.kept,
        samples_per_kept=args.ratio,
        label_source="fam",
        predictor_config="small",
        generator_config="small",
        train={"model_seed": args.seed},
        generate={"seed": args.seed},
        screen={
            "gnn_tolerance": 5.0,
            "fam_tolerance": 5.0,
            "fam_model": "sevennet-0",
            # loose matching, so that a tiny generator's samples get labeled
            "fam_settings": FamSettings(ltol=0.6, stol=1.0, angle_tol=20.0),
        },
    )


class Reporter:
    """The child's side: appends events to ``events.jsonl`` and fires a planned self-kill."""

    def __init__(self, path: Path, attempt: int, plan: dict[str, Any] | None) -> None:
        self.fh = open(path, "a", buffering=1)  # noqa: SIM115 (open for the process's life; SIGKILL closes it)
        self.attempt = attempt
        self.plan = plan or {}
        self.iteration = -1
        self.stage = "start"
        self.armed = False
        self.count = 0

    def emit(self, ev: str, **fields: Any) -> None:
        line = {"t": time.time(), "attempt": self.attempt, "it": self.iteration, "stage": self.stage, "ev": ev}
        self.fh.write(json.dumps(line | fields) + "\n")  # line-buffered: in the page cache before any kill

    def enter(self, stage: str) -> None:
        self.stage = stage
        self.emit("stage")
        plan = self.plan
        if plan.get("kind") not in ("parquet", "result"):
            return
        here, planned = (self.iteration, STAGES.index(stage)), (plan["iteration"], STAGES.index(plan["stage"]))
        if not self.armed:
            self.armed = here >= planned
        elif here > planned and self.count < plan["k"]:  # a resumed stage wrote less: fire at the next write
            plan["k"] = self.count + 1

    def write_window(self, kind: str) -> bool:
        """True when this write is the planned one: the k-th of its kind since the planned stage began, or the
        first after it when the resumed stage wrote fewer than k."""
        if not self.armed or self.plan.get("kind") != kind:
            return False
        self.count += 1
        return self.count == self.plan["k"]

    def die(self, where: str) -> None:
        self.emit("kill", where=where)
        os.kill(os.getpid(), signal.SIGKILL)


def instrument(rep: Reporter) -> None:
    """Wrap the loop's stage dispatch, the lake's Parquet writes and the result storage's writes."""
    import pyarrow.parquet as pq
    from prefect.filesystems import LocalFileSystem

    import flows.active_learning as al
    from core.provenance import utcnow
    from storage.lake import Lake

    stage_params, run_stage, metrics, report = al._stage_params, al._run_stage, al.iteration_metrics, al.report

    def _stage_params(params: Any, lake: Any, iteration: int, loop_run_id: str = "") -> Any:
        rep.iteration = iteration
        return stage_params(params, lake, iteration, loop_run_id)

    def _run_stage(stage: str, sp: Any, mode: str) -> None:
        rep.enter(stage)
        run_stage(stage, sp, mode)
        rep.emit("stage-end")

    def _metrics(*a: Any, **k: Any) -> Any:
        rep.enter("record")
        return metrics(*a, **k)

    def _report(*a: Any, **k: Any) -> None:
        report(*a, **k)
        rep.emit("stage-end")

    al._stage_params, al._run_stage, al.iteration_metrics, al.report = _stage_params, _run_stage, _metrics, _report

    write_atomic = Lake._write_atomic

    def _write_atomic(self: Lake, table: str, col: str, value: Any, data: Any) -> None:
        rep.emit("parquet", table=table)
        if rep.write_window("parquet"):
            folder = self.path(table, f"{col}={value}")
            self.fs.makedirs(folder, exist_ok=True)
            buf = io.BytesIO()
            pq.write_table(data, buf, compression="zstd")
            payload = buf.getvalue()
            tmp = f"{folder}/part-{utcnow():%Y%m%dT%H%M%S%f}-chaos.parquet.tmp"
            with open(tmp, "wb") as fh:
                fh.write(payload[: len(payload) // 2])
                fh.flush()
                rep.die(f"mid Parquet write of {table} ({len(payload) // 2} of {len(payload)} bytes in its .tmp)")
        write_atomic(self, table, col, value, data)
        rep.emit("parquet-done", table=table)

    Lake._write_atomic = _write_atomic  # type: ignore[method-assign]

    write_path, awrite_path = LocalFileSystem.write_path, LocalFileSystem.awrite_path

    def _before(block: LocalFileSystem, path: str, content: bytes) -> None:
        rep.emit("result", key=path)
        if rep.write_window("result"):
            target = block._resolve_path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as fh:  # Prefect writes the result file in place: a kill leaves it half
                fh.write(content[: len(content) // 2])
                fh.flush()
                rep.die(f"mid result write ({len(content) // 2} of {len(content)} bytes of {path[:12]}...)")

    def _write_path(self: LocalFileSystem, path: str, content: bytes, **kw: Any) -> str:
        _before(self, path, content)
        out = write_path(self, path, content, _sync=True)
        rep.emit("result-done", key=path)
        return out

    async def _awrite_path(self: LocalFileSystem, path: str, content: bytes) -> str:
        _before(self, path, content)
        out = await awrite_path(self, path, content)
        rep.emit("result-done", key=path)
        return out

    LocalFileSystem.write_path = _write_path  # type: ignore[method-assign]
    LocalFileSystem.awrite_path = _awrite_path  # type: ignore[method-assign]


def child(args: argparse.Namespace) -> None:
    """One run of the loop on ``--lake``, reporting to ``--events``; exits 0 when the loop finished."""
    import torch

    torch.set_num_threads(1)
    from flows.active_learning import active_learning

    rep = Reporter(Path(args.events), args.attempt, json.loads(args.plan) if args.plan else None)
    rep.emit("spawn")
    instrument(rep)
    active_learning(loop_params(args.lake, args))
    rep.stage = "done"
    rep.emit("finished")


# ---------------------------------------------------------------- the parent: plan, kill, rerun, check


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return out


def spawn(args: argparse.Namespace, lake: Path, events: Path, attempt: int, plan: dict[str, Any] | None, log: Path):
    argv = [sys.executable, __file__, "--child", "--lake", str(lake), "--events", str(events)]
    argv += ["--attempt", str(attempt), "--seed", str(args.seed), "--iterations", str(args.iterations)]
    argv += ["--kept", str(args.kept), "--ratio", str(args.ratio), "--targets", *map(str, args.targets)]
    if plan:
        argv += ["--plan", json.dumps(plan)]
    fh = open(log, "w")  # noqa: SIM115 (the child's output, closed when it ends)
    return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy()), fh


def position(ev: dict[str, Any]) -> tuple[int, int]:
    stage = ev["stage"]
    return (ev["it"], STAGES.index(stage)) if stage in STAGES else ((-1, -1) if stage == "start" else (1 << 30, 0))


def timeline(events: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, float]]:
    """Per (iteration, stage) of an uninterrupted run: seconds, Parquet writes, result writes."""
    out: dict[tuple[int, str], dict[str, float]] = defaultdict(lambda: {"s": 0.0, "parquet": 0, "result": 0})
    entered: dict[tuple[int, str], float] = {}
    for ev in events:
        key = (ev["it"], ev["stage"])
        if ev["ev"] == "stage":
            entered[key] = ev["t"]
        elif ev["ev"] == "stage-end" and key in entered:
            out[key]["s"] = ev["t"] - entered[key]
        elif ev["ev"] in ("parquet", "result") and ev["stage"] in STAGES:
            out[key][ev["ev"]] += 1
    return dict(out)


def make_plan(n: int, seed: int, tl: dict[tuple[int, str], dict[str, float]]) -> list[dict[str, Any]]:
    """N kills: one per stage and write window first, the rest drawn; sorted along the loop's timeline."""
    rng = random.Random(seed)
    required = ["parquet", "result", *STAGES]
    kinds = required[:n] + [rng.choices(["stage", "parquet", "result"], [0.6, 0.2, 0.2])[0] for _ in range(n - 7)]
    plan = []
    for kind in kinds:
        if kind in ("parquet", "result"):
            spots = [(k, v[kind]) for k, v in tl.items() if v[kind] > 0]
            (it, stage), count = rng.choices(spots, [c for _, c in spots])[0]
            k = rng.randint(1, int(count))
            plan.append({"kind": kind, "iteration": it, "stage": stage, "k": k, "at": k / (count + 1)})
            continue
        if kind == "stage":
            spots = [(k, v["s"]) for k, v in tl.items()]
            (it, stage), _ = rng.choices(spots, [max(s, 1.0) for _, s in spots])[0]
        else:
            stage = kind
            it = rng.choice(sorted({i for i, s in tl if s == stage}))
        frac = rng.uniform(0.05, 0.95)
        plan.append(
            {"kind": "stage", "iteration": it, "stage": stage, "delay": round(frac * tl[(it, stage)]["s"], 2)}
            | {"at": frac}
        )
    plan.sort(key=lambda p: (p["iteration"], STAGES.index(p["stage"]), p["at"]))
    return plan


def run_to_kill(args: argparse.Namespace, lake: Path, events: Path, attempt: int, plan: dict[str, Any], log: Path):
    """One run with one planned kill; returns (exit code, seconds, when the parent sent the kill or None)."""
    proc, fh = spawn(args, lake, events, attempt, plan, log)
    t0 = time.time()
    target = (plan["iteration"], STAGES.index(plan["stage"]))
    fire_at = None
    sent = None
    try:
        while proc.poll() is None:
            if time.time() - t0 > args.run_timeout:
                proc.kill()
                raise RuntimeError(f"attempt {attempt} ran past {args.run_timeout} s; see {log}")
            mine = [e for e in read_events(events) if e["attempt"] == attempt and e["ev"] in ("stage", "stage-end")]
            past = (
                bool(mine)
                and position(mine[-1]) >= target
                and (mine[-1]["ev"] == "stage-end" or position(mine[-1]) > target)
            )
            if plan["kind"] == "stage":
                if fire_at is None and mine and mine[-1]["ev"] == "stage" and position(mine[-1]) >= target:
                    fire_at = time.time() + plan["delay"]
                elif fire_at is not None and past:
                    fire_at = time.time()  # a resumed stage ended before the delay: kill it at its end
            elif fire_at is None and past:  # the planned write never came (a resumed run took it from the cache)
                fire_at = time.time()  # so the kill lands at the end of its stage instead
            if fire_at is not None and time.time() >= fire_at:
                proc.send_signal(signal.SIGKILL)
                sent = time.time()
                proc.wait()
                break
            time.sleep(0.05)
    finally:
        fh.close()
    return proc.returncode, time.time() - t0, sent


def landing(events: list[dict[str, Any]], attempt: int, killed_at: float | None) -> str:
    """Where a killed run was at ``killed_at`` (None: it killed itself): its stage, a write it was in."""
    mine = [e for e in events if e["attempt"] == attempt]
    if not mine:
        return "start-up (before the loop reported anything: imports, Prefect client)"
    last = mine[-1]
    stage = f"iteration {last['it']} {last['stage']}" if last["stage"] in STAGES else last["stage"]
    entered = next((e["t"] for e in reversed(mine) if e["ev"] == "stage"), mine[0]["t"])
    if last["ev"] == "kill":
        return f"{stage}: {last['where']}"
    if last["ev"] == "parquet":
        return f"{stage}: mid Parquet write of {last['table']} (timer)"
    if last["ev"] == "result":
        return f"{stage}: mid result write (timer)"
    if last["stage"] == "start":
        return "start-up (loop started, before its first stage)"
    return f"{stage}, {(killed_at or last['t']) - entered:.1f} s into the stage (last event: {last['ev']})"


def payload_columns(con: Any, table: str) -> list[str]:
    cols = [r[0] for r in con.execute(f"DESCRIBE {table}_history").fetchall()]
    return [c for c in cols if c not in PROVENANCE and c not in VOLATILE.get(table, ())]


def table_figures(lake: Any) -> dict[str, dict[str, int]]:
    """Per table: history rows, distinct keys, keys with several rows, duplicate rows (same key and payload)."""
    from storage.schemas import KEYS

    con = lake.connect()
    out = {}
    for table, keys in KEYS.items():
        cols = ", ".join(payload_columns(con, table))
        k = ", ".join(keys)
        n, distinct = con.execute(f"SELECT count(*), count(DISTINCT ({k})) FROM {table}_history").fetchone()
        multi = con.execute(
            f"SELECT count(*) FROM (SELECT {k} FROM {table}_history GROUP BY ALL HAVING count(*) > 1)"
        ).fetchone()[0]
        dupes = con.execute(
            f"SELECT coalesce(sum(c - 1), 0) FROM (SELECT count(*) c FROM {table}_history GROUP BY {cols} HAVING c > 1)"
        ).fetchone()[0]
        out[table] = {"rows": n, "keys": distinct, "keys_with_several_rows": multi, "duplicates": int(dupes)}
    con.close()
    return out


def file_figures(lake: Any) -> dict[str, Any]:
    """Committed Parquet files that do not read, stray temporary files, result files that do not load."""
    import pyarrow.parquet as pq
    from prefect.results import ResultRecord

    root = Path(lake.root)
    bad_parquet = []
    for f in root.glob("*/*/*.parquet"):
        try:
            pq.read_table(f)
        except Exception as exc:
            bad_parquet.append(f"{f.relative_to(root)}: {exc}")
    tmp = [str(f.relative_to(root)) for f in root.rglob("*.tmp")]
    bad_results = []
    results = sorted((root / "results").glob("*")) if (root / "results").exists() else []
    for f in results:
        try:
            ResultRecord.deserialize(f.read_bytes())
        except Exception as exc:
            bad_results.append(f"{f.name[:16]}: {type(exc).__name__}")
    return {
        "parquet_files": len(list(root.glob("*/*/*.parquet"))),
        "unreadable_parquet": bad_parquet,
        "stray_tmp": tmp,
        "result_files": len(results),
        "unloadable_results": bad_results,
    }


def recomputed(events: list[dict[str, Any]]) -> tuple[int, int, list[str]]:
    """(result writes, distinct results, results written completely by one run and written again by a later one)."""
    done: dict[str, list[int]] = defaultdict(list)
    writes = 0
    for e in events:
        if e["ev"] == "result":
            writes += 1
        if e["ev"] == "result-done":
            done[e["key"]].append(e["attempt"])
    again = [f"{key[:16]} (runs {attempts})" for key, attempts in done.items() if len(set(attempts)) > 1]
    return writes, len(done), again


def cache_hits(log: Path) -> int:
    return log.read_text(errors="replace").count("Cached(type=COMPLETED)") if log.exists() else 0


def _same_value(a: Any, b: Any) -> bool:
    """Equal, floats to 1e-12 relative: an aggregate (a MAPE over candidates) sums its rows in file order, and a
    killed run's lake holds more files than the uninterrupted run's, so the last digit may differ."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15) or (math.isnan(a) and math.isnan(b))
    return a == b


def iteration_rows(lake: Any) -> list[dict[str, Any]]:
    skip = {*PROVENANCE, *VOLATILE["iterations"]}
    rows = lake.query("SELECT * FROM iterations ORDER BY iteration, target").to_pylist()
    return [{k: v for k, v in r.items() if k not in skip} for r in rows]


def fresh_lake(path: Path) -> Any:
    from storage import Lake
    from storage.ingest import ingest

    shutil.rmtree(path, ignore_errors=True)
    lake = Lake(path)
    ingest(lake, "seed")
    return lake


def parent(args: argparse.Namespace) -> dict[str, Any]:
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with prefect_test_harness(server_startup_timeout=180):  # one server for every run; it outlives the kills
        os.environ["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
        ref_lake, chaos_lake = fresh_lake(out / "reference" / "lake"), fresh_lake(out / "chaos" / "lake")
        ref_events, chaos_events = out / "reference" / "events.jsonl", out / "chaos" / "events.jsonl"
        for f in (ref_events, chaos_events):
            f.unlink(missing_ok=True)

        print(f"reference: uninterrupted run on {ref_lake.url}", flush=True)
        t0 = time.time()
        proc, fh = spawn(args, Path(ref_lake.root), ref_events, 0, None, out / "reference" / "run.log")
        rc = proc.wait()
        fh.close()
        if rc != 0:
            raise RuntimeError(f"the reference run failed (exit {rc}); see {out / 'reference' / 'run.log'}")
        ref_seconds = time.time() - t0
        tl = timeline(read_events(ref_events))
        print(f"reference finished in {ref_seconds:.0f} s; per stage (s, Parquet writes, result writes):")
        for (it, stage), v in sorted(tl.items(), key=lambda kv: (kv[0][0], STAGES.index(kv[0][1]))):
            print(f"  iteration {it} {stage:<8} {v['s']:7.1f} s  {v['parquet']:3d}  {v['result']:3d}")

        plan = make_plan(args.kills, args.seed, tl)
        print(f"\nchaos: {len(plan)} planned kills (seed {args.seed}) on {chaos_lake.url}", flush=True)
        kills: list[dict[str, Any]] = []
        attempt = 0
        for item in plan:
            attempt += 1
            log = out / "chaos" / f"run-{attempt:02d}.log"
            rc, seconds, sent = run_to_kill(args, Path(chaos_lake.root), chaos_events, attempt, item, log)
            killed = rc == -signal.SIGKILL
            where = landing(read_events(chaos_events), attempt, sent) if killed else f"not killed: exit {rc}"
            kills.append(
                {"attempt": attempt, "plan": item, "killed": killed, "by": "self" if sent is None else "parent"}
            )
            kills[-1] |= {"landed": where, "seconds": round(seconds, 1), "cache_hits": cache_hits(log)}
            desc = _plan_text(item)
            print(f"  kill {attempt:2d} [{desc}] after {seconds:5.1f} s -> {where}", flush=True)
            if rc == 0:
                print("  the loop finished before this kill: the remaining kills have nothing left to hit")
                break
            if not killed:
                raise RuntimeError(f"attempt {attempt} failed without a kill (exit {rc}); see {log}")
        attempt += 1
        log = out / "chaos" / f"run-{attempt:02d}.log"
        t0 = time.time()
        proc, fh = spawn(args, Path(chaos_lake.root), chaos_events, attempt, None, log)
        rc = proc.wait()
        fh.close()
        final_seconds = time.time() - t0
        print(f"  final run {attempt}: exit {rc} after {final_seconds:.1f} s, {cache_hits(log)} cache hits")

        summary = check(args, ref_lake, chaos_lake, ref_events, chaos_events, kills, rc, out)
        summary |= {"reference_seconds": round(ref_seconds, 1), "total_seconds": round(time.time() - started, 1)}
    print(f"\ntotal {summary['total_seconds']:.0f} s (reference run {ref_seconds:.0f} s)")
    return summary


def _plan_text(item: dict[str, Any]) -> str:
    at = f"iteration {item['iteration']} {item['stage']}"
    if item["kind"] == "stage":
        return f"timer, {item['delay']:.1f} s into {at}"
    return f"{item['kind']} write #{item['k']} from {at}"


def check(
    args: argparse.Namespace,
    ref_lake: Any,
    chaos_lake: Any,
    ref_events: Path,
    chaos_events: Path,
    kills: list[dict[str, Any]],
    final_rc: int,
    out: Path,
) -> dict[str, Any]:
    """The checks, printed; returns them as a dict (``--json``)."""
    from storage.candidates import n_open

    landed = [k for k in kills if k["killed"]]
    windows = Counter()
    for k in landed:
        text = k["landed"]
        for stage in STAGES:
            if f" {stage}" in text.split(":")[0] or text.startswith(stage):
                windows[stage] += 1
        windows["Parquet write"] += "mid Parquet write" in text
        windows["result write"] += "mid result write" in text
        windows["start-up"] += text.startswith("start-up")
    print(
        f"\nkills that landed: {len(landed)} of {len(kills)} runs; by window: "
        + ", ".join(f"{w} {windows[w]}" for w in (*STAGES, "Parquet write", "result write", "start-up"))
    )
    logs = [(out / "chaos" / f"run-{k['attempt']:02d}.log").read_text(errors="replace") for k in kills]
    refused = sum("LakeLockedError" in text for text in logs)
    print(f"reruns refused by a stale loop lock: {refused}")

    n_ref = ref_lake.query("SELECT count(DISTINCT iteration) n FROM iterations").column("n")[0].as_py()
    n_chaos = chaos_lake.query("SELECT count(DISTINCT iteration) n FROM iterations").column("n")[0].as_py()
    print(f"iterations completed: {n_chaos} of {args.iterations} (reference {n_ref}); final run exit {final_rc}")

    ref_t, chaos_t = table_figures(ref_lake), table_figures(chaos_lake)
    print("\nrows in <table>_history (chaos / reference), keys with several rows, duplicate rows (same key + payload)")
    print(f"  {'table':<12} {'rows':>13} {'keys':>13} {'multi-row keys':>15} {'duplicates':>11}")
    for table, c in chaos_t.items():
        r = ref_t[table]
        print(
            f"  {table:<12} {c['rows']:>6} / {r['rows']:<6} {c['keys']:>6} / {r['keys']:<6} "
            f"{c['keys_with_several_rows']:>6} / {r['keys_with_several_rows']:<6} "
            f"{c['duplicates']:>4} / {r['duplicates']}"
        )
    files = file_figures(chaos_lake)
    print(
        f"\nfiles: {files['parquet_files']} committed Parquet files, {len(files['unreadable_parquet'])} unreadable; "
        f"{len(files['stray_tmp'])} stray temporary files (never read by a view); "
        f"{files['result_files']} result files, {len(files['unloadable_results'])} that do not load"
    )
    for line in files["unreadable_parquet"] + files["stray_tmp"][:10] + files["unloadable_results"]:
        print(f"  {line}")
    open_candidates = n_open(chaos_lake)
    ref_open = n_open(ref_lake)
    n_cand = chaos_lake.counts()["candidates"]
    print(f"candidates without a terminal status: {open_candidates} of {n_cand} (reference {ref_open})")

    ref_writes, ref_distinct, _ = recomputed(read_events(ref_events))
    writes, distinct, again = recomputed(read_events(chaos_events))
    hits = sum(k["cache_hits"] for k in kills) + cache_hits(out / "chaos" / f"run-{len(kills) + 1:02d}.log")
    print(
        f"cached task results: reference wrote {ref_writes} ({ref_distinct} distinct); the chaos runs began "
        f"{writes} writes, {distinct} distinct results completed; finished tasks recomputed after a resume "
        f"(a complete result written again by a later run): {len(again)}; cache hits logged: {hits}"
    )
    for line in again:
        print(f"  recomputed: {line}")

    ref_rows, chaos_rows = iteration_rows(ref_lake), iteration_rows(chaos_lake)
    diffs = []
    for r, c in zip(ref_rows, chaos_rows, strict=False):
        diffs += [
            f"iteration {r['iteration']} target {r['target']:g} {k}: {r[k]!r} vs {c.get(k)!r}"
            for k in r
            if not _same_value(r[k], c.get(k))
        ]
    same = len(ref_rows) == len(chaos_rows) and not diffs
    print(
        f"final iteration rows equal to the uninterrupted run's (times, run ids aside): {same} "
        f"({len(chaos_rows)} rows vs {len(ref_rows)})"
    )
    for line in diffs[:20]:
        print(f"  differs: {line}")
    return {
        "kills": kills,
        "kills_landed": len(landed),
        "windows": dict(windows),
        "stale_lock_refusals": refused,
        "iterations_completed": n_chaos,
        "iterations_expected": args.iterations,
        "final_exit": final_rc,
        "tables": chaos_t,
        "reference_tables": ref_t,
        "duplicates": sum(t["duplicates"] for t in chaos_t.values()),
        "files": files,
        "candidates_open": open_candidates,
        "recomputed": len(again),
        "cache_hits": hits,
        "final_rows_equal": same,
        "differences": diffs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="kill plan and loop seed")
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--targets", type=float, nargs="+", default=[250.0, 350.0])
    parser.add_argument("--kept", type=int, default=3, help="candidates kept per target")
    parser.add_argument("--ratio", type=int, default=4, help="samples per kept candidate")
    parser.add_argument("--run-timeout", type=float, default=1800.0, help="seconds one run may take")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "chaos")
    parser.add_argument("--json", type=Path, help="write the checks as JSON here")
    # the child's side
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lake", help=argparse.SUPPRESS)
    parser.add_argument("--events", help=argparse.SUPPRESS)
    parser.add_argument("--attempt", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.kills < 1:
        parser.error("--kills must be at least 1")
    summary = parent(args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
