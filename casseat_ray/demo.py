"""``casseat demo``: the pipeline end to end on tiny models and generated data, on CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

from casseat_ray.config import Config, to_yaml

# Engine settings that fit a tiny model on a laptop CPU: a fixed small KV cache (on CPU,
# gpu_memory_utilization would reserve a share of system RAM) and eager mode for a quick start.
TINY_ENGINE = dict(max_model_len=2048, kv_cache_memory_bytes=256 * 2**20, enforce_eager=True)


def tiny_config(out: Path, seed: int = 0) -> Config:
    out = Path(out)
    return Config.model_validate(
        dict(
            name="synth",
            output_dir=str(out),
            seed=seed,
            sources=[dict(name="demo", format="canonical", path=str(out / "data" / "demo.parquet"), license="generated")],
            teacher=dict(model=str(out / "models" / "teacher"), engine=TINY_ENGINE, sampling=dict(max_tokens=96), batch_size=8),
            ddf_labeled=dict(max_student_tokens=1024),
            student=dict(model=str(out / "models" / "student"), engine=TINY_ENGINE),
            ray=dict(num_cpus=2, storage_path=str(out / "ray")),
        )
    )


def ensure_tiny(path: Path, role: str, seed: int) -> Path:
    """Build the tiny model unless the same role and seed are already there."""
    from casseat_ray.tiny import make_tiny, tiny_marker

    marker = path / "casseat_tiny.json"
    if marker.is_file() and json.loads(marker.read_text()) == tiny_marker(role, seed):
        return path
    return make_tiny(path, role=role, seed=seed)


def run(out: str | Path = "out/demo", n: int = 16, seed: int = 0, progress: bool = True) -> dict:
    """Build the tiny models and demo data under ``out``, then run the synthesis job on them."""
    from casseat_ray.demo_data import make_demo_data
    from casseat_ray.synth import pipeline

    out = Path(out)
    cfg = tiny_config(out, seed)
    t0 = time.perf_counter()
    ensure_tiny(Path(cfg.teacher.model), "teacher", seed)
    ensure_tiny(Path(cfg.student.model), "student", seed)
    make_demo_data(out / "data", n=n, seed=seed)
    (out / "config.yaml").write_text(to_yaml(cfg))
    build_s = time.perf_counter() - t0
    stats = pipeline.run(cfg, fresh=True, progress=progress)
    summary = dict(
        out=str(cfg.run_dir),
        questions=stats["stages"]["read"]["in"],
        kept=stats["stages"]["ddf_labeled"]["out"],
        rejected=stats["stages"]["ddf_labeled"]["rejected"],
        sft_samples=stats["sft"]["samples"],
        sft_by_kind=stats["sft"]["by_kind"],
        teacher_tokens_in=stats["teacher"]["tokens_in"],
        teacher_tokens_out=stats["teacher"]["tokens_out"],
        build_seconds=round(build_s, 1),
        synthesis_seconds=stats["wall_seconds"],
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
