"""Evaluation arithmetic on crafted inputs: intervals, pairing, best-of-N, the reflection matrix,
and what each mode's outputs answer."""

import math

from casseat_ray.evaluate.items import item_result
from casseat_ray.evaluate.metrics import bootstrap_ci, majority, paired_bootstrap, pick_best_of_n, reflection_cell, reflection_summary
from casseat_ray.evaluate.report import compute


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_n():
    small = [1.0, 0.0] * 20
    large = [1.0, 0.0] * 500
    lo_s, hi_s = bootstrap_ci(small, 1000, seed=1)
    lo_l, hi_l = bootstrap_ci(large, 1000, seed=1)
    assert lo_s <= 0.5 <= hi_s and lo_l <= 0.5 <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3  # ~1/sqrt(25) as wide
    assert bootstrap_ci(small, 1000, seed=1) == (lo_s, hi_s)  # seeded


def test_paired_difference_uses_the_same_items():
    base = [0.0] * 50 + [1.0] * 50
    tuned = [1.0] * 60 + [1.0] * 40  # fixes 10 of base's wrong items, keeps its right ones... on these items
    p = paired_bootstrap(base, tuned, 1000, seed=0)
    assert math.isclose(p["diff"], 0.5) and p["ci95"][0] > 0 and p["p_not_better"] == 0.0
    same = paired_bootstrap(base, base, 1000, seed=0)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0]  # pairing removes item-to-item noise entirely


def test_best_of_n_picks_by_accept_then_majority():
    assert pick_best_of_n(["3", "4", "4"], [0.9, 0.2, 0.1]) == 0
    assert pick_best_of_n(["3", "4", "4"], [0.5, 0.5, 0.5]) == 1  # tie: the majority answer
    assert pick_best_of_n([None, "4"], [0.99, 0.1]) == 1  # a sample without an answer is never picked
    assert pick_best_of_n([None, None], [0.5, 0.5]) is None
    assert majority(["2", None, "5", "5"]) == "5" and majority([None]) is None


def test_reflection_matrix_counts_fixes_and_breaks():
    cells = [reflection_cell(True, "Accept", True), reflection_cell(False, "Refine", True), reflection_cell(True, "Refine", False),
             reflection_cell(False, None, False)]
    s = reflection_summary(cells)
    assert s["matrix"] == {"right|Accept|right": 1, "wrong|Refine|right": 1, "right|Refine|wrong": 1, "wrong|none|wrong": 1}
    assert s["accept_after_right"] == 0.5 and s["refine_after_wrong"] == 0.5
    assert s["fixes"] == 0.25 and s["breaks"] == 0.25 and s["verdict_share"] == 0.75


def _score(pred, correct):
    return None if pred is None else {"extraction": pred, "prediction": pred, "correct": correct, "method": "rule"}


def _row(mode, c1, c2=None, probs=None):
    return dict(benchmark="b", eval_model="base", eval_mode=mode, sample_id="s", source_id="7", answer="3", answer_type="integer", meta='{"id": "7", "level": 2}',
                c1_scores=[_score(*x) for x in c1], c1_errors=[None] * len(c1), c1_output_tokens=[10] * len(c1),
                c2_scores=None if c2 is None else [_score(*x) for x in c2], c2_errors=None if c2 is None else [None] * len(c2),
                c2_texts=None if c2 is None else [f"Evaluation: {'Accept' if ok else 'Refine'}" for _, ok in c1[: len(c2)]],
                c2_output_tokens=None if c2 is None else [5] * len(c2), c2_accept_prob=probs)


def test_what_each_mode_answers():
    cascade = item_result(_row("cascade", [("4", False)], [("3", True)]))
    assert cascade["correct"] and not cascade["pass1_correct"] and cascade["pass2_ran"] and cascade["verdict"] == "Refine"
    assert cascade["source_id"] == "7" and cascade["level"] == "2" and cascade["output_tokens"] == 15
    assert cascade["extracted_by"] == "rule" and item_result(_row("cascade", [(None, False)]))["extracted_by"] is None
    by_model = _row("cascade", [("4", False)], [("3", True)])
    by_model["c2_scores"][0]["method"] = "model"
    assert item_result(by_model)["extracted_by"] == "model"
    fallback = item_result(_row("cascade", [("3", True)], [(None, False)]))
    assert fallback["correct"] and fallback["prediction"] == "3"  # pass 2 has no answer: pass 1's counts
    bon = item_result(_row("best_of_n", [("4", False), ("3", True), ("3", True)], [("4", True), ("3", True), ("3", True)], [0.9, 0.4, 0.3]))
    assert not bon["correct"] and bon["bon_correct_by_n"] == [False, False, False] and bon["majority_correct"] and bon["oracle_correct"]
    cot = item_result(_row("cot", [("3", True)]))
    assert cot["correct"] and not cot["pass2_ran"] and cot["verdict"] is None


