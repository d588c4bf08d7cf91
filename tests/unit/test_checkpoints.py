"""Telling a complete training checkpoint from a torn one, and falling back to an older one."""

import json

import torch

from casseat_ray.train import checkpoints


def _write(d, step, weight=1.0):
    d.mkdir(parents=True)
    checkpoints.write(d, {"w": torch.full((4, 4), weight)}, {"state": {}, "param_groups": []}, {"last_epoch": step},
                      {"step": step, "epoch": 0, "skipped_nonfinite": 0})
    return d


def test_problem_names_what_is_wrong():
    sizes = {"trainable.safetensors": 100, "optimizer.pt": 50, "scheduler.pt": 10}
    marker = json.dumps({"step": 3, "files": sizes})
    assert checkpoints.problem(sizes, marker) is None
    assert "missing" in checkpoints.problem(sizes, None)
    assert "unreadable" in checkpoints.problem(sizes, "{\"ste")
    assert checkpoints.problem({**sizes, "optimizer.pt": 20}, marker) == "optimizer.pt has 20 of its 50 bytes"
    assert checkpoints.problem({k: v for k, v in sizes.items() if k != "scheduler.pt"}, marker) == "scheduler.pt is missing"
    assert checkpoints.problem(sizes, json.dumps({"step": 3})) is None  # an older checkpoint without sizes, all files there


def test_a_torn_newest_checkpoint_falls_back_to_the_newest_complete_one(tmp_path):
    from ray.train import Checkpoint

    old = _write(tmp_path / "checkpoint_2026-01-01_00-00-01.000000", 3, 1.0)
    mid = _write(tmp_path / "checkpoint_2026-01-01_00-00-02.000000", 6, 2.0)
    new = _write(tmp_path / "checkpoint_2026-01-01_00-00-03.000000", 9, 3.0)
    after = _write(tmp_path / "checkpoint_2026-01-01_00-00-04.000000", 12, 4.0)  # newer than what Ray offers: never used
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's record, beside the folders
    assert checkpoints.folder_names(p.name for p in tmp_path.iterdir()) == [old.name, mid.name, new.name, after.name]
    assert checkpoints.choose(None) == (None, [])
    chosen, notes = checkpoints.choose(Checkpoint(str(new)))
    assert chosen.path == str(new) and notes == []
    (new / "trainable.safetensors").write_bytes((new / "trainable.safetensors").read_bytes()[:40])  # truncated
    (mid / "state.json").unlink()  # the marker never written
    chosen, notes = checkpoints.choose(Checkpoint(str(new)))
    assert chosen.path == str(old), notes
    assert notes[0].startswith(f"checkpoint {new.name} is incomplete: trainable.safetensors has 40 of its")
    assert notes[1] == f"checkpoint {mid.name} is incomplete: its state.json is missing (it was not finished)"
    assert notes[2] == f"resuming from {old.name} (step 3)"
    with chosen.as_directory() as d:
        weights, _, scheduler, state = checkpoints.read(d)
    assert state["step"] == 3 and scheduler == {"last_epoch": 3} and torch.equal(weights["w"], torch.full((4, 4), 1.0))
    (old / "optimizer.pt").unlink()
    chosen, notes = checkpoints.choose(Checkpoint(str(new)))
    assert chosen is None and notes[-1] == "no complete checkpoint is left: starting from step 0"
    assert after.exists()
