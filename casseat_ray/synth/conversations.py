"""Pure builders of the teacher's conversations (no engine, no Ray).

C1 is one user turn: image + reasoning prompt + question. C2 is a second user turn after the
teacher's own C1 answer, on the same conversation, so the engine's prefix cache covers C1.
"""

from __future__ import annotations

from casseat_ray.engines import assistant, image_part, text_part, user
from casseat_ray.prompts import Prompt
from casseat_ray.samples import format_choices


def question_with_choices(row: dict) -> str:
    """The question as the teacher sees it: choices listed as ``(A) text`` lines."""
    q = row["question"].strip()
    choices = row.get("choices") or []
    if choices:
        q += "\n" + format_choices(choices)
    return q


def c1_conversation(row: dict, c1: Prompt) -> list[dict]:
    return [user(image_part(row["image"]), text_part(c1.render(question=question_with_choices(row))))]


def c2_conversation(row: dict, c1: Prompt, cot: str, c2: Prompt) -> list[dict]:
    """[user: image + C1] [assistant: the teacher's CoT] [user: C2]; C2 may carry a hidden hint."""
    values = {"answer": row["answer"]} if "answer" in c2.fields else {}
    return c1_conversation(row, c1) + [assistant(cot), user(text_part(c2.render(**values)))]
