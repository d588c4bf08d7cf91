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
import math

from casseat_ray.prompts import Prompt
from casseat_ray.inference.turns import c2_turn_text, first_turn_text

IMAGE_TOKEN = "<image>"


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
        "kind": kind,
        "messages": messages,
        "images": [row["image"]],
        "loss_on": loss_on,
        "source": row.get("source"),
        "answer": row.get("answer"),
    }


def _order(sample_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()


def mix_counts(n_cot: int, n_self_eval: int, ratio: float, cap: int | None) -> tuple[int, int]:
    """The largest ``(cot, self_eval)`` within what is available (and the cap) whose
    proportion is exactly ``ratio`` self-evaluation samples per CoT sample (rounded)."""
    if ratio == 0:
        cot = n_cot if cap is None else min(n_cot, cap)
        return cot, 0
    cot = min(n_cot, math.floor(n_self_eval / ratio + 1e-9))
    if cap is not None:
        cot = min(cot, math.floor(cap / (1 + ratio) + 1e-9))
    return cot, round(cot * ratio)


def mix(cot_pool: list[dict], self_eval_pool: list[dict], ratio: float, cap: int | None, seed: int) -> list[dict]:
    """Pick samples from the two pools at the configured ratio; a seeded, content-based order
    decides which, so reruns pick the same ones."""
    n_cot, n_se = mix_counts(len(cot_pool), len(self_eval_pool), ratio, cap)
    pick = lambda pool, n: sorted(pool, key=lambda s: _order(s["sample_id"], seed))[:n]  # noqa: E731
    return pick(cot_pool, n_cot) + pick(self_eval_pool, n_se)
