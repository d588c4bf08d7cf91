"""The synthesis stages on the real (tiny, format-trained) teacher engine, shared per session,
driven through the one engine actor class as Ray Data drives it (its async ``__call__``)."""

import asyncio
import time

import pyarrow as pa
import pytest

from casseat_ray.answers import score
from casseat_ray.config import Config, EngineConfig
from casseat_ray.data import ROW_SCHEMA
from casseat_ray.demo import TINY_ENGINE
from casseat_ray.inference.stage import EngineStage
from casseat_ray.synth.stages import JudgeTask, LabelStage, StudentFilterTask, TeacherTask

pytestmark = pytest.mark.slow


def _stage(task, engine, **engine_cfg):
    """Run ``task`` over a batch in the engine actor, on the session's engine."""
    stage = EngineStage(task, engine.model, EngineConfig(**TINY_ENGINE, **engine_cfg), engine=engine)
    return lambda batch: asyncio.run(stage(batch))


def TeacherStage(cfg, engine):  # noqa: N802  (reads like the actor it builds)
    return _stage(TeacherTask(cfg), engine)


def StudentFilter(cfg, engine):  # noqa: N802
    return _stage(StudentFilterTask(cfg), engine)


def JudgeStage(cfg, engine):  # noqa: N802
    return _stage(JudgeTask(cfg), engine)


def _cfg(tiny_models, **kw) -> Config:
    base = dict(
        teacher=dict(model=str(tiny_models["teacher"]), engine=TINY_ENGINE, sampling=dict(max_tokens=96)),
        student=dict(model=str(tiny_models["student"]), engine=TINY_ENGINE),
        ddf_labeled=dict(max_student_tokens=1024),
    )
    base.update(kw)
    return Config.model_validate(base)


def _batch(demo_rows) -> pa.Table:
    rows = [dict(r, reject_stage=None, reject_reason=None, reject_detail=None) for r in demo_rows[:12]]
    rows[3] = dict(rows[3], image=b"", reject_stage="validate", reject_reason="empty_image", reject_detail="0 bytes")
    rows[5] = dict(rows[5], image=b"\x89PNG\r\n\x1a\n broken")  # passes nothing to the engine but an error
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


@pytest.fixture(scope="module")
def label_stage(tiny_models):
    return LabelStage(_cfg(tiny_models))


def _check_conserved(before: pa.Table, after: pa.Table) -> None:
    assert after.num_rows == before.num_rows
    assert after["sample_id"].to_pylist() == before["sample_id"].to_pylist()
    # an earlier reject passes through untouched
    assert after["reject_reason"][3].as_py() == "empty_image"
    assert "c1_texts" not in after.column_names or after["c1_texts"][3].as_py() is None


def test_cascade_runs_c1_then_c2_and_labels_every_row(tiny_models, teacher_engine, demo_rows, label_stage):
    cfg = _cfg(tiny_models)
    batch = _batch(demo_rows)
    out = TeacherStage(cfg, teacher_engine)(batch)
    _check_conserved(batch, out)
    rows = out.to_pylist()
    ok = [r for i, r in enumerate(rows) if i not in (3, 5)]
    ran_c2 = [r for r in ok if r["c2_skipped"] is None]
    assert len(ran_c2) >= 6 and all(r["c2_skipped"] in ("c1_truncated", "c1_no_answer") for r in ok if r not in ran_c2)
    assert all(r["c2_texts"][0] and "Evaluation:" in r["c2_texts"][0] for r in ran_c2)  # the taught format
    assert all(r["c2_prompt_tokens"][0] > r["c1_prompt_tokens"] + r["c1_output_tokens"][0] for r in ran_c2)
    assert all(r["model"] == cfg.teacher.model and r["c1_prompt_sha"] and r["seconds"] > 0 and r["mode"] == "cascade" for r in ok)
    assert all(r["c1_scores"][0]["extraction"] is not None for r in ran_c2)  # scored once, here
    assert rows[5]["c1_finish"] == ["error"] and rows[5]["c2_texts"] is None and rows[5]["c2_skipped"] == "c1_error"
    labelled = label_stage(out)
    _check_conserved(batch, labelled)
    lab = labelled.to_pylist()
    assert lab[5]["reject_stage"] == "ddf_labeled" and lab[5]["reject_reason"] == "engine_error"
    for r in lab:
        if r["reject_stage"] == "ddf_labeled" and r["reject_reason"] in ("accept_after_wrong", "refine_after_right"):
            assert r["c1_correct"] == [r["reject_reason"] == "refine_after_right"]
        if r["reject_reason"] is None:  # kept: right final answer, a verdict consistent with C1
            assert r["final_correct"] and r["verdict"] in ("Accept", "Refine")
            assert ("cot" in r["kinds"]) == r["c1_correct"][0] and 0 < max(r["student_tokens"]) <= 1024
    reasons = {r["reject_reason"] for r in lab}
    assert reasons & {"accept_after_wrong", "wrong_answer", "no_answer"}, reasons


