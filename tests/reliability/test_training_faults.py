"""Training faults on real Ray Train with the tiny student: a killed run, a killed worker and a
torn checkpoint all end on the weights of the uninterrupted run; a worker failing every attempt
ends the run after max_failures + 1 attempts; bad samples and non-finite losses are counted."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from casseat_ray.config import to_yaml
from casseat_ray.train import run as train_run
from casseat_ray.train.run import read_metrics
from tests.conftest import casseat_cmd, make_sft, train_config
from tests.reliability.conftest import casseat

pytestmark = pytest.mark.slow
STEPS = 12  # 0.75 of an epoch of 32 samples at batch 2; checkpoints every 3 steps, the last 2 kept


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tiny_models, sft, ray_session):
    """The uninterrupted run each fault's outcome is compared with."""
    cfg = train_config(tmp_path_factory.mktemp("whole"), tiny_models, "whole", epochs=0.75)
    assert train_run.run(cfg, data=sft)["steps"] == STEPS
    return cfg


def _weights(cfg) -> dict:
    return load_file(str(train_run.train_dir(cfg) / "adapter" / "adapter_model.safetensors"))


def _difference(a, b) -> float:
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def _command(cfg, sft: Path, tmp: Path) -> list[str]:
    path = tmp / f"{cfg.name}.yaml"
    path.write_text(to_yaml(cfg))
    return casseat_cmd("train", "--config", str(path), "--data", str(sft))


def _checkpoints(storage: Path) -> list[Path]:
    """Ray Train's checkpoint folders, newest first (its snapshot file shares their prefix)."""
    return sorted((p for p in storage.glob("checkpoint_*") if p.is_dir()), reverse=True)


def _resumed_at(stdout: str) -> int:
    found = re.search(r"\[casseat train\] training: .*resuming at step (\d+)", stdout)
    assert found, stdout[-2000:]
    return int(found.group(1))


@pytest.mark.extended  # about 3 minutes; resuming from a checkpoint runs by default in F10
def test_f11_a_killed_training_run_resumes_to_the_same_weights(whole, tmp_path, tiny_models, sft, figures):
    # SIGKILL to the command's whole process group (driver, Ray, workers): harder than SIGTERM,
    # nothing gets to clean up. Killed once Ray Train has registered a checkpoint (its
    # snapshot names it); a folder still being copied is F12's case.
    cfg = train_config(tmp_path, tiny_models, "killed", epochs=0.75)
    cmd = _command(cfg, sft, tmp_path)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    storage = tmp_path / "ray" / "killed"
    snapshot = storage / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (snapshot.exists() and "checkpoint_dir_name" in snapshot.read_text()):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    figures.update(signal="SIGKILL", checkpoints_at_kill=len(_checkpoints(storage)))
    assert _checkpoints(storage) and not (train_run.train_dir(cfg) / "summary.json").exists()
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    figures["rerun_without_resume_exit"] = refused.returncode
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    t0 = time.time()
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = _resumed_at(resumed.stdout)
    worst = _difference(whole, cfg)
    steps = json.loads((train_run.train_dir(cfg) / "summary.json").read_text())["steps"]
    figures.update(resume_step=start, final_step=steps, weight_max_abs_diff=worst, resume_seconds=round(time.time() - t0, 1))
    assert start >= cfg.train.checkpoint_every and start % cfg.train.checkpoint_every == 0, start
    assert steps == STEPS
    assert worst < 1e-5, worst  # the stated tolerance: resumed weights match to 1e-5
    assert [r["step"] for r in read_metrics(train_run.train_dir(cfg) / "metrics.jsonl")] == list(range(1, STEPS + 1))
    # the workers' progress lines reach the user's console: the first step, every log_every-th, the last
    printed = [int(m) for m in re.findall(r"\[casseat train\] step=(\d+) ", resumed.stdout)]
    assert printed == sorted({start + 1, STEPS} | {s for s in range(start + 1, STEPS + 1) if s % cfg.train.log_every == 0}), printed


