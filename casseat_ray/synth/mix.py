"""Mixing kept teacher outputs into SFT samples (pure functions).

Sample kinds (``messages`` use ``<image>`` in the first user turn; ``images`` holds the bytes):

- ``cot``: [user: image + C1 prompt + question] -> [assistant: C1 reasoning]
- ``self_eval``: the three-turn cascade -> [assistant: C2 evaluation]; loss on the last turn only
- ``seat``: [user: image + SEAT prompt + question] -> [assistant: reasoning with inline checks]

The student's C2 turn is always the plain C2 prompt: when the teacher saw a hidden
ground-truth hint, the hint never reaches the training data.
"""

from __future__ import annotations

import hashlib

from casseat_ray.prompts import Prompt
from casseat_ray.inference.turns import c2_turn_text, first_turn_text

IMAGE_TOKEN = "<image>"  # marks the image in a sample's first user turn (train.collate reads it)


def _user_first(row: dict, prompt: Prompt) -> dict:
    return {"role": "user", "content": IMAGE_TOKEN + first_turn_text(row, prompt)}


def cot_sample(row: dict, c1_prompt: Prompt, cot: str) -> dict:
    return _sft(row, "cot", [_user_first(row, c1_prompt), {"role": "assistant", "content": cot}], "all")


def self_eval_sample(row: dict, c1_prompt: Prompt, cot: str, c2_prompt: Prompt, evaluation: str) -> dict:
    if "answer" in c2_prompt.fields:
        raise ValueError("the student's C2 prompt must not carry the ground truth; use the plain c2 template")
    messages = [
        _user_first(row, c1_prompt),
        {"role": "assistant", "content": cot},
        {"role": "user", "content": c2_turn_text(row, c2_prompt)},
        {"role": "assistant", "content": evaluation},
    ]
    return _sft(row, "self_eval", messages, "last")


def seat_sample(row: dict, seat_prompt: Prompt, text: str) -> dict:
    return _sft(row, "seat", [_user_first(row, seat_prompt), {"role": "assistant", "content": text}], "all")


def _sft(row: dict, kind: str, messages: list[dict], loss_on: str) -> dict:
    return {
        "id": f"{row['sample_id']}-{kind}",
        "sample_id": row["sample_id"],
        "source_id": row.get("source_id"),
        "kind": kind,
        "messages": messages,
        "images": [row["image"]],
        "loss_on": loss_on,
        "source": row.get("source"),
        "answer": row.get("answer"),
        "choices": list(row.get("choices") or []),
        "precision": row.get("precision"),
    }


def _order(sample_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()


def mix_questions(questions: list[dict], ratio: float, cap: int | None, seed: int, keep_all_refine: bool = True) -> dict[str, set[str]]:
    """Which samples of each kept question go into the SFT set; the unit is the question.

    ``questions``: ``{"sample_id", "kinds", "verdict"}`` per kept question. ``ratio`` is
    self-evaluation samples per CoT sample, applied as a share of questions: at 1 every
    question gives all its samples (the method's 1:1 per kept question); below 1 every question
    gives its CoT sample and a seeded share ``ratio`` of them also their self-evaluation sample;
    above 1 every question gives its self-evaluation sample and a share ``1 / ratio`` also its
    CoT sample. With ``keep_all_refine`` a Refine sample (the only kind that teaches
    correction) is never left out by the ratio. ``cap`` takes whole questions in a seeded order
    until the next would pass it. Reruns choose the same samples.
    """
    ordered = sorted(questions, key=lambda q: _order(q["sample_id"], seed))
    thinned, share = ("self_eval", ratio) if ratio < 1 else ("cot", 1 / ratio)
    # a question is never left with nothing by the ratio: CoT is thinned only where a self-evaluation sample stays
    candidates = [q for q in ordered if thinned in q["kinds"] and (thinned == "self_eval" or "self_eval" in q["kinds"])]
    keep_n = round(share * len(candidates))
    protected = [q for q in candidates if keep_all_refine and thinned == "self_eval" and q.get("verdict") == "Refine"]
    dropped = {q["sample_id"] for q in [q for q in candidates if q not in protected][max(keep_n - len(protected), 0):]}
    chosen: dict[str, set[str]] = {}
    total = 0
    for q in ordered:
        kinds = set(q["kinds"]) - ({thinned} if q["sample_id"] in dropped else set())
        if cap is not None and total + len(kinds) > cap:
            break
        if kinds:
            chosen[q["sample_id"]] = kinds
            total += len(kinds)
    return chosen


def left_out(questions: list[dict], chosen: dict[str, set[str]]) -> dict[str, tuple[str, list[str]]]:
    """Samples the mix leaves out, per question: ``sample_id -> (reason, kinds)``;
    ``over_ratio`` when the question keeps its other samples (mix.self_eval_per_cot),
    ``over_cap`` when mix.max_samples left the whole question out."""
    out = {}
    for q in questions:
        kinds = sorted(set(q["kinds"]) - chosen.get(q["sample_id"], set()))
        if kinds:
            out[q["sample_id"]] = ("over_ratio" if q["sample_id"] in chosen else "over_cap", kinds)
    return out