def test_k_cot_samples_seat_and_cot_only_modes(tiny_models, teacher_engine, demo_rows, label_stage):
    batch = _batch(demo_rows)
    k = TeacherStage(_cfg(tiny_models, teacher=dict(model=str(tiny_models["teacher"]), sampling=dict(temperature=1.0, max_tokens=64)),
                          synthesis=dict(cot_samples=3)), teacher_engine)(batch).to_pylist()
    assert all(len(r["c1_texts"]) == 3 and len(r["c1_output_tokens"]) == 3 for i, r in enumerate(k) if i not in (3, 5))
    assert any(len(set(r["c1_texts"])) > 1 for r in k if r["c1_texts"])
    for mode, kind in (("seat", "seat"), ("cot", "cot")):
        cfg = _cfg(tiny_models, synthesis=dict(mode=mode))
        out = TeacherStage(cfg, teacher_engine)(batch)
        rows = out.to_pylist()
        assert all(r["c2_texts"] is None for r in rows)
        if mode == "seat":
            assert sum("[Self-evaluation]" in r["c1_texts"][0] for r in rows if r["c1_texts"]) >= 6
        labelled = LabelStage(cfg)(out).to_pylist()
        kept = [r for r in labelled if r["reject_reason"] is None]
        assert all(r["kinds"] == [kind] for r in kept)
        assert all(r["reject_stage"] in ("validate", "ddf_labeled") for r in labelled if r["reject_reason"])


def test_student_filter_rejects_what_the_student_already_answers(tiny_models, teacher_engine, demo_rows):
    # The format-trained tiny teacher stands in for a student here: one engine per session.
    cfg = _cfg(tiny_models, ddf_source=dict(model_filter=dict(enabled=True, max_tokens=16)))
    batch = _batch(demo_rows)
    out = StudentFilter(cfg, teacher_engine)(batch)
    _check_conserved(batch, out)
    rows = out.to_pylist()
    assert 0 < sum(r["reject_reason"] == "too_easy" for r in rows) < 10  # it memorized some demo answers
    for r in rows:
        if r["reject_reason"] == "too_easy":
            assert r["reject_stage"] == "ddf_model" and score(r["student_direct"], r).correct
        elif r["student_direct"] is not None:
            assert not score(r["student_direct"], r).correct


def test_model_judge_rejects_unfaithful_reflections_and_passes_earlier_rejects(tiny_models, teacher_engine, demo_rows, label_stage):
    from casseat_ray.synth.filters import judge_verdict

    batch = _batch(demo_rows)
    labelled = label_stage(TeacherStage(_cfg(tiny_models), teacher_engine)(batch))
    before = labelled.to_pylist()
    kept = [i for i, r in enumerate(before) if r["reject_reason"] is None]
    assert kept
    # constrained (the default): every kept row gets exactly one verdict word from the engine
    cfg = _cfg(tiny_models, ddf_labeled=dict(max_student_tokens=1024, judge=dict(enabled=True)))
    judged = JudgeStage(cfg, teacher_engine)(labelled)
    _check_conserved(batch, judged)
    rows = judged.to_pylist()
    for i, (a, b) in enumerate(zip(before, rows)):
        if i not in kept:  # rejected earlier: untouched, never sent to the judge
            assert (b["reject_stage"], b["reject_reason"], b["judge_text"]) == (a["reject_stage"], a["reject_reason"], None)
            continue
        assert b["judge_text"] in ("faithful", "unfaithful") and b["judge_verdict"] == b["judge_text"]
        assert b["judge_model"] == cfg.teacher.model and b["judge_prompt_sha"]
        assert (b["reject_reason"] == "judge_unfaithful") == (b["judge_verdict"] == "unfaithful")
        assert b["reject_stage"] == ("ddf_judge" if b["reject_reason"] else None)
    # free-form: the reply is read for a last "Verdict:" line; without one the row is rejected
    cfg = _cfg(tiny_models, ddf_labeled=dict(max_student_tokens=1024, judge=dict(enabled=True, constrained=False, max_tokens=24)))
    rows = JudgeStage(cfg, teacher_engine)(labelled).to_pylist()
    for i in kept:
        r = rows[i]
        assert r["judge_verdict"] == judge_verdict(r["judge_text"])
        expected = {None: "judge_no_verdict", "unfaithful": "judge_unfaithful", "faithful": None}[r["judge_verdict"]]
        assert r["reject_reason"] == expected


