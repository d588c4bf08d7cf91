"""AFT on the student's own answers, as the AFT paper runs it (Wang et al., arXiv 2309.02144).

``train.aft.samples: student`` makes ``casseat train`` three steps, each resumable:

1. stage 1: plain NLL fine-tuning on the SFT set (Ray Train run ``NAME-aft-stage1``, outputs
   under ``train/stage1``);
2. sampling: the stage-1 student (the base model with the stage-1 adapter, on the student's
   vLLM engine through the inference layer's engine actor) answers every CoT or SEAT sample's
   question ``train.aft.k`` times; DDF's scorer ranks each answer (right, wrong, no usable
   answer) and the answers replace the sample's ``responses`` in a copy of the SFT set
   (``train/aft_sft``). Finished blocks are parts (``train/aft_samples``), so a rerun asks
   only for what is missing, and retries requests the engine failed;
3. stage 2: NLL + the alignment loss on that copy, starting from the stage-1 adapter (the
   run's own name and ``train/adapter``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from casseat_ray import parts as partstore
from casseat_ray.adapters import ShippedAdapter, adapter_weights, serving_engine, shipped
from casseat_ray.config import Config, ConfigError, PlacementConfig, SamplingConfig
from casseat_ray.engines import RETRYABLE, failure_reason, image_part
from casseat_ray.rows import REJECT_FIELDS

log = logging.getLogger(__name__)
STAGE1_DIR, SAMPLES_DIR, SFT_DIR = "stage1", "aft_samples", "aft_sft"
RESPONSE_FIELDS = [
    pa.field("responses", pa.list_(pa.string())),
    pa.field("responses_correct", pa.list_(pa.bool_())),
    pa.field("responses_rank", pa.list_(pa.int64())),
]
# What a sampled question needs: its prompt turns, images and what scores an answer.
WORK_COLUMNS = ["id", "kind", "messages", "images", "answer", "answer_type", "choices", "precision"]


def student_samples(cfg: Config) -> bool:
    """Whether the run trains AFT on the student's own answers (two stages)."""
    return cfg.train.loss == "aft" and cfg.train.aft.samples == "student"


def stage1_name(cfg: Config) -> str:
    return f"{cfg.name}-aft-stage1"


def stage1_config(cfg: Config) -> Config:
    """Stage 1: the run's training settings with the plain NLL loss."""
    a = cfg.train.aft
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"loss": "nll", "epochs": a.stage1_epochs or cfg.train.epochs})})


