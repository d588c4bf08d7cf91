"""Whole synthesis runs on 200 clean rows with the real tiny teacher: two uninterrupted runs
agree (B1), a driver SIGKILLed mid-run and rerun ends where the uninterrupted run did (F7),
a teacher actor whose process dies mid-run costs at most its batch in flight (F1), and a
worker node removed mid-run from a two-node cluster costs only its rows in flight (F6).

The teacher is the fault engine in front of the real engine, injecting nothing but a request
log (which rows an engine computed, and how often), except where F1 kills the actor. Every run
resolves the same config but for its name, so every run's outputs can be compared row by row.
The 40-row killed-and-resumed run of tests/e2e/test_synthesize.py guards F7 in every test run;
this module is the measured case (``-m extended``, about 6 minutes on 2 cores)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from casseat_ray.config import to_yaml
from casseat_ray.parts import PART_GLOB
from casseat_ray.synth import pipeline
from casseat_ray.synth.stages import stage_specs
from tests.conftest import ROOT, casseat_cmd, ray_cluster
from tests.reliability.conftest import fault_config, tagged_item, tagged_source

pytestmark = [pytest.mark.slow, pytest.mark.extended]
N = 200


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, list[dict]]:
    from casseat_ray.demo_data import make_demo_data

    tmp = tmp_path_factory.mktemp("clean")
    made = make_demo_data(tmp / "made", n=N, seed=3)
    return tagged_source(tmp, pq.read_table(made).to_pylist(), pq.read_schema(made))


def config(tmp: Path, tiny_models, source: Path, name: str, markers: Path, *extra: str, **faults):
    markers.mkdir(parents=True, exist_ok=True)
    return fault_config(tmp, tiny_models, source, name, {"log_requests": True, "marker_dir": str(markers), **faults}, *extra)


def outputs(run: Path) -> tuple[list[dict], list[dict]]:
    """The SFT set and the rejects, every column, sorted."""
    sft = sorted(pq.read_table(run / "sft").to_pylist(), key=lambda r: r["id"])
    rejects = sorted(pq.read_table(run / "rejects.parquet").to_pylist(), key=lambda r: (r["sample_id"], r["reject_stage"]))
    return sft, rejects


def requests(markers: Path) -> Counter:
    """C1 requests per row (its tag's number), over every engine that logged."""
    seen = Counter()
    for log in markers.glob("requests-*.log"):
        seen.update(i for i in map(tagged_item, log.read_text().splitlines()) if i is not None)
    return seen


def part_column(run: Path, column: str = "sample_id") -> list:
    """``column`` of every row of the run's parts, duplicates included (a part a kill caught
    mid-write is still its temporary file, not a part)."""
    return [v for f in sorted((run / "work" / "parts").glob(PART_GLOB)) for v in pq.read_table(f, columns=[column])[column].to_pylist()]


def as_in_reference(run: Path, reference: dict) -> bool:
    """The run's SFT set and rejects equal the uninterrupted run's rows of the same questions."""
    sft, rejects = outputs(run)
    ref_sft, ref_rejects = reference["outputs"]
    mine = {r["sample_id"] for r in sft} | {r["sample_id"] for r in rejects}
    return sft == [r for r in ref_sft if r["sample_id"] in mine] and rejects == [r for r in ref_rejects if r["sample_id"] in mine]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models, clean, ray_session) -> dict:
    """The uninterrupted run of the 200 rows, in this process on the session's Ray."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = config(tmp, tiny_models, clean[0], "first", tmp / "markers")
    stats = pipeline.run(cfg, progress=False)
    return {"cfg": cfg, "stats": stats, "outputs": outputs(cfg.run_dir), "requests": requests(tmp / "markers")}


def test_b1_clean_rows_are_all_accounted_for_once_and_two_runs_agree(reference, tmp_path, tiny_models, clean, figures):
    first = reference["stats"]
    cfg = config(tmp_path, tiny_models, clean[0], "second", tmp_path / "markers")
    second = pipeline.run(cfg, progress=False)
    sft, rejects = reference["outputs"]
    labeled = first["stages"]["ddf_labeled"]
    ids = part_column(reference["cfg"].run_dir)
    figures.update(rows=N, accepted=labeled["out"], rejected=dict(labeled["rejected"]), rejected_total=len({r["sample_id"] for r in rejects}),
                   sft_samples=len(sft), duplicates=len(ids) - len(set(ids)), c1_requests=sum(reference["requests"].values()),
                   first_run_rows_per_s=round(first["rows_per_s"], 2), first_seconds=round(first["wall_seconds"], 1),
                   second_seconds=round(second["wall_seconds"], 1), identical=outputs(cfg.run_dir) == reference["outputs"])
    assert first["failed"] is None and first["stages"]["read"]["in"] == N
    assert labeled["in"] == N and labeled["out"] + sum(labeled["rejected"].values()) == N
    # every row is in the SFT set or the rejects, never both, never twice
    kept = {s["sample_id"] for s in sft}
    rejected = [r["sample_id"] for r in rejects]
    assert len(rejected) == len(set(rejected)) and not kept & set(rejected) and len(kept) + len(rejected) == N
    assert len(ids) == len(set(ids)) == N and sorted(reference["requests"]) == list(range(N))
    assert set(reference["requests"].values()) == {1}  # each row computed exactly once
    assert outputs(cfg.run_dir) == reference["outputs"]  # the second run gives the same outputs, every column


def test_f7_a_driver_killed_mid_run_is_rerun_to_the_uninterrupted_outputs(reference, tmp_path, tiny_models, clean, figures):
    cfg = config(tmp_path, tiny_models, clean[0], "killed", tmp_path / "markers")
    path = tmp_path / "killed.yaml"
    path.write_text(to_yaml(cfg))
    command = casseat_cmd("synthesize", "--config", str(path), "--no-progress")
    # the command's own local Ray imports the fault engine from this folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=out, start_new_session=True, env=env)
    parts = cfg.run_dir / "work" / "parts"
    deadline = time.time() + 600
    family: list[psutil.Process] = []
    try:
        while len(list(parts.glob(PART_GLOB))) < 5 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before it could be killed: {log.read_text()[-2000:]}"
        family = psutil.Process(proc.pid).children(recursive=True)  # the local Ray it started: GCS, raylet, workers, the teacher actor
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as `kill -9` does
        killed_at = time.time()
        proc.wait()
        _, outlived = psutil.wait_procs(family, timeout=60)
        gone_after = round(time.time() - killed_at, 1)
    finally:  # whatever is left, also when the test fails: its process group, and its processes in sessions of their own
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    done_before = len(part_column(cfg.run_dir))
    finished = {tagged_item(q) for q in part_column(cfg.run_dir, "question")}
    computed_before = requests(tmp_path / "markers")
    assert not (cfg.run_dir / "stats.json").exists() and 0 < done_before < N

    t0 = time.time()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)  # the same command
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    stats = json.loads((cfg.run_dir / "stats.json").read_text())
    computed = requests(tmp_path / "markers")
    ids = part_column(cfg.run_dir)
    figures.update(rows=N, processes_at_kill=len(family), processes_left_after_kill=len(outlived), seconds_until_all_gone=gone_after,
                   rows_in_parts_at_kill=done_before, rows_requested_before_kill=len(computed_before),
                   rerun_processed=stats["rows_processed"], rerun_resumed=stats["rows_resumed"],
                   rows_recomputed=sum(1 for n in computed.values() if n > 1), duplicates=len(ids) - len(set(ids)),
                   rerun_seconds=round(time.time() - t0, 1), equal_to_uninterrupted=outputs(cfg.run_dir) == reference["outputs"])
    assert not outlived, f"{len(outlived)} processes outlived the killed driver by {gone_after}s: {[p.pid for p in outlived]}"
    assert stats["rows_resumed"] == done_before and stats["rows_processed"] == N - done_before  # only the unfinished rows
    assert len(ids) == len(set(ids)) == N
    # a row is computed again only if the kill caught it in flight: a row in a part is never redone
    again = {i for i, n in computed.items() if n > 1}
    assert not again & finished and len(again) <= len(computed_before) - done_before
    assert outputs(cfg.run_dir) == reference["outputs"]


def test_f1_a_teacher_actor_dying_mid_run_costs_at_most_its_batch_in_flight(reference, tmp_path, tiny_models, clean, figures):
    markers = tmp_path / "markers"
    # two actors; each engine works on 4 rows at a time (max_in_flight 4) from the batches of 4
    # its actor holds (one in the engine, one queued: no bubble between them). A dying actor
    # loses the rows of the batches it held. It dies after 24 answers: about three batches.
    cfg = config(tmp_path, tiny_models, clean[0], "actor-dies", markers, "sources.0.max_samples=64", "teacher.concurrency=2",
                 "teacher.num_cpus=0.5", "ddf_labeled.num_cpus=0.25", "teacher.engine.max_in_flight=4", exit_after=24)
    t0 = time.time()
    stats = pipeline.run(cfg, progress=False)
    seconds = time.time() - t0
    died = [m.stat().st_mtime for m in markers.glob("exit-*")]
    starts = sorted(m.stat().st_mtime for m in markers.glob("start-*"))
    computed = requests(markers)
    ids = part_column(cfg.run_dir)
    again = sorted(i for i, n in computed.items() if n > 1)
    recovery = round(min(t for t in starts if t > died[0]) - died[0], 1) if died and any(t > died[0] for t in starts) else None
    labeled = stats["stages"]["ddf_labeled"]
    held = next(s for s in stage_specs(cfg) if s.name == "teacher")
    figures.update(rows=64, actors=2, crashes=len(died), engines_built=len(starts), rows_recomputed=len(again), batch_size=4,
                   batches_held_per_actor=held.in_flight_batches,
                   recovery_seconds=recovery, seconds=round(seconds, 1), duplicates=len(ids) - len(set(ids)),
                   accepted=labeled["out"], rejected=sum(labeled["rejected"].values()))
    assert len(died) == 1 and len(starts) == 3  # one actor process died; Ray built one replacement
    assert stats["failed"] is None and labeled["in"] == 64 and labeled["out"] + sum(labeled["rejected"].values()) == 64
    assert len(ids) == len(set(ids)) == 64 and sorted(computed) == list(range(64))
    assert len(again) <= held.in_flight_batches * held.batch_size  # re-work: at most the batches the actor held
    assert as_in_reference(cfg.run_dir, reference)  # and the rows came out as in the uninterrupted run


def test_f6_a_worker_node_removed_mid_run_costs_its_rows_in_flight_and_the_run_completes(reference, tmp_path, tiny_models, clean,
                                                                                        monkeypatch, figures):
    """Two Ray nodes (``ray_cluster``): a head of 3 CPUs and a worker of
    2; each teacher actor needs 1.5, so Ray Data's SPREAD puts one on each node, and the head
    has room for the second after the worker is gone. The worker node is removed (its raylet
    and every process on it killed, no drain) once its engine has answered 8 requests."""
    markers = tmp_path / "markers"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # the cluster's workers import the fault engine from this folder (they inherit this environment)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = None
    with ray_cluster(3, 2) as (cluster, (worker,)):
        try:
            cfg = config(tmp_path, tiny_models, clean[0], "node-lost", markers, "sources.0.max_samples=64", "teacher.concurrency=2",
                         "teacher.num_cpus=1.5", "ddf_labeled.num_cpus=0.25", "teacher.engine.max_in_flight=4",
                         f"ray.address={cluster.address}")
            path = tmp_path / "node-lost.yaml"
            path.write_text(to_yaml(cfg))
            log = tmp_path / "node-lost.log"
            t0 = time.time()
            with log.open("w") as out:
                proc = subprocess.Popen(casseat_cmd("synthesize", "--config", str(path), "--no-progress"), stdout=out, stderr=out,
                                        start_new_session=True)
            deadline, on_worker = time.time() + 600, None
            while time.time() < deadline and proc.poll() is None:
                if on_worker is None:
                    on_worker = next((a["Pid"] for a in cluster.global_state.actor_table(None).values()
                                      if "EngineStage" in a["ActorClassName"] and a["State"] == "ALIVE"
                                      and a["Address"]["NodeID"] == worker.node_id), None)
                answered = markers / f"requests-{on_worker}.log"
                if on_worker is not None and answered.exists() and len(answered.read_text().splitlines()) >= 8:
                    break
                time.sleep(0.2)
            assert proc.poll() is None and on_worker is not None, f"no teacher actor answered on the worker node: {log.read_text()[-2000:]}"
            in_parts_at_removal = len(part_column(cfg.run_dir))
            cluster.remove_node(worker, allow_graceful=False)
            removed_at = time.time()
            code = proc.wait(timeout=900)
            seconds = time.time() - t0
            assert code == 0, log.read_text()[-3000:]
            engines = [a for a in cluster.global_state.actor_table(None).values() if "EngineStage" in a["ActorClassName"]]
        finally:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    stats = json.loads((cfg.run_dir / "stats.json").read_text())
    starts = sorted(m.stat().st_mtime for m in markers.glob("start-*"))
    computed = requests(markers)
    ids = part_column(cfg.run_dir)
    again = sorted(i for i, n in computed.items() if n > 1)
    labeled = stats["stages"]["ddf_labeled"]
    held = next(s for s in stage_specs(cfg) if s.name == "teacher")
    later = [t for t in starts if t > removed_at]
    figures.update(rows=64, nodes=2, actors=2, rows_in_parts_at_removal=in_parts_at_removal, engines_built=len(starts),
                   engine_actors=len(engines), rows_recomputed=len(again),
                   recovery_seconds=round(later[0] - removed_at, 1) if later else None, seconds=round(seconds, 1),
                   duplicates=len(ids) - len(set(ids)), accepted=labeled["out"], rejected=sum(labeled["rejected"].values()))
    assert stats["failed"] is None and labeled["in"] == 64 and labeled["out"] + sum(labeled["rejected"].values()) == 64
    assert len(ids) == len(set(ids)) == 64 and sorted(computed) == list(range(64))  # every row once, none lost
    assert len(starts) == 3  # the lost actor restarted once, on the head
    assert len(again) <= held.in_flight_batches * held.batch_size  # re-work: the batches the lost actor held
    assert as_in_reference(cfg.run_dir, reference)
