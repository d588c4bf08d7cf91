"""LoRA adapter folders (peft's format): what makes one usable for the student, in one place
for evaluation (the 'tuned' model) and training (``train.init_adapter``)."""

from __future__ import annotations

import json
from pathlib import Path


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
