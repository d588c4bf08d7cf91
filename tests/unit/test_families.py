"""Every student family the method names -- Qwen2-VL, Qwen2.5-VL, LLaVA-1.5, LLaVA-NeXT -- tokenized as the
model sees it at inference, trained on what it must generate and where it stops, LoRA on its language
model only. Tiny models of each architecture, built offline."""

import pytest
import torch

from casseat_ray import prompts
from casseat_ray.synth.mix import cot_sample, self_eval_sample
from casseat_ray.train.collate import IGNORE, _images, collate, count_tokens, encode, to_conversation
from casseat_ray.train.loop import build_model
from tests.conftest import train_config

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava", "llava_next"]
ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}


def _sample(row, kind: str) -> dict:
    c1, c2 = prompts.load("c1"), prompts.load("c2")
    if kind == "cot":
        return cot_sample(row, c1, "Step 1: count the shapes.\nThe answer is 3.")
    return self_eval_sample(row, c1, "Step 1: count.\nThe answer is 4.", c2, "Evaluation: Refine\nThe answer is 3.")


def _labels(enc) -> list[int]:
    return [t for t in enc.labels if t != IGNORE]


def _inference_prompt(sample: dict, processor):
    """What the inference layer sends for the sample's last turn: the conversation before it,
    rendered with the generation prompt, no special tokens added."""
    text = processor.apply_chat_template(to_conversation(sample["messages"][:-1]), tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=_images(sample), return_tensors="pt", add_special_tokens=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_the_tokens_the_student_generates(family, family_students, demo_rows):
    from transformers import AutoProcessor

    path = family_students[family]
    processor = AutoProcessor.from_pretrained(path)
    tok = processor.tokenizer
    samples = [_sample(demo_rows[0], "cot"), _sample(demo_rows[1], "self_eval")]
    for s in samples:
        enc = encode(s, processor)
        start = next(i for i, t in enumerate(enc.labels) if t != IGNORE)
        prompt = _inference_prompt(s, processor)["input_ids"][0].tolist()
        assert enc.input_ids[:start] == prompt  # the labels start where the model starts generating
        labels = _labels(enc)
        assert labels == enc.input_ids[start:start + len(labels)]  # one run, the last turn's
        # the turn's own text, then the end-of-sequence token the generation stops on (and
        # Qwen's line after it, as its template renders the turn)
        stop = labels.index(tok.eos_token_id)
        assert tok.decode(labels[:stop]).strip() == s["messages"][-1]["content"]
        assert tok.decode(labels[stop + 1:]) == ("" if family.startswith("llava") else "\n")
        assert count_tokens(s, processor) == len(enc)
    if family.startswith("llava"):  # the template closes a turn with a space and no end token: EOS inserted
        s = samples[0]
        text = processor.apply_chat_template(to_conversation(s["messages"]), tokenize=False)
        assert text.endswith("The answer is 3. ") and tok.eos_token not in text
        assert len(encode(s, processor)) == len(processor(text=[text], images=_images(s), add_special_tokens=False)["input_ids"][0]) + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_the_language_model_and_the_student_learns_to_stop(family, family_students, demo_rows, tmp_path):
    from transformers import AutoProcessor

    path = family_students[family]
    processor = AutoProcessor.from_pretrained(path)
    cfg = train_config(tmp_path, {"student": path}, family)
    torch.manual_seed(0)
    model = build_model(cfg, torch.float32)
    assert type(model.get_base_model()).__name__ == ARCHITECTURES[family]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)  # vision tower, projector frozen
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} >= {"q_proj", "v_proj", "down_proj"}
    # trained on one self-evaluation sample until it knows it, the student's greedy answer at
    # inference is exactly the label tokens: the same text, the end token, then it stops
    s = _sample(demo_rows[1], "self_eval")
    enc = encode(s, processor)
    batch = collate([enc], processor.tokenizer.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(60):
        model(**batch, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    prompt = _inference_prompt(s, processor)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=40, do_sample=False)[0, prompt["input_ids"].shape[1]:].tolist()
    labels = _labels(enc)
    assert out == labels[:labels.index(processor.tokenizer.eos_token_id) + 1]


@pytest.mark.parametrize("attention", ["sdpa", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_give_every_sample_exactly_its_own_logits(family, attention, family_students, demo_rows, monkeypatch):
    # transformers' SDPA with its block-diagonal mask, and the per-sample attention packing runs use
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from casseat_ray.train import attention as packed_attention
    from casseat_ray.train.collate import collate_packed, rope_positions
    from casseat_ray.train.losses import token_nll

    processor = AutoProcessor.from_pretrained(family_students[family])
    attn = packed_attention.register() if attention == "packed" else "sdpa"
    model = AutoModelForImageTextToText.from_pretrained(family_students[family], attn_implementation=attn).eval()
    samples = [_sample(demo_rows[0], "cot"), _sample(demo_rows[1], "self_eval"),
               cot_sample(demo_rows[2], prompts.load("c1"), f"The answer is {demo_rows[2]['answer']}.")]
    enc = [encode(s, processor) for s in samples]
    for e in enc:  # M-RoPE positions (Qwen); LLaVA's are plain 0..len-1
        e.positions = rope_positions(e, getattr(model.model, "get_rope_index", None))
    pad = processor.tokenizer.pad_token_id
    packed = collate_packed([[enc[0], enc[1]], [enc[2]]], pad)  # the second row closes with padding
    width = len(enc[0]) + len(enc[1])
    assert "attention_mask" not in packed
    assert packed["position_ids"].shape == ((2, width) if family.startswith("llava") else (4, 2, width))
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def spy(q, *a, **k):
        calls.append((q.shape[0], q.shape[2], k.get("is_causal"), k.get("attn_mask") is None))
        return sdpa(q, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        out = model(**packed, use_cache=False).logits  # a cache would hide the sample boundaries
    monkeypatch.undo()
    text_calls = {c for c in calls if c[2] or not c[3]}  # the language model's (the vision tower's are neither causal nor masked)
    if attention == "packed":  # one unmasked causal call per sample and per closing padding
        assert text_calls == {(1, len(enc[0]), True, True), (1, len(enc[1]), True, True), (1, len(enc[2]), True, True),
                              (1, width - len(enc[2]), True, True)}
    else:  # one call over whole rows with the block-diagonal mask
        assert text_calls == {(2, width, False, False)}
    with torch.no_grad():
        alone = [model(**collate([e], pad)).logits[0] for e in enc]
        padded = model(**collate(enc, pad))
    spans = [(0, 0, len(enc[0])), (0, len(enc[0]), len(enc[1])), (1, 0, len(enc[2]))]
    for (row, start, n), ref in zip(spans, alone):
        assert torch.allclose(out[row, start:start + n], ref, atol=1e-4), (row, start)
    for i, ref in enumerate(alone):  # right-padded with no mask: every real token sees what it sees alone
        assert torch.allclose(padded.logits[i, :len(enc[i])], ref, atol=1e-4), i
    # the same samples, packed or padded, give the same loss
    assert torch.allclose(token_nll(out, packed["labels"]), padded.loss, atol=1e-5)


def test_a_saved_llava_has_the_hub_layout_vllm_loads(family_students, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    from casseat_ray.train.run import hub_layout

    with safe_open(str(family_students["llava"] / "model.safetensors"), "pt") as fh:
        towers = [k for k in fh.keys() if k.startswith("vision_tower.")]
    assert towers and all(k.startswith("vision_tower.vision_model.") for k in towers)
    # what transformers 5 writes for a LLaVA built from its config (loaded from a checkpoint, it
    # keeps that checkpoint's layout): renamed in place, the index too
    model = AutoModelForImageTextToText.from_config(AutoModelForImageTextToText.from_pretrained(family_students["llava"]).config)
    model.save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as fh:
        assert any(k.startswith("vision_tower.embeddings.") for k in fh.keys())
    hub_layout(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as fh:
        assert sorted(fh.keys()) == sorted(safe_open(str(family_students["llava"] / "model.safetensors"), "pt").keys())
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "m").state_dict()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
    shard = tmp_path / "s"
    shard.mkdir()
    save_file({"vision_tower.encoder.w": torch.ones(1), "language_model.model.w": torch.ones(1)}, str(shard / "a.safetensors"))
    (shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"vision_tower.encoder.w": "a.safetensors",
                                                                                   "language_model.model.w": "a.safetensors"}}))
    hub_layout(shard)
    assert sorted(json.loads((shard / "model.safetensors.index.json").read_text())["weight_map"]) == [
        "language_model.model.w", "vision_tower.vision_model.encoder.w"]


def test_bf16_training_runs_the_adapters_in_bf16_and_keeps_their_weights_fp32(family_students, demo_rows, tmp_path):
    """At bf16 (the GPU default) the LoRA weights stay fp32, for precise optimizer updates, but
    their matmuls take the bf16 activations under ``mixed_precision``: no fp32 copy of every
    layer's input, no fp32 matmul. The loss matches the fp32 model's to bf16's precision."""
    from transformers import AutoProcessor

    from casseat_ray.train.loop import mixed_precision

    path = family_students["qwen2_vl"]
    processor = AutoProcessor.from_pretrained(path)
    cfg = train_config(tmp_path, {"student": path}, "bf16")
    batch = collate([encode(_sample(demo_rows[1], "self_eval"), processor)], processor.tokenizer.pad_token_id)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    reference = build_model(cfg, torch.float32)
    torch.manual_seed(0)
    model = build_model(cfg, torch.bfloat16)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
             for n, m in model.named_modules() if n.endswith("lora_A.default")]
    with mixed_precision(cpu, torch.bfloat16):
        loss = model(**batch, use_cache=False).loss
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora.values())
    with mixed_precision(cpu, torch.float32), torch.no_grad():  # fp32: no autocast at all
        ref = reference(**batch, use_cache=False).loss
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()


