"""The stages of synthesis: three engine tasks and the labeling actor.

The engine tasks (teacher cascade, student filter, judge) run inside the one engine actor of
``inference.stage``, one coroutine per row; labeling (DDF level 2 plus the student-token
budget) runs in CPU actors that hold the student's processor. Rows an earlier stage rejected
pass through untouched, so ``in == out + rejected`` holds per stage. The logic they call
(conversation turns, modes, filters, sample builders) is pure and lives elsewhere.
"""

from __future__ import annotations

import functools
import logging

import pyarrow as pa

from casseat_ray.answers import ScoredAnswer
from casseat_ray.config import Config, SamplingConfig
from casseat_ray.inference.modes import RESULT_FIELDS, ModeCall, as_scored, run_mode
from casseat_ray.inference.stage import StageSpec, engine_stage
from casseat_ray.inference.turns import judge_conversation, judged_texts, run_prompts
from casseat_ray.rows import pending, reject, with_columns
from casseat_ray.synth.filters import JUDGE_VERDICTS, SKIPPED_C2, judge_cascade, judge_reject, judge_single, judge_verdict, too_long, unusable_c1
from casseat_ray.synth.mix import cot_sample, seat_sample, self_eval_sample

log = logging.getLogger(__name__)

# Columns the teacher stage adds (one row per question; C1 may hold k samples).
TEACHER_FIELDS = RESULT_FIELDS
# Columns the model filter and the labeling stage add.
LABEL_FIELDS = [
    pa.field("student_direct", pa.string()),
    pa.field("verdict", pa.string()),
    pa.field("c1_correct", pa.list_(pa.bool_())),
    pa.field("c1_rank", pa.list_(pa.int64())),
    pa.field("final_correct", pa.bool_()),
    pa.field("kinds", pa.list_(pa.string())),  # the samples this row yields (within the budget)
    pa.field("too_long_kinds", pa.list_(pa.string())),  # samples dropped for the student budget
    pa.field("student_tokens", pa.list_(pa.int64())),  # per candidate sample, in the order of kinds + too_long_kinds
]
# Columns the model judge adds.
JUDGE_FIELDS = [
    pa.field("judge_text", pa.string()),
    pa.field("judge_verdict", pa.string()),
    pa.field("judge_model", pa.string()),
    pa.field("judge_prompt_sha", pa.string()),
]


# ---------------------------------------------------------------- engine tasks
class TeacherTask:
    """The configured synthesis mode on the teacher: cascade (C1 with k samples, then C2 on the
    first), seat or cot. C2 is skipped after a C1 that DDF level 2 will reject anyway."""

    stage = "teacher"
    fields = TEACHER_FIELDS

    def __init__(self, cfg: Config):
        ps = run_prompts(cfg)
        t = cfg.teacher
        skip = None if cfg.synthesis.c2_after_unusable_c1 else functools.partial(unusable_c1, cfg.ddf_labeled)
        self.call = ModeCall(mode=cfg.synthesis.mode, prompts=dict(ps, c2=ps["teacher_c2"]), model=t.model,
                             sampling=t.sampling.model_copy(update={"n": cfg.synthesis.cot_samples}),
                             c2_sampling=t.sampling.model_copy(update={"n": 1}), c2_skip=skip)

    async def __call__(self, engine, row: dict) -> dict:
        return await run_mode(engine, row, self.call)


class StudentFilterTask:
    """DDF level 1, model part: the student answers directly; what it gets right is too easy."""

    stage = "ddf_model"
    fields = LABEL_FIELDS[:1]

    def __init__(self, cfg: Config):
        mf = cfg.ddf_source.model_filter
        sampling = SamplingConfig(temperature=0.0, max_tokens=mf.max_tokens)
        self.call = ModeCall(mode="direct", prompts=run_prompts(cfg), model=cfg.student.model, sampling=sampling)

    async def __call__(self, engine, row: dict) -> dict:
        out = await run_mode(engine, row, self.call)
        values = {"student_direct": out["c1_texts"][0]}
        s = as_scored(out["c1_scores"][0])
        if s is not None and s.correct:
            values["reject"] = ("too_easy", f"the student already answers {out['c1_texts'][0].strip()[:40]!r}")
        return values


class JudgeTask:
    """The optional model judge (DDF level 2, last check): reads each kept row's reasoning and
    self-evaluation with the image and rejects the unfaithful ones."""

    stage = "ddf_judge"
    fields = JUDGE_FIELDS

    def __init__(self, cfg: Config):
        j = cfg.ddf_labeled.judge
        self.mode, self.on_no_verdict, self.model = cfg.synthesis.mode, j.on_no_verdict, cfg.judge_model
        self.prompt = run_prompts(cfg)["judge"]
        self.sampling = SamplingConfig(temperature=0.0, max_tokens=j.max_tokens, n=1, choice=list(JUDGE_VERDICTS) if j.constrained else None)

    async def __call__(self, engine, row: dict) -> dict:
        (o,) = await engine.generate(judge_conversation(row, self.prompt, *judged_texts(self.mode, row)), self.sampling)
        values = dict(judge_text=o.text, judge_verdict=None if o.error else judge_verdict(o.text), judge_model=self.model,
                      judge_prompt_sha=self.prompt.sha)
        hit = judge_reject(o.text, o.error, self.on_no_verdict, o.finish_reason)
        if hit:
            values["reject"] = hit
        return values


# ---------------------------------------------------------------- labeling (DDF level 2)
def response_rank(scored: ScoredAnswer | None, finish_reason: str | None) -> int:
    """Ranked feedback on one teacher response (0 best), for AFT's ranking variant: right
    final answer, then a wrong but complete answer, then no usable answer (engine error,
    cut off at the token limit, or nothing extractable)."""
    if scored is not None and scored.correct:
        return 0
    if scored is None or finish_reason == "length" or scored.extraction is None:
        return 2
    return 1


