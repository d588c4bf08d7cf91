"""LoRA adapter folders (peft's format): what makes one usable for the student, in one place
for evaluation (the 'tuned' model) and training (``train.init_adapter``), and how one reaches
the node that uses it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def adapter_weights(path: Path) -> Path | None:
    """The weights file of a peft adapter folder, or None."""
    return next((path / f for f in ("adapter_model.safetensors", "adapter_model.bin") if (path / f).is_file()), None)


def adapter_config(path: Path) -> dict:
    """An adapter folder's adapter_config.json (rank ``r``, ``lora_alpha``, ...)."""
    return json.loads((Path(path) / "adapter_config.json").read_text())


def adapter_problems(path: Path, key: str, student: str | None) -> tuple[list[str], dict]:
    """Why ``path`` cannot serve as a LoRA adapter of ``student`` (messages naming ``key``), and
    its adapter_config.json when it could be read."""
    conf = path / "adapter_config.json"
    if not path.is_dir():
        return [f"{key}: no adapter directory at {path}"], {}
    if not conf.is_file() or adapter_weights(path) is None:
        return [f"{key}: {path} is not a peft adapter (adapter_config.json and adapter_model.safetensors expected)"], {}
    try:
        meta = adapter_config(path)
    except json.JSONDecodeError as e:
        return [f"{key}: {conf} is not valid JSON: {e}"], {}
    problems = []
    if meta.get("peft_type") != "LORA":
        problems.append(f"{key}: {path} holds a {meta.get('peft_type')} adapter; only LoRA adapters can be used")
    base = meta.get("base_model_name_or_path")
    if base and student and Path(base).name != Path(student).name:
        problems.append(f"{key}: {path} was trained on {base!r}, not on the student {student!r}")
    return problems, meta


def serving_engine(engine, adapter: Path):
    """``engine`` (an EngineConfig) with LoRA on and a rank slot that fits ``adapter``: what
    the student's engine needs to answer through that adapter."""
    rank = adapter_config(adapter).get("r", 8)
    return engine.model_copy(update={"enable_lora": True, "max_lora_rank": max(engine.max_lora_rank, lora_rank_slot(rank))})


def lora_rank_slot(r: int) -> int:
    """vLLM accepts max_lora_rank from a fixed set of sizes."""
    return next(s for s in (8, 16, 32, 64, 128, 256, 320, 512) if s >= r)


# ---------------------------------------------------------------- shipping to other nodes
def node_copies() -> Path:
    """Where a node keeps the adapters shipped to it, one folder per content digest."""
    return Path(tempfile.gettempdir()) / "casseat-adapters"


@dataclass(frozen=True)
class ShippedAdapter:
    """An adapter folder carried in Ray's object store to the engine actors and training
    workers that use it. A path on the driver is not one on another node: a URI output's
    adapter sits in the driver's staging folder, and a user's adapter may be on its local disk.
    ``str()`` is the folder on the driver (what outputs record); ``local()`` a copy on the
    calling node, written once per node and content."""

    path: str
    digest: str
    files: Any  # ObjectRef of {file name: bytes}

    def __str__(self) -> str:
        return self.path

    def local(self) -> Path:
        target = node_copies() / self.digest
        if target.is_dir():
            return target
        import ray

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.digest}-", dir=target.parent))
        for name, data in ray.get(self.files).items():
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp, target)  # whole or not at all, for the other processes of this node
        except OSError:  # another process of this node put it there first
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def drop_local(self) -> None:
        """Remove this node's copy (the driver's, once the step that used it is over)."""
        shutil.rmtree(node_copies() / self.digest, ignore_errors=True)
        with contextlib.suppress(OSError):  # the folder too, when no other copy is in it
            node_copies().rmdir()


def ship(path: Path) -> ShippedAdapter:
    """The adapter folder ``path`` (its files; peft's folder has no subfolders) in Ray's object
    store; needs a connected Ray."""
    import ray

    files = {f.name: f.read_bytes() for f in sorted(Path(path).iterdir()) if f.is_file()}
    h = hashlib.sha256()
    for name, data in files.items():
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return ShippedAdapter(str(path), h.hexdigest()[:20], ray.put(files))


@contextlib.contextmanager
def shipped(path: Path | None):
    """``ship(path)`` for the step inside (None: no adapter, yields None); the driver node's
    copy is removed after it."""
    adapter = None if path is None else ship(path)
    try:
        yield adapter
    finally:
        if adapter is not None:
            adapter.drop_local()


def local_path(adapter: ShippedAdapter | str | Path) -> str:
    """The folder an adapter can be loaded from on this node."""
    return str(adapter.local() if isinstance(adapter, ShippedAdapter) else adapter)
