"""``casseat data inspect --show N``: accepted rows as the teacher and the student will see
them, before any compute is spent: parsed choices, the mapped answer, the answer type, the
rendered C1 prompt, and its length in the student's tokens with the image tokens."""

from __future__ import annotations

import io

from casseat_ray.inference.turns import first_turn_text
from casseat_ray.prompts import Prompt
from casseat_ray.samples import LETTERS


def mapped_answer(row: dict) -> str:
    """The ground truth as scored: for a multiple-choice row, the option it maps to."""
    choices = list(row.get("choices") or [])
    answer = row["answer"]
    if choices and answer in choices:
        return f"({LETTERS[choices.index(answer)]}) {answer}"
    if row.get("answer_type") == "float" and row.get("precision") is not None:
        return f"{answer} (to {row['precision']} decimal places)"
    return str(answer)


def c1_prompt_tokens(row: dict, text: str, processor) -> int:
    """Tokens of the student's C1 input: chat template, image placeholder expanded."""
    from PIL import Image

    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    rendered = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    image = Image.open(io.BytesIO(row["image"])).convert("RGB")
    return len(processor(text=[rendered], images=[image], return_tensors="pt")["input_ids"][0])


def show_rows(rows: list[dict], c1: Prompt, processor=None) -> str:
    """The preview text of ``rows`` (the student's token counts when a processor is given)."""
    blocks = []
    for i, row in enumerate(rows, 1):
        choices = list(row.get("choices") or [])
        head = f"-- {i}/{len(rows)}  {row['sample_id']}  source {row['source']}"
        if row.get("source_id"):
            head += f" (id {row['source_id']})"
        text = first_turn_text(row, c1)
        lines = [head,
                 f"answer type: {row['answer_type']}   answer: {mapped_answer(row)}",
                 "choices: " + ("  ".join(f"({LETTERS[k]}) {c}" for k, c in enumerate(choices)) if choices else "none"),
                 f"image: {row.get('width')}x{row.get('height')} {row.get('image_format')}"]
        if processor is not None:
            lines.append(f"student tokens of the C1 turn (image included): {c1_prompt_tokens(row, text, processor)}")
        lines += ["C1 prompt (after the image):", *("  | " + line for line in text.splitlines())]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
