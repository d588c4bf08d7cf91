"""DDF level 2: labeled filtering of the teacher's cascade outputs (pure functions).

A cascade result for one question is judged in this order, the first failing check giving
the reject reason (so each reason is counted once and means one thing):

1. ``engine_error``        the engine failed this row (a rerun retries it), or
   ``prompt_too_long``     a turn's prompt does not fit the engine's context (final)
2. ``truncated``           a turn hit the token budget
3. ``no_answer``           a turn has no final answer
4. ``no_verdict`` / ``multiple_verdicts`` / ``contradictory_verdict``   C2 must hold exactly one
5. ``accept_after_wrong``  Accept although C1 was wrong
   ``refine_after_right``  Refine although C1 was right
   ``refine_not_fixed``    Refine after a wrong C1 whose correction is still wrong
6. ``wrong_answer``        the final answer (C2's) is wrong
7. ``leakage``             text mentions having been given the answer
8. ``too_long``            over the student's token budget (checked by the caller, who has the
                           student's tokenizer; see ``too_long``)

The optional model judge then reads what is left (stage ``ddf_judge``, see ``judge_reject``):
``judge_unfaithful``, and with ``on_no_verdict: reject`` also ``judge_no_verdict`` and
``judge_error``.

What survives yields a self-evaluation sample; a CoT sample additionally needs C1 correct.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from casseat_ray.answers import ScoredAnswer, find_verdicts, score
from casseat_ray.config import DDFLabeledConfig
from casseat_ray.engines import PROMPT_TOO_LONG, failure_reason


@dataclass
class CascadeJudgement:
    """What DDF level 2 concluded about one question's C1 -> C2 exchange."""

    reason: str | None  # None: kept
    detail: str
    c1: ScoredAnswer | None
    c2: ScoredAnswer | None
    verdict: str | None

    @property
    def kept(self) -> bool:
        return self.reason is None

    @property
    def cot_usable(self) -> bool:
        """C1 alone is a correct worked solution (a CoT training sample)."""
        return self.kept and self.c1 is not None and self.c1.correct


def _failed(turn: dict) -> bool:
    return bool(turn.get("error")) or turn.get("finish_reason") == "error"


def _leaks(texts: list[str], phrases: list[str]) -> str | None:
    for t in texts:
        low = t.lower()
        for p in phrases:
            if p.lower() in low:
                return p
    return None


def judge_cascade(sample: dict, c1: dict, c2: dict, cfg: DDFLabeledConfig, s1: ScoredAnswer | None = None,
                  s2: ScoredAnswer | None = None) -> CascadeJudgement:
    """Judge one question: ``c1``/``c2`` are completions as dicts (text, finish_reason, error);
    ``s1``/``s2`` their scores when already known (the inference layer scores each answer once)."""
    def out(reason, detail, s1=None, s2=None, verdict=None):
        return CascadeJudgement(reason, detail, s1, s2, verdict)

    for name, turn in (("C1", c1), ("C2", c2)):
        if _failed(turn):
            return out(failure_reason(turn.get("finish_reason")), f"{name}: {turn.get('error')}")
    if cfg.drop_truncated:
        for name, turn in (("C1", c1), ("C2", c2)):
            if turn.get("finish_reason") == "length":
                return out("truncated", f"{name} hit the token budget")
    s1 = s1 or score(c1["text"], sample)
    s2 = s2 or score(c2["text"], sample)
    if cfg.require_answer:
        for name, s in (("C1", s1), ("C2", s2)):
            if s.extraction is None:
                return out("no_answer", f"{name} has no final answer", s1, s2)
    verdicts = find_verdicts(c2["text"])
    verdict = verdicts[0] if len(set(verdicts)) == 1 else None
    if cfg.require_verdict:
        if not verdicts:
            return out("no_verdict", "C2 has no 'Evaluation: Accept|Refine'", s1, s2)
        if len(set(verdicts)) > 1:
            return out("contradictory_verdict", f"C2 says {verdicts}", s1, s2)
        if len(verdicts) > 1:
            return out("multiple_verdicts", f"C2 gives its verdict {len(verdicts)} times", s1, s2)
    if cfg.require_consistent and verdict is not None:
        if verdict == "Accept" and not s1.correct:
            return out("accept_after_wrong", f"C1 answered {s1.prediction!r}, truth {sample['answer']!r}", s1, s2, verdict)
        if verdict == "Refine" and s1.correct:
            return out("refine_after_right", "C1 was right", s1, s2, verdict)
        if verdict == "Refine" and not s2.correct:
            return out("refine_not_fixed", f"corrected to {s2.prediction!r}, truth {sample['answer']!r}", s1, s2, verdict)
    if cfg.require_correct and not s2.correct:
        return out("wrong_answer", f"final answer {s2.prediction!r}, truth {sample['answer']!r}", s1, s2, verdict)
    leaked = _leaks([c1["text"], c2["text"]], cfg.leakage_phrases)
    if leaked:
        return out("leakage", f"mentions {leaked!r}", s1, s2, verdict)
    return out(None, "", s1, s2, verdict)


