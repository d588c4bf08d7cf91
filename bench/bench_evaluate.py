"""Evaluation throughput of the cascade against the engine's own limit, side by side in one run
on the same items (MATH-V testmini, real images), model, engine settings and sampling. Prints
one JSON object:

- ``engine_limit_items_per_s``: one engine, no Ray: every base item's C1 submitted at once, then
  every C2 at once, then the same for the tuned model (LoRA adapter); items = benchmark items x
  models. On CPU the engine computes with the threads Ray gives the job's engine actor
  (``evaluate.num_cpus``, ``engine_threads``), as the job's engine does: vLLM's CPU LoRA
  kernels gather each token's adapter weights and scale with threads, so an engine given other
  threads than the job's is another engine.
- ``engine_limit_all_cores_items_per_s``: the same with every core computing (torch's
  default), and ``all_cores_ratio`` = pipeline / that: what the job leaves on the table when
  the machine has cores its engine actor was not given.
- ``pipeline_items_per_s``: ``casseat evaluate``'s job (Ray Data, the engine actor, scoring,
  parts written), steady state: items / (the last part written - the first item's first
  request, as the rows record it).
- ``engine_limit_ratio`` = pipeline / engine limit (goal >= 0.90).

The format-trained tiny teacher plays the student (so answers and verdicts exist); the tuned
model is a random non-zero LoRA adapter on it.

    python bench/bench_evaluate.py [--n 128] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MATHV = Path(__file__).resolve().parents[2] / "shared" / "data" / "math-v" / "testmini.jsonl"


def _cfg(root: Path, model: Path, adapter: Path, n: int, max_tokens: int):
    from casseat_ray.config import Config
    from casseat_ray.demo import TINY_ENGINE

    return Config.model_validate(dict(
        name="bench", output_dir=str(root / "runs"), student=dict(model=str(model), engine=TINY_ENGINE),
        evaluate=dict(benchmarks=[dict(name="mathv", format="mathv", path=str(MATHV), protocol="mathv", max_samples=n)],
                      models=["base", "tuned"], modes=["cascade"], adapter=str(adapter), sampling=dict(max_tokens=max_tokens)),
        ray=dict(num_cpus=2, storage_path=str(root / "ray")),
    ))


def benchmark_rows(cfg) -> list[dict]:
    """The benchmark's items, read as the job reads them."""
    import ray

    from casseat_ray import data
    from casseat_ray.runtime import init_ray

    init_ray(cfg.ray)
    rows = [r for r in data.load(cfg, sources=list(cfg.evaluate.benchmarks), filtered=False).take_all() if r["reject_reason"] is None]
    ray.shutdown()
    return rows


def engine_side(cfg, rows: list[dict], threads: float | None) -> dict:
    """Both models' cascade on one engine, phase by phase, no Ray (the engine's limit). The
    engine computes with the threads Ray gives an actor of ``threads`` CPUs (the job's engine
    actor's); None: torch's default, every core."""
    from casseat_ray.engines.vllm import VLLMEngine
    from casseat_ray.evaluate.job import adapter_path, student_engine
    from casseat_ray.inference.turns import c1_conversation, c2_conversation, run_prompts
    from casseat_ray.runtime import actor_threads

    ps = run_prompts(cfg)
    with actor_threads(threads):
        engine = VLLMEngine(cfg.student.model, student_engine(cfg), cfg.evaluate.sampling)
    adapter = str(adapter_path(cfg).resolve())
    try:
        engine.chat([c1_conversation(r, ps["c1"]) for r in rows[:8]], adapter=adapter)  # warm-up, LoRA loaded
        t0 = time.perf_counter()
        for lora in (None, adapter):
            firsts = engine.chat([c1_conversation(r, ps["c1"]) for r in rows], adapter=lora)
            engine.chat([c2_conversation(r, ps["c1"], f[0].text, ps["c2"]) for r, f in zip(rows, firsts)], adapter=lora)
        seconds = time.perf_counter() - t0
    finally:
        engine.close()
    return {"items": 2 * len(rows), "seconds": seconds}


def pipeline_side(cfg) -> dict:
    """The evaluation job from an empty run folder; steady rate from what its parts record."""
    import pyarrow.parquet as pq

    from casseat_ray.evaluate import job
    from casseat_ray.parts import PART_GLOB

    t0 = time.perf_counter()
    report = job.run(cfg, fresh=True, progress=False)
    wall = time.perf_counter() - t0
    parts = sorted((cfg.run_dir / "eval" / "work" / "parts").glob(PART_GLOB))
    started = min(min(pq.read_table(f, columns=["started_at"])["started_at"].to_pylist()) for f in parts)
    last = max(f.stat().st_mtime for f in parts)
    items = sum(pq.read_metadata(f).num_rows for f in parts)
    acc = {e["model"]: round(e["accuracy"], 3) for e in report["results"]}
    return {"items": items, "steady_seconds": last - started, "wall_seconds": wall, "accuracy": acc}


def main() -> None:
    from casseat_ray.demo import ensure_tiny
    from casseat_ray.runtime import actor_thread_count
    from casseat_ray.tiny import make_tiny_adapter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128, help="MATH-V testmini items (default 128; 304 is all)")
    ap.add_argument("--max-tokens", type=int, default=48, help="max tokens per turn (default 48)")
    ap.add_argument("--root", type=Path, default=Path("out/bench-evaluate"))
    args = ap.parse_args()
    model = ensure_tiny(args.root / "models" / "teacher", "teacher", 0)
    adapter = args.root / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        make_tiny_adapter(model, adapter)
    cfg = _cfg(args.root, model, adapter, args.n, args.max_tokens)
    rows = benchmark_rows(cfg)
    eng = engine_side(cfg, rows, cfg.evaluate.num_cpus)
    every_core = engine_side(cfg, rows, None)
    pipe = pipeline_side(cfg)
    limit = eng["items"] / eng["seconds"]
    limit_all = every_core["items"] / every_core["seconds"]
    rate = pipe["items"] / pipe["steady_seconds"]
    print(json.dumps({
        "items": pipe["items"], "mode": "cascade", "models": ["base", "tuned"], "max_tokens": args.max_tokens,
        "engine_threads": actor_thread_count(cfg.evaluate.num_cpus),
        "engine_limit_items_per_s": round(limit, 2), "pipeline_items_per_s": round(rate, 2), "engine_limit_ratio": round(rate / limit, 3),
        "engine_limit_all_cores_items_per_s": round(limit_all, 2), "all_cores_ratio": round(rate / limit_all, 3),
        "pipeline_wall_seconds": round(pipe["wall_seconds"], 1), "accuracy": pipe["accuracy"],
    }, indent=2))


if __name__ == "__main__":
    main()