def _turn(row: dict, prefix: str, i: int = 0) -> dict:
    texts = row[f"{prefix}_texts"]
    if not texts:  # the turn never ran
        return {"text": "", "finish_reason": "error", "error": row.get("c2_skipped") or "not run"}
    return {"text": texts[i], "finish_reason": row[f"{prefix}_finish"][i], "error": row[f"{prefix}_errors"][i]}


def label_row(cfg: Config, row: dict, ps: dict, count_tokens) -> tuple[tuple[str, str] | None, dict]:
    """DDF level 2 for one teacher-processed row: ``(reject or None, LABEL_FIELDS values)``.

    Every answer was scored once by the inference layer (``c1_scores``, ``c2_scores``).
    ``count_tokens(sample)`` gives a candidate SFT sample's length in the student's tokens,
    image tokens included; each sample is measured, and only those over the budget are dropped
    (the row is rejected as too long when none fits).
    """
    mode, f = cfg.synthesis.mode, cfg.ddf_labeled
    scores = [as_scored(s) for s in row["c1_scores"]]
    c1_correct = [bool(s and s.correct) for s in scores]
    c1_rank = [response_rank(s, fr) for s, fr in zip(scores, row["c1_finish"])]
    labels = dict(verdict=None, c1_correct=c1_correct, c1_rank=c1_rank, final_correct=None, kinds=[], too_long_kinds=[], student_tokens=[])
    c1 = _turn(row, "c1")
    if mode == "cascade":
        if row.get("c2_skipped") in SKIPPED_C2:  # C1 alone decides the reject: say so, not "engine error"
            reason, what = SKIPPED_C2[row["c2_skipped"]]
            return (reason, f"{what}; C2 not run"), labels
        c2 = _turn(row, "c2")
        s2 = as_scored(row["c2_scores"][0]) if row["c2_scores"] else None
        j = judge_cascade(row, c1, c2, f, scores[0], s2)
        labels.update(verdict=j.verdict, final_correct=j.c2.correct if j.c2 else None)
        if not j.kept:
            return (j.reason, j.detail), labels
        samples = [self_eval_sample(row, ps["c1"], c1["text"], ps["c2"], c2["text"])]
        if j.cot_usable:
            samples.append(cot_sample(row, ps["c1"], c1["text"]))
    else:
        reason, detail, s = judge_single(row, c1, f, need_verdict=(mode == "seat"), s=scores[0])
        labels.update(final_correct=s.correct if s else None)
        if reason:
            return (reason, detail), labels
        samples = [seat_sample(row, ps["seat"], c1["text"]) if mode == "seat" else cot_sample(row, ps["c1"], c1["text"])]
    counts = [count_tokens(s) for s in samples]
    fits = [too_long(n, f) is None for n in counts]
    labels["kinds"] = [s["kind"] for s, ok in zip(samples, fits) if ok]
    labels["too_long_kinds"] = [s["kind"] for s, ok in zip(samples, fits) if not ok]
    labels["student_tokens"] = [n for n, ok in zip(counts, fits) if ok] + [n for n, ok in zip(counts, fits) if not ok]
    if not labels["kinds"]:
        return too_long(max(counts), f), labels
    return None, labels


class LabelStage:
    """DDF level 2 with the student's processor at hand (for the length budget)."""

    def __init__(self, cfg: Config):
        from transformers import AutoProcessor

        self.cfg = cfg
        self.ps = run_prompts(cfg)
        self.processor = AutoProcessor.from_pretrained(cfg.student.model)

    def count_tokens(self, sample: dict) -> int:
        from casseat_ray.train.collate import count_tokens

        return count_tokens(sample, self.processor)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for i in pending(rows):
            try:
                hit, labels = label_row(self.cfg, rows[i], self.ps, self.count_tokens)
            except Exception as e:  # one malformed row is that row's reject, never a dead job
                log.warning("labeling %s failed: %s: %s", rows[i].get("sample_id"), type(e).__name__, e)
                hit, labels = ("label_error", f"{type(e).__name__}: {e}"), {}
            rows[i].update(labels)
            if hit:
                reject(rows[i], "ddf_labeled", *hit)
        return with_columns(batch, rows, LABEL_FIELDS)


# ---------------------------------------------------------------- the stage specs
def stage_specs(cfg: Config) -> list[StageSpec]:
    """The model-backed part of the synthesis pipeline, in order."""
    t, lab = cfg.teacher, cfg.ddf_labeled
    specs = []
    if cfg.ddf_source.model_filter.enabled:
        specs.append(engine_stage("ddf_model", StudentFilterTask(cfg), cfg.student.model, cfg.student.engine, concurrency=1,
                                  batch_size=cfg.ddf_source.model_filter.batch_size, num_cpus=t.num_cpus, num_gpus=min(t.num_gpus, 1.0),
                                  placement=t.placement))
    specs.append(engine_stage("teacher", TeacherTask(cfg), t.model, t.engine, concurrency=t.concurrency, batch_size=t.batch_size,
                              num_cpus=t.num_cpus, num_gpus=t.num_gpus, placement=t.placement))
    specs.append(StageSpec("ddf_labeled", LabelStage, {"cfg": cfg}, lab.concurrency, t.batch_size, {"num_cpus": lab.num_cpus}))
    if lab.judge.enabled:
        j = lab.judge
        specs.append(engine_stage("ddf_judge", JudgeTask(cfg), cfg.judge_model, cfg.judge_engine, concurrency=j.concurrency,
                                  batch_size=j.batch_size, num_cpus=j.num_cpus, num_gpus=j.num_gpus, placement=t.placement))
    return specs
