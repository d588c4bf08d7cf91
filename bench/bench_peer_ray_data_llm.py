"""Peer: the same two-turn cascade built from two chained ``ray.data.llm`` processors
(``build_processor`` + ``vLLMEngineProcessorConfig``) on the tiny teacher, CPU only.

Compared with ``bench_synthesis.py`` (one engine per actor runs C1 then C2, so C2 reuses C1's
prefix cache), chaining processors means two engines, two copies of the weights, and no
shared prefix cache. On a 2-CPU machine the default stage resources (1 CPU per stage actor,
four stage actors per processor) exceed the cluster and Ray Data's resource budget stalls the
pipeline, so this script gives every stage a fraction of a CPU. It prints rows/s, or the
exact reason the processors cannot run with the installed Ray and vLLM.

    python bench/bench_peer_ray_data_llm.py [--n 32] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--root", type=Path, default=Path("out/bench-synthesis"))
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from casseat_ray import prompts
    from casseat_ray.demo import TINY_ENGINE, ensure_tiny
    from casseat_ray.demo_data import make_demo_data
    from casseat_ray.inference.turns import c1_conversation, c2_conversation

    teacher = ensure_tiny(args.root / "models" / "teacher", "teacher", 0)
    make_demo_data(args.root / "data", n=args.n, seed=7)
    rows = pq.read_table(args.root / "data" / "demo.parquet").to_pylist()[: args.n]
    c1, c2 = prompts.load("c1"), prompts.load("c2")
    sampling = dict(temperature=0.0, max_tokens=96)
    keep = ("sample_id", "image", "question", "choices", "answer")
    small = dict(num_cpus=0.05)

    ray.init(num_cpus=2, include_dashboard=False)  # before build_processor, which reserves placement groups

    def config():
        return vLLMEngineProcessorConfig(
            model_source=str(teacher), engine_kwargs=dict(TINY_ENGINE, enable_prefix_caching=True),
            batch_size=args.batch, concurrency=1, log_engine_metrics=False,
            placement_group_config={"bundles": [{"CPU": 0.5}]},  # CPU-only engine bundle
            chat_template_stage=small, tokenize_stage=small, detokenize_stage=small,
            prepare_multimodal_stage=dict(enabled=True, **small),
        )

    first = build_processor(
        config(), preprocess=lambda r: dict(messages=c1_conversation(r, c1), sampling_params=sampling),
        postprocess=lambda r: dict({k: r[k] for k in keep}, c1_text=r["generated_text"]),
        preprocess_map_kwargs=small, postprocess_map_kwargs=small)
    second = build_processor(
        config(), preprocess=lambda r: dict(messages=c2_conversation(r, c1, r["c1_text"], c2), sampling_params=sampling,
                                            sample_id=r["sample_id"], c1_text=r["c1_text"]),
        postprocess=lambda r: dict(sample_id=r["sample_id"], c1_text=r["c1_text"], c2_text=r["generated_text"]),
        preprocess_map_kwargs=small, postprocess_map_kwargs=small)

    ds = ray.data.from_items([{k: r[k] for k in keep} for r in rows])
    t0 = time.perf_counter()
    try:
        out = second(first(ds)).take_all()
    except Exception as e:  # report why, in one line, instead of a wall of Ray internals
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        text = str(e)
        missing = "vllm.entrypoints.chat_utils" in text
        print(json.dumps({"ran": False, "error": type(cause).__name__, "why": (
            "ray.data.llm's PrepareMultimodalUDF imports vllm.entrypoints.chat_utils.parse_chat_messages_async, "
            "which the installed vLLM no longer has (it moved to vllm.renderers.chat_utils), so no image can be prepared"
        ) if missing else text.splitlines()[-1][:500]}, indent=2))
        return
    seconds = time.perf_counter() - t0
    print(json.dumps({"ran": True, "rows": len(out), "seconds_incl_two_engine_starts": round(seconds, 2)}, indent=2))


if __name__ == "__main__":
    main()
