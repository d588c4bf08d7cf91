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
            name="demo",
            output_dir=str(out.parent),
            seed=seed,
            sources=[dict(name="demo", format="canonical", path=str(out / "data" / "demo.parquet"), license="generated")],
            teacher=dict(model=str(out / "models" / "teacher"), engine=TINY_ENGINE, sampling=dict(max_tokens=48)),
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


def run(out: str | Path = "out/demo", n: int = 16, seed: int = 0) -> dict:
    import pyarrow.parquet as pq

    from casseat_ray import prompts
    from casseat_ray.demo_data import make_demo_data
    from casseat_ray.engines.vllm import VLLMEngine
    from casseat_ray.synth.conversations import c1_conversation, c2_conversation

    out = Path(out)
    cfg = tiny_config(out, seed)
    t0 = time.perf_counter()
    ensure_tiny(Path(cfg.teacher.model), "teacher", seed)
    ensure_tiny(Path(cfg.student.model), "student", seed)
    make_demo_data(out / "data", n=n, seed=seed)
    (out / "config.yaml").write_text(to_yaml(cfg))
    build_s = time.perf_counter() - t0

    rows = pq.read_table(cfg.sources[0].path).to_pylist()
    c1, c2 = prompts.load("c1"), prompts.load("c2")
    engine = VLLMEngine(cfg.teacher.model, cfg.teacher.engine, cfg.teacher.sampling)

    t1 = time.perf_counter()
    first = [outs[0] for outs in engine.chat([c1_conversation(r, c1) for r in rows])]
    t2 = time.perf_counter()
    second = [outs[0] for outs in engine.chat([c2_conversation(r, c1, a.text, c2) for r, a in zip(rows, first)])]
    t3 = time.perf_counter()

    records = [
        dict(
            sample_id=r["sample_id"], question=r["question"], answer=r["answer"], answer_type=r["answer_type"],
            c1_text=a.text, c1_finish=a.finish_reason, c1_prompt_tokens=a.prompt_tokens, c1_output_tokens=a.output_tokens,
            c2_text=b.text, c2_finish=b.finish_reason, c2_prompt_tokens=b.prompt_tokens, c2_output_tokens=b.output_tokens,
            c1_prompt_sha=c1.sha, c2_prompt_sha=c2.sha, teacher=cfg.teacher.model,
        )
        for r, a, b in zip(rows, first, second)
    ]
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(records), out / "cascade.parquet")
    summary = dict(
        out=str(out),
        questions=len(rows),
        answer_types=sorted({r["answer_type"] for r in rows}),
        build_seconds=round(build_s, 1),
        vllm_start_seconds=round(engine.start_seconds, 1),
        c1_seconds=round(t2 - t1, 2),
        c2_seconds=round(t3 - t2, 2),
        c1_tokens_out=sum(a.output_tokens for a in first),
        c2_tokens_in=sum(b.prompt_tokens for b in second),
        c2_tokens_out=sum(b.output_tokens for b in second),
        errors=sum(1 for a, b in zip(first, second) if a.error or b.error),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
