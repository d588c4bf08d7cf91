"""The student's LoRA training step at a real shape, without Ray (for a machine with a GPU,
torch, transformers and peft): tokens/s, peak memory and MFU.

The model is Qwen2-VL-2B's architecture (published config values below) with random bf16
weights; each sample is one 448x448 image (256 merged image tokens) followed by text up to
``--seq`` tokens (``--packing N``: N such samples of seq/N tokens in each row). The step is the project's own: ``build_model``'s LoRA placement (language
model linear layers, vision frozen; fp32 adapter weights) and vision attention, under
``mixed_precision``'s bf16 autocast, ``nll_loss`` (logits only where a label follows), AdamW,
clipping; ``--compile`` is ``train.compile``.

MFU is the model FLOPs of a LoRA step per second over the bf16 matmul rate measured on the same
device in the same run (``mfu``), and over the device's published dense bf16 peak where it is
known (``mfu_of_spec_peak``). The model FLOPs, with no recomputation counted:
- frozen language-model linear layers: 4 x weights per token (forward and the activations'
  gradients; frozen weights need no weight gradients), the lm_head only at the positions the
  loss reads;
- LoRA adapters: 6 x adapter weights per token (they also get weight gradients);
- causal attention: 6 x layers x sample length x hidden per token (the forward's QK^T and AV over
  half the sample's keys on average, 2 x length x hidden, and a backward of twice that);
- the frozen vision tower, forward only: 2 x its linear weights per patch, plus 4 x blocks x
  patches-per-image x width per patch for its attention.

    python bench/bench_train_gpu.py [--batch 4] [--seq 2048] [--steps 10] [--shape qwen2-vl-2b|tiny] [--compile] [--packing N] [--profile]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

SHAPES = {
    # Qwen/Qwen2-VL-2B-Instruct config.json
    "qwen2-vl-2b": dict(
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                  tie_word_embeddings=True),
        vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, in_channels=3)),
    # a CPU smoke-test of the script itself
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=152000, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, in_channels=3)),
}


# published dense bf16 tensor-core peaks (FLOP/s), by a part of the device's name
SPEC_BF16_DENSE = {"H100 80GB HBM3": 989.4e12, "H200": 989.4e12, "H100 PCIe": 756.5e12, "A100": 312e12}


def varlen_check(device) -> float | None:
    """The vision attention's one-call path (PyTorch's varlen FlashAttention, GPU only) against
    one SDPA call per image, on random bf16 inputs of four images: the largest difference."""
    import torch

    from casseat_ray.train.attention import _per_sequence, varlen_attn, varlen_sdpa

    if device.type != "cuda" or varlen_attn is None:
        return None
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, 16, 4 * 1024, 80, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
    bounds = torch.tensor([0, 1024, 2048, 3072, 4096], device=device, dtype=torch.int32)
    with torch.no_grad():
        one = varlen_sdpa(None, q, k, v, None, cu_seq_lens_q=bounds, max_length_q=1024, scaling=80**-0.5)[0]
        each = _per_sequence(None, q, k, v, bounds, 80**-0.5)
    return round((one.float() - each.float()).abs().max().item(), 5)


def matmul_rate(device, dtype, n: int = 8192, reps: int = 20) -> float:
    """Measured dense matmul FLOP/s at ``dtype`` on ``device``."""
    import torch

    if device.type == "cpu":
        n, reps = 1024, 5
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_step(model, batch, step) -> None:
    """One step under torch.profiler, its phases annotated, and the frozen vision tower's
    forward timed on its own."""
    import sys

    import torch
    from torch.profiler import ProfilerActivity, profile

    from casseat_ray.train import loop

    phases = {}
    visual = model.get_base_model().model.visual
    with torch.no_grad(), loop.mixed_precision(batch["pixel_values"].device, torch.bfloat16):
        for _ in range(2):
            visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        torch.cuda.synchronize()
        phases["vision_forward_s"] = round((time.perf_counter() - t0) / 5, 4)
    print(json.dumps(phases), file=sys.stderr)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=40, max_name_column_width=90), file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-vl-2b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sample, image tokens included")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--packing", type=int, default=0, metavar="N",
                    help="train.packing: each row packs N samples of seq/N tokens, each with its own image")
    ap.add_argument("--compile", action="store_true", help="train.compile: every transformer block and the loss compiled "
                    "with torch.compile (the warm-up steps pay the compilation)")
    ap.add_argument("--profile", action="store_true", help="also print, to stderr, where one step's GPU time goes: "
                    "forward, backward and optimizer, the frozen vision tower's forward alone, and the kernels that take longest")
    args = ap.parse_args()

    import torch
    from torch.profiler import record_function
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from casseat_ray.config import Config
    from casseat_ray.train.collate import IGNORE, Encoded, collate_packed, rope_positions
    from casseat_ray.train.loop import build_model, mixed_precision, nll_loss, rope_index
    from casseat_ray.train.losses import label_tokens, predicting_positions

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    shape = SHAPES[args.shape]
    config = Qwen2VLConfig(text_config=shape["text"], vision_config=shape["vision"])
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:  # build_model loads from a path, as in training
        Qwen2VLForConditionalGeneration(config).to(dtype).save_pretrained(tmp)
        cfg = Config.model_validate(dict(student=dict(model=tmp, lora=dict(r=args.rank, alpha=2 * args.rank, dropout=0.0)),
                                         train=dict(gradient_checkpointing=args.gradient_checkpointing, compile=args.compile,
                                                    packing=args.packing > 0)))
        model = build_model(cfg, dtype).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    # one 448x448 image per sample: a 32x32 patch grid, 256 tokens after the 2x2 merge
    v = shape["vision"]
    n_patch = 32 * 32
    n_img = n_patch // v["spatial_merge_size"] ** 2
    patch_dim = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2
    per_row = max(args.packing, 1)  # samples in a row
    sample_len = args.seq // per_row
    if args.packing:  # the training loop's own packed rows: positions restart per sample, no mask
        samples = []
        for _ in range(args.batch * per_row):
            ids = [1] + [config.image_token_id] * n_img + torch.randint(0, 150000, (sample_len - 1 - n_img,)).tolist()
            e = Encoded(ids, [IGNORE] * (1 + n_img) + ids[1 + n_img:], {"pixel_values": torch.randn(n_patch, patch_dim, dtype=dtype),
                        "image_grid_thw": torch.tensor([[1, 32, 32]])}, [0] + [1] * n_img + [0] * (sample_len - 1 - n_img))
            e.positions = rope_positions(e, rope_index(model))
            samples.append(e)
        batch = collate_packed([samples[r * per_row:(r + 1) * per_row] for r in range(args.batch)], pad_id=0)
    else:
        ids = torch.randint(0, 150000, (args.batch, args.seq))
        ids[:, 1:1 + n_img] = config.image_token_id
        types = torch.zeros_like(ids)
        types[:, 1:1 + n_img] = 1
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "mm_token_type_ids": types,
                 "pixel_values": torch.randn(args.batch * n_patch, patch_dim, dtype=dtype),
                 "image_grid_thw": torch.tensor([[1, 32, 32]] * args.batch)}
        batch["labels"][:, :1 + n_img] = IGNORE
    batch = {k: t.to(device) for k, t in batch.items()}
    n_labels = label_tokens(batch["labels"])

    def step():  # the phases are named for --profile
        with record_function("phase: forward"), mixed_precision(device, dtype):
            loss = nll_loss(model, batch, n_labels, compiled=args.compile)
        with record_function("phase: backward"):
            loss.backward()
        with record_function("phase: clip + optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    model.train()
    for _ in range(2):
        step()  # warm-up
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - t0) / args.steps
    if args.profile and device.type == "cuda":
        profile_step(model, batch, step)

    base = model.get_base_model()
    # matmul weights only: embedding lookups cost no FLOPs, a tied lm_head still does
    linear = [(n, m.weight.numel()) for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    n_vision = sum(k for n, k in linear if ".visual." in f".{n}.")
    n_lm = sum(k for n, k in linear if ".visual." not in f".{n}.")
    t = shape["text"]
    tokens = args.batch * args.seq
    n_head = base.lm_head.weight.numel()
    kept = args.batch * len(predicting_positions(batch["labels"]))  # logits are computed at these alone
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    flops = (4 * (n_lm - n_head) * tokens + 4 * n_head * kept + 6 * n_lora * tokens
             + 6 * t["num_hidden_layers"] * sample_len * t["hidden_size"] * tokens  # each token attends within its sample
             + (2 * n_vision + 4 * v["depth"] * n_patch * v["embed_dim"]) * args.batch * per_row * n_patch)
    peak = matmul_rate(device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    spec = next((rate for key, rate in SPEC_BF16_DENSE.items() if key in name), None)
    print(json.dumps({
        "shape": args.shape, "device": name,
        "batch": args.batch, "seq": args.seq, "samples_per_row": per_row, "lora_rank": args.rank, "gradient_checkpointing": args.gradient_checkpointing, "compile": args.compile,
        "params_lm": n_lm, "params_vision": n_vision, "trainable": sum(p.numel() for p in params),
        "step_s": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "model_tflops_per_s": round(flops / seconds / 1e12, 3), "matmul_bf16_tflops_per_s": round(peak / 1e12, 3),
        "mfu": round(flops / seconds / peak, 4),
        "mfu_of_spec_peak": round(flops / seconds / spec, 4) if spec else None,
        "vision_varlen_max_abs_diff": varlen_check(device),
    }, indent=2))


if __name__ == "__main__":
    main()
