"""The model-backed stages of synthesis, as Ray Data callable classes.

Each class owns what is expensive to build (an engine, a processor) and maps a batch of
accepted source rows (a ``pyarrow.Table``) to the same rows with new columns. Rows an earlier
stage rejected pass through untouched, so ``in == out + rejected`` holds per stage. The
logic they call (conversation builders, scoring, DDF level 2, sample builders) is pure and
lives in the sibling modules; the classes only batch it around the engine.
"""

from __future__ import annotations

import json
import time

import pyarrow as pa

from casseat_ray import prompts
from casseat_ray.answers import score
from casseat_ray.config import Config, EngineConfig, SamplingConfig
from casseat_ray.engines import image_part, text_part, user
from casseat_ray.synth.conversations import c1_conversation, c2_conversation, judge_conversation, judged_texts, question_with_choices
from casseat_ray.synth.filters import JUDGE_VERDICTS, judge_cascade, judge_reject, judge_single, judge_verdict, too_long
from casseat_ray.synth.mix import cot_sample, seat_sample, self_eval_sample

# Columns the teacher stage adds (one row per question; C1 may hold k samples).
TEACHER_FIELDS = [
    pa.field("c1_texts", pa.list_(pa.string())),
    pa.field("c1_finish", pa.list_(pa.string())),
    pa.field("c1_errors", pa.list_(pa.string())),
    pa.field("c1_prompt_tokens", pa.int64()),
    pa.field("c1_output_tokens", pa.list_(pa.int64())),
    pa.field("c2_text", pa.string()),
    pa.field("c2_finish", pa.string()),
    pa.field("c2_error", pa.string()),
    pa.field("c2_prompt_tokens", pa.int64()),
    pa.field("c2_output_tokens", pa.int64()),
    pa.field("teacher_model", pa.string()),
    pa.field("teacher_sampling", pa.string()),
    pa.field("c1_prompt_sha", pa.string()),
    pa.field("c2_prompt_sha", pa.string()),
    pa.field("teacher_seconds", pa.float64()),
]
# Columns the model filter and the labeling stage add.
LABEL_FIELDS = [
    pa.field("student_direct", pa.string()),
    pa.field("verdict", pa.string()),
    pa.field("c1_correct", pa.list_(pa.bool_())),
    pa.field("c1_rank", pa.list_(pa.int64())),
    pa.field("final_correct", pa.bool_()),
    pa.field("kinds", pa.list_(pa.string())),
    pa.field("student_tokens", pa.int64()),
]


# Columns the model judge adds.
JUDGE_FIELDS = [
    pa.field("judge_text", pa.string()),
    pa.field("judge_verdict", pa.string()),
    pa.field("judge_model", pa.string()),
    pa.field("judge_prompt_sha", pa.string()),
]


def _pending(rows: list[dict]) -> list[int]:
    return [i for i, r in enumerate(rows) if r.get("reject_reason") is None]


def _reject(row: dict, stage: str, reason: str, detail: str) -> None:
    row.update(reject_stage=stage, reject_reason=reason, reject_detail=detail)


def stage_prompts(cfg: Config) -> dict[str, prompts.Prompt]:
    """The templates a run uses, with the config's overrides applied."""
    p = cfg.synthesis.prompts
    c2_name = "c2_hint" if cfg.synthesis.hint_ground_truth else "c2"
    ps = {
        "c1": prompts.load("c1", p.c1),
        "c2": prompts.load("c2", p.c2),  # the student's C2: never a hint
        "teacher_c2": prompts.load(c2_name, p.c2_hint if cfg.synthesis.hint_ground_truth else p.c2),
        "seat": prompts.load("seat", p.seat),
        "direct": prompts.load("direct", p.direct),
    }
    if cfg.ddf_labeled.judge.enabled:
        ps["judge"] = prompts.load("judge", p.judge)
    return ps


