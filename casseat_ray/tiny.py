"""Tiny vision-language models with a real architecture, built offline.

Nothing can be downloaded in tests or in the demo, so we build the whole model directory
ourselves: config + random weights (seeded), a tokenizer trained locally on math-reasoning
text with the family's real special tokens and chat template, and image processors with
small pixel bounds. The result loads with ``AutoModelForImageTextToText`` / ``AutoProcessor``.

Families (``FAMILIES``), each loading in vLLM's CPU build too: ``qwen2_vl`` (the project's
default teacher and student), ``qwen2_5_vl`` (same tokenizer and template, Qwen2.5-VL's windowed
vision tower) and ``llava`` (LLaVA-1.5: a CLIP vision tower, a two-layer projector, a
Llama language model with a SentencePiece-style tokenizer and LLaVA-1.5's own chat template,
which ends an assistant turn with a space and no end-of-turn token), and ``llava_next`` (LLaVA-NeXT:
the same language model, tokenizer and template, its image tiled at any resolution; tested in
training, not run in vLLM here).

Shape limits found on vLLM's CPU backend: head_dim must be 64 (16 is rejected), and the
M-RoPE sections must sum to head_dim / 2.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's own template, reduced to what the project uses: a default system turn, images
# and videos as placeholder runs inside user turns, any number of turns.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyShape:
    """Sizes of one tiny role. head_dim = hidden / heads must be 64 for vLLM on CPU."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_depth: int
    vision_dim: int
    vision_heads: int


SHAPES = {
    # The teacher is larger than the student, as in the method.
    "teacher": TinyShape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512,
                         vision_depth=2, vision_dim=64, vision_heads=2),
    "student": TinyShape(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=256,
                         vision_depth=2, vision_dim=64, vision_heads=2),
}

VOCAB_SIZE = 1024
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112
MAX_POSITIONS = 4096


def _tokenizer_corpus(seed: int) -> list[str]:
    """Text that looks like what the models will read and write, so BPE merges are useful."""
    from casseat_ray import prompts

    rng = random.Random(seed)
    words = (
        "the answer is step first then so therefore count shapes circle square triangle bar "
        "chart value length longer shorter angle degrees clock hour minute image shows left "
        "right top bottom red blue green yellow total sum difference equals evaluation accept "
        "refine check previous reasoning mistake correct wrong final choice option which how "
        "many what is of in a an to and we see there are"
    ).split()
    lines = [prompts.load("c1").text, prompts.load("c2").text, prompts.load("seat").text]
    for _ in range(400):
        n = rng.randint(5, 20)
        lines.append(" ".join(rng.choice(words) for _ in range(n)) + f" {rng.randint(0, 999)}.")
        lines.append(f"The answer is {rng.choice('ABCDE')}. Evaluation: {rng.choice(['Accept', 'Refine'])}")
        lines.append(f"{rng.randint(0, 99)} + {rng.randint(0, 99)} = {rng.random() * 100:.2f}")
    return lines


def build_tokenizer(seed: int = 0):
    """Byte-level BPE trained locally; the Qwen2-VL special tokens get the last ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        padding_side="left",
    )


def build_config(role: str, tokenizer):
    from transformers import Qwen2VLConfig

    s = SHAPES[role]
    head_dim = s.hidden // s.heads
    assert head_dim == 64, "vLLM's CPU attention needs head_dim 64"
    quarter = head_dim // 8
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        max_window_layers=s.layers,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            # M-RoPE (temporal, height, width) sections sum to head_dim / 2.
            "mrope_section": [quarter, (head_dim // 2 - quarter) // 2, (head_dim // 2 - quarter) // 2],
        },
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    vision = dict(
        depth=s.vision_depth,
        embed_dim=s.vision_dim,
        hidden_size=s.hidden,
        num_heads=s.vision_heads,
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    # The processor refuses a missing video processor, so give it one with the same bounds.
    video_processor = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next")

# LLaVA-1.5's tokens and its Hugging Face chat template (llava-hf/llava-1.5-7b-hf), verbatim but
# for the {% generation %} markers: images first, then text, each turn closed by a space.
LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_IMAGE_SIZE = 56  # CLIP input side: (56 / 14)^2 = 16 image tokens
# LLaVA-NeXT's any-resolution grid, scaled to the tiny CLIP side: an image is tiled by the best
# fitting of these resolutions, each tile a CLIP view, plus one view of the whole image
LLAVA_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def build_llava_tokenizer(seed: int = 0):
    """A SentencePiece-style BPE, as Llama's: spaces become a word-boundary piece and one is
    prepended to the text, so a text tokenized in pieces differs from the whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    corpus = _tokenizer_corpus(seed) + ["USER: ASSISTANT:"] * 50  # the template's own words
    alphabet = sorted(set(string.printable.strip()) | set("".join(corpus)) | {"\u2581"})  # every ASCII character has a piece
    # the special tokens take the first ids (<unk> 0, <s> 1, </s> 2, as Llama's)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=LLAVA_SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(LLAVA_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   chat_template=LLAVA_CHAT_TEMPLATE, model_max_length=MAX_POSITIONS, padding_side="left")


