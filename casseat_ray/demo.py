"""``casseat demo``: the whole pipeline on the shipped tiny config, on CPU.

It builds what the config reads (tiny teacher and student, demo questions, held-out demo
questions) under one folder, points the config there, and runs ``casseat run`` on it:
synthesis with DDF, LoRA training, cascaded evaluation of base and tuned student.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from casseat_ray.config import Config, load_config, to_yaml

# Engine settings that fit a tiny model on a laptop CPU: a fixed small KV cache (on CPU,
# gpu_memory_utilization would reserve a share of system RAM) and eager mode for a quick start.
TINY_ENGINE = dict(max_model_len=2048, kv_cache_memory_bytes=256 * 2**20, enforce_eager=True)

# The shipped tiny config (a source checkout: jobs/ sits beside the package).
TINY_CONFIG = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "tiny-cpu.yaml"
HELDOUT_SEED = 1  # held-out questions come from another seed than the training questions


def demo_config(out: Path, config: Path = TINY_CONFIG, overrides: list[str] = ()) -> Config:
    """The tiny config with every input and output moved under ``out``."""
    out = Path(out)
    moved = [f"output_dir={out}", f"sources.0.path={out / 'data' / 'demo.parquet'}", f"teacher.model={out / 'models' / 'teacher'}",
             f"student.model={out / 'models' / 'student'}", f"evaluate.benchmarks.0.path={out / 'heldout' / 'demo.parquet'}",
             f"ray.storage_path={out / 'ray'}"]
    return load_config(config, [*moved, *overrides])


def ensure_tiny(path: Path, role: str, seed: int, family: str = "qwen2_vl") -> Path:
    """Build the tiny model unless the same role, seed and family are already there."""
    from casseat_ray.tiny import make_tiny, tiny_marker

    marker = path / "casseat_tiny.json"
    if marker.is_file() and json.loads(marker.read_text()) == tiny_marker(role, seed, family=family):
        return path
    return make_tiny(path, role=role, seed=seed, family=family)


def run(out: str | Path = "out/demo", n: int = 32, heldout: int = 32, overrides: list[str] = (), progress: bool = True) -> dict:
    """Build the inputs under ``out`` and run the whole pipeline on them, from scratch."""
    from casseat_ray import run as pipeline_run
    from casseat_ray.demo_data import make_demo_data

    out = Path(out)
    cfg = demo_config(out, overrides=list(overrides))
    t0 = time.perf_counter()
    ensure_tiny(Path(cfg.teacher.model), "teacher", cfg.seed)
    ensure_tiny(Path(cfg.student.model), "student", cfg.seed)
    make_demo_data(out / "data", n=n, seed=cfg.seed)
    make_demo_data(out / "heldout", n=heldout, seed=HELDOUT_SEED)
    (out / "config.yaml").write_text(to_yaml(cfg))
    build_s = time.perf_counter() - t0
    summary = pipeline_run.run(cfg, start="synthesize", progress=progress)  # the inputs were just rebuilt: redo every step
    summary["steps"] = {"build": {"seconds": round(build_s, 1)}, **summary["steps"]}
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
