"""`ray job submit` for real: a local Ray head on loopback with its own temp dir and ports, the
README's submit line (working dir upload, jobs/runtime_env.yaml, jobs/run.py) on the tiny
config, outputs and checkpoints on an S3-compatible server on loopback. The head is stopped
by the process ids it started (everything under its temp dir), also when the test fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, S3_ENV, ray_head_on_loopback

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    staging = tmp_path_factory.mktemp("staging")
    env = {**os.environ, **S3_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "CASSEAT_STAGING_DIR": str(staging), "VLLM_LOGGING_LEVEL": "WARNING", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    with ray_head_on_loopback(env, dashboard=True) as head:
        yield {"address": head["dashboard"], "env": env}


def _submit(head: dict, sid: str, args: list[str], timeout: int = 1200) -> tuple[str, str]:
    """Submit the README's line; returns (final status, job logs)."""
    from ray.job_submission import JobSubmissionClient

    # The CLI quotes each argument into the entrypoint's shell line itself ('&' in a URI included).
    entry = ["python", "jobs/run.py", *args]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--submission-id", sid, "--working-dir", ".",
           "--runtime-env", "jobs/runtime_env.yaml", "--", *entry]
    subprocess.run(cmd, cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=timeout)
    client = JobSubmissionClient(head["address"])
    deadline = time.time() + 60
    status = str(client.get_job_status(sid))
    while not status.endswith(("SUCCEEDED", "FAILED", "STOPPED")) and time.time() < deadline:
        time.sleep(1)
        status = str(client.get_job_status(sid))
    return status.rsplit(".", 1)[-1], client.get_job_logs(sid)


def test_submitted_run_writes_everything_to_shared_storage(ray_head, s3_server, tiny_models, demo_parquet):
    from casseat_ray import storage

    runs, ckpt = s3_server["uri"]("runs"), s3_server["uri"]("ckpt")
    args = ["--config", "jobs/configs/tiny-cpu.yaml", "--no-progress", "name=job",
            f"sources.0.path={demo_parquet}", "sources.0.max_samples=6",
            f"teacher.model={tiny_models['teacher']}", f"student.model={tiny_models['student']}",
            f"evaluate.benchmarks.0.path={demo_parquet}", "evaluate.benchmarks.0.max_samples=6",
            "evaluate.modes=[cot, cascade]", "train.epochs=1", f"output_dir={runs}", f"ray.storage_path={ckpt}"]
    status, logs = _submit(ray_head, "casseat-job-run", args)
    assert status == "SUCCEEDED", logs[-4000:]
    run = storage.join(runs, "job")
    names = storage.list_names(run)
    for f in ("summary.json", "run.json", "stats.json", "funnel.png", "rejects.parquet", "adapter_model.safetensors",
              "metrics.jsonl", "items.parquet", "report.json", "accuracy.png"):
        assert f in names, f"{f} missing from {run}: {sorted(names)}"
    fs, path = storage.filesystem(storage.join(run, "summary.json"))
    with fs.open_input_stream(path) as fh:
        summary = json.loads(fh.read())
    assert summary["outputs"] == run and summary["questions"] == 6
    assert summary["funnel"]["read"]["in"] == 6 and set(summary["steps"]) == {"synthesize", "train", "evaluate"}
    assert summary["train"]["final_loss"] is not None and summary["train"]["steps"] >= 1
    assert set(summary["eval"]) == {"base", "tuned"} and all(set(m) == {"cot", "cascade"} for m in summary["eval"].values())
    assert all(c["n"] == 6 for m in summary["eval"].values() for c in m.values())
    assert any(n.startswith("checkpoint_") for n in storage.list_names(storage.join(ckpt, "job")))
    assert "[casseat run] evaluate: starting" in logs


def test_a_job_with_relative_outputs_is_refused_before_any_work(ray_head, tiny_models, demo_parquet):
    args = ["--config", "jobs/configs/tiny-cpu.yaml", f"sources.0.path={demo_parquet}", f"teacher.model={tiny_models['teacher']}",
            f"student.model={tiny_models['student']}", f"evaluate.benchmarks.0.path={demo_parquet}", "output_dir=out/runs",
            "ray.storage_path=/tmp/casseat-never-used"]
    t0 = time.time()
    status, logs = _submit(ray_head, "casseat-job-relative", args, timeout=300)
    assert status == "FAILED"
    assert "output_dir: 'out/runs' is relative; inside a Ray job it would resolve to" in logs
    assert "runtime_resources" in logs  # where it would have gone: the job's temporary copy
    assert "ray.storage_path: " not in logs  # the absolute one is fine
    assert time.time() - t0 < 120  # refused up front: no engine started
