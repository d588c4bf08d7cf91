"""The evaluation job: benchmarks x models x modes on the inference layer, resumable.

One visible loop (``run``): benchmark items (read and validated, never DDF-filtered) expand to
one work row per (model, mode); the student's rows (``base``: no adapter, ``tuned``: the LoRA
adapter, both on **one** engine) and the teacher's (its own engine) stream through the engine
actor, and each finished block is written as a part keyed by ``benchmark/model/mode/sample_id``,
so a rerun skips what is done. When every row is in a part, ``report.finalize`` writes
``items.parquet``, ``report.json``, ``report.md`` and the plots under ``OUTPUT_DIR/NAME/eval/``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from casseat_ray import parts as partstore
from casseat_ray import storage
from casseat_ray.adapters import ShippedAdapter, adapter_problems, adapter_weights, serving_engine, shipped
from casseat_ray.config import Config, ConfigError, PlacementConfig
from casseat_ray.engines import RETRYABLE
from casseat_ray.evaluate.items import expand_batch
from casseat_ray.inference.modes import RESULT_FIELDS, ModeCall, first_failure, run_mode
from casseat_ray.inference.turns import run_prompts

FINGERPRINT_KEYS = ("evaluate", "synthesis", "images")
SCHEDULING = {"evaluate": ("concurrency", "batch_size", "num_cpus", "num_gpus", "bootstrap")}


# ---------------------------------------------------------------- the adapter
def adapter_path(cfg: Config) -> Path:
    return Path(cfg.evaluate.adapter) if cfg.evaluate.adapter else cfg.run_dir / "train" / "adapter"


def check_adapter(cfg: Config) -> list[str]:
    """Why the 'tuned' adapter cannot be served, one message per problem (none: it can)."""
    if "tuned" not in cfg.evaluate.models:
        return []
    path = adapter_path(cfg)
    if cfg.evaluate.adapter:
        key = "evaluate.adapter"
    else:
        key = "the adapter this run trained"
        if not path.is_dir():
            return [f"{key}: no adapter directory at {path} (train first, or set evaluate.adapter)"]
    return adapter_problems(path, key, cfg.student.model if cfg.student else None)[0]


def student_engine(cfg: Config):
    """The student's engine config, with LoRA on (and a rank that fits the adapter) for 'tuned'."""
    engine = cfg.evaluate.engine or cfg.student.engine
    return serving_engine(engine, adapter_path(cfg)) if "tuned" in cfg.evaluate.models else engine


def extract_prompt(cfg: Config):
    """The few-shot answer-extraction template when ``evaluate.model_extractor`` is on, else None."""
    from casseat_ray import prompts

    return prompts.load("extract", cfg.synthesis.prompts.extract) if cfg.evaluate.model_extractor else None


# ---------------------------------------------------------------- the engine task
class EvalTask:
    """Runs each work row's mode for its model on the engine the row was sent to. An item a
    request failed for keeps its outputs and is marked with the failure (reject columns), so
    that a rerun retries the ``engine_error`` ones."""

    stage = "evaluate"
    fields = RESULT_FIELDS
    key = "key"  # a sample_id has one row per model and mode

    def __init__(self, cfg: Config, model_paths: dict[str, str], adapter: ShippedAdapter | None):
        e = cfg.evaluate
        ps = run_prompts(cfg)
        greedy = e.sampling
        sampled = e.sampling.model_copy(update={"n": e.best_of_n, "temperature": e.best_of_n_temperature, "seed": e.seed})
        protocols = {b.name: b.protocol for b in e.benchmarks}
        self.calls = {
            (model, mode, protocol): ModeCall(mode=mode, prompts=ps, model=model_paths[model],
                                              sampling=sampled if mode == "best_of_n" else greedy,
                                              c2_sampling=greedy.model_copy(update={"n": 1}), protocol=protocol,
                                              adapter=adapter if model == "tuned" else None, extractor=extract_prompt(cfg))
            for model in model_paths for mode in e.modes for protocol in set(protocols.values())
        }

    async def __call__(self, engine, row: dict) -> dict:
        out = await run_mode(engine, row, self.calls[(row["eval_model"], row["eval_mode"], row["protocol"])])
        hit = first_failure(out)
        if hit:
            out["reject"] = hit
        return out


# ---------------------------------------------------------------- the job
def fingerprint(cfg: Config) -> dict:
    adapter = adapter_path(cfg) if "tuned" in cfg.evaluate.models else None
    stamp = None
    if adapter is not None:
        weights = adapter_weights(adapter)
        stamp = {"path": str(adapter.resolve()), "bytes": weights.stat().st_size if weights else None,
                 "mtime": int(weights.stat().st_mtime) if weights else None}
    extra = {"student.model": cfg.student.model, "teacher.model": cfg.teacher.model if cfg.teacher else None, "adapter": stamp,
             "prompt_shas": {k: p.sha for k, p in run_prompts(cfg).items()},
             "extract_prompt_sha": extract_prompt(cfg).sha if cfg.evaluate.model_extractor else None,
             "benchmark_files": partstore.files_stamp(b.path for b in cfg.evaluate.benchmarks)}
    return partstore.fingerprint(cfg, FINGERPRINT_KEYS, SCHEDULING, extra)


