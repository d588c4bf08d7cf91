"""`casseat synthesize` as a user runs it: two teacher actors on demo + real MATH-V data, and a
run killed mid-way that resumes to the same SFT set."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, casseat_cmd, ray_cluster, shared_data
from tests.e2e.test_cli import casseat

pytestmark = pytest.mark.slow
CONFIG = ROOT / "jobs" / "configs" / "tiny-cpu.yaml"


def _overrides(tmp: Path, tiny_models, demo_parquet, name: str, *extra: str) -> list[str]:
    mathv = shared_data("math-v", "testmini.jsonl")
    sources = (f"sources=[{{name: demo, format: canonical, path: {demo_parquet}, license: generated}}, "
               f"{{name: mathv, format: mathv, path: {mathv}, max_samples: 16, license: MIT}}]")
    return [sources, f"name={name}", f"output_dir={tmp}", f"teacher.model={tiny_models['teacher']}",
            f"student.model={tiny_models['student']}", f"ray.storage_path={tmp / 'ray'}", "teacher.batch_size=8", *extra]


def _sft(run: Path) -> dict:
    return {r["id"]: (r["messages"], r["images"], r["kind"]) for r in pq.read_table(run / "sft").to_pylist()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_models, demo_parquet):
    tmp = tmp_path_factory.mktemp("synth")
    args = _overrides(tmp, tiny_models, demo_parquet, "full", "teacher.concurrency=2", "teacher.num_cpus=0.5", "ddf_labeled.num_cpus=0.25")
    r = casseat("synthesize", "--config", str(CONFIG), *args, "--no-progress", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, args, r


def test_bad_inputs_stop_before_any_work(tmp_path, tiny_models, demo_parquet):
    args = _overrides(tmp_path, tiny_models, demo_parquet, "bad", f"teacher.model={tmp_path / 'nope'}")
    r = casseat("synthesize", "--config", str(CONFIG), *args)
    assert r.returncode == 2 and "teacher.model: model directory not found" in r.stderr
    assert not (tmp_path / "bad").exists()
    r = casseat("synthesize", "--config", str(CONFIG), *args[:-1], "synthesis.mode=debate")
    assert r.returncode == 2 and "synthesis.mode" in r.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, the device every write to fails with ENOSPC")
def test_a_full_disk_says_what_failed_and_that_a_rerun_resumes(tmp_path, tiny_models, demo_parquet):
    # the run's first write (config.yaml, through its temporary name) lands on a full device
    args = _overrides(tmp_path, tiny_models, demo_parquet, "full-disk")
    (tmp_path / "full-disk").mkdir()
    (tmp_path / "full-disk" / "config.yaml.tmp").symlink_to("/dev/full")
    r = casseat("synthesize", "--config", str(CONFIG), *args, "--no-progress")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "error: no space left on device ([Errno 28] No space left on device: " in r.stderr and "config.yaml.tmp" in r.stderr
    assert "free some space and rerun the same command to resume" in r.stderr and "Traceback" not in r.stderr


def test_two_actor_run_writes_a_consistent_dataset(full_run):
    tmp, _, r = full_run
    run = tmp / "full"
    stats = json.loads((run / "stats.json").read_text())
    stages = stats["stages"]
    assert stages["read"]["in"] == 24 + 16
    previous = None
    for name, st in stages.items():
        if name == "mix":
            continue
        assert st["in"] == st["out"] + sum(st["rejected"].values()), name  # conservation per stage
        if previous is not None:
            assert st["in"] == previous, name
        previous = st["out"]
    kept = stages["ddf_labeled"]["out"]
    assert 0 < kept < 40 and stages["ddf_labeled"]["rejected"]
    sft = pq.read_table(run / "sft").to_pylist()
    kinds = [s["kind"] for s in sft]
    # 1:1 per kept question: every question with a CoT sample also gives its self-evaluation
    # sample, and no Refine sample is dropped
    by_question = {}
    for x in sft:
        by_question.setdefault(x["sample_id"], set()).add(x["kind"])
    assert all("self_eval" in k for k in by_question.values()) and len(by_question) == kept
    verdicts = stats["self_eval_verdicts"]
    assert verdicts["after_mix"] == verdicts["before_mix"] and sum(verdicts["after_mix"].values()) == kinds.count("self_eval")
    assert all(s["images"][0] and s["messages"][0]["content"].startswith("<image>") for s in sft)
    rejects = pq.read_table(run / "rejects.parquet")
    from casseat_ray.rows import REJECT_SCHEMA

    assert rejects.schema.equals(REJECT_SCHEMA)  # one reject schema: the same as `data inspect --rejects`
    assert rejects.num_rows == 40 - kept
    # every sample and every reject names the source's own item: the demo's ids and MATH-V's
    mathv_ids = {json.loads(line)["id"] for line in shared_data("math-v", "testmini.jsonl").open()}
    for x in sft + rejects.to_pylist():
        assert x["source_id"] in mathv_ids if x["source"] == "mathv" else x["source_id"].startswith("demo-0-"), x
    parts = pq.read_table(run / "work" / "parts")
    assert parts.num_rows == 40 and len(set(parts["sample_id"].to_pylist())) == 40
    assert "mathv" in set(parts["source"].to_pylist()) and all(t for t in parts["c1_texts"].to_pylist())
    assert stats["teacher"]["rows"] == 40 and stats["teacher"]["tokens_out"] > 0 and stats["rows_per_s"] > 0
    card = (run / "README.md").read_text()
    assert "| mathv | mathv |" in card and "MIT" in card and "ddf_labeled" in card
    assert f"in the SFT set: Accept {verdicts['after_mix']['accept']}, Refine {verdicts['after_mix']['refine']}" in card
    assert (run / "funnel.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "export" / "llamafactory" / "dataset_info.json").read_text())
    assert len((run / "export" / "swift" / "train.jsonl").read_text().splitlines()) == len(sft)
    assert "SFT set:" in r.stdout and "ddf_labeled" in r.stdout


def test_killed_run_resumes_to_the_same_sft_set(full_run, tiny_models, demo_parquet):
    tmp, _, _ = full_run
    # one row on the engine at a time: the 5 parts come about a second apart, so the kill lands
    # between the first and the last (with every row in flight at once, all parts and the
    # published outputs can come within a fraction of a second)
    args = _overrides(tmp, tiny_models, demo_parquet, "resumed", "teacher.engine.max_in_flight=1")
    proc = subprocess.Popen(casseat_cmd("synthesize", "--config", str(CONFIG), *args, "--no-progress"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    parts = tmp / "resumed" / "work" / "parts"
    deadline = time.time() + 600
    while not list(parts.glob("part-*.parquet")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    family = psutil.Process(proc.pid).children(recursive=True)  # the local Ray it started, its engine
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as `kill -9` does
    proc.wait()
    try:  # the run's processes end with it (Ray's own agents would outlive it by a minute)
        gone, alive = psutil.wait_procs(family, timeout=20)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    first = {f.name for f in parts.glob("part-*.parquet")}
    assert first and not (tmp / "resumed" / "stats.json").exists()
    r = casseat("synthesize", "--config", str(CONFIG), *args, "--no-progress", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((tmp / "resumed" / "stats.json").read_text())
    assert stats["rows_resumed"] >= 8 and stats["rows_resumed"] + stats["rows_processed"] == 40
    assert first <= {f.name for f in parts.glob("part-*.parquet")}  # earlier parts kept, not redone
    ids = pq.read_table(parts, columns=["sample_id"])["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 40  # no duplicates
    assert _sft(tmp / "resumed") == _sft(tmp / "full")


def test_a_rerun_with_another_mix_republishes_from_the_parts_and_writes_what_it_leaves_out(full_run):
    tmp, args, _ = full_run
    shutil.copytree(tmp / "full", tmp / "remix")
    # the mix is not part of the teacher's work: no row is redone, the outputs are rewritten
    r = casseat("synthesize", "--config", str(CONFIG), *args, "name=remix", "mix.self_eval_per_cot=0", "--no-progress", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp / "remix"
    stats = json.loads((run / "stats.json").read_text())
    assert stats["rows_processed"] == 0 and stats["rows_resumed"] == 40
    mix = stats["stages"]["mix"]
    left = mix["rejected"].get("over_ratio", 0)
    assert left > 0 and set(mix["rejected"]) == {"over_ratio"} and mix["in"] == mix["out"] + left
    sft = pq.read_table(run / "sft").to_pylist()
    assert len(sft) == mix["out"] and all(s["kind"] == "cot" or s["verdict"] == "Refine" for s in sft)
    written = [x for x in pq.read_table(run / "rejects.parquet").to_pylist() if x["reject_stage"] == "mix"]
    assert len(written) == left and {x["reject_reason"] for x in written} == {"over_ratio"}
    assert all(x["reject_detail"] == "self_eval sample left out by the mix" and x["source_id"] for x in written)
    assert {x["sample_id"] for x in written} <= {s["sample_id"] for s in sft if s["kind"] == "cot"}  # their CoT samples stay


def test_model_judge_runs_as_its_own_stage(tmp_path, tiny_models, demo_parquet):
    # SEAT mode on demo data: the teacher and the judge (the teacher's model, its own engine)
    # run as two actor pools on the 2-CPU local Ray
    args = [f"sources=[{{name: demo, format: canonical, path: {demo_parquet}}}]", "name=judged", f"output_dir={tmp_path}",
            f"teacher.model={tiny_models['teacher']}", f"student.model={tiny_models['student']}", f"ray.storage_path={tmp_path / 'ray'}",
            "teacher.batch_size=8", "teacher.num_cpus=0.5", "ddf_labeled.num_cpus=0.25", "synthesis.mode=seat",
            "ddf_labeled.judge.enabled=true", "ddf_labeled.judge.num_cpus=0.5", "ddf_labeled.judge.batch_size=4"]
    r = casseat("synthesize", "--config", str(CONFIG), *args, "--no-progress", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "judged"
    stages = json.loads((run / "stats.json").read_text())["stages"]
    assert list(stages)[-2:] == ["ddf_judge", "mix"]
    judge = stages["ddf_judge"]
    assert judge["in"] == stages["ddf_labeled"]["out"] > 0 and judge["in"] == judge["out"] + sum(judge["rejected"].values())
    assert set(judge["rejected"]) <= {"judge_unfaithful", "judge_no_verdict", "judge_error"}
    parts = pq.read_table(run / "work" / "parts").to_pylist()
    sent = [p for p in parts if p["judge_text"] is not None]
    assert len(sent) == judge["in"] and all(p["judge_verdict"] in ("faithful", "unfaithful") for p in sent)
    kept = {p["sample_id"] for p in sent if p["judge_verdict"] == "faithful"}
    assert len(kept) == judge["out"]
    assert {s["sample_id"] for s in pq.read_table(run / "sft").to_pylist()} <= kept
    assert "Model judge:" in (run / "README.md").read_text()


def test_two_node_cluster_places_a_teacher_on_each_node_and_writes_the_same_sft_set(full_run, tiny_models, demo_parquet,
                                                                                    monkeypatch, tmp_path):
    """Two Ray nodes (``ray_cluster``): an actor needs 1.5 of a node's 2
    CPUs, so the two teacher actors cannot share one; the SFT set equals the one-node run's."""
    tmp, _, _ = full_run
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with ray_cluster(2, 2) as (cluster, _):
        args = _overrides(tmp, tiny_models, demo_parquet, "two-nodes", "teacher.concurrency=2", "teacher.num_cpus=1.5",
                          "ddf_labeled.num_cpus=0.25", f"ray.address={cluster.address}")
        r = casseat("synthesize", "--config", str(CONFIG), *args, "--no-progress", timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        actors = [a for a in cluster.global_state.actor_table(None).values() if "EngineStage" in a["ActorClassName"]]
        nodes = {a["Address"]["NodeID"] for a in actors}
        assert len(actors) == 2 and len(nodes) == 2, actors
        assert nodes == {n["NodeID"] for n in cluster.global_state.node_table()}
    assert _sft(tmp / "two-nodes") == _sft(tmp / "full")