class Recording:
    """The session's real engine, with the time each request was in flight recorded per row
    and turn (C1: one user turn; C2: the cascade's second)."""

    def __init__(self, engine):
        self.engine, self.model, self.max_num_seqs = engine, engine.model, engine.max_num_seqs
        self.spans, self.live, self.peak = [], 0, 0

    async def generate(self, conversation, sampling=None, adapter=None):
        first = conversation[0]["content"]
        question = (hash(first[0]["image"]), first[1]["text"])  # the row: its image and question
        self.live += 1
        self.peak = max(self.peak, self.live)
        t0 = time.perf_counter()
        try:
            return await self.engine.generate(conversation, sampling, adapter)
        finally:
            self.live -= 1
            self.spans.append((question, "c2" if len(conversation) > 1 else "c1", t0, time.perf_counter()))

    def chat(self, conversations, sampling=None, adapter=None):
        return self.engine.chat(conversations, sampling, adapter)

    def close(self):
        pass


def test_each_rows_c2_starts_when_its_own_c1_is_done(tiny_models, teacher_engine, demo_rows):
    """No batch barrier: some row's C2 is on the engine before the batch's slowest C1 is done."""
    cfg = _cfg(tiny_models, synthesis=dict(c2_after_unusable_c1=True))
    rec = Recording(teacher_engine)
    batch = pa.Table.from_pylist([dict(r, reject_stage=None, reject_reason=None, reject_detail=None) for r in demo_rows[:12]], schema=ROW_SCHEMA)
    out = _stage(TeacherTask(cfg), rec)(batch).to_pylist()
    assert all(r["c2_texts"] for r in out)
    c1_ends = [end for _, turn, _, end in rec.spans if turn == "c1"]
    c2_starts = sorted(start for _, turn, start, _ in rec.spans if turn == "c2")
    assert len(c1_ends) == len(c2_starts) == 12
    assert c2_starts[0] < max(c1_ends), "every C2 waited for the slowest C1 of the batch"
    for question in {q for q, *_ in rec.spans}:  # and each row's own C2 follows its C1
        (c1,) = [s for s in rec.spans if s[0] == question and s[1] == "c1"]
        (c2,) = [s for s in rec.spans if s[0] == question and s[1] == "c2"]
        assert c2[2] >= c1[3]


def test_a_failing_row_in_the_in_flight_window_is_a_reject_and_the_rest_complete(tiny_models, teacher_engine, demo_rows):
    cfg = _cfg(tiny_models)
    rec = Recording(teacher_engine)
    rows = [dict(r, reject_stage=None, reject_reason=None, reject_detail=None) for r in demo_rows[:10]]
    rows[2] = dict(rows[2], image=b"\x89PNG\r\n\x1a\n broken")  # the engine fails this request alone
    rows[6] = dict(rows[6], choices=None, question=None)  # the task itself raises on this row
    batch = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    out = _stage(TeacherTask(cfg), rec, max_in_flight=4)(batch).to_pylist()
    assert 1 < rec.peak <= 4  # rows overlapped, never more than max_in_flight at once
    assert (out[6]["reject_stage"], out[6]["reject_reason"]) == ("teacher", "stage_error") and "AttributeError" in out[6]["reject_detail"]
    assert out[2]["reject_reason"] is None and out[2]["c1_finish"] == ["error"]  # DDF level 2 rejects it as engine_error
    done = [r for i, r in enumerate(out) if i not in (2, 6)]
    assert all(r["reject_reason"] is None and r["c1_texts"][0] and r["c1_errors"] == [None] for r in done)


def test_an_unexpected_error_while_labeling_is_that_rows_reject(demo_rows, label_stage):
    batch = _batch(demo_rows)  # no teacher columns at all: labeling any pending row raises
    out = label_stage(batch)
    _check_conserved(batch, out)
    rows = out.to_pylist()
    pending_before = [i for i, r in enumerate(batch.to_pylist()) if r["reject_reason"] is None]
    assert all((rows[i]["reject_stage"], rows[i]["reject_reason"]) == ("ddf_labeled", "label_error") for i in pending_before)
    assert "KeyError" in rows[0]["reject_detail"]