def build_family(family: str, role: str, seed: int):
    """(model class, config, processor) of a tiny ``family`` model of ``role``'s size."""
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    s = SHAPES[role]
    if family == "qwen2_vl":
        tokenizer = build_tokenizer(seed)
        return Qwen2VLForConditionalGeneration, build_config(role, tokenizer), build_processor(tokenizer)
    if family == "qwen2_5_vl":
        tokenizer = build_tokenizer(seed)
        qwen2 = build_config(role, tokenizer).to_dict()
        vision = dict(depth=s.vision_depth, hidden_size=s.vision_dim, intermediate_size=2 * s.vision_dim, num_heads=s.vision_heads,
                      out_hidden_size=s.hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[s.vision_depth - 1])
        ids = {k: qwen2[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
        config = Qwen2_5_VLConfig(text_config=qwen2["text_config"], vision_config=vision, tie_word_embeddings=False, **ids)
        processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS), tokenizer=tokenizer,
                                        video_processor=Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
                                        chat_template=CHAT_TEMPLATE)
        return Qwen2_5_VLForConditionalGeneration, config, processor
    if family in ("llava", "llava_next"):  # LLaVA-NeXT (vicuna) keeps LLaVA-1.5's tokens and template
        tokenizer = build_llava_tokenizer(seed)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL_TOKENS}
        text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=s.hidden, intermediate_size=s.intermediate,
                    num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                    max_position_embeddings=MAX_POSITIONS, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
                    tie_word_embeddings=False)
        vision = dict(model_type="clip_vision_model", hidden_size=s.vision_dim, intermediate_size=2 * s.vision_dim,
                      num_hidden_layers=s.vision_depth, num_attention_heads=s.vision_heads, image_size=LLAVA_IMAGE_SIZE, patch_size=14,
                      projection_dim=s.vision_dim)
        if family == "llava_next":
            config = LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=ids["<image>"],
                                     image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, vision_feature_layer=-2,
                                     vision_feature_select_strategy="default", tie_word_embeddings=False)
            image_processor = LlavaNextImageProcessor(size={"shortest_edge": LLAVA_IMAGE_SIZE},
                                                      crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
                                                      image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
            processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                           vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                           chat_template=LLAVA_CHAT_TEMPLATE)
            return LlavaNextForConditionalGeneration, config, processor
        config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=ids["<image>"],
                             image_seq_length=(LLAVA_IMAGE_SIZE // 14) ** 2, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", tie_word_embeddings=False)
        image_processor = CLIPImageProcessor(size={"shortest_edge": LLAVA_IMAGE_SIZE},
                                             crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE})
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_CHAT_TEMPLATE)
        return LlavaForConditionalGeneration, config, processor
    raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")


DEFAULT_FORMAT_STEPS = {"teacher": 400, "student": 0}
TEACH_QUESTIONS = 32  # the teacher learns scripted solutions of make_rows(32, seed): the demo's questions
RECIPE = 2  # bumped when the scripted solutions or the training recipe change (old builds are redone)


def make_tiny(out: str | Path, role: str = "student", seed: int = 0, format_steps: int | None = None, family: str = "qwen2_vl") -> Path:
    """Build and save a tiny ``family`` model (Qwen2-VL by default) of ``role``'s size in
    ``out``; returns the directory.

    ``format_steps`` > 0 then trains it briefly on scripted answers (``teach_format``); by
    default the teacher gets 400 steps (two to three minutes on a laptop CPU) and the student none, so
    the student starts out knowing nothing. Deterministic: the same role, seed and steps give
    byte-identical weights and tokenizer.
    """
    import torch

    if role not in SHAPES:
        raise ValueError(f"role must be one of {sorted(SHAPES)}, got {role!r}")
    model_class, config, processor = build_family(family, role, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed + (0 if role == "student" else 1))
    model = model_class(config).to(torch.float32).eval()
    with torch.no_grad():
        # Wider init than the default 0.02 so different inputs give visibly different outputs.
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    text = config.get_text_config()
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if family in ("llava", "llava_next"):
        from casseat_ray.train.run import hub_layout

        hub_layout(out)  # what vLLM loads
    steps = DEFAULT_FORMAT_STEPS[role] if format_steps is None else format_steps
    if steps:
        teach_format(out, steps=steps, seed=seed)
    (out / "casseat_tiny.json").write_text(json.dumps(tiny_marker(role, seed, steps, family), indent=2) + "\n")
    return out