@pytest.mark.extended  # about 75 s; the torn-checkpoint rule is unit-tested, resuming runs by default in F10
def test_f12_a_torn_newest_checkpoint_falls_back_to_the_previous_one(whole, tmp_path, tiny_models, sft, figures):
    # The finished run's storage under another name, its newest checkpoint cut short as a
    # worker killed mid-copy (or a full disk) leaves it; then `casseat train --resume`.
    cfg = train_config(tmp_path, tiny_models, "torn", epochs=0.75)
    storage = Path(train_run.checkpoint_dir(cfg))
    shutil.copytree(train_run.checkpoint_dir(whole), storage)
    newest, previous = _checkpoints(storage)[:2]
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    previous_step = json.loads((previous / "state.json").read_text())["step"]
    resumed = subprocess.run(_command(cfg, sft, tmp_path) + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = _resumed_at(resumed.stdout)
    worst = _difference(whole, cfg)
    figures.update(torn=f"{newest.name}/trainable.safetensors cut to half", resume_step=start, expected_resume_step=previous_step,
                   weight_max_abs_diff=worst)
    assert f"[casseat train] checkpoint {newest.name} is incomplete: trainable.safetensors has" in resumed.stdout
    assert f"[casseat train] resuming from {previous.name} (step {previous_step})" in resumed.stdout
    assert start == previous_step == STEPS - 3
    assert [r["step"] for r in read_metrics(train_run.train_dir(cfg) / "metrics.jsonl")] == list(range(start + 1, STEPS + 1))
    assert worst < 1e-5, worst


def _records(metrics: Path) -> list[dict]:
    """Every metrics record as written, a resumed attempt's repeats included (``read_metrics``
    keeps the last per step)."""
    try:
        return [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    except FileNotFoundError:  # not written yet, or removed as a run starts over from step 0
        return []


def train_workers() -> set[int]:
    """Process ids of the Ray Train workers of this test session's Ray (its processes are this
    process's descendants; a worker's title names its actor class)."""
    found = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::RayTrainWorker"):
                found.add(p.pid)
        except psutil.Error:
            pass
    return found


class Watcher(threading.Thread):
    """Notes every training worker process that comes up; with ``kill_at``, SIGKILLs the worker
    (once) while it runs that step (metrics.jsonl has the step before it) and after Ray Train
    has registered a checkpoint (its snapshot names one), noting that checkpoint's step."""

    def __init__(self, storage: Path | None = None, metrics: Path | None = None, kill_at: int | None = None):
        super().__init__(daemon=True)
        self.storage, self.metrics, self.kill_at = storage, metrics, kill_at
        self.seen: set[int] = set()
        self.killed_at: float | None = None
        self.registered: int | None = None  # the newest registered checkpoint's step at the kill
        self.done = threading.Event()

    def _step(self) -> int:
        records = _records(self.metrics) if self.metrics else []
        return records[-1]["step"] if records else 0

    def _registered(self) -> int | None:
        try:
            latest = json.loads((self.storage / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
            return latest["metrics"]["step"] if latest else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def run(self):
        pids, looked = set(), 0.0
        while not self.done.is_set():
            if time.time() - looked > 0.5:  # walking the process tree is slow next to a tiny step
                pids, looked = train_workers(), time.time()
                self.seen |= pids
            if self.kill_at and self.killed_at is None and pids and self._step() >= self.kill_at - 1:
                registered = self._registered()
                if registered:
                    for pid in pids:
                        os.kill(pid, signal.SIGKILL)
                    self.killed_at, self.registered = time.time(), registered
            time.sleep(0.01)


def test_f10_a_training_worker_killed_mid_run_resumes_from_the_last_checkpoint(whole, tmp_path, tiny_models, sft, monkeypatch, figures):
    # Ray Train's controller learns of a reported checkpoint when it next polls the workers
    # (every 2 s by default: longer than this whole run); poll often so that one is registered
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")
    cfg = train_config(tmp_path, tiny_models, "f10", epochs=0.75, checkpoint_every=4, max_failures=1)
    metrics = train_run.train_dir(cfg) / "metrics.jsonl"
    watcher = Watcher(Path(train_run.checkpoint_dir(cfg)), metrics, kill_at=7)
    watcher.start()
    try:
        summary = train_run.run(cfg, data=sft)
    finally:
        watcher.done.set()
        watcher.join()
    records = _records(metrics)
    before = [r["step"] for r in records if r["time"] < watcher.killed_at]
    after = [r for r in records if r["time"] > watcher.killed_at]
    restart = after[0]["step"] - 1  # the step the second worker resumed from
    worst = _difference(whole, cfg)
    figures.update(killed_in_step=max(before) + 1, checkpoint_every=4, registered_checkpoint_step=watcher.registered, attempts=len(watcher.seen), resume_step=restart,
                   final_step=summary["steps"], steps_redone=max(before) - restart,
                   recovery_seconds=round(after[0]["time"] - watcher.killed_at, 1), weight_max_abs_diff=worst)
    assert watcher.killed_at is not None and len(watcher.seen) == 2  # killed once; Ray Train started one new worker
    assert max(before) >= 6 and restart == watcher.registered == 4 * (max(before) // 4), (before, restart, watcher.registered)
    assert max(before) - restart < 4  # re-work: less than the steps between checkpoints
    assert summary["steps"] == STEPS and [r["step"] for r in read_metrics(metrics)] == list(range(1, STEPS + 1))
    assert worst < 1e-5, worst


@pytest.mark.extended  # about 80 s; a worker group replaced after a failure runs by default in F10
def test_f13_a_worker_failing_every_attempt_ends_the_run_after_max_failures_plus_one(tmp_path, tiny_models, sft, ray_session, figures):
    # the student's weights cut short: every worker fails the same way as it loads them
    student = tmp_path / "student"
    shutil.copytree(tiny_models["student"], student)
    weights = student / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    cfg = train_config(tmp_path, {"student": student}, "f13", epochs=0.25, max_failures=1)
    watcher = Watcher()
    watcher.start()
    t0 = time.time()
    path = tmp_path / "f13.yaml"
    path.write_text(to_yaml(cfg))
    try:
        code, err = casseat("train", "--config", str(path), "--data", str(sft))  # the command, in this process
    finally:
        watcher.done.set()
        watcher.join()
    line = next((x for x in err.splitlines() if x.startswith("error: ")), "")
    figures.update(max_failures=1, attempts=len(watcher.seen), seconds=round(time.time() - t0, 1), exit_code=code, error=line[:200])
    assert len(watcher.seen) == 2  # max_failures + 1 worker groups, then no more
    assert code == 1 and line.startswith("error: training failed on worker 0, 2 time(s) in a row (train.max_failures=1): "), err[-2000:]
    assert "SafetensorError" in line or "deserializing" in line, err[-2000:]  # the worker's own error, on the one line


@pytest.mark.extended  # about 65 s
def test_b11_bad_samples_are_dropped_and_non_finite_steps_skipped_with_counters(tmp_path, tiny_models, ray_session, figures):
    from transformers import AutoProcessor

    from casseat_ray.train.collate import encode

    clean = pq.read_table(make_sft(tmp_path / "clean"))
    base = clean.to_pylist()
    long_row = dict(base[0], id=base[0]["id"] + "-long")
    long_row["messages"] = [dict(m, content=m["content"] + " and so on" * 1500) if m["role"] == "user" else m for m in base[0]["messages"]]
    no_labels = dict(base[1], id=base[1]["id"] + "-nolabels", messages=[m for m in base[1]["messages"] if m["role"] != "assistant"])
    malformed = dict(base[2], id=base[2]["id"] + "-twoimages")
    malformed["messages"] = [dict(m, content="<image>" + m["content"]) if m["role"] == "user" else m for m in base[2]["messages"]]
    data = tmp_path / "sft"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(base + [long_row, no_labels, malformed], schema=clean.schema),
                   data / "sft.parquet")
    # a student whose embedding of one rare token is NaN: every sample holding that token has a
    # non-finite loss (the embedding is frozen under LoRA, so it never spreads to other steps)
    student = tmp_path / "student"
    shutil.copytree(tiny_models["student"], student)
    processor = AutoProcessor.from_pretrained(student)
    held = Counter(t for r in base for t in set(encode(r, processor).input_ids))
    poisoned, token = min((n, t) for t, n in held.items())
    state = load_file(str(student / "model.safetensors"))
    (key,) = [k for k in state if k.endswith("embed_tokens.weight")]
    state[key][token] = float("nan")
    save_file(state, str(student / "model.safetensors"), metadata={"format": "pt"})
    cfg = train_config(tmp_path, {"student": student}, "b11", epochs=1)
    summary = train_run.run(cfg, data=data)
    records = read_metrics(train_run.train_dir(cfg) / "metrics.jsonl")
    skipped = [r["step"] for r in records if r["loss"] is None]
    adapter = load_file(str(train_run.train_dir(cfg) / "adapter" / "adapter_model.safetensors"))
    figures.update(samples_in=len(base) + 3, dropped_too_long=summary["dropped_too_long"], dropped_no_labels=summary["dropped_no_labels"],
                   dropped_malformed=summary["dropped_malformed"], samples_with_nan_token=poisoned, steps=summary["steps"],
                   skipped_nonfinite=summary["skipped_nonfinite"], adapter_finite=all(bool(torch.isfinite(v).all()) for v in adapter.values()))
    assert (summary["dropped_too_long"], summary["dropped_no_labels"], summary["dropped_malformed"]) == (1, 1, 1)
    assert summary["samples"] == len(base)
    assert 0 < summary["skipped_nonfinite"] == len(skipped) <= poisoned  # only the steps holding a poisoned sample
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in records if r["step"] not in skipped)
    assert all(bool(torch.isfinite(v).all()) for v in adapter.values())  # nothing non-finite reached the weights
