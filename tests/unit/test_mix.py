import pytest

from casseat_ray import prompts
from casseat_ray.synth.mix import cot_sample, mix_questions, seat_sample, self_eval_sample

ROW = {"sample_id": "abc", "source_id": "q7", "image": b"png", "question": "How many?", "choices": [], "answer": "3", "source": "demo"}
C1, C2 = prompts.load("c1"), prompts.load("c2")


def test_sample_shapes():
    cot = cot_sample(ROW, C1, "Three. The answer is 3")
    assert [m["role"] for m in cot["messages"]] == ["user", "assistant"] and cot["loss_on"] == "all"
    assert cot["messages"][0]["content"].startswith("<image>") and "How many?" in cot["messages"][0]["content"]
    se = self_eval_sample(ROW, C1, "Two. The answer is 2", C2, "Evaluation: Refine\nThe answer is 3")
    assert [m["role"] for m in se["messages"]] == ["user", "assistant", "user", "assistant"]
    assert se["loss_on"] == "last" and se["kind"] == "self_eval" and se["id"] == "abc-self_eval" and se["source_id"] == "q7"
    assert all("3" not in m["content"] for m in se["messages"] if m["role"] == "user")  # never the truth
    with pytest.raises(ValueError, match="must not carry the ground truth"):
        self_eval_sample(ROW, C1, "x", prompts.load("c2_hint"), "y")
    assert seat_sample(ROW, prompts.load("seat"), "...")["kind"] == "seat"


def _questions(n_accept: int, n_refine: int) -> list[dict]:
    """Kept questions as labeling leaves them: Accept ones give a CoT and a self-evaluation
    sample, Refine ones (C1 was wrong) only a self-evaluation sample."""
    return ([{"sample_id": f"a{i}", "kinds": ["self_eval", "cot"], "verdict": "Accept"} for i in range(n_accept)]
            + [{"sample_id": f"r{i}", "kinds": ["self_eval"], "verdict": "Refine"} for i in range(n_refine)])


def _count(chosen: dict, kind: str, prefix: str = "") -> int:
    return sum(kind in kinds for sid, kinds in chosen.items() if sid.startswith(prefix))


def test_one_to_one_per_kept_question_keeps_every_sample():
    chosen = mix_questions(_questions(12, 5), 1.0, None, seed=0)
    # every kept question contributes its CoT and its self-evaluation: no Refine sample is dropped
    assert _count(chosen, "cot") == 12 and _count(chosen, "self_eval") == 17 and _count(chosen, "self_eval", "r") == 5
    assert all(chosen[f"a{i}"] == {"cot", "self_eval"} for i in range(12))  # CoT and self-eval from the same question


def test_the_ratio_chooses_questions_and_refine_samples_stay():
    chosen = mix_questions(_questions(20, 4), 0.5, None, seed=0)
    assert _count(chosen, "cot") == 20 and _count(chosen, "self_eval") == 12 and _count(chosen, "self_eval", "r") == 4
    thin = mix_questions(_questions(20, 4), 0.5, None, seed=0, keep_all_refine=False)
    assert _count(thin, "self_eval") == 12 and _count(thin, "self_eval", "r") < 4
    more = mix_questions(_questions(20, 4), 2.0, None, seed=0)
    assert _count(more, "self_eval") == 24 and _count(more, "cot") == 10
    none = mix_questions(_questions(10, 3), 0.0, None, seed=0, keep_all_refine=False)
    assert _count(none, "self_eval") == 0 and _count(none, "cot") == 10 and len(none) == 10


def test_the_cap_takes_whole_questions_and_the_choice_is_seeded():
    qs = _questions(20, 6)
    chosen = mix_questions(qs, 1.0, 15, seed=1)
    assert sum(len(k) for k in chosen.values()) <= 15
    assert all(k == {"cot", "self_eval"} for sid, k in chosen.items() if sid.startswith("a"))
    assert chosen == mix_questions(list(reversed(qs)), 1.0, 15, seed=1)
    assert chosen != mix_questions(qs, 1.0, 15, seed=2)
