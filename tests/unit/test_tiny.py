import io

import pytest
import torch

from casseat_ray.tiny import SPECIAL_TOKENS, fingerprint, make_tiny


def test_same_seed_same_files_other_seed_other_weights(tmp_path, tiny_models):
    again = make_tiny(tmp_path / "s", role="student", seed=0)
    assert fingerprint(again) == fingerprint(tiny_models["student"])
    other = make_tiny(tmp_path / "s1", role="student", seed=1)
    assert fingerprint(other) != fingerprint(again)
    with pytest.raises(ValueError, match="role must be one of"):
        make_tiny(tmp_path / "x", role="judge")


def test_loads_in_transformers_and_answers_two_turn_image_conversation(tiny_models, demo_rows):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    sizes = {}
    for role, path in tiny_models.items():
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        processor = AutoProcessor.from_pretrained(path)
        sizes[role] = sum(p.numel() for p in model.parameters())
        assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
        tok = processor.tokenizer
        for t in SPECIAL_TOKENS:
            assert tok.convert_tokens_to_ids(t) != tok.unk_token_id
        image = Image.open(io.BytesIO(demo_rows[0]["image"]))
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": demo_rows[0]["question"]}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The answer is 3"}]},
            {"role": "user", "content": [{"type": "text", "text": "Check your answer."}]},
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text.count("<|im_start|>user") == 2 and text.endswith("<|im_start|>assistant\n")
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert n_image_tokens == int(inputs["image_grid_thw"].prod()) // 4  # 2x2 spatial merge
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert out.shape[1] > inputs["input_ids"].shape[1]
    assert sizes["teacher"] > 2 * sizes["student"]