def teacher_turns(cfg: Config, rows: list[dict], engine, ps: dict) -> list[dict]:
    """Run the configured mode for ``rows`` on ``engine``; one dict of TEACHER_FIELDS per row.

    cascade: C1 (k samples) then C2 on the first sample, as a second user turn of the same
    conversation (the engine's prefix cache holds C1); seat: one long prompt; cot: C1 only.
    ``teacher_seconds`` is the row's share of its batch's engine time.
    """
    mode = cfg.synthesis.mode
    sampling = cfg.teacher.sampling.model_copy(update={"n": cfg.synthesis.cot_samples})
    first = ps["seat"] if mode == "seat" else ps["c1"]
    t0 = time.perf_counter()
    firsts = engine.chat([[user(image_part(r["image"]), text_part(first.render(question=question_with_choices(r))))] for r in rows], sampling)
    share = (time.perf_counter() - t0) / max(len(rows), 1)
    described = json.dumps(sampling.model_dump(mode="json"), sort_keys=True)
    out = [
        dict(
            c1_texts=[o.text for o in outs], c1_finish=[o.finish_reason for o in outs], c1_errors=[o.error for o in outs],
            c1_prompt_tokens=outs[0].prompt_tokens, c1_output_tokens=[o.output_tokens for o in outs],
            c2_text=None, c2_finish=None, c2_error=None, c2_prompt_tokens=None, c2_output_tokens=None,
            teacher_model=cfg.teacher.model, teacher_sampling=described,
            c1_prompt_sha=first.sha, c2_prompt_sha=None, teacher_seconds=share,
        )
        for outs in firsts
    ]
    if mode != "cascade":
        return out
    todo = [i for i, o in enumerate(out) if o["c1_finish"][0] != "error"]
    t1 = time.perf_counter()
    convs = [c2_conversation(rows[i], ps["c1"], out[i]["c1_texts"][0], ps["teacher_c2"]) for i in todo]
    answers = engine.chat(convs, cfg.teacher.sampling.model_copy(update={"n": 1})) if convs else []
    share = (time.perf_counter() - t1) / max(len(todo), 1)
    for i, outs in zip(todo, answers):
        o = outs[0]
        out[i].update(c2_text=o.text, c2_finish=o.finish_reason, c2_error=o.error, c2_prompt_tokens=o.prompt_tokens,
                      c2_output_tokens=o.output_tokens, c2_prompt_sha=ps["teacher_c2"].sha,
                      teacher_seconds=out[i]["teacher_seconds"] + share)
    return out


def response_rank(scored, finish_reason: str | None) -> int:
    """Ranked feedback on one teacher response (0 best), for AFT's ranking variant: right
    final answer, then a wrong but complete answer, then no usable answer (engine error,
    cut off at the token limit, or nothing extractable)."""
    if scored is not None and scored.correct:
        return 0
    if scored is None or finish_reason == "length" or scored.extraction is None:
        return 2
    return 1


def label_row(cfg: Config, row: dict, ps: dict, count_tokens) -> tuple[tuple[str, str] | None, dict]:
    """DDF level 2 for one teacher-processed row: ``(reject or None, LABEL_FIELDS values)``.

    ``count_tokens(sample)`` gives a candidate SFT sample's length in the student's tokens,
    image tokens included. The longest sample a row yields must fit the budget.
    """
    mode, f = cfg.synthesis.mode, cfg.ddf_labeled
    c1 = [{"text": t, "finish_reason": fr, "error": e} for t, fr, e in zip(row["c1_texts"], row["c1_finish"], row["c1_errors"])]
    scored = [None if c["error"] else score(c["text"], row) for c in c1]
    c1_correct = [bool(s and s.correct) for s in scored]
    c1_rank = [response_rank(s, c["finish_reason"]) for s, c in zip(scored, c1)]
    labels = dict(verdict=None, c1_correct=c1_correct, c1_rank=c1_rank, final_correct=None, kinds=[], student_tokens=None)
    if mode == "cascade":
        if row["c2_text"] is None and row["c2_error"] is None:  # C2 never ran: C1 failed in the engine
            c2 = {"text": "", "finish_reason": "error", "error": c1[0]["error"]}
        else:
            c2 = {"text": row["c2_text"], "finish_reason": row["c2_finish"], "error": row["c2_error"]}
        j = judge_cascade(row, c1[0], c2, f)
        labels.update(verdict=j.verdict, final_correct=j.c2.correct if j.c2 else None)
        if not j.kept:
            return (j.reason, j.detail), labels
        samples = [self_eval_sample(row, ps["c1"], c1[0]["text"], ps["c2"], c2["text"])]
        if j.cot_usable:
            samples.append(cot_sample(row, ps["c1"], c1[0]["text"]))
    else:
        reason, detail, s = judge_single(row, c1[0], f, need_verdict=(mode == "seat"))
        labels.update(final_correct=s.correct if s else None)
        if reason:
            return (reason, detail), labels
        samples = [seat_sample(row, ps["seat"], c1[0]["text"]) if mode == "seat" else cot_sample(row, ps["c1"], c1[0]["text"])]
    # The first sample is the row's longest: a self-evaluation sample contains its CoT sample
    # (same image, same C1 turn) as a prefix, so counting it alone bounds both.
    labels["student_tokens"] = count_tokens(samples[0])
    hit = too_long(labels["student_tokens"], f)
    if hit:
        return hit, labels
    labels["kinds"] = [s["kind"] for s in samples]
    return None, labels