def judge_single(sample: dict, completion: dict, cfg: DDFLabeledConfig, need_verdict: bool,
                 s: ScoredAnswer | None = None) -> tuple[str | None, str, ScoredAnswer | None]:
    """DDF level 2 for one-turn outputs: CoT-only mode, or SEAT (inline verdicts allowed)."""
    if _failed(completion):
        return failure_reason(completion.get("finish_reason")), str(completion.get("error")), None
    if cfg.drop_truncated and completion.get("finish_reason") == "length":
        return "truncated", "hit the token budget", None
    s = s or score(completion["text"], sample)
    if cfg.require_answer and s.extraction is None:
        return "no_answer", "no final answer", s
    if need_verdict and cfg.require_verdict and not find_verdicts(completion["text"]):
        return "no_verdict", "no inline self-evaluation", s
    if cfg.require_correct and not s.correct:
        return "wrong_answer", f"final answer {s.prediction!r}, truth {sample['answer']!r}", s
    leaked = _leaks([completion["text"]], cfg.leakage_phrases)
    if leaked:
        return "leakage", f"mentions {leaked!r}", s
    return None, "", s


# Why C2 was skipped -> the DDF level-2 reject the C1 earns by itself (reason, what C1 did).
SKIPPED_C2 = {"c1_truncated": ("truncated", "C1 hit the token budget"), "c1_no_answer": ("no_answer", "C1 has no final answer")}


def unusable_c1(cfg: DDFLabeledConfig, c1, scored: ScoredAnswer | None) -> str | None:
    """Why the cascade's C2 need not run after this C1 (``engines.Completion``): DDF level 2
    rejects the row for it whatever C2 says. None when C2 should run."""
    if cfg.drop_truncated and c1.finish_reason == "length":
        return "c1_truncated"
    if cfg.require_answer and (scored is None or scored.extraction is None):
        return "c1_no_answer"
    return None


def too_long(n_tokens: int, cfg: DDFLabeledConfig) -> tuple[str, str] | None:
    """The student-budget check; ``n_tokens`` counts text and image tokens of the full sample."""
    if n_tokens > cfg.max_student_tokens:
        return "too_long", f"{n_tokens} student tokens > {cfg.max_student_tokens}"
    return None


JUDGE_VERDICTS = ("faithful", "unfaithful")
_JUDGE_LINE = re.compile(r"verdict\s*[:：]\s*\**\s*(unfaithful|faithful)\b", re.IGNORECASE)


def judge_verdict(text: str) -> str | None:
    """The judge's verdict: a reply that is exactly one verdict word (a constrained reply), else
    the last ``Verdict: ...`` line of a free-form one; None when there is neither."""
    bare = text.strip().strip(".*\"' ").lower()
    if bare in JUDGE_VERDICTS:
        return bare
    found = _JUDGE_LINE.findall(text)
    return found[-1].lower() if found else None


def judge_reject(text: str, error: str | None, on_no_verdict: str, finish_reason: str | None = None) -> tuple[str, str] | None:
    """The reject (reason, detail) the judge's reply implies, or None to keep the sample. A
    judge that could not read the sample (an error, a prompt over its context) decides nothing:
    the sample is rejected only with ``on_no_verdict: reject``."""
    if error:
        reason = PROMPT_TOO_LONG if finish_reason == PROMPT_TOO_LONG else "judge_error"
        return (reason, error) if on_no_verdict == "reject" else None
    verdict = judge_verdict(text)
    if verdict == "unfaithful":
        return "judge_unfaithful", text.strip()[-200:]
    if verdict is None and on_no_verdict == "reject":
        return "judge_no_verdict", text.strip()[-200:] or "empty reply"
    return None
