"""Collate with the tiny student's own processor: labels on exactly the intended spans."""

import pytest

from casseat_ray import prompts
from casseat_ray.synth.mix import cot_sample, self_eval_sample
from casseat_ray.train.collate import IGNORE, BadSample, NoLabels, collate, encode, label_turns


@pytest.fixture(scope="module")
def processor(tiny_models):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_models["student"])


def _labelled_text(enc, processor) -> str:
    return processor.tokenizer.decode([t for t in enc.labels if t != IGNORE])


def _spans(enc) -> int:
    """Number of contiguous labelled runs."""
    runs, inside = 0, False
    for t in enc.labels:
        if t != IGNORE and not inside:
            runs += 1
        inside = t != IGNORE
    return runs


def test_self_eval_trains_on_the_last_turn_only(processor, demo_rows):
    c1, c2 = prompts.load("c1"), prompts.load("c2")
    s = self_eval_sample(demo_rows[0], c1, "Step 1: count.\nThe answer is 3.", c2, "Evaluation: Accept\nThe answer is 3.")
    for mode in ("last_assistant", "all_assistant"):  # self-evaluation rows ignore the mode
        enc = encode(s, processor, mode)
        assert _labelled_text(enc, processor) == "Evaluation: Accept\nThe answer is 3.<|im_end|>\n"
        assert _spans(enc) == 1
    full = processor.tokenizer.decode(enc.input_ids)
    assert "Step 1: count." in full and full.endswith("The answer is 3.<|im_end|>\n")


def test_all_assistant_mode_labels_every_turn_of_a_multi_turn_row(processor, demo_rows):
    messages = [
        {"role": "user", "content": "<image>What is shown?"},
        {"role": "assistant", "content": "Shapes."},
        {"role": "user", "content": "How many?"},
        {"role": "assistant", "content": "Three."},
    ]
    row = {"messages": messages, "images": [demo_rows[0]["image"]], "loss_on": "all"}
    both = encode(row, processor, "all_assistant")
    assert _spans(both) == 2
    assert _labelled_text(both, processor) == "Shapes.<|im_end|>\nThree.<|im_end|>\n"
    last = encode(row, processor, "last_assistant")
    assert _labelled_text(last, processor) == "Three.<|im_end|>\n"
    assert both.input_ids == last.input_ids
    assert label_turns(messages, "all", "all_assistant") == [1, 3]


def test_image_tokens_are_whole_and_never_labelled(processor, demo_rows):
    s = cot_sample(demo_rows[1], prompts.load("c1"), "The answer is 4.")
    enc = encode(s, processor)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    positions = [i for i, t in enumerate(enc.input_ids) if t == image_id]
    t, h, w = enc.image_grid_thw[0].tolist()
    merge = processor.image_processor.merge_size
    assert len(positions) == t * h * w // merge**2
    assert positions == list(range(positions[0], positions[0] + len(positions)))  # one contiguous run
    assert all(enc.labels[i] == IGNORE for i in positions)
    assert enc.pixel_values.shape[0] == t * h * w
    assert [enc.token_types[i] for i in positions] == [1] * len(positions)


def test_marker_image_mismatch_is_an_error(processor, demo_rows):
    # the sample's own defects (the training loop drops and counts them), ValueErrors as well
    s = cot_sample(demo_rows[0], prompts.load("c1"), "x")
    s["images"] = []
    with pytest.raises(BadSample, match="markers but 0 images"):
        encode(s, processor)
    with pytest.raises(NoLabels, match="no assistant turn"):
        encode({"messages": [{"role": "user", "content": "hi"}], "images": []}, processor)


def test_collate_pads_right_and_concatenates_images(processor, demo_rows):
    c1 = prompts.load("c1")
    a = encode(cot_sample(demo_rows[0], c1, "The answer is 3."), processor)
    b = encode(cot_sample(demo_rows[2], c1, "Step 1: look closely at the bars.\nThe answer is 5."), processor)
    batch = collate([a, b], pad_id=processor.tokenizer.pad_token_id)
    width = max(len(a), len(b))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    short = 0 if len(a) < len(b) else 1
    n = min(len(a), len(b))
    assert (batch["input_ids"][short, n:] == processor.tokenizer.pad_token_id).all() and (batch["labels"][short, n:] == IGNORE).all()
    assert "attention_mask" not in batch  # right padding under causal attention: no real token sees a pad
    assert batch["pixel_values"].shape[0] == a.pixel_values.shape[0] + b.pixel_values.shape[0]
    assert batch["image_grid_thw"].shape == (2, 3)
    assert batch["mm_token_type_ids"].shape == (2, width)


