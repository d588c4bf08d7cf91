"""Synthesis benchmarks, measured side by side in one run on the tiny teacher (CPU or GPU).

1. Pipeline efficiency: steady-state rows/s of the Ray Data cascade (teacher actor + labeling
   actor) divided by a plain loop calling the same stages on the same engine settings, batch
   size and rows. Engine start-up is excluded on both sides (the first block is a warm-up).
   Goal >= 0.9.
2. Cascade cost: C2 seconds with prefix caching on vs off, same conversations.

    python bench/bench_synthesis.py [--n 160] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _cfg(root: Path, n: int, batch: int, **engine):
    from casseat_ray.config import Config
    from casseat_ray.demo import TINY_ENGINE

    eng = dict(TINY_ENGINE, **engine)
    return Config.model_validate(dict(
        name="bench", output_dir=str(root / "runs"),
        sources=[dict(name="demo", format="canonical", path=str(root / "data" / "demo.parquet"))],
        teacher=dict(model=str(root / "models" / "teacher"), engine=eng, sampling=dict(max_tokens=96), batch_size=batch),
        student=dict(model=str(root / "models" / "student"), engine=TINY_ENGINE),
        ddf_labeled=dict(max_student_tokens=1024),
        ray=dict(num_cpus=2),
    ))


def _batches(cfg):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from casseat_ray.data import ROW_SCHEMA

    rows = [dict(r, reject_stage=None, reject_reason=None, reject_detail=None) for r in pq.read_table(cfg.sources[0].path).to_pylist()]
    b = cfg.teacher.batch_size
    return [pa.Table.from_pylist(rows[i:i + b], schema=ROW_SCHEMA) for i in range(0, len(rows), b)]


def plain_loop(cfg) -> dict:
    """The same stages called in a loop; also times C2 with this engine's prefix caching."""
    from casseat_ray.synth.stages import LabelStage, TeacherStage

    teacher, label = TeacherStage(cfg), LabelStage(cfg)
    batches = _batches(cfg)
    label(teacher(batches[0]))  # warm-up, excluded like the pipeline's first block
    t0 = time.perf_counter()
    rows = sum(label(teacher(b)).num_rows for b in batches[1:])
    seconds = time.perf_counter() - t0
    c2 = c2_seconds(cfg, teacher, batches[1:])
    teacher.engine.llm.llm_engine.engine_core.shutdown()
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "c2_seconds": c2}


def c2_seconds(cfg, teacher, batches) -> float:
    """C1 then C2 per batch, timing only C2 (its prefix was just computed by C1)."""
    from casseat_ray.inference.turns import c1_conversation, c2_conversation

    ps, total = teacher.ps, 0.0
    for b in batches:
        rows = b.to_pylist()
        firsts = teacher.engine.chat([c1_conversation(r, ps["c1"]) for r in rows], cfg.teacher.sampling)
        convs = [c2_conversation(r, ps["c1"], f[0].text, ps["teacher_c2"]) for r, f in zip(rows, firsts)]
        t0 = time.perf_counter()
        teacher.engine.chat(convs, cfg.teacher.sampling)
        total += time.perf_counter() - t0
    return total


def no_cache_c2(cfg) -> float:
    from casseat_ray.synth.stages import TeacherStage

    teacher = TeacherStage(cfg)
    batches = _batches(cfg)
    c2_seconds(cfg, teacher, batches[:1])  # warm-up
    seconds = c2_seconds(cfg, teacher, batches[1:])
    teacher.engine.llm.llm_engine.engine_core.shutdown()
    return seconds


def ray_pipeline(cfg) -> dict:
    from casseat_ray import data
    from casseat_ray.runtime import init_ray
    from casseat_ray.synth.pipeline import build

    init_ray(cfg.ray)
    source = data.load(cfg).repartition(target_num_rows_per_block=cfg.teacher.batch_size).materialize()
    rows, t0 = 0, None
    for block in build(cfg, source, set()).iter_batches(batch_size=None, batch_format="pyarrow"):
        if t0 is None:  # the first block carries the engine start-up
            t0 = time.perf_counter()
            continue
        rows += block.num_rows
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds}


def main() -> None:
    from casseat_ray.demo import ensure_tiny
    from casseat_ray.demo_data import make_demo_data

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=160, help="questions (default 160)")
    ap.add_argument("--batch", type=int, default=16, help="rows per teacher batch (default 16)")
    ap.add_argument("--root", type=Path, default=Path("out/bench-synthesis"))
    args = ap.parse_args()
    ensure_tiny(args.root / "models" / "teacher", "teacher", 0)
    ensure_tiny(args.root / "models" / "student", "student", 0)
    make_demo_data(args.root / "data", n=args.n, seed=7)
    cfg = _cfg(args.root, args.n, args.batch)
    plain = plain_loop(cfg)
    pipe = ray_pipeline(cfg)
    off = no_cache_c2(_cfg(args.root, args.n, args.batch, enable_prefix_caching=False))
    result = {
        "rows": args.n, "batch_size": args.batch,
        "plain_rows_per_s": round(plain["rows_per_s"], 2), "ray_rows_per_s": round(pipe["rows_per_s"], 2),
        "pipeline_efficiency": round(pipe["rows_per_s"] / plain["rows_per_s"], 3),
        "c2_seconds_prefix_cache_on": round(plain["c2_seconds"], 3), "c2_seconds_prefix_cache_off": round(off, 3),
        "c2_speedup_from_prefix_cache": round(off / plain["c2_seconds"], 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
