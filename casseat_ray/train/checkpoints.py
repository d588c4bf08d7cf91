"""Training checkpoints: what one holds, how a complete one is told from a torn one, and
which one a resumed run starts from.

A checkpoint is three files plus ``state.json``, written last, which names the step and
every other file's size. A worker killed while the checkpoint was being copied to storage,
or a full disk, leaves a folder whose marker is missing or whose files are shorter than the
marker says; a resumed run then starts from the newest complete checkpoint instead, and
says why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt")
MARKER = "state.json"


def write(directory: str | Path, weights: dict, optimizer: dict, scheduler: dict, state: dict) -> None:
    """Write a checkpoint into ``directory``: the files, then the marker with their sizes."""
    import torch
    from safetensors.torch import save_file

    d = Path(directory)
    save_file(weights, str(d / FILES[0]))
    torch.save(optimizer, d / FILES[1])
    torch.save(scheduler, d / FILES[2])
    sizes = {name: os.path.getsize(d / name) for name in FILES}
    (d / MARKER).write_text(json.dumps({**state, "files": sizes}))


def read(directory: str | Path) -> tuple[dict, dict, dict, dict]:
    """(trainable weights, optimizer state, scheduler state, state) of a complete checkpoint."""
    import torch
    from safetensors.torch import load_file

    d = Path(directory)
    return (load_file(str(d / FILES[0])), torch.load(d / FILES[1], weights_only=False),
            torch.load(d / FILES[2], weights_only=False), json.loads((d / MARKER).read_text()))


def problem(sizes: dict[str, int], marker: str | None) -> str | None:
    """Why a checkpoint with these file sizes and this marker text is not complete, or None.

    A marker without ``files`` (an older checkpoint) is trusted when every file is there."""
    if marker is None:
        return f"its {MARKER} is missing (it was not finished)"
    try:
        state = json.loads(marker)
        step = int(state["step"])
    except (ValueError, KeyError, TypeError):
        return f"its {MARKER} is unreadable"
    if step < 1:
        return f"its {MARKER} names step {step}"
    for name in FILES:
        if name not in sizes:
            return f"{name} is missing"
        expected = state.get("files", {}).get(name)
        if expected is not None and sizes[name] != expected:
            return f"{name} has {sizes[name]} of its {expected} bytes"
    return None


def _inspect(fs, path: str) -> tuple[str | None, int | None]:
    """(problem, step) of the checkpoint folder ``path`` on the pyarrow filesystem ``fs``."""
    from pyarrow import fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(path))
    except (OSError, FileNotFoundError) as e:
        return f"it cannot be listed ({e})", None
    sizes = {Path(i.path).name: i.size for i in infos if i.type == pafs.FileType.File}
    marker = None
    if MARKER in sizes:
        with fs.open_input_stream(f"{path}/{MARKER}") as fh:
            marker = fh.read().decode("utf-8", "replace")
    why = problem(sizes, marker)
    return why, (None if why else int(json.loads(marker)["step"]))


def folder_names(names) -> list[str]:
    """Ray Train's checkpoint folders among ``names`` (what a run's storage folder holds),
    oldest first: Ray names them by time, and its checkpoint_manager_snapshot.json shares
    their prefix."""
    return sorted(n for n in names if n.startswith("checkpoint_") and not n.endswith(".json"))


def choose(checkpoint) -> tuple[object | None, list[str]]:
    """The checkpoint to resume from, given the one Ray Train offers (its newest registered
    one, or None), and what was passed over: that one if it is torn, then older ones in
    the same folder, newest first, until a complete one. Never a newer one than Ray offered:
    Ray's record of the run stays the truth about what happened."""
    from pyarrow import fs as pafs
    from ray.train import Checkpoint

    if checkpoint is None:
        return None, []
    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, newest = path.rsplit("/", 1)

    names = folder_names(Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(parent)) if i.type == pafs.FileType.Directory)
    candidates = [newest] + [n for n in reversed(names) if n < newest]
    notes = []
    for name in candidates:
        why, step = _inspect(fs, f"{parent}/{name}")
        if why is None:
            if notes:
                notes.append(f"resuming from {name} (step {step})")
            return (checkpoint if name == newest else Checkpoint(f"{parent}/{name}", filesystem=fs)), notes
        notes.append(f"checkpoint {name} is incomplete: {why}")
    notes.append("no complete checkpoint is left: starting from step 0")
    return None, notes