def _with_columns(batch: pa.Table, rows: list[dict], fields: list[pa.Field]) -> pa.Table:
    """``batch`` with the reject columns refreshed from ``rows`` and ``fields`` appended."""
    for name in ("reject_stage", "reject_reason", "reject_detail"):
        batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array([r.get(name) for r in rows], pa.string()))
    for field in fields:
        values = pa.array([r.get(field.name) for r in rows], field.type)
        if field.name in batch.schema.names:
            batch = batch.set_column(batch.schema.get_field_index(field.name), field, values)
        else:
            batch = batch.append_column(field, values)
    return batch


# ---------------------------------------------------------------- Ray Data callable classes
class StudentFilter:
    """DDF level 1, model part: the student answers directly; what it gets right is too easy."""

    def __init__(self, cfg: Config, engine=None, engine_config: EngineConfig | None = None):
        from casseat_ray.engines.vllm import VLLMEngine

        self.cfg = cfg
        self.prompt = stage_prompts(cfg)["direct"]
        self.engine = engine or VLLMEngine(cfg.student.model, engine_config or cfg.student.engine)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = _pending(rows)
        mf = self.cfg.ddf_source.model_filter
        sampling = self.cfg.teacher.sampling.model_copy(update={"n": 1, "temperature": 0.0, "max_tokens": mf.max_tokens})
        convs = [[user(image_part(rows[i]["image"]), text_part(self.prompt.render(question=question_with_choices(rows[i]))))] for i in todo]
        for i, outs in zip(todo, self.engine.chat(convs, sampling) if convs else []):
            o = outs[0]
            rows[i]["student_direct"] = o.text
            if o.error is None and score(o.text, rows[i]).correct:
                _reject(rows[i], "ddf_model", "too_easy", f"the student already answers {o.text.strip()[:40]!r}")
        return _with_columns(batch, rows, LABEL_FIELDS[:1])


class TeacherStage:
    """Owns one teacher engine and runs the whole cascade for its batch on it."""

    def __init__(self, cfg: Config, engine=None, engine_config: EngineConfig | None = None):
        from casseat_ray.engines.vllm import VLLMEngine

        self.cfg = cfg
        self.ps = stage_prompts(cfg)
        self.engine = engine or VLLMEngine(cfg.teacher.model, engine_config or cfg.teacher.engine, cfg.teacher.sampling)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = _pending(rows)
        for i, values in zip(todo, teacher_turns(self.cfg, [rows[i] for i in todo], self.engine, self.ps)):
            rows[i].update(values)
        return _with_columns(batch, rows, TEACHER_FIELDS)


class LabelStage:
    """DDF level 2 with the student's processor at hand (for the length budget)."""

    def __init__(self, cfg: Config):
        from transformers import AutoProcessor

        self.cfg = cfg
        self.ps = stage_prompts(cfg)
        self.processor = AutoProcessor.from_pretrained(cfg.student.model)

    def count_tokens(self, sample: dict) -> int:
        from casseat_ray.train.collate import encode

        return len(encode(sample, self.processor, "all_assistant"))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for i in _pending(rows):
            hit, labels = label_row(self.cfg, rows[i], self.ps, self.count_tokens)
            rows[i].update(labels)
            if hit:
                _reject(rows[i], "ddf_labeled", *hit)
        return _with_columns(batch, rows, LABEL_FIELDS)


class JudgeStage:
    """The optional model judge (DDF level 2, last check): reads each kept row's reasoning and
    self-evaluation with the image and rejects the unfaithful ones."""

    def __init__(self, cfg: Config, engine=None, engine_config: EngineConfig | None = None):
        from casseat_ray.engines.vllm import VLLMEngine

        j = cfg.ddf_labeled.judge
        self.cfg = cfg
        self.model = cfg.judge_model
        self.prompt = stage_prompts(cfg)["judge"]
        self.sampling = SamplingConfig(temperature=0.0, max_tokens=j.max_tokens, n=1, choice=list(JUDGE_VERDICTS) if j.constrained else None)
        self.engine = engine or VLLMEngine(self.model, engine_config or cfg.judge_engine)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = _pending(rows)
        convs = [judge_conversation(rows[i], self.prompt, *judged_texts(self.cfg.synthesis.mode, rows[i])) for i in todo]
        for i, outs in zip(todo, self.engine.chat(convs, self.sampling) if convs else []):
            o = outs[0]
            rows[i].update(judge_text=o.text, judge_verdict=None if o.error else judge_verdict(o.text),
                           judge_model=self.model, judge_prompt_sha=self.prompt.sha)
            hit = judge_reject(o.text, o.error, self.cfg.ddf_labeled.judge.on_no_verdict)
            if hit:
                _reject(rows[i], "ddf_judge", *hit)
        return _with_columns(batch, rows, JUDGE_FIELDS)