def test_aft_candidates_share_the_prompt_and_label_only_the_response(processor, demo_rows):
    from casseat_ray.train.collate import encode_responses

    c1, c2 = prompts.load("c1"), prompts.load("c2")
    texts = ["Step 1.\nThe answer is 3.", "The answer is 5."]
    cot = {**cot_sample(demo_rows[0], c1, texts[0]), "responses": texts, "responses_correct": [True, False], "responses_rank": [0, 1]}
    ref = encode(cot, processor)
    cands = encode_responses(cot, processor, ref)
    assert [_labelled_text(e, processor) for e in cands] == [t + "<|im_end|>\n" for t in texts]
    prompt_len = ref.labels.index(next(t for t in ref.labels if t != IGNORE))
    assert all(e.input_ids[:prompt_len] == ref.input_ids[:prompt_len] for e in cands)  # same image + question
    assert cands[0].input_ids == ref.input_ids
    se = {**self_eval_sample(demo_rows[0], c1, texts[0], c2, "Evaluation: Accept\nThe answer is 3."),
          "responses": texts, "responses_correct": [True, False]}
    assert encode_responses(se, processor, encode(se, processor)) == []  # each question is scored once, with its CoT row


def test_aft_reads_a_response_identical_to_the_reference_from_the_reference_row(processor, demo_rows, tiny_models):
    import torch
    from transformers import AutoModelForImageTextToText

    from casseat_ray.train.collate import aft_group, aft_rows, encode_responses
    from casseat_ray.train.losses import aft_loss

    c1 = prompts.load("c1")
    deduped, naive = [], []
    for r in demo_rows[:2]:
        kept = f"Step 1: read the figure.\nThe answer is {r['answer']}."
        row = {**cot_sample(r, c1, kept), "responses": [kept, "I guess.\nThe answer is 0.", "Not sure"]}
        ref = encode(row, processor)
        cands = encode_responses(row, processor, ref)
        group = aft_group(ref, cands, [0, 1, 2], cutoff_len=4096)
        assert group[0][0] is None and all(c is not None for c, _ in group[1:])
        deduped.append((ref, group))
        naive.append((ref, list(zip(cands, [0, 1, 2]))))
    rows, groups = aft_rows(deduped)
    naive_rows, naive_groups = aft_rows(naive)
    assert (len(rows), len(naive_rows)) == (6, 8)
    assert groups == [([0, 2, 3], [0, 1, 2]), ([1, 4, 5], [0, 1, 2])]
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["student"]).eval()

    def loss(batch_rows, batch_groups):
        batch = collate(batch_rows, processor.tokenizer.pad_token_id)
        labels = batch.pop("labels")
        with torch.no_grad():
            return aft_loss(model(**batch).logits, labels, 2, batch_groups, "boundary", 1.0, 2.0)

    (total, align), (naive_total, naive_align) = loss(rows, groups), loss(naive_rows, naive_groups)
    assert align > 0 and torch.allclose(total, naive_total, atol=1e-4) and torch.allclose(align, naive_align, atol=1e-4)
    # only the shortest candidate fits: no better/worse pair is left, nothing to align
    assert aft_group(ref, cands, [0, 1, 2], cutoff_len=min(len(c) for c in cands)) is None


def test_token_nll_is_the_models_own_loss(processor, demo_rows, tiny_models):
    import torch
    from transformers import AutoModelForImageTextToText

    from casseat_ray.train.losses import label_tokens, token_nll

    c1 = prompts.load("c1")
    batch = collate([encode(cot_sample(r, c1, f"The answer is {r['answer']}."), processor) for r in demo_rows[:3]],
                    processor.tokenizer.pad_token_id)
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["student"]).eval()
    with torch.no_grad():
        out = model(**batch)
        # the training loop's form: the model's loss divided by the step's global label-token count
        n = label_tokens(batch["labels"])
        share = model(**batch, num_items_in_batch=torch.tensor(3.0 * n)).loss
    assert torch.allclose(token_nll(out.logits, batch["labels"]), out.loss, atol=1e-5)
    assert torch.allclose(share, token_nll(out.logits, batch["labels"], 3 * n), atol=1e-6)
    assert torch.allclose(3 * share, out.loss, atol=1e-5)
    # the loop's form: logits only where a label follows (no prompt, no image token), same loss
    from casseat_ray.train.loop import nll_loss
    from casseat_ray.train.losses import predicting_positions

    keep = predicting_positions(batch["labels"])
    assert 0 < len(keep) < batch["input_ids"].shape[1] // 2  # the prompts, images included, are most of these rows
    with torch.no_grad():
        assert torch.allclose(nll_loss(model, batch, 3 * n), share, atol=1e-6)
    assert "labels" in batch  # the caller's batch is left as it was


def test_token_count_without_pixels_equals_the_encoded_length(processor, demo_rows):
    from casseat_ray.train.collate import count_tokens
    from tests.conftest import shared_data

    c1, c2 = prompts.load("c1"), prompts.load("c2")
    # real MATH-V images of many shapes beside the demo's
    images = sorted(shared_data("math-v", "images").glob("*.jpg"))[:12]
    rows = [dict(demo_rows[0], image=p.read_bytes()) for p in images] + demo_rows[:4]
    for r in rows:
        for s in (cot_sample(r, c1, "Step 1: count.\nThe answer is 3."),
                  self_eval_sample(r, c1, "The answer is 4.", c2, "Evaluation: Refine\nThe answer is 5.")):
            assert count_tokens(s, processor) == len(encode(s, processor, "all_assistant"))
