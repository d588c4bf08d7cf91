"""Training faults on real Ray Train with the tiny student: a killed run and a torn checkpoint
both end on the weights of the uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from casseat_ray.config import to_yaml
from casseat_ray.train import run as train_run
from casseat_ray.train.run import read_metrics
from tests.conftest import casseat_cmd, train_config

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


@pytest.mark.extended  # about 3 minutes; resuming from a checkpoint runs by default in F12
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