def make_tiny_adapter(model_dir: str | Path, out: str | Path, seed: int = 0, r: int = 8) -> Path:
    """A real peft LoRA adapter for ``model_dir`` with random, non-zero weights (so the adapted
    model answers differently), on the language model's linear layers; returns ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    get_peft_model(model, LoraConfig(r=r, lora_alpha=8 * r, target_modules=targets, init_lora_weights=False)).save_pretrained(out)
    return Path(out)


def tiny_marker(role: str, seed: int, format_steps: int | None = None, family: str = "qwen2_vl") -> dict:
    """What ``casseat_tiny.json`` records, so a rebuild can be skipped when nothing changed."""
    steps = DEFAULT_FORMAT_STEPS[role] if format_steps is None else format_steps
    return {"role": role, "seed": seed, "format_steps": steps, "recipe": RECIPE if steps else None,
            **({"family": family} if family != "qwen2_vl" else {})}


def fingerprint(path: str | Path) -> str:
    """Hash of every file in a model directory (names + bytes), for determinism checks."""
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            h.update(f.relative_to(path).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- a teacher that knows the format
def scripted_targets(row: dict, rng: random.Random, wrong_rate: float = 0.3) -> dict[str, str]:
    """What a well-behaved teacher would write for one demo row, for each prompt the project
    uses. C1 is deliberately wrong at ``wrong_rate`` so C2 has something to Refine."""
    truth = row["answer"]
    wrong = truth
    if rng.random() < wrong_rate:
        others = [c for c in row.get("choices") or [] if c != truth]
        if others:
            wrong = rng.choice(others)
        else:
            try:
                wrong = str(int(float(truth)) + rng.choice([1, 2, 3]))
            except ValueError:
                wrong = truth + "s"
    step = "Step 1: I look at the image.\nStep 2: I read the values it shows."
    c1 = f"{step}\nThe answer is {wrong}."
    # C2 reads the image again, then compares with the previous answer: a rule the model can
    # learn (Accept when they agree), so its verdicts follow what it sees, not a memorized coin.
    recheck = f"I read the image again: it shows {truth}. The previous answer was {wrong}."
    if wrong == truth:
        c2 = f"{recheck}\nEvaluation: Accept\nThe answer is {truth}."
    else:
        c2 = f"{recheck} Step 2 misread it.\nEvaluation: Refine\nThe corrected reading gives {truth}.\nThe answer is {truth}."
    seat = f"{step}\n[Self-evaluation] I checked the reading. Evaluation: Accept [/Self-evaluation]\nThe answer is {truth}."
    return {"c1": c1, "c2": c2, "seat": seat, "direct": truth}


def teach_format(path: str | Path, n: int = TEACH_QUESTIONS, steps: int = 100, seed: int = 0, lr: float = 1e-3,
                 wrong_rate: float = 0.3) -> dict:
    """Train a tiny model in place, all weights, on scripted answers to ``n`` demo questions
    (``demo_data.make_rows(n, seed)``), so end-to-end runs see well-formed reasoning,
    verdicts and answers, and greedy outputs are stable (a random model's near-tied logits
    flip with batch shape). It learns those questions' answers from their pictures (about
    half of them after 400 steps; 1e-3 learns them, 3e-3 does not) and nothing beyond: a
    stand-in for a large teacher on the demo's questions, not one that generalizes. C1 is
    scripted wrong at ``wrong_rate`` so that C2 learns to Refine."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from casseat_ray import prompts
    from casseat_ray.demo_data import make_rows
    from casseat_ray.synth.mix import cot_sample, seat_sample, self_eval_sample
    from casseat_ray.train.collate import collate, encode

    path = Path(path)
    processor = AutoProcessor.from_pretrained(path)
    rng = random.Random(seed)
    c1, c2, seat, direct = (prompts.load(k) for k in ("c1", "c2", "seat", "direct"))
    samples = []
    for row in make_rows(n, seed):
        t = scripted_targets(row, rng, wrong_rate)
        samples += [
            cot_sample(row, c1, t["c1"]),
            self_eval_sample(row, c1, t["c1"], c2, t["c2"]),
            seat_sample(row, seat, t["seat"]),
            cot_sample(row, direct, t["direct"]),
        ]
    encoded = [encode(s, processor, "last_assistant") for s in samples]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a fixed thread count: the same bytes on every machine
    try:
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        order = random.Random(seed)
        losses = []
        for step in range(steps):
            batch = collate(order.sample(encoded, 8), processor.tokenizer.pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        model.eval().save_pretrained(path)
    finally:
        torch.set_num_threads(threads)
    return {"steps": steps, "first_loss": losses[0], "last_loss": sum(losses[-10:]) / 10}
