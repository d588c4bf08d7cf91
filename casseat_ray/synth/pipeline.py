"""The synthesis job: source rows -> teacher cascade -> DDF level 2 -> mix -> SFT set.

One visible loop (``run``): the Ray Data pipeline streams accepted source rows through the
model filter, the teacher actors and the labeling actors; the driver receives finished
blocks and writes each one atomically as a *part* under ``<run>/work/parts``. A rerun of
the same command skips every sample id already in a part, so a killed run resumes without
duplicates. When all accepted rows are in parts, ``finalize`` mixes and writes the outputs
(each file written to a temporary name, then renamed).

Layout of ``<output_dir>/<name>/``::

    config.yaml            the resolved config
    sft/*.parquet          the SFT set (messages + images + provenance)
    rejects.parquet        every rejected row with its stage, reason and detail
    stats.json             funnel per stage, teacher tokens, rows/s, wall time
    README.md, funnel.png  dataset card and funnel chart
    export/                LLaMA-Factory (sharegpt) and ms-swift copies of the SFT set
    work/                  parts (teacher outputs per row) and the run's fingerprint
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from casseat_ray.config import Config, ConfigError, to_yaml

PART_GLOB = "part-*.parquet"
# Config sections whose change makes earlier teacher outputs invalid for this run; how many
# actors run and how batches are cut are not among them (a resumed run may scale out).
FINGERPRINT_KEYS = ("sources", "images", "ddf_source", "teacher", "synthesis", "ddf_labeled", "seed")
SCHEDULING = {"teacher": ("concurrency", "num_cpus", "num_gpus", "batch_size", "placement"), "ddf_labeled": ("concurrency", "num_cpus"),
              "ddf_labeled.judge": ("concurrency", "num_cpus", "num_gpus", "batch_size")}


# ---------------------------------------------------------------- resume bookkeeping
def fingerprint(cfg: Config) -> dict:
    dumped = cfg.model_dump(mode="json")
    out = {k: dumped[k] for k in FINGERPRINT_KEYS}
    for section, keys in SCHEDULING.items():
        node = out
        for part in section.split("."):
            node = (node or {}).get(part)
        for k in keys:
            (node or {}).pop(k, None)
    out["student.model"] = cfg.student.model if cfg.student else None
    return out


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(prefix + k)
    return keys


def prepare_work_dir(cfg: Config, fresh: bool) -> Path:
    """The parts folder for this run. Refuses to mix outputs of a different config into it."""
    work = cfg.run_dir / "work"
    parts = work / "parts"
    stamp = work / "fingerprint.json"
    if fresh and work.exists():
        for f in parts.glob("*"):
            f.unlink()
        stamp.unlink(missing_ok=True)
    parts.mkdir(parents=True, exist_ok=True)
    now = fingerprint(cfg)
    if stamp.exists():
        before = json.loads(stamp.read_text())
        changed = _diff(before, now)
        if changed:
            raise ConfigError(
                f"{cfg.run_dir}: holds a run made with a different config (changed: {', '.join(changed[:8])}); "
                "rerun with --fresh to start over, or choose another name="
            )
    else:
        _atomic_write_text(stamp, json.dumps(now, indent=2, sort_keys=True))
    for leftover in parts.glob("*.tmp"):  # a write the last run did not finish
        leftover.unlink()
    return parts


def done_ids(parts: Path) -> set[str]:
    ids: set[str] = set()
    for f in sorted(parts.glob(PART_GLOB)):
        ids.update(pq.read_table(f, columns=["sample_id"])["sample_id"].to_pylist())
    return ids


def pending_batch(batch: pa.Table, done: set[str]) -> pa.Table:
    """Accepted source rows whose sample id has no part yet."""
    keep = pc.is_null(batch["reject_reason"])
    if done:
        keep = pc.and_(keep, pc.invert(pc.is_in(batch["sample_id"], value_set=pa.array(sorted(done), pa.string()))))
    return batch.filter(keep)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_part(parts: Path, table: pa.Table) -> Path:
    """One finished block, named by its content; written whole or not at all."""
    ids = "\n".join(sorted(table["sample_id"].to_pylist()))
    path = parts / f"part-{hashlib.sha256(ids.encode()).hexdigest()[:16]}.parquet"
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- the pipeline
def build(cfg: Config, source, done: set[str]):
    """The Ray Data chain from source rows to labeled rows (one line per stage)."""
    from ray.data import ActorPoolStrategy

    from casseat_ray.runtime import engine_actor_args
    from casseat_ray.synth.stages import JudgeStage, LabelStage, StudentFilter, TeacherStage

    t = cfg.teacher
    ds = source.map_batches(pending_batch, batch_format="pyarrow", fn_kwargs={"done": done}, num_cpus=0.1)
    if cfg.ddf_source.model_filter.enabled:
        resources, engine = engine_actor_args(cfg.student.engine, t.num_cpus, min(t.num_gpus, 1.0), t.placement)
        ds = ds.map_batches(StudentFilter, fn_constructor_kwargs={"cfg": cfg, "engine_config": engine}, batch_format="pyarrow",
                            compute=ActorPoolStrategy(size=1), batch_size=cfg.ddf_source.model_filter.batch_size, **resources)
    resources, engine = engine_actor_args(t.engine, t.num_cpus, t.num_gpus, t.placement)
    ds = ds.map_batches(TeacherStage, fn_constructor_kwargs={"cfg": cfg, "engine_config": engine}, batch_format="pyarrow",
                        compute=ActorPoolStrategy(size=t.concurrency), batch_size=t.batch_size, **resources)
    lab = cfg.ddf_labeled
    ds = ds.map_batches(LabelStage, fn_constructor_kwargs={"cfg": cfg}, batch_format="pyarrow", compute=ActorPoolStrategy(size=lab.concurrency),
                        batch_size=t.batch_size, num_cpus=lab.num_cpus)
    j = lab.judge
    if j.enabled:
        resources, engine = engine_actor_args(cfg.judge_engine, j.num_cpus, j.num_gpus, t.placement)
        ds = ds.map_batches(JudgeStage, fn_constructor_kwargs={"cfg": cfg, "engine_config": engine}, batch_format="pyarrow",
                            compute=ActorPoolStrategy(size=j.concurrency), batch_size=j.batch_size, **resources)
    return ds


def run(cfg: Config, fresh: bool = False, progress: bool = True) -> dict:
    """Synthesize (or resume) the SFT set of ``cfg``; returns the stats written to stats.json."""
    from casseat_ray import data
    from casseat_ray.runtime import init_ray
    from casseat_ray.synth import outputs

    t0 = time.perf_counter()
    if cfg.teacher is None or cfg.student is None:
        raise ConfigError("synthesize needs teacher.model and student.model (the student's processor counts sample lengths)")
    run_dir = cfg.run_dir
    parts = prepare_work_dir(cfg, fresh)
    _atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    init_ray(cfg.ray)
    # One teacher batch per block, cut before any actor holds a CPU: each finished block then
    # reaches the driver (and a part file) as soon as it is done, so an interrupted run loses
    # at most the blocks in flight.
    source = data.load(cfg).repartition(target_num_rows_per_block=cfg.teacher.batch_size).materialize()
    source_funnel = data.funnel(source)
    done = done_ids(parts)
    accepted = source_funnel["accepted"]
    todo = accepted - len(done)
    processed, written = 0, 0
    t_loop = time.perf_counter()
    if todo > 0:
        bar = _progress(todo, progress, resumed=len(done))
        try:
            for block in build(cfg, source, done).iter_batches(batch_size=None, batch_format="pyarrow"):
                if block.num_rows == 0:
                    continue
                write_part(parts, block)
                processed += block.num_rows
                written += 1
                bar.update(block.num_rows)
        finally:
            bar.close()
    loop_seconds = time.perf_counter() - t_loop
    have = len(done) + processed  # blocks hold only pending rows, so no id is counted twice
    if have < accepted:
        return {"complete": False, "parts": written, "rows_done": have, "rows_total": accepted}
    timing = {"wall_seconds": time.perf_counter() - t0, "loop_seconds": loop_seconds, "processed_rows": processed, "resumed_rows": len(done)}
    return outputs.finalize(cfg, source, source_funnel, parts, timing)


def _progress(total: int, enabled: bool, resumed: int):
    from tqdm import tqdm

    desc = "teacher cascade" + (f" (resuming, {resumed} done)" if resumed else "")
    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True)


__all__ = ["run", "build", "pending_batch", "write_part", "done_ids"]
