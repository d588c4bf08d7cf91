"""The synthesis job's pure parts: resume bookkeeping, labeling, choosing, exports."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from casseat_ray.config import Config, ConfigError
from casseat_ray import parts
from casseat_ray.synth import outputs, pipeline
from casseat_ray.inference.turns import run_prompts as stage_prompts
from casseat_ray.synth.stages import label_row


def _cfg(tmp_path, **kw) -> Config:
    base = dict(name="t", output_dir=str(tmp_path), teacher=dict(model="teacher"), student=dict(model="student"))
    base.update(kw)
    return Config.model_validate(base)


def _row(sample_id="s1", answer="3", c1="Step 1.\nThe answer is 3.", c2="Evaluation: Accept\nThe answer is 3.", **kw):
    """A teacher-processed row as the inference layer leaves it (every answer scored once)."""
    from casseat_ray.answers import score
    from casseat_ray.inference.modes import scored_dict

    row = dict(sample_id=sample_id, source_id=f"src-{sample_id}", image=b"png", question="How many?", choices=[], answer=answer, answer_type="integer",
               precision=None, unit=None, source="demo", split="train", reject_stage=None, reject_reason=None, reject_detail=None,
               c1_texts=[c1], c1_finish=["stop"], c1_errors=[None], c1_prompt_sha="a", c2_prompt_sha="b", model="teacher", sampling="{}",
               c2_texts=None if c2 is None else [c2], c2_finish=None if c2 is None else ["stop"], c2_errors=None if c2 is None else [None],
               c2_skipped=None)
    row.update(kw)
    row["c1_scores"] = [None if e else scored_dict(score(t, row)) for t, e in zip(row["c1_texts"], row["c1_errors"])]
    row["c2_scores"] = None if row["c2_texts"] is None else [scored_dict(score(t, row)) for t in row["c2_texts"]]
    return row


def test_pending_batch_keeps_accepted_rows_without_a_part():
    t = pa.table({"sample_id": ["a", "b", "c", "d"], "reject_reason": [None, None, "duplicate", None]})
    assert parts.not_done(t, set())["sample_id"].to_pylist() == ["a", "b", "d"]
    assert parts.not_done(t, {"b"})["sample_id"].to_pylist() == ["a", "d"]


def test_parts_are_named_by_content_and_written_whole(tmp_path):
    t = pa.table({"sample_id": ["b", "a"], "x": [1, 2]})
    p1 = parts.write_part(tmp_path, t)
    p2 = parts.write_part(tmp_path, t.take([1, 0]))
    assert p1 == p2 and p1.name.startswith("part-") and not list(tmp_path.glob("*.tmp"))
    assert parts.done_ids(tmp_path) == {"a", "b"}


def test_a_transient_failure_is_retried_and_its_final_row_stands(tmp_path):
    import os

    retry = ("engine_error",)
    first = parts.write_part(tmp_path, pa.table({"sample_id": ["a", "b", "c"], "reject_reason": [None, "engine_error", "wrong_answer"],
                                                 "x": [1, 2, 3]}))
    assert parts.done_ids(tmp_path) == {"a", "b", "c"}  # without retry every row is final
    assert parts.done_ids(tmp_path, retry=retry) == {"a", "c"}  # b's engine error is tried again
    os.utime(first, ns=(1, 1))  # written before the retry's part
    parts.write_part(tmp_path, pa.table({"sample_id": ["b"], "reject_reason": [None], "x": [20]}))
    assert parts.done_ids(tmp_path, retry=retry) == {"a", "b", "c"}
    rows = [r for t in parts.read_parts(tmp_path, retry=retry) for r in t.to_pylist()]
    assert sorted((r["sample_id"], r["x"]) for r in rows) == [("a", 1), ("b", 20), ("c", 3)]  # one row per id: b's retry
    # an id that failed on every attempt keeps its latest attempt
    for f in tmp_path.glob("part-*.parquet"):
        os.utime(f, ns=(2, 2))
    late = parts.write_part(tmp_path, pa.table({"sample_id": ["d"], "reject_reason": ["engine_error"], "x": [4]}))
    os.utime(late, ns=(3, 3))
    again = parts.write_part(tmp_path, pa.table({"sample_id": ["d"], "reject_reason": ["engine_error"], "x": [40]}))
    os.utime(again, ns=(4, 4))
    rows = [r for t in parts.read_parts(tmp_path, columns=["sample_id", "x"], retry=retry) for r in t.to_pylist()]
    assert sorted((r["sample_id"], r["x"]) for r in rows) == [("a", 1), ("b", 20), ("c", 3), ("d", 40)]


def test_work_dir_refuses_a_changed_config_and_fresh_starts_over(tmp_path):
    cfg = _cfg(tmp_path)
    folder = pipeline.prepare_work_dir(cfg, fresh=False)
    # nothing written yet: a corrected config is no change (a typo must not block its own fix)
    assert pipeline.prepare_work_dir(_cfg(tmp_path, teacher=dict(model="teachr")), fresh=False) == folder
    parts.record_stamp(folder, pipeline.fingerprint(cfg))  # as the pipeline does with its first part
    parts.write_part(folder, pa.table({"sample_id": ["a"]}))
    (folder / "part-x.parquet.tmp").write_bytes(b"half a file")
    scaled = _cfg(tmp_path, teacher=dict(model="teacher", concurrency=4, batch_size=2, engine=dict(max_in_flight=8)))  # scheduling only: fine
    assert pipeline.prepare_work_dir(scaled, fresh=False) == folder
    assert not list(folder.glob("*.tmp"))  # an unfinished write is discarded
    changed = _cfg(tmp_path, teacher=dict(model="teacher", sampling=dict(max_tokens=7)))
    with pytest.raises(ConfigError, match="teacher.sampling.max_tokens"):
        pipeline.prepare_work_dir(changed, fresh=False)
    pipeline.prepare_work_dir(changed, fresh=True)
    assert parts.done_ids(folder) == set()


def test_an_edited_prompt_file_is_a_changed_config(tmp_path):
    prompt = tmp_path / "my_c1.txt"
    prompt.write_text("Think hard.\n{{question}}")
    cfg = _cfg(tmp_path, synthesis=dict(prompts=dict(c1=str(prompt))))
    parts.record_stamp(pipeline.prepare_work_dir(cfg, fresh=False), pipeline.fingerprint(cfg))
    prompt.write_text("Think step by step.\n{{question}}")  # same path, new text
    with pytest.raises(ConfigError, match="prompt_shas.c1"):
        pipeline.prepare_work_dir(cfg, fresh=False)


def test_label_row_reasons_on_crafted_outputs(tmp_path):
    cfg = _cfg(tmp_path)
    ps = stage_prompts(cfg)
    short = lambda s: 100  # noqa: E731
    hit, lab = label_row(cfg, _row(), ps, short)
    assert hit is None and sorted(lab["kinds"]) == ["cot", "self_eval"] and lab["verdict"] == "Accept"
    assert lab["c1_correct"] == [True] and lab["student_tokens"] == [100, 100]
    hit, lab = label_row(cfg, _row(c1="The answer is 4."), ps, short)
    assert hit[0] == "accept_after_wrong" and lab["c1_correct"] == [False]
    hit, lab = label_row(cfg, _row(c1="The answer is 4.", c2="Evaluation: Refine\nIt is 3.\nThe answer is 3."), ps, short)
    assert hit is None and lab["kinds"] == ["self_eval"]  # C1 was wrong: no CoT sample
    hit, _ = label_row(cfg, _row(), ps, lambda s: 5000)
    assert hit[0] == "too_long" and "5000 student tokens" in hit[1]
    # each sample is measured: a self-evaluation over the budget drops alone, its CoT stays
    by_kind = lambda s: 3000 if s["kind"] == "self_eval" else 900  # noqa: E731
    hit, lab = label_row(cfg, _row(), ps, by_kind)
    assert hit is None and lab["kinds"] == ["cot"] and lab["too_long_kinds"] == ["self_eval"] and lab["student_tokens"] == [900, 3000]

    hit, _ = label_row(cfg, _row(c1_finish=["error"], c1_errors=["boom"], c1_texts=[""], c2=None), ps, short)
    assert hit == ("engine_error", "C1: boom")
    # a prompt over the engine's context is the row's own final reject, never retried
    hit, _ = label_row(cfg, _row(c1_finish=["prompt_too_long"], c1_errors=["over 2048"], c1_texts=[""], c2=None, c2_skipped="c1_error"), ps, short)
    assert hit == ("prompt_too_long", "C1: over 2048") and hit[0] not in outputs.RETRY_REASONS
    # C2 skipped by the rule: the reject names C1's own problem, not an engine failure
    hit, _ = label_row(cfg, _row(c1="I am not sure.", c2=None, c2_skipped="c1_no_answer"), ps, short)
    assert hit == ("no_answer", "C1 has no final answer; C2 not run")
    hit, _ = label_row(cfg, _row(c1="Step 1. I count", c1_finish=["length"], c2=None, c2_skipped="c1_truncated"), ps, short)
    assert hit == ("truncated", "C1 hit the token budget; C2 not run")
    seat = _cfg(tmp_path, synthesis=dict(mode="seat"))
    hit, lab = label_row(seat, _row(c1="Step.\n[Self-evaluation] ok. Evaluation: Accept [/Self-evaluation]\nThe answer is 3.", c2=None), stage_prompts(seat), short)
    assert hit is None and lab["kinds"] == ["seat"]
    hit, _ = label_row(seat, _row(c2=None), stage_prompts(seat), short)
    assert hit[0] == "no_verdict"
    cot = _cfg(tmp_path, synthesis=dict(mode="cot"))
    hit, lab = label_row(cot, _row(c2=None), stage_prompts(cot), short)
    assert hit is None and lab["kinds"] == ["cot"]


def test_choose_mixes_per_kept_question_and_counts_verdicts(tmp_path):
    light = [dict(sample_id=f"s{i}", reject_reason=None, kinds=["self_eval", "cot"] if i % 3 else ["self_eval"],
                  verdict="Accept" if i % 3 else "Refine") for i in range(30)]
    light.append(dict(sample_id="r", reject_reason="wrong_answer", kinds=[], verdict=None))
    chosen, dropped, candidates = outputs.choose(light, _cfg(tmp_path))
    kinds = [k for ks in chosen.values() for k in ks]
    assert candidates == 50 and kinds.count("cot") == 20 and kinds.count("self_eval") == 30  # nothing dropped at 1:1
    assert dropped == {}
    assert outputs.verdict_counts(light) == outputs.verdict_counts(light, chosen) == {"accept": 20, "refine": 10}
    chosen, dropped, _ = outputs.choose(light, _cfg(tmp_path, mix=dict(self_eval_per_cot=0.5)))
    after = outputs.verdict_counts(light, chosen)
    assert after == {"refine": 10, "accept": 5}  # half of the 30 questions keep their self-evaluation, every Refine one among them
    # every sample the mix leaves out is accounted for, with why
    assert {(r, tuple(k)) for r, k in dropped.values()} == {("over_ratio", ("self_eval",))} and len(dropped) == 15
    again, _, _ = outputs.choose(light, _cfg(tmp_path, mix=dict(self_eval_per_cot=0.5)))
    assert again == chosen  # seeded: the same picks every time
    capped, dropped, _ = outputs.choose(light, _cfg(tmp_path, mix=dict(max_samples=10)))
    assert sum(len(k) for k in capped.values()) <= 10
    assert all(reason == "over_cap" and sid not in capped for sid, (reason, _) in dropped.items())
    assert sum(len(k) for k in capped.values()) + sum(len(k) for _, k in dropped.values()) == 50


def test_sft_rows_never_carry_the_hint(tmp_path, demo_rows):
    cfg = _cfg(tmp_path, synthesis=dict(hint_ground_truth=True))
    ps = stage_prompts(cfg)
    assert "answer" in ps["teacher_c2"].fields and "answer" not in ps["c2"].fields
    row = _row(image=demo_rows[0]["image"], c1_correct=[True], c1_rank=[0], verdict="Accept")
    samples = outputs.sft_rows(row, {"cot", "self_eval"}, ps)
    assert {s["kind"] for s in samples} == {"cot", "self_eval"}
    se = next(s for s in samples if s["kind"] == "self_eval")
    assert se["messages"][2]["content"] == ps["c2"].render() and se["loss_on"] == "last"
    assert se["prompt_shas"] == ["a", "b"] and se["responses_correct"] == [True]
    hinted = ps["teacher_c2"].render(answer=row["answer"])
    assert all(hinted not in m["content"] for s in samples for m in s["messages"])


def test_exporters_write_loadable_llamafactory_and_swift_files(tmp_path, demo_rows):
    cfg = _cfg(tmp_path)
    ps = stage_prompts(cfg)
    row = _row(image=demo_rows[0]["image"], c1_correct=[True], c1_rank=[0], verdict="Accept")
    samples = outputs.sft_rows(row, {"cot", "self_eval"}, ps)
    sft = tmp_path / "sft"
    sft.mkdir()
    pq.write_table(pa.Table.from_pylist(samples, schema=outputs.SFT_SCHEMA), sft / "sft-00000.parquet")
    lf = outputs.export_llamafactory(sft, tmp_path / "export" / "lf", "demo")
    info = json.loads((lf / "dataset_info.json").read_text())
    assert set(info) == {"demo", "demo_self_eval"} and info["demo"]["formatting"] == "sharegpt"
    items = json.loads((lf / info["demo_self_eval"]["file_name"]).read_text())
    assert items[0]["messages"][0]["content"].startswith("<image>") and len(items[0]["messages"]) == 4
    assert (lf / items[0]["images"][0]).read_bytes() == demo_rows[0]["image"]
    assert (items[0]["id"], items[0]["source_id"]) == ("s1-self_eval", "src-s1")  # traceable to the source item
    sw = outputs.export_swift(sft, tmp_path / "export" / "swift")
    lines = [json.loads(line) for line in (sw / "train.jsonl").read_text().splitlines()]
    assert {x["source_id"] for x in lines} == {"src-s1"} and {x["id"] for x in lines} == {"s1-cot", "s1-self_eval"}
    se = next(x for x in lines if len(x["messages"]) == 4)
    assert se["messages"][1]["loss"] is False and "loss" not in se["messages"][3]
    moved = shutil.move(sw, tmp_path / "elsewhere")  # relative paths: the folder can be moved
    assert all(not Path(p).is_absolute() and (Path(moved) / p).read_bytes() == demo_rows[0]["image"] for x in lines for p in x["images"])


def test_label_row_ranks_every_response_for_aft(tmp_path):
    cfg = _cfg(tmp_path)
    texts = ["The answer is 3.", "The answer is 4.", "I am not sure", "The answer is 3.", "The answer is"]
    row = _row(c1_texts=texts, c1_finish=["stop", "stop", "stop", "length", "length"], c1_errors=[None] * 5)
    _, lab = label_row(cfg, row, stage_prompts(cfg), lambda s: 100)
    # a right answer ranks first even when cut off; a cut-off wrong one ranks with no answer
    assert lab["c1_correct"] == [True, False, False, True, False]
    assert lab["c1_rank"] == [0, 1, 2, 0, 2]
    _, lab = label_row(cfg, _row(c1_errors=["engine died"]), stage_prompts(cfg), lambda s: 100)
    assert lab["c1_rank"] == [2] and lab["c1_correct"] == [False]


def test_judge_verdicts_and_rejects_on_crafted_replies():
    from casseat_ray.synth.filters import judge_reject, judge_verdict

    assert judge_verdict("faithful") == "faithful" and judge_verdict(" Unfaithful.\n") == "unfaithful"
    free = "The reflection misreads the bar heights.\nVerdict: faithful? no.\nVerdict: **unfaithful**"
    assert judge_verdict(free) == "unfaithful"  # the last verdict line counts
    assert judge_verdict("The steps check out, so it is faithful to the image") is None  # no verdict line
    assert judge_reject("faithful", None, "reject") is None
    assert judge_reject(free, None, "keep")[0] == "judge_unfaithful"  # unfaithful is rejected either way
    assert judge_reject("hmm", None, "reject") == ("judge_no_verdict", "hmm")
    assert judge_reject("hmm", None, "keep") is None
    assert judge_reject("", "engine died", "reject") == ("judge_error", "engine died")
    assert judge_reject("", "engine died", "keep") is None
    assert judge_reject("", "over 2048", "reject", "prompt_too_long") == ("prompt_too_long", "over 2048")  # final, not retried


def test_judge_reads_the_right_texts_and_its_prompt_is_recorded(tmp_path):
    from casseat_ray.inference.turns import judge_conversation, judged_texts

    cfg = _cfg(tmp_path, ddf_labeled=dict(judge=dict(enabled=True)))
    ps = stage_prompts(cfg)
    assert "judge" in ps and "judge" not in stage_prompts(_cfg(tmp_path))
    row = _row(answer="3", choices=["3", "4"])
    conv = judge_conversation(row, ps["judge"], *judged_texts("cascade", row))
    text = conv[0]["content"][1]["text"]
    assert conv[0]["content"][0]["image"] == b"png" and len(conv) == 1
    assert "Reference answer: 3" in text and "Step 1." in text and "Evaluation: Accept" in text and "(A) 3" in text
    assert "(inline" in judge_conversation(row, ps["judge"], *judged_texts("seat", row))[0]["content"][1]["text"]
    # judge scheduling may change on resume; its model may not
    base = pipeline.fingerprint(cfg)
    assert pipeline.fingerprint(_cfg(tmp_path, ddf_labeled=dict(judge=dict(enabled=True, concurrency=3, num_cpus=0.5)))) == base
    assert pipeline.fingerprint(_cfg(tmp_path, ddf_labeled=dict(judge=dict(enabled=True, model="bigger")))) != base


def test_c2_is_skipped_only_after_a_c1_that_ddf_level_2_rejects_anyway(tmp_path):
    from casseat_ray.answers import score
    from casseat_ray.engines import Completion
    from casseat_ray.synth.filters import unusable_c1

    rules = _cfg(tmp_path).ddf_labeled
    row = _row()

    def c1(text, finish="stop"):
        return Completion(text, finish, 10, 5), score(text, row)

    assert unusable_c1(rules, *c1("Step 1.\nThe answer is 4.")) is None  # wrong but complete: C2 may correct it
    assert unusable_c1(rules, *c1("Step 1. I count", "length")) == "c1_truncated"
    assert unusable_c1(rules, *c1("I am not sure what the picture shows.")) == "c1_no_answer"
    lenient = _cfg(tmp_path, ddf_labeled=dict(drop_truncated=False, require_answer=False)).ddf_labeled
    assert unusable_c1(lenient, *c1("Step 1. I count", "length")) is None  # kept by those rules: C2 runs


def test_over_budget_rows_are_counted_but_not_written_unless_asked():
    from casseat_ray.data import is_written_reject

    assert not is_written_reject("over_budget", write_over_budget=False)  # not a quality reject
    assert is_written_reject("over_budget", write_over_budget=True)
    assert is_written_reject("duplicate", write_over_budget=False) and not is_written_reject(None, True)


def test_a_run_that_fails_or_keeps_nothing_is_not_a_success():
    def stats(rejected: dict, rows=10, samples=4, crash=False):
        return {"stages": {"ddf_model": {"in": rows, "rejected": {}}, "teacher": {"rejected": {"engine_crash": 1} if crash else {}},
                           "ddf_labeled": {"rejected": rejected}}, "sft": {"samples": samples}}

    assert outputs.failure(stats({"accept_after_wrong": 6}), 0.1) is None
    assert outputs.failure(stats({"engine_error": 1}), 0.1) is None  # 1 of 10: within the budget
    over = outputs.failure(stats({"engine_error": 1, "stage_error": 1}), 0.1)
    assert over.startswith("2 of 10 questions failed with errors (engine_error 1, stage_error 1), over synthesis.max_error_share=0.1")
    # a row that crashed the engine never reached the teacher's figures, but was asked
    crashed = outputs.failure(stats({"engine_error": 1}, crash=True), 0.1)
    assert crashed.startswith("2 of 10 questions failed with errors (engine_crash 1, engine_error 1)")
    empty = outputs.failure(stats({"accept_after_wrong": 7, "no_answer": 3}, samples=0), 0.1)
    assert empty == "the SFT set is empty: no question was kept (rejects: accept_after_wrong 7, no_answer 3)"


def test_a_source_that_rejects_everything_is_explained():
    from casseat_ray.data import nothing_accepted

    f = {"in": 1740, "rejected": {"missing_field": 1730, "missing_image": 10},
         "examples": {"missing_field": "column 'question' not in row (columns: ['answer', 'image', 'q'])",
                      "missing_image": "file not found: /data/imgs/1.png"}}
    text = nothing_accepted(f)
    assert text.splitlines()[:3] == [
        "no source row was accepted: all 1740 rows were rejected",
        "  missing_field: 1730 (e.g. column 'question' not in row (columns: ['answer', 'image', 'q']))",
        "  missing_image: 10 (e.g. file not found: /data/imgs/1.png)"]


def test_a_source_changed_in_place_is_refused_not_resumed(tmp_path, demo_parquet):
    import shutil

    data = tmp_path / "data.parquet"
    shutil.copy2(demo_parquet, data)
    cfg = _cfg(tmp_path, sources=[dict(name="demo", format="canonical", path=str(data))])
    parts.record_stamp(pipeline.prepare_work_dir(cfg, fresh=False), pipeline.fingerprint(cfg))
    assert pipeline.prepare_work_dir(cfg, fresh=False)  # untouched: a resume
    table = pq.read_table(data)
    pq.write_table(table.slice(0, table.num_rows // 2), data)  # shrunk in place
    with pytest.raises(ConfigError, match=r"source_files\."):
        pipeline.prepare_work_dir(cfg, fresh=False)