def stage2_config(cfg: Config, adapter: Path) -> Config:
    """Stage 2: NLL + alignment, starting from the stage-1 adapter."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_adapter": str(adapter)})})


def sampling(cfg: Config) -> SamplingConfig:
    a = cfg.train.aft
    return SamplingConfig(temperature=a.temperature, max_tokens=a.max_tokens, n=a.k, seed=cfg.train.seed)


# ---------------------------------------------------------------- one question
def prompt_conversation(row: dict) -> list[dict]:
    """The engine conversation of an SFT sample's turns before its first assistant turn: what
    the student is asked, exactly as it was trained on it (``<image>`` markers become the
    row's images, in order)."""
    from casseat_ray.train.collate import prompt_turns, to_conversation

    conv = to_conversation(prompt_turns(list(row["messages"])))
    images = iter(row.get("images") or [])
    for m in conv:
        m["content"] = [image_part(next(images)) if p["type"] == "image" else p for p in m["content"]]
    return conv


def ranked(completions, row: dict) -> dict:
    """The response columns of one question's sampled answers: each scored by DDF's rule and
    ranked 0 right, 1 wrong answer, 2 no usable answer (``synth.stages.response_rank``)."""
    from casseat_ray.answers import score
    from casseat_ray.synth.stages import response_rank

    scores = [None if c.error else score(c.text, row) for c in completions]
    return {"responses": [c.text for c in completions],
            "responses_correct": [bool(s is not None and s.correct) for s in scores],
            "responses_rank": [response_rank(s, c.finish_reason) for s, c in zip(scores, completions)]}


class SampleTask:
    """The engine actor's task: ``k`` answers to one question through the stage-1 adapter."""

    stage = "aft_sample"
    fields = RESPONSE_FIELDS
    key = "id"

    def __init__(self, sampling: SamplingConfig, adapter: ShippedAdapter):
        self.sampling, self.adapter = sampling, adapter

    async def __call__(self, engine, row: dict) -> dict:
        outs = await engine.generate(prompt_conversation(row), self.sampling, self.adapter)
        out = ranked(outs, row)
        bad = next((c for c in outs if c.error), None)
        if bad is not None:  # the question is not final: a rerun asks again (engine_error)
            out["reject"] = (failure_reason(bad.finish_reason), bad.error)
        return out


def with_reject_columns(batch: pa.Table) -> pa.Table:
    for name in REJECT_FIELDS:
        if name not in batch.schema.names:
            batch = batch.append_column(name, pa.nulls(batch.num_rows, pa.string()))
    return batch


def questions(batch: pa.Table, done: set[str]) -> pa.Table:
    """The CoT / SEAT samples of ``batch`` not sampled yet (self-evaluation samples get no
    candidates: AFT scores a question's answers once, with its CoT sample)."""
    batch = batch.filter(pc.not_equal(batch["kind"], "self_eval"))
    return partstore.not_done(with_reject_columns(batch), done, "id")


# ---------------------------------------------------------------- the step
def fingerprint(cfg: Config, sft: Path, adapter: Path) -> dict:
    weights = adapter_weights(adapter)
    return partstore.fingerprint(cfg, (), extra={
        "student.model": cfg.student.model, "sampling": sampling(cfg).model_dump(mode="json"),
        "adapter": {"path": str(adapter.resolve()), "bytes": weights.stat().st_size, "mtime": int(weights.stat().st_mtime)},
        "sft_files": partstore.files_stamp([sft]),
    })


def samples_parts(work: Path, stamp: dict) -> Path:
    """The sampling's parts folder; parts of another adapter, SFT set or sampling are of no
    use, so they are dropped (and said) rather than refused."""
    try:
        return partstore.prepare(work, stamp, False, str(work))
    except ConfigError as e:
        log.warning("%s; sampling again", e.args[0].split("; rerun")[0])
        return partstore.prepare(work, stamp, True, str(work))


def sample(cfg: Config, sft: Path, adapter: Path, out: Path, progress: bool = True) -> dict:
    """Step 2: the stage-1 student's answers for every question of ``sft`` not yet in a part,
    then the SFT copy with them (``out/aft_sft``); returns the step's figures."""
    from tqdm import tqdm

    from casseat_ray.inference.stage import engine_stage
    from casseat_ray.train.run import read_sft

    t0 = time.perf_counter()
    e = cfg.evaluate
    stamp = fingerprint(cfg, sft, adapter)
    parts = samples_parts(out / SAMPLES_DIR, stamp)
    done = partstore.done_ids(parts, "id", retry=RETRYABLE)
    work = (read_sft(sft, cfg.train, WORK_COLUMNS)
            .map_batches(questions, batch_format="pyarrow", fn_kwargs={"done": done}, num_cpus=0.1)
            .repartition(target_num_rows_per_block=e.batch_size).materialize())
    asked = work.count()
    if asked:
        engine = serving_engine(e.engine or cfg.student.engine, adapter)
        with (shipped(adapter.resolve()) as copy,
              tqdm(total=asked, desc="AFT: stage-1 student samples", unit="q", disable=not progress, dynamic_ncols=True) as bar):
            spec = engine_stage("aft_sample", SampleTask(sampling(cfg), copy), cfg.student.model, engine,
                                concurrency=e.concurrency, batch_size=e.batch_size, num_cpus=e.num_cpus, num_gpus=e.num_gpus,
                                placement=cfg.teacher.placement if cfg.teacher else PlacementConfig())
            for block in spec.apply(work).iter_batches(batch_size=None, batch_format="pyarrow"):
                if block.num_rows:
                    partstore.record_stamp(parts, stamp)
                    partstore.write_part(parts, block.select(["id", *REJECT_FIELDS, *(f.name for f in RESPONSE_FIELDS)]), "id")
                    bar.update(block.num_rows)
    figures = write_set(sft, parts, out / SFT_DIR)
    figures.update(asked=asked, seconds=round(time.perf_counter() - t0, 1))
    return figures


def write_set(sft: Path, parts: Path, out: Path) -> dict:
    """The SFT set with every CoT / SEAT sample's responses replaced by the student's (none for
    a question whose sampling failed, and for self-evaluation samples), streamed file by file;
    returns what was sampled."""
    import os
    import shutil

    sampled = {r["id"]: r for t in partstore.read_parts(parts, id_column="id", retry=RETRYABLE) for r in t.to_pylist()}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = [sft] if sft.is_file() else sorted(sft.glob("*.parquet"))
    for i, f in enumerate(files):
        reader = pq.ParquetFile(f)
        with pq.ParquetWriter(tmp / f"sft-{i:05d}.parquet", reader.schema_arrow) as writer:
            for batch in reader.iter_batches(batch_size=256):
                t = pa.Table.from_batches([batch])
                hits = [sampled.get(k) if kind != "self_eval" else None for k, kind in zip(t["id"].to_pylist(), t["kind"].to_pylist())]
                for field in RESPONSE_FIELDS:
                    values = pa.array([(h[field.name] if h and h["reject_reason"] is None else []) for h in hits], field.type)
                    t = t.set_column(t.schema.get_field_index(field.name), field, values)
                writer.write_table(t)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    rows = list(sampled.values())
    ok = [r for r in rows if r["reject_reason"] is None]
    ranks = [k for r in ok for k in r["responses_rank"]]
    return {"questions": len(rows), "failed": {reason: sum(1 for r in rows if r["reject_reason"] == reason)
                                               for reason in sorted({r["reject_reason"] for r in rows} - {None})},
            "answers": len(ranks), "right": ranks.count(0), "wrong": ranks.count(1), "unusable": ranks.count(2),
            "questions_with_right_and_wrong": sum(1 for r in ok if 0 in r["responses_rank"] and set(r["responses_rank"]) - {0}),
            "sft": str(out)}


def read_summary(path: Path) -> dict | None:
    f = path / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None
