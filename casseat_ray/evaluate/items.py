"""One evaluated item per (benchmark, model, mode): the work rows a benchmark item expands to,
and what a mode's outputs answer (pure)."""

from __future__ import annotations

import json

import pyarrow as pa

from casseat_ray.evaluate.metrics import majority, pick_best_of_n, verdict_of
from casseat_ray.inference.modes import as_scored

ITEM_SCHEMA = pa.schema([
    pa.field("benchmark", pa.string()), pa.field("model", pa.string()), pa.field("mode", pa.string()),
    pa.field("sample_id", pa.string()), pa.field("source_id", pa.string()), pa.field("answer_type", pa.string()),
    pa.field("subject", pa.string()), pa.field("level", pa.string()), pa.field("answer", pa.string()),
    pa.field("prediction", pa.string()), pa.field("correct", pa.bool_()), pa.field("has_answer", pa.bool_()),
    pa.field("pass1_prediction", pa.string()), pa.field("pass1_correct", pa.bool_()),
    pa.field("pass2_ran", pa.bool_()), pa.field("pass2_has_answer", pa.bool_()), pa.field("verdict", pa.string()),
    pa.field("extracted_by", pa.string()),  # rule | model (evaluate.model_extractor) | null: no answer
    pa.field("output_tokens", pa.int64()), pa.field("error", pa.string()),
    pa.field("failure", pa.string()),  # engine_error (a rerun retries it) | prompt_too_long | stage_error (the task raised) | engine_crash | null
    # best_of_n: accept-probability pick with the first k samples (k = 1..N), majority vote, oracle
    pa.field("bon_correct_by_n", pa.list_(pa.bool_())), pa.field("majority_correct", pa.bool_()), pa.field("oracle_correct", pa.bool_()),
])


def work_key(benchmark: str, model: str, mode: str, sample_id: str) -> str:
    return f"{benchmark}/{model}/{mode}/{sample_id}"


def expand(row: dict, models: list[str], modes: list[str], protocols: dict[str, str]) -> list[dict]:
    """One work row per (model, mode) for an accepted benchmark item (none for a rejected one:
    it is counted in the funnel, never scored)."""
    if row["reject_reason"] is not None:
        return []
    return [dict(row, key=work_key(row["source"], m, mode, row["sample_id"]), benchmark=row["source"], eval_model=m, eval_mode=mode,
                 protocol=protocols[row["source"]])
            for m in models for mode in modes]


WORK_FIELDS = [pa.field(n, pa.string()) for n in ("key", "benchmark", "eval_model", "eval_mode", "protocol")]


def expand_batch(batch: pa.Table, models: list[str], modes: list[str], protocols: dict[str, str]) -> pa.Table:
    """``expand`` over a batch, in Arrow (list columns stay lists)."""
    schema = batch.schema
    for f in WORK_FIELDS:
        schema = schema.append(f)
    return pa.Table.from_pylist([w for r in batch.to_pylist() for w in expand(r, models, modes, protocols)], schema=schema)


def _meta(row: dict) -> dict:
    try:
        return json.loads(row.get("meta") or "{}")
    except json.JSONDecodeError:
        return {}


def item_result(row: dict) -> dict:
    """The scored answer a work row's outputs give under its mode.

    cascade: pass 2's answer, or pass 1's when pass 2 has none (or did not run); best_of_n:
    the sample whose self-check gives ``Accept`` the highest probability."""
    meta = _meta(row)
    mode = row["eval_mode"]
    c1 = [as_scored(s) for s in row["c1_scores"] or []]
    c2 = [as_scored(s) for s in row["c2_scores"] or []]
    errors = [e for e in (row["c1_errors"] or []) + (row["c2_errors"] or []) if e]
    first = c1[0] if c1 else None
    out = dict(
        benchmark=row["benchmark"], model=row["eval_model"], mode=mode, sample_id=row["sample_id"],
        source_id=row.get("source_id"),
        answer_type=row["answer_type"], subject=None if meta.get("subject") is None else str(meta["subject"]),
        level=None if meta.get("level") is None else str(meta["level"]), answer=row["answer"],
        pass1_prediction=first.prediction if first else None, pass1_correct=bool(first and first.correct),
        pass2_ran=bool(row["c2_texts"]), pass2_has_answer=bool(c2 and c2[0] and c2[0].extraction is not None), verdict=None,
        output_tokens=sum(row["c1_output_tokens"] or []) + sum(row["c2_output_tokens"] or []), error=errors[0] if errors else None,
        failure=row.get("reject_reason"),
        bon_correct_by_n=None, majority_correct=None, oracle_correct=None,
    )
    chosen = first
    if mode == "cascade":
        out["verdict"] = verdict_of(row["c2_texts"][0]) if row["c2_texts"] else None
        if c2 and c2[0] is not None and c2[0].extraction is not None:
            chosen = c2[0]
    elif mode == "best_of_n":
        preds = [s.prediction if s else None for s in c1]
        probs = list(row["c2_accept_prob"] or [None] * len(c1))
        by_n = []
        for k in range(1, len(c1) + 1):
            i = pick_best_of_n(preds[:k], probs[:k])
            by_n.append(bool(i is not None and c1[i].correct))
        pick = pick_best_of_n(preds, probs)
        chosen = c1[pick] if pick is not None else first
        vote = majority(preds)
        out.update(bon_correct_by_n=by_n, oracle_correct=any(bool(s and s.correct) for s in c1),
                   majority_correct=bool(vote is not None and any(s and s.prediction == vote and s.correct for s in c1)))
        if pick is not None and row["c2_texts"]:
            out["verdict"] = verdict_of(row["c2_texts"][pick])
    has_answer = bool(chosen and chosen.extraction is not None)
    out.update(prediction=chosen.prediction if chosen else None, correct=bool(chosen and chosen.correct), has_answer=has_answer,
               extracted_by=("model" if chosen.method == "model" else "rule") if has_answer else None)
    return out
