"""Outputs on local disk or behind a URI: the storage helpers against an S3-compatible server
on loopback, config paths that stay URIs, and the refusal of relative outputs inside a job."""

from __future__ import annotations

from pathlib import Path

import pytest

from casseat_ray import storage
from casseat_ray.config import Config
from casseat_ray.runtime import job_output_problems


def test_join_keeps_the_query_at_the_end():
    assert storage.join("s3://b/runs?endpoint_override=h:1&scheme=http", "name", "train") == "s3://b/runs/name/train?endpoint_override=h:1&scheme=http"
    assert storage.join("/data/runs/", "name") == "/data/runs/name"


def test_uri_outputs_stay_uris_and_stage_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("CASSEAT_STAGING_DIR", str(tmp_path / "staging"))
    cfg = Config.model_validate({"name": "r", "output_dir": "s3://bucket/runs", "ray": {"storage_path": "s3://bucket/ckpt"}})
    assert cfg.output_dir == "s3://bucket/runs" and cfg.ray.storage_path == "s3://bucket/ckpt"  # not a folder 's3:/bucket'
    assert cfg.run_uri == "s3://bucket/runs/r"
    assert cfg.run_dir.parent.parent == tmp_path / "staging" and cfg.run_dir.name == "r"
    local = Config.model_validate({"name": "r", "output_dir": str(tmp_path)})
    assert local.run_uri is None and local.run_dir == tmp_path / "r"


def test_mirror_pulls_pushes_and_deletes_what_the_step_removed(s3_server, tmp_path):
    remote = s3_server["uri"]("runs/mirror")
    local = tmp_path / "stage"
    (local / "work").mkdir(parents=True)
    (local / "work" / "part-1.parquet").write_bytes(b"one")
    (local / "stats.json").write_text("{}")
    with storage.mirrored(local, remote) as m:
        m.push()  # a finished step goes out at once
        assert sorted(storage.list_names(remote)) == ["part-1.parquet", "stats.json", "work"]
        (local / "work" / "part-1.parquet").unlink()  # e.g. --fresh discarded it
        (local / "work" / "part-2.parquet").write_bytes(b"two")
    assert sorted(storage.list_names(remote)) == ["part-2.parquet", "stats.json", "work"]
    elsewhere = tmp_path / "other-machine"
    with storage.mirrored(elsewhere, remote):  # a rerun anywhere starts from what is there
        assert (elsewhere / "work" / "part-2.parquet").read_bytes() == b"two"
        with storage.mirrored(elsewhere, remote):  # nested (casseat run around a step): no second pull
            (elsewhere / "late.txt").write_text("x")
        assert (elsewhere / "late.txt").is_file()
    storage.delete(remote)
    assert not storage.exists(remote) and storage.list_names(remote) == []


def test_a_job_refuses_relative_outputs_and_says_where_they_would_go(monkeypatch, tmp_path):
    cfg = Config.model_validate({"output_dir": "out/runs", "ray": {"storage_path": "out/ray"}})
    assert job_output_problems(cfg) == []  # not in a job: relative is fine
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.chdir(tmp_path)
    problems = job_output_problems(cfg)
    assert len(problems) == 2
    assert problems[0].startswith("output_dir: 'out/runs' is relative") and str(tmp_path / "out" / "runs") in problems[0]
    assert "ray.storage_path" in problems[1] and "s3://" in problems[1]
    shared = Config.model_validate({"output_dir": "s3://bucket/runs", "ray": {"storage_path": str(tmp_path / "ckpt")}})
    assert job_output_problems(shared) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, the device every write to fails with ENOSPC")
def test_a_full_disk_is_recognised_from_python_pyarrow_and_wrapped_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    full = tmp_path / "out.parquet"
    full.symlink_to("/dev/full")  # through a link: pyarrow removes the file a failed write leaves
    with pytest.raises(OSError) as python_error:
        full.write_text("x" * 100_000)
    with pytest.raises(OSError) as arrow_error:
        pq.write_table(pa.table({"x": list(range(100_000))}), str(full))
    assert Path("/dev/full").exists()
    assert storage.disk_full(python_error.value) and storage.disk_full(arrow_error.value)
    try:  # a step that re-raises it as something else still counts
        try:
            raise arrow_error.value
        except OSError as e:
            raise RuntimeError("writing part failed") from e
    except RuntimeError as wrapped:
        assert storage.disk_full(wrapped)
    assert not storage.disk_full(FileNotFoundError(2, "No such file or directory", "x")) and not storage.disk_full(None)
