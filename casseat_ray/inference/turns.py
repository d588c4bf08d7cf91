"""The prompts of a run and the conversation turns built from them (pure: no engine, no Ray).

One builder per turn, used by every caller: the teacher's cascade, the student filter, the
SFT samples (``synth.mix``) and evaluation. The first user turn is image + prompt + question;
C2 is a second user turn after the model's own C1 answer on the same conversation, so the
engine's prefix cache covers C1.
"""

from __future__ import annotations

from casseat_ray import prompts
from casseat_ray.engines import assistant, image_part, text_part, user
from casseat_ray.prompts import Prompt
from casseat_ray.samples import format_choices


def run_prompts(cfg) -> dict[str, Prompt]:
    """The templates a run uses, with the config's overrides applied. ``c2`` is the student's
    (never a hint); ``teacher_c2`` is what the teacher sees (the hint template when on)."""
    p, hint = cfg.synthesis.prompts, cfg.synthesis.hint_ground_truth
    ps = {
        "c1": prompts.load("c1", p.c1),
        "c2": prompts.load("c2", p.c2),
        "teacher_c2": prompts.load("c2_hint", p.c2_hint) if hint else prompts.load("c2", p.c2),
        "seat": prompts.load("seat", p.seat),
        "direct": prompts.load("direct", p.direct),
    }
    if cfg.ddf_labeled.judge.enabled:
        ps["judge"] = prompts.load("judge", p.judge)
    return ps


def question_with_choices(row: dict) -> str:
    """The question as a model sees it: choices listed as ``(A) text`` lines."""
    q = row["question"].strip()
    choices = row.get("choices") or []
    if choices:
        q += "\n" + format_choices(choices)
    return q


def first_turn_text(row: dict, prompt: Prompt) -> str:
    """The text of the first user turn (C1, SEAT or direct prompt around the question)."""
    return prompt.render(question=question_with_choices(row))


def c2_turn_text(row: dict, c2: Prompt) -> str:
    """The C2 user turn; a hint template gets the ground truth (the teacher's only)."""
    return c2.render(**({"answer": row["answer"]} if "answer" in c2.fields else {}))


def c1_conversation(row: dict, prompt: Prompt) -> list[dict]:
    """[user: image + prompt + question]; ``prompt`` is the C1, SEAT or direct template."""
    return [user(image_part(row["image"]), text_part(first_turn_text(row, prompt)))]


def c2_conversation(row: dict, c1: Prompt, cot: str, c2: Prompt) -> list[dict]:
    """[user: image + C1] [assistant: the model's CoT] [user: C2]."""
    return c1_conversation(row, c1) + [assistant(cot), user(text_part(c2_turn_text(row, c2)))]


def judge_conversation(row: dict, judge: Prompt, reasoning: str, evaluation: str) -> list[dict]:
    """One user turn for the model judge: the image, the question with its reference answer,
    the teacher's reasoning and its self-evaluation (the judge is never shown to the student)."""
    text = judge.render(question=question_with_choices(row), answer=row["answer"], reasoning=reasoning.strip(), evaluation=evaluation.strip())
    return [user(image_part(row["image"]), text_part(text))]


def judged_texts(mode: str, row: dict) -> tuple[str, str]:
    """(reasoning, self-evaluation) the judge reads for a row of the given synthesis mode."""
    if mode == "cascade":
        return row["c1_texts"][0], (row["c2_texts"] or [""])[0] or ""
    if mode == "seat":
        return row["c1_texts"][0], "(inline in the worked answer)"
    return row["c1_texts"][0], "(none: judge whether the worked answer itself is faithful to the image)"
