import pytest

from casseat_ray import prompts
from casseat_ray.synth.mix import cot_sample, mix, mix_counts, seat_sample, self_eval_sample

ROW = {"sample_id": "abc", "image": b"png", "question": "How many?", "choices": [], "answer": "3", "source": "demo"}
C1, C2 = prompts.load("c1"), prompts.load("c2")


def test_sample_shapes():
    cot = cot_sample(ROW, C1, "Three. The answer is 3")
    assert [m["role"] for m in cot["messages"]] == ["user", "assistant"] and cot["loss_on"] == "all"
    assert cot["messages"][0]["content"].startswith("<image>") and "How many?" in cot["messages"][0]["content"]
    se = self_eval_sample(ROW, C1, "Two. The answer is 2", C2, "Evaluation: Refine\nThe answer is 3")
    assert [m["role"] for m in se["messages"]] == ["user", "assistant", "user", "assistant"]
    assert se["loss_on"] == "last" and se["kind"] == "self_eval" and se["id"] == "abc-self_eval"
    assert all("3" not in m["content"] for m in se["messages"] if m["role"] == "user")  # never the truth
    with pytest.raises(ValueError, match="must not carry the ground truth"):
        self_eval_sample(ROW, C1, "x", prompts.load("c2_hint"), "y")
    assert seat_sample(ROW, prompts.load("seat"), "...")["kind"] == "seat"


@pytest.mark.parametrize(
    "n_cot, n_se, ratio, cap, expected",
    [
        (10, 10, 1.0, None, (10, 10)),
        (10, 6, 1.0, None, (6, 6)),
        (10, 30, 2.0, None, (10, 20)),
        (10, 30, 0.5, None, (10, 5)),
        (10, 10, 1.0, 8, (4, 4)),
        (10, 10, 0.0, None, (10, 0)),
        (0, 10, 1.0, None, (0, 0)),
    ],
)
def test_ratio_is_exact(n_cot, n_se, ratio, cap, expected):
    assert mix_counts(n_cot, n_se, ratio, cap) == expected


def test_mix_is_deterministic_and_seeded():
    cots = [{"sample_id": f"q{i}", "kind": "cot"} for i in range(20)]
    ses = [{"sample_id": f"q{i}", "kind": "self_eval"} for i in range(12)]
    a = mix(cots, ses, 1.0, None, seed=1)
    assert len(a) == 24 and sum(s["kind"] == "cot" for s in a) == 12
    assert a == mix(list(reversed(cots)), ses, 1.0, None, seed=1)
    assert a != mix(cots, ses, 1.0, None, seed=2)