def check(cfg: Config, adapter: bool = True) -> None:
    """Everything that would make the run fail, before any inference; ``adapter=False`` when
    the adapter is yet to be trained (``casseat run``)."""
    problems = []
    if not cfg.evaluate.benchmarks:
        problems.append("evaluate.benchmarks: no benchmark configured")
    if cfg.student is None:
        problems.append("student.model: evaluate needs the student")
    if "teacher" in cfg.evaluate.models and cfg.teacher is None:
        problems.append("evaluate.models: 'teacher' needs teacher.model")
    names = [b.name for b in cfg.evaluate.benchmarks]
    if len(set(names)) != len(names):
        problems.append(f"evaluate.benchmarks: names must be unique, got {names}")
    if adapter:
        problems += check_adapter(cfg)
    if problems:
        raise ConfigError("\n".join(problems))


@storage.mirrors_run_dir
def run(cfg: Config, fresh: bool = False, progress: bool = True) -> dict:
    """Evaluate (or resume evaluating) the configured models; returns the report."""
    from casseat_ray import data
    from casseat_ray.config import with_absolute_models
    from casseat_ray.evaluate import report
    from casseat_ray.inference.stage import engine_stage
    from casseat_ray.runtime import init_ray

    t0 = time.perf_counter()
    check(cfg)
    cfg = with_absolute_models(cfg)
    e = cfg.evaluate
    out_dir = cfg.run_dir / "eval"
    stamp = fingerprint(cfg)  # once: it stats every benchmark file and the adapter
    parts = partstore.prepare(out_dir / "work", stamp, fresh, str(out_dir))
    init_ray(cfg.ray)
    items = data.load(cfg, sources=list(e.benchmarks), filtered=False).materialize()
    funnel = data.funnel(items)
    done = partstore.done_ids(parts, "key", retry=RETRYABLE)
    protocols = {b.name: b.protocol for b in e.benchmarks}
    groups = []  # (models served by one engine, model path, engine config, CPUs, GPUs, actors)
    student_models = [m for m in e.models if m in ("base", "tuned")]
    if student_models:
        groups.append((student_models, cfg.student.model, student_engine(cfg), e.num_cpus, e.num_gpus, e.concurrency))
    if "teacher" in e.models:
        t = cfg.teacher
        groups.append((["teacher"], t.model, t.engine, t.num_cpus, t.num_gpus, t.concurrency))
    per_item = len(e.modes)
    total = funnel["accepted"] * per_item * len(e.models)
    bars = report.progress_bars(e, funnel, enabled=progress, done=done)
    written = len(done)
    # the engine actors' nodes get the adapter through the object store, not by a driver path
    with shipped(adapter_path(cfg).resolve() if "tuned" in e.models else None) as adapter, contextlib.closing(bars):
        for models, model, engine, cpus, gpus, concurrency in groups:
            finished = sum(1 for k in done if k.rsplit("/", 3)[1] in models)
            if finished >= funnel["accepted"] * per_item * len(models):
                continue  # nothing left for this engine: do not start it
            paths = {m: model for m in models}
            # model by model (base, then tuned): an engine that serves one adapter at a time
            # switches once instead of at every batch
            per_model = [items.map_batches(expand_batch, batch_format="pyarrow", fn_kwargs={"models": [m], "modes": list(e.modes), "protocols": protocols})
                         for m in models]
            work = per_model[0].union(*per_model[1:]) if len(per_model) > 1 else per_model[0]
            work = work.map_batches(partstore.not_done, batch_format="pyarrow", fn_kwargs={"done": done, "id_column": "key"}, num_cpus=0.1)
            work = work.repartition(target_num_rows_per_block=e.batch_size).materialize()
            placement = cfg.teacher.placement if cfg.teacher else PlacementConfig()
            spec = engine_stage("evaluate", EvalTask(cfg, paths, adapter), model, engine, concurrency=concurrency,
                                batch_size=e.batch_size, num_cpus=cpus, num_gpus=gpus, placement=placement)
            for block in spec.apply(work).iter_batches(batch_size=None, batch_format="pyarrow"):
                if block.num_rows == 0:
                    continue
                partstore.record_stamp(parts, stamp)  # with the first part (a no-op once recorded)
                partstore.write_part(parts, block.drop_columns(["image"]), "key")
                written += block.num_rows
                bars.update(block)
    if written < total:
        return {"complete": False, "rows_done": written, "rows_total": total}
    return report.finalize(cfg, out_dir, parts, funnel, {"wall_seconds": time.perf_counter() - t0}, RETRYABLE)

