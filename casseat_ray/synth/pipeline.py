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

import time

from casseat_ray import parts as partstore
from casseat_ray import storage
from casseat_ray.config import Config, ConfigError, to_yaml

# Config sections whose change makes earlier teacher outputs invalid for this run; how many
# actors run, how batches are cut and how many rows are in flight are not among them (a
# resumed run may scale out).
FINGERPRINT_KEYS = ("sources", "images", "ddf_source", "teacher", "synthesis", "ddf_labeled", "seed")
SCHEDULING = {"teacher": ("concurrency", "num_cpus", "num_gpus", "batch_size", "placement"), "teacher.engine": ("max_in_flight", "request_timeout_s"),
              "synthesis": ("max_error_share",),
              "ddf_labeled": ("concurrency", "num_cpus"), "ddf_labeled.judge": ("concurrency", "num_cpus", "num_gpus", "batch_size"),
              "ddf_labeled.judge.engine": ("max_in_flight", "request_timeout_s")}
# Bumped when the columns of a part change: parts of another layout cannot be resumed.
PARTS_LAYOUT = 3


def fingerprint(cfg: Config) -> dict:
    """What synthesis outputs depend on: the config sections above, the student model (its
    tokenizer measures lengths), the text of every prompt template the run renders (an
    edited template file changes its hash even when its path does not) and the size and
    modification time of every source file (a source edited in place is not resumed)."""
    from casseat_ray.inference.turns import run_prompts

    extra = {"student.model": cfg.student.model if cfg.student else None, "parts_layout": PARTS_LAYOUT,
             "prompt_shas": {k: p.sha for k, p in run_prompts(cfg).items()},
             "source_files": partstore.files_stamp(s.path for s in cfg.sources)}
    return partstore.fingerprint(cfg, FINGERPRINT_KEYS, SCHEDULING, extra)


def prepare_work_dir(cfg: Config, fresh: bool, stamp: dict | None = None):
    """The parts folder for this run. Refuses to mix outputs of a different config into it
    (``stamp``: the run's ``fingerprint``, when the caller has it already)."""
    return partstore.prepare(cfg.run_dir / "work", stamp or fingerprint(cfg), fresh, str(cfg.run_dir))


# ---------------------------------------------------------------- the pipeline
def build(cfg: Config, source, done: set[str]):
    """The Ray Data chain from source rows to labeled rows: a loop over the stage specs."""
    from casseat_ray.synth.stages import stage_specs

    ds = source.map_batches(partstore.not_done, batch_format="pyarrow", fn_kwargs={"done": done}, num_cpus=0.1)
    for spec in stage_specs(cfg):
        ds = spec.apply(ds)
    return ds


@storage.mirrors_run_dir
def run(cfg: Config, fresh: bool = False, progress: bool = True) -> dict:
    """Synthesize (or resume) the SFT set of ``cfg``; returns the stats written to stats.json."""
    from casseat_ray import data
    from casseat_ray.runtime import init_ray
    from casseat_ray.synth import outputs

    t0 = time.perf_counter()
    if cfg.teacher is None or cfg.student is None:
        raise ConfigError("synthesize needs teacher.model and student.model (the student's processor counts sample lengths)")
    run_dir = cfg.run_dir
    stamp = fingerprint(cfg)  # once: it stats every source file
    parts = prepare_work_dir(cfg, fresh, stamp)
    partstore.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    init_ray(cfg.ray)
    # One teacher batch per block, cut before any actor holds a CPU: each finished block then
    # reaches the driver (and a part file) as soon as it is done, so an interrupted run loses
    # at most the blocks in flight.
    source = data.load(cfg).repartition(target_num_rows_per_block=cfg.teacher.batch_size).materialize()
    source_funnel = data.funnel(source)
    if source_funnel["accepted"] == 0:  # before any engine starts
        raise ConfigError(data.nothing_accepted(source_funnel))
    done = partstore.done_ids(parts, retry=outputs.RETRY_REASONS)  # transient failures are tried again
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
                if not written:  # with the first part: a run that did nothing binds nothing
                    partstore.record_stamp(parts, stamp)
                partstore.write_part(parts, block)
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


__all__ = ["run", "build", "fingerprint", "prepare_work_dir"]
