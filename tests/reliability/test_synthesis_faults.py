"""Synthesis faults on real Ray Data and the real vLLM engine (tiny teacher), faults injected
by tests/reliability/fault_engine.py through the config every teacher actor receives."""

from __future__ import annotations

import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from casseat_ray.parts import read_parts
from casseat_ray.synth import pipeline
from casseat_ray.synth.outputs import RETRY_REASONS
from tests.reliability.conftest import fault_config

pytestmark = pytest.mark.slow
N = 8
TIMEOUT = 15  # seconds; a tiny-teacher request takes about one


def _config(tmp, tiny_models, demo_parquet, name: str, faults: dict, *extra: str):
    return fault_config(tmp, tiny_models, demo_parquet, name, faults, f"sources.0.max_samples={N}", *extra)


@pytest.mark.extended  # about 3 minutes; the timeout (test_vllm_engine) and the retry rule (test_synth_pipeline) run by default
def test_b9_a_hung_request_times_out_as_a_retryable_reject_and_a_rerun_retries_only_it(
        tmp_path, tiny_models, demo_parquet, demo_rows, ray_session, figures):
    counts = Counter(r["question"] for r in demo_rows[:N])
    hung = [r["question"] for r in demo_rows[:N] if counts[r["question"]] == 1][:2]
    assert len(hung) == 2
    (tmp_path / "markers").mkdir()
    cfg = _config(tmp_path, tiny_models, demo_parquet, "hang", {"hang_once": hung, "marker_dir": str(tmp_path / "markers")},
                  f"teacher.engine.request_timeout_s={TIMEOUT}", "synthesis.max_error_share=0.5")
    first = pipeline.run(cfg, progress=False)
    rejects = pq.read_table(cfg.run_dir / "rejects.parquet").to_pylist()
    timed_out = [r for r in rejects if r["reject_reason"] == "engine_error"]
    figures.update(rows=N, hung=len(hung), timeout_s=TIMEOUT, first_run_retryable=first["rows_retryable"],
                   first_run_failed=first["failed"], first_run_seconds=first["wall_seconds"])
    assert first["failed"] is None and first["rows_retryable"] == 2  # the job finished; the two rows wait for a retry
    assert sorted(r["question"] for r in timed_out) == sorted(hung)
    assert all(r["reject_stage"] == "ddf_labeled" and "C1: timeout: no reply within 15s" in r["reject_detail"] for r in timed_out)
    assert first["stages"]["ddf_labeled"]["in"] == N

    again = pipeline.run(cfg, progress=False)  # the same command: only the two rows run again
    rejects = pq.read_table(cfg.run_dir / "rejects.parquet").to_pylist()
    kept = [r for t in read_parts(cfg.run_dir / "work" / "parts", ["sample_id", "reject_reason"], retry=RETRY_REASONS) for r in t.to_pylist()]
    raw = pq.read_table(cfg.run_dir / "work" / "parts", columns=["sample_id"]).num_rows
    figures.update(rerun_processed=again["rows_processed"], rerun_resumed=again["rows_resumed"],
                   rerun_retryable=again["rows_retryable"], parts_rows=raw, final_rows=len(kept), rerun_seconds=again["wall_seconds"])
    assert again["rows_processed"] == 2 and again["rows_resumed"] == N - 2
    assert again["rows_retryable"] == 0 and not any(r["reject_reason"] in RETRY_REASONS for r in rejects)
    assert len(kept) == len({r["sample_id"] for r in kept}) == N and raw == N + 2  # each id once; the failed attempts superseded
    stage = again["stages"]["ddf_labeled"]
    assert stage["in"] == N and stage["out"] + sum(stage["rejected"].values()) == N and "engine_error" not in stage["rejected"]


@pytest.mark.extended
@pytest.mark.timeout(1200)  # the failure this guards against is a hang
def test_f3_the_engine_killed_inside_a_live_actor_is_replaced_and_the_run_completes(
        tmp_path, tiny_models, demo_parquet, demo_rows, ray_session, figures):
    victim = next(r["question"] for r in demo_rows[:N] if sum(x["question"] == r["question"] for x in demo_rows[:N]) == 1)
    markers = tmp_path / "markers"
    markers.mkdir()
    cfg = _config(tmp_path, tiny_models, demo_parquet, "die", {"die_once": [victim], "marker_dir": str(markers)})
    t0 = time.time()
    stats = pipeline.run(cfg, progress=False)
    starts = len(list(markers.glob("start-*")))
    raw = pq.read_table(cfg.run_dir / "work" / "parts", columns=["sample_id", "reject_reason"]).to_pylist()
    figures.update(rows=N, engine_starts=starts, killed=len(list(markers.glob("die-*"))), seconds=round(time.time() - t0, 1),
                   parts_rows=len(raw), rejected=dict(Counter(r["reject_reason"] for r in raw if r["reject_reason"])))
    assert len(list(markers.glob("die-*"))) == 1  # the engine was killed once, mid-run
    assert starts == 2  # the actor exited and Ray built one replacement: no retry storm against the dead engine
    assert stats["failed"] is None and stats["stages"]["ddf_labeled"]["in"] == N
    assert len(raw) == len({r["sample_id"] for r in raw}) == N  # every row once: the lost batch was redone, nothing twice
    assert not any(r["reject_reason"] in RETRY_REASONS for r in raw)  # the killed engine's rows were retried whole, not failed