def test_a_packing_run_builds_its_student_with_per_sample_attention(family_students, tmp_path):
    from casseat_ray.train.attention import PACKED_ATTENTION

    for packing, expected in ((True, PACKED_ATTENTION), (False, "sdpa")):
        cfg = train_config(tmp_path, {"student": family_students["qwen2_vl"]}, "attn", packing=packing)
        model = build_model(cfg, torch.float32)
        assert model.get_base_model().config.get_text_config()._attn_implementation == expected


def test_llava_next_tiles_images_of_any_shape_and_batches_them(family_students, demo_rows):
    # a wide image is tiled into fewer views than a square one; a batch pads the views as
    # LLaVA-NeXT's processor does, and each sample still gets exactly its own logits
    import io

    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from casseat_ray.train.collate import collate_packed

    path = family_students["llava_next"]
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    wide = io.BytesIO()
    Image.open(io.BytesIO(demo_rows[1]["image"])).resize((224, 56)).save(wide, "PNG")
    samples = [_sample(demo_rows[0], "cot"), {**_sample(demo_rows[1], "cot"), "images": [wide.getvalue()]}]
    enc = [encode(s, processor) for s in samples]
    views = [e.images["pixel_values"].shape[1] for e in enc]
    assert views[1] < views[0]
    assert [count_tokens(s, processor) for s in samples] == [len(e) for e in enc]
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        alone = [model(**collate([e], pad)).logits[0] for e in enc]
        padded = model(**collate(enc, pad)).logits
        packed = model(**collate_packed([enc], pad), use_cache=False).logits[0]
    assert collate(enc, pad)["pixel_values"].shape[:2] == (2, views[0])
    for i, ref in enumerate(alone):
        assert torch.allclose(padded[i, :len(enc[i])], ref, atol=1e-4), i
    assert torch.allclose(packed[:len(enc[0])], alone[0], atol=1e-4)
    assert torch.allclose(packed[len(enc[0]):], alone[1], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_aft_candidates_take_their_reference_images_and_encode_as_they_would_alone(family, family_students, demo_rows):
    # the row's images are processed once for the reference sample and its k responses; each
    # response's tokens, labels and token types are what encoding it on its own gives
    from transformers import AutoProcessor

    from casseat_ray.train.collate import encode_responses, prompt_turns

    processor = AutoProcessor.from_pretrained(family_students[family])
    texts = ["Step 1: count the shapes.\nThe answer is 3.", "The answer is 5."]
    one = {**_sample(demo_rows[0], "cot"), "responses": texts}
    # two images side by side in one turn (LLaVA's placeholders are then adjacent: one run)
    two = {**one, "images": [demo_rows[0]["image"], demo_rows[1]["image"]],
           "messages": [{**one["messages"][0], "content": "<image><image>\n" + one["messages"][0]["content"].replace("<image>", "")},
                        one["messages"][1]]}
    for row in (one, two):
        ref = encode(row, processor)
        cands = encode_responses(row, processor, ref)
        assert len(cands) == 2
        for c, text in zip(cands, texts):
            alone = encode({**row, "messages": prompt_turns(row["messages"]) + [{"role": "assistant", "content": text}], "loss_on": "all"},
                           processor, "all_assistant")
            assert (c.input_ids, c.labels, c.token_types) == (alone.input_ids, alone.labels, alone.token_types)
            assert c.images is ref.images and c.images.keys() == alone.images.keys()
            assert all(torch.equal(c.images[k], alone.images[k]) for k in alone.images)


COMPILED_BLOCKS = {"qwen2_vl": {"Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"},
                   "llava": {"LlamaDecoderLayer", "CLIPEncoderLayer", "CLIPVisionEmbeddings"}}


@pytest.mark.parametrize(("family", "packing"), [("qwen2_vl", False), ("qwen2_vl", True), ("llava", False)],
                         ids=["padded", "packed", "llava"])
def test_compiled_layers_train_as_the_eager_student_does(family, packing, family_students, demo_rows, tmp_path):
    """``train.compile``: every block (decoder layers and vision blocks) compiled in place, each
    kind sharing one compiled code, and the token loss compiled; on batches of three lengths
    (Qwen2-VL padded, or packed rows of two samples each; LLaVA padded, its CLIP tower compiled
    too) the student gives the eager model's loss and LoRA gradients (to fp32 summation order)
    and the same weights after the steps, and a third length compiles nothing more."""
    from torch._dynamo.utils import counters
    from transformers import AutoProcessor

    from casseat_ray.train.collate import collate_packed, rope_positions
    from casseat_ray.train.loop import blocks, nll_loss, rope_index
    from casseat_ray.train.losses import label_tokens

    path = family_students[family]
    processor = AutoProcessor.from_pretrained(path)
    pad = processor.tokenizer.pad_token_id
    models = {}
    for compiled in (False, True):
        cfg = train_config(tmp_path, {"student": path}, "compile", compile=compiled, packing=packing)
        cfg.student.lora.dropout = 0.0  # compiled code draws other random numbers than eager
        torch.manual_seed(0)
        models[compiled] = build_model(cfg, torch.float32)
    eager, model = models[False], models[True]
    layers = [b for b in blocks(model) if b._compiled_call_impl is not None]
    assert layers == blocks(model) and {type(b).__name__ for b in layers} == COMPILED_BLOCKS[family]
    assert len(blocks(model, vision=False)) == 2 and not any(b._compiled_call_impl for b in blocks(eager))
    encoded = [encode(_sample(r, kind), processor) for r in demo_rows[:6] for kind in ("cot", "self_eval")]
    if packing:  # two rows of two samples each, with their own M-RoPE positions
        for e in encoded:
            e.positions = rope_positions(e, rope_index(eager))
        batches = [collate_packed([encoded[k:k + 2], encoded[k + 2:k + 4]], pad) for k in (0, 4, 8)]
    else:
        batches = [collate(encoded[k:k + 2], pad) for k in (0, 2, 4)]
    assert len({b["input_ids"].shape[1] for b in batches}) == 3
    counters.clear()
    graphs = []
    # plain SGD: Adam would turn the last-digit differences of near-zero gradients into whole steps
    opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for k, m in models.items()}
    for batch in batches:
        losses, grads = {}, {}
        for k, m in models.items():
            loss = nll_loss(m, batch, label_tokens(batch["labels"]), compiled=k)
            loss.backward()
            losses[k] = loss.item()
            grads[k] = torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad])
            opts[k].step()
            opts[k].zero_grad()
        assert losses[True] == pytest.approx(losses[False], rel=1e-5)
        assert ((grads[True] - grads[False]).norm() / grads[False].norm()).item() < 1e-4
        graphs.append(counters["stats"]["unique_graphs"])
    for (n, p), q in zip([(n, p) for n, p in eager.named_parameters() if p.requires_grad],
                         [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)
    # the first length compiles each kind of block and the loss (a decoder layer twice: the first
    # layer's input needs no gradient, the second's does), the second compiles them with the
    # length dynamic, the third compiles nothing
    assert 0 < graphs[0] < graphs[1] == graphs[2]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava"])
def test_qwen_vision_towers_attend_to_every_image_in_one_call(family, family_students, tmp_path):
    """``build_model`` gives a vision tower whose blocks take the images' bounds (the Qwen
    families) the attention that reads those bounds (no per-image split, no host sync); its
    image features equal those of transformers' own per-image SDPA for two images of different
    sizes (Qwen2.5-VL: windowed blocks included). LLaVA's tower keeps SDPA."""
    from casseat_ray.train.attention import VARLEN_ATTENTION

    model = build_model(train_config(tmp_path, {"student": family_students[family]}, "varlen"), torch.float32)
    base = model.get_base_model()
    if family == "llava":
        assert base.config.vision_config._attn_implementation == "sdpa"
        return
    assert base.config.vision_config._attn_implementation == VARLEN_ATTENTION
    assert base.config.text_config._attn_implementation == "sdpa"
    tower = base.model.visual
    grid = torch.tensor([[1, 8, 8], [1, 4, 12]])
    c = tower.config
    pixels = torch.randn(int(grid.prod(-1).sum()), c.in_channels * c.temporal_patch_size * c.patch_size ** 2)
    with torch.no_grad():
        ours = tower(pixels, grid_thw=grid).pooler_output
        base.set_attn_implementation({"vision_config": "sdpa"})
        theirs = tower(pixels, grid_thw=grid).pooler_output
    torch.testing.assert_close(ours, theirs)
