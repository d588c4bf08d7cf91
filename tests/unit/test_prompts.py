import pytest

from casseat_ray import prompts
from casseat_ray.inference.turns import c1_conversation, c2_conversation, question_with_choices


def test_templates_render_latex_safely():
    c1 = prompts.load("c1")
    text = c1.render(question=r"Find $\frac{1}{2}$ of {x}")
    assert r"Find $\frac{1}{2}$ of {x}" in text
    assert "The answer is X" in text
    with pytest.raises(KeyError, match="needs \\['question'\\]"):
        c1.render()


def test_hash_tracks_text(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("Think. {{question}}")
    mine, builtin = prompts.load("c1", f), prompts.load("c1")
    assert mine.sha != builtin.sha and len(mine.sha) == 12
    assert prompts.load("c1").sha == builtin.sha
    with pytest.raises(ValueError, match="unknown prompt"):
        prompts.load("c9")


def test_cascade_conversation_shape():
    row = {"image": b"png", "question": "Which?", "choices": ["3", "4"], "answer": "4"}
    c1, c2 = prompts.load("c1"), prompts.load("c2")
    assert question_with_choices(row) == "Which?\nChoices:\n(A) 3\n(B) 4"
    conv = c2_conversation(row, c1, "I think B. The answer is B", c2)
    assert [m["role"] for m in conv] == ["user", "assistant", "user"]
    assert conv[0]["content"][0] == {"type": "image", "image": b"png"}
    assert conv[:1] == c1_conversation(row, c1)  # shared prefix for the prefix cache
    assert "4" not in conv[2]["content"][0]["text"]  # the plain C2 never sees the answer
    hinted = c2_conversation(row, c1, "...", prompts.load("c2_hint"))
    assert "expected answer is 4" in hinted[2]["content"][0]["text"]
