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


def judge_conversation(row: dict, judge: Prompt, reasoning: str, evaluation: str) -> list[dict]:
    """One user turn for the model judge: the image, the question with its reference answer,
    the teacher's reasoning and its self-evaluation (the judge is never shown to the student)."""
    text = judge.render(question=question_with_choices(row), answer=row["answer"], reasoning=reasoning.strip(), evaluation=evaluation.strip())
    return [user(image_part(row["image"]), text_part(text))]


def judged_texts(mode: str, row: dict) -> tuple[str, str]:
    """(reasoning, self-evaluation) the judge reads for a row of the given synthesis mode."""
    if mode == "cascade":
        return row["c1_texts"][0], row["c2_text"] or ""
    if mode == "seat":
        return row["c1_texts"][0], "(inline in the worked answer)"
    return row["c1_texts"][0], "(none: judge whether the worked answer itself is faithful to the image)"
