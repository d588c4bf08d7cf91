"""DDF level 2 on crafted teacher outputs: each reason fires for its own case only."""

import pytest

from casseat_ray.config import DDFLabeledConfig
from casseat_ray.synth.filters import judge_cascade, judge_single, too_long

INT = {"question": "How many circles?", "choices": [], "answer": "3", "answer_type": "integer"}
MC = {"question": "Which bar?", "choices": ["red", "blue", "green"], "answer": "blue", "answer_type": "multi_choice"}
CFG = DDFLabeledConfig()


def turn(text, finish="stop", error=None):
    return {"text": text, "finish_reason": finish, "error": error}


RIGHT = turn("I see three circles.\nThe answer is 3")
WRONG = turn("I see two circles.\nThe answer is 2")


@pytest.mark.parametrize(
    "c1, c2, reason",
    [
        (RIGHT, turn("Each step matches the image.\nEvaluation: Accept\nThe answer is 3"), None),
        (WRONG, turn("I missed one circle.\nEvaluation: Refine\nThere are three.\nThe answer is 3"), None),
        (turn("", "error", "boom"), RIGHT, "engine_error"),
        (turn("", "prompt_too_long", "prompt of 5042 tokens"), RIGHT, "prompt_too_long"),
        (RIGHT, turn("", "prompt_too_long", "prompt of 2075 tokens"), "prompt_too_long"),  # C1's answer pushed C2 over
        (turn("I see three circles and", "length"), RIGHT, "truncated"),
        (turn("I see some circles."), turn("Evaluation: Accept\nThe answer is 3"), "no_answer"),
        (RIGHT, turn("Looks fine.\nThe answer is 3"), "no_verdict"),
        (RIGHT, turn("Evaluation: Accept ... no wait Evaluation: Refine\nThe answer is 3"), "contradictory_verdict"),
        (RIGHT, turn("Evaluation: Accept\nEvaluation: Accept\nThe answer is 3"), "multiple_verdicts"),
        (WRONG, turn("Evaluation: Accept\nThe answer is 2"), "accept_after_wrong"),
        (RIGHT, turn("Evaluation: Refine\nThe answer is 3"), "refine_after_right"),
        (WRONG, turn("Evaluation: Refine\nActually four.\nThe answer is 4"), "refine_not_fixed"),
        (RIGHT, turn("Evaluation: Accept\nThe answer is 2"), "wrong_answer"),
        (RIGHT, turn("The expected answer is 3, so Evaluation: Accept\nThe answer is 3"), "leakage"),
    ],
)
def test_each_reason(c1, c2, reason):
    j = judge_cascade(INT, c1, c2, CFG)
    assert j.reason == reason, (j.reason, j.detail)
    if reason is None:
        assert j.kept and j.c2.correct
        assert j.cot_usable == (c1 is RIGHT)  # a fixed wrong C1 gives no CoT sample


def test_switches_turn_checks_off():
    loose = DDFLabeledConfig(require_verdict=False, require_consistent=False, require_correct=False, drop_truncated=False)
    assert judge_cascade(INT, turn("so 3. The answer is 3", "length"), turn("The answer is 5"), loose).kept


def test_multiple_choice_by_letter_or_text():
    c1 = turn("The blue bar is tallest. The answer is (B)")
    assert judge_cascade(MC, c1, turn("Evaluation: Accept\nThe answer is blue"), CFG).kept
    assert judge_cascade(MC, turn("The answer is (A)"), turn("Evaluation: Refine\nThe answer is B"), CFG).kept


def test_single_turn_modes():
    assert judge_single(INT, turn("", "prompt_too_long", "over"), CFG, need_verdict=False)[:2] == ("prompt_too_long", "over")
    assert judge_single(INT, RIGHT, CFG, need_verdict=False)[0] is None
    assert judge_single(INT, RIGHT, CFG, need_verdict=True)[0] == "no_verdict"
    seat = turn("Two circles? [Self-evaluation] recount. Evaluation: Refine, three. [/Self-evaluation]\nThe answer is 3")
    assert judge_single(INT, seat, CFG, need_verdict=True)[0] is None
    assert judge_single(INT, WRONG, CFG, need_verdict=False)[0] == "wrong_answer"
    assert too_long(5000, CFG) == ("too_long", "5000 student tokens > 2048") and too_long(10, CFG) is None