def test_report_numbers_come_from_the_items():
    items = [dict(item_result(_row(mode, [("3", i % 2 == 0)], [("3", True)] if mode == "cascade" else None)), model=model, sample_id=f"s{i}")
             for model in ("base", "tuned") for mode in ("direct", "cot", "cascade") for i in range(10)]
    rep = compute(items, 200, 0)
    assert {(e["model"], e["mode"]) for e in rep["results"]} == {(m, x) for m in ("base", "tuned") for x in ("direct", "cot", "cascade")}
    cot = next(e for e in rep["results"] if (e["model"], e["mode"]) == ("base", "cot"))
    assert cot["accuracy"] == 0.5 and cot["n"] == 10 and cot["ci95"][0] <= 0.5 <= cot["ci95"][1]
    assert next(e for e in rep["results"] if e["mode"] == "cascade")["accuracy"] == 1.0
    assert [p["diff"] for p in rep["paired_differences"]] == [0.0, 0.0, 0.0]
    assert rep["robustness"][0]["cot_minus_direct"] == 0.0 and rep["reflection"][0]["fixes"] == 0.5


def test_failed_requests_mark_the_item_and_only_engine_errors_are_retried(tmp_path):
    import pyarrow as pa

    from casseat_ray import parts
    from casseat_ray.engines import RETRYABLE as RETRY_REASONS
    from casseat_ray.inference.modes import first_failure

    ok = dict(c1_finish=["stop"], c1_errors=[None], c2_finish=["stop"], c2_errors=[None])
    assert first_failure(ok) is None
    assert first_failure(dict(ok, c2_finish=["error"], c2_errors=["timeout"])) == ("engine_error", "C2: timeout")
    assert first_failure(dict(ok, c1_finish=["prompt_too_long"], c1_errors=["over 2048"], c2_finish=None, c2_errors=None)) == (
        "prompt_too_long", "C1: over 2048")
    # a work row failed by the engine is written, then replaced by its retry; a too-long one stands
    first = [dict(_row("cot", [(None, False)]), key="b/base/cot/s1", sample_id="s1", reject_reason="engine_error"),
             dict(_row("cot", [(None, False)]), key="b/base/cot/s2", sample_id="s2", reject_reason="prompt_too_long"),
             dict(_row("cot", [("3", True)]), key="b/base/cot/s3", sample_id="s3", reject_reason=None)]
    for r in first[:2]:
        r["c1_errors"] = ["boom"]
    parts.write_part(tmp_path, pa.Table.from_pylist(first), "key")
    assert parts.done_ids(tmp_path, "key", retry=RETRY_REASONS) == {"b/base/cot/s2", "b/base/cot/s3"}
    items = [item_result(r) for t in parts.read_parts(tmp_path, id_column="key", retry=RETRY_REASONS) for r in t.to_pylist()]
    rep = compute(items, 50, 0)
    assert rep["results"][0]["failures"] == {"engine_error": 1, "prompt_too_long": 1} and rep["retryable_items"] == 1
    parts.write_part(tmp_path, pa.Table.from_pylist([dict(_row("cot", [("3", True)]), key="b/base/cot/s1", sample_id="s1", reject_reason=None)]), "key")
    items = [item_result(r) for t in parts.read_parts(tmp_path, id_column="key", retry=RETRY_REASONS) for r in t.to_pylist()]
    assert sorted((i["sample_id"], i["correct"], i["failure"]) for i in items) == [
        ("s1", True, None), ("s2", False, "prompt_too_long"), ("s3", True, None)]
    rep = compute(items, 50, 0)
    assert rep["results"][0]["failures"] == {"prompt_too_long": 1} and rep["retryable_items"] == 0
