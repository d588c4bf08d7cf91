"""`data inspect --show`: rows as the teacher and the student will see them."""

from casseat_ray import prompts
from casseat_ray.demo_data import make_rows
from casseat_ray.inference.turns import first_turn_text
from casseat_ray.preview import c1_prompt_tokens, mapped_answer, show_rows
from casseat_ray.tiny import build_processor, build_tokenizer


def test_preview_shows_choices_mapped_answer_prompt_and_student_tokens():
    rows = make_rows(4, seed=0)  # count, tallest bar (multi_choice), bar value, line length (float)
    processor = build_processor(build_tokenizer(0))
    c1 = prompts.load("c1")
    text = show_rows(rows, c1, processor)
    blocks = text.split("\n\n-- ")
    assert len(blocks) == 4
    bar = rows[1]
    letter = "ABCD"[bar["choices"].index(bar["answer"])]
    assert f"answer type: multi_choice   answer: ({letter}) {bar['answer']}" in blocks[1]
    assert "choices: (A) " in blocks[1] and "  | Choices:" in blocks[1]  # the prompt lists them as the teacher reads them
    assert mapped_answer(rows[3]) == f"{rows[3]['answer']} (to 1 decimal places)"
    n = c1_prompt_tokens(rows[0], "How many?", processor)
    plain = len(processor.tokenizer("How many?")["input_ids"])
    assert n > plain + 4  # the chat template and the image's own tokens are counted
    exact = c1_prompt_tokens(rows[0], first_turn_text(rows[0], c1), processor)
    assert f"student tokens of the C1 turn (image included): {exact}" in blocks[0]
    assert "student tokens" not in show_rows(rows[:1], c1)  # no student configured: no counts
