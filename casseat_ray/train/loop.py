"""The student's LoRA training loop, run by every Ray Train worker.

Reads top to bottom: load the student and wrap it with LoRA, then optimizer steps over the
run's plan (``train.stream``): each step's samples stream in from the worker's dataset
shard, encoded by Ray Data, in the (seed, epoch)-determined order; a checkpoint every
``checkpoint_every`` steps. Every step's randomness (dropout) is seeded from (seed, rank,
step), so a resumed run replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from pathlib import Path

from casseat_ray.config import Config, LoraConfig, TrainConfig
from casseat_ray.train import checkpoints

VISION_PARTS = ("visual", "vision_tower", "vision_model", "image_encoder")
PROJECTOR_NAMES = ("merger", "multi_modal_projector", "mm_projector")


def peak_memory_mb(device) -> dict:
    """This process's peak resident memory, its private resident memory now (Linux) and the
    device's peak allocation on a GPU, in MiB."""
    import resource

    import torch

    out = {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB on Linux
    # The peak counts the pages of Ray's shared object store the worker read its data from; its
    # own private memory (what holding samples would grow) is RssAnon, read now.
    status = Path("/proc/self/status")
    if status.exists():
        anon = next((line.split()[1] for line in status.read_text().splitlines() if line.startswith("RssAnon:")), None)
        out["private_memory_mb"] = round(int(anon) / 1024, 1) if anon else None
    if device.type == "cuda":
        out["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def lora_targets(model, lora: LoraConfig) -> str | list[str]:
    """With ``all-linear``, a pattern matching the language model's linear layers only: the
    vision tower, the projector and the output head stay frozen, as the method keeps them.
    Every family here (Qwen2-VL, Qwen2.5-VL, LLaVA-1.5/NeXT) has its language model under a
    ``language_model`` module; a model without one gets every linear layer outside the
    vision parts and projectors. Else the configured module names."""
    import torch

    if lora.target_modules != "all-linear":
        return list(lora.target_modules)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    language = [n for n in linear if "language_model" in n.split(".")]
    if language:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in language})
        return rf"^(.*\.)?language_model\..*\.({'|'.join(leaves)})$"
    frozen = VISION_PARTS + PROJECTOR_NAMES
    leaves = {n.rsplit(".", 1)[-1] for n in linear if not any(p in n.split(".") for p in frozen) and not n.endswith("lm_head")}
    if not leaves:
        raise ValueError("no linear layers found outside the vision tower and projector")
    parts = "|".join(frozen)
    return rf"^(?!.*\b({parts})\b).*\.({'|'.join(sorted(leaves))})$"


def load_adapter(model, path: Path) -> None:
    """Set the peft model's LoRA weights from an adapter folder; every tensor of the file must
    land on a LoRA weight of the model and every LoRA weight must get one."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from casseat_ray.adapters import adapter_weights

    weights = adapter_weights(path)
    state = load_file(str(weights)) if weights.suffix == ".safetensors" else torch.load(weights, weights_only=True)
    result = set_peft_model_state_dict(model, state)
    lora = [n for n, p in model.named_parameters() if "lora_" in n]
    if result.unexpected_keys or len(state) != len(lora):
        raise ValueError(f"train.init_adapter: {path} does not fit the student's LoRA layers "
                         f"({len(state)} tensors for {len(lora)} LoRA weights; unexpected: {list(result.unexpected_keys)[:3]})")


def build_model(cfg: Config, dtype):
    """The student with LoRA on its language model; vision tower frozen unless configured."""
    import torch
    from peft import LoraConfig as PeftLora, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForImageTextToText

    from casseat_ray.train import attention

    lora = cfg.student.lora
    # packed rows attend sample by sample (every batch of a packing run is packed, unmasked)
    attn = attention.register() if cfg.train.packing else None
    model = AutoModelForImageTextToText.from_pretrained(cfg.student.model, dtype=dtype, attn_implementation=attn)
    attention.register_varlen(model)  # a Qwen vision tower: every image in one attention call, no host sync
    projector = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTOR_NAMES] if lora.train_projector else []
    peft_cfg = PeftLora(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora_targets(model, lora),
        modules_to_save=[n.rsplit(".", 1)[-1] for n in projector] or None, task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_cfg)
    if dtype != torch.float32:
        # LoRA weights stay fp32 (peft's default: precise optimizer updates) and the step runs
        # under autocast (``mixed_precision``): peft must not upcast the bf16 activations to
        # them, or every adapter matmul runs in fp32 behind two copies
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    if cfg.train.init_adapter:
        load_adapter(model, Path(cfg.train.init_adapter))
    if not lora.freeze_vision:
        for name, p in model.named_parameters():
            if any(part in name.split(".") for part in VISION_PARTS):
                p.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.train.compile:
        # every block, in place: the layer lists and peft's module names stay as they are
        for block in blocks(model):
            block.compile()
    return model


def blocks(model, vision: bool = True) -> list:
    """The peft-wrapped student's repeated transformer blocks (its own no-split modules:
    decoder layers and, unless ``vision`` is False, vision blocks)."""
    names = set(getattr(model.get_base_model(), "_no_split_modules", None) or [])
    return [m for n, m in model.named_modules()
            if type(m).__name__ in names and (vision or not any(p in n.split(".") for p in VISION_PARTS))]


def mixed_precision(device, dtype):
    """The context every forward pass of a ``build_model`` student runs in: autocast to the
    weights' dtype when that is not fp32 (matmuls in bf16, fp32 LoRA weights and their
    gradients), nothing otherwise."""
    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def nll_loss(model, batch: dict, num_tokens, compiled: bool = False):
    """One micro-batch's share of the step's token NLL (``num_tokens``: the step's label
    tokens), computing logits only where a label follows; ``compiled`` (``train.compile``):
    the cross-entropy in fused kernels over the half-precision logits."""
    from casseat_ray.train.losses import compiled_kept_nll, kept_nll, predicting_positions

    batch = dict(batch)
    labels = batch.pop("labels")
    keep = predicting_positions(labels)
    loss = compiled_kept_nll() if compiled else kept_nll
    return loss(model(**batch, use_cache=False, logits_to_keep=keep).logits, labels, keep, num_tokens)


def rope_index(model):
    """The peft-wrapped student's M-RoPE position function (``get_rope_index``), or None
    for a model whose positions are plain 0..len-1."""
    return getattr(model.get_base_model().model, "get_rope_index", None)


def compute_dtype(t: TrainConfig, use_cuda: bool):
    """The student's weights' dtype: bf16 when configured or, with ``auto``, on a GPU."""
    import torch

    return torch.bfloat16 if t.precision == "bf16" or (t.precision == "auto" and use_cuda) else torch.float32


def _unwrap(model):
    return getattr(model, "module", model)


def shard_model(model, device):
    """FSDP2: every transformer block (the model's own no-split modules), then the whole
    model, becomes a ``fully_shard`` unit, so parameters, gradients and optimizer state are
    split across the workers. Works over gloo on CPU as over NCCL on GPU."""
    from torch.distributed.fsdp import fully_shard

    model = model.to(device)
    for module in blocks(model):
        fully_shard(module)
    fully_shard(model)
    return model


def _full(value):
    """A whole CPU copy of a tensor that may be an FSDP shard (collective for a shard)."""
    import torch
    from torch.distributed.tensor import DTensor

    if not torch.is_tensor(value):
        return value
    return (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu().clone()


def _like(value, param):
    """``value`` (a whole tensor) laid out as ``param``: sharded the same way under FSDP."""
    import torch
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)
    return value


def trainable_state(model) -> dict:
    """Whole CPU copies of the trainable parameters by name. Every rank calls it: under FSDP
    gathering the shards is collective."""
    return {n: _full(p) for n, p in _unwrap(model).named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict) -> None:
    import torch

    params = dict(_unwrap(model).named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
    if missing:
        raise ValueError(f"checkpoint lacks trainable parameters {missing[:3]}... (was it made with another LoRA config?)")
    with torch.no_grad():
        for name in sorted(state):
            params[name].copy_(_like(state[name].to(params[name].dtype), params[name]))


def optimizer_state(optimizer) -> dict:
    """The optimizer's state with whole tensors (collective under FSDP), so a checkpoint
    does not depend on how many workers shared it."""
    sd = optimizer.state_dict()
    return {"state": {i: {k: _full(v) for k, v in s.items()} for i, s in sorted(sd["state"].items())},
            "param_groups": sd["param_groups"]}


def load_optimizer_state(optimizer, saved: dict) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {i: {k: _like(v, params[i]) for k, v in s.items()} for i, s in sorted(saved["state"].items())}
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


# ---------------------------------------------------------------- the worker loop
def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers import AutoProcessor, get_scheduler

    from casseat_ray.train.collate import aft_rows, collate, collate_packed
    from casseat_ray.train.losses import aft_loss
    from casseat_ray.train.stream import EncodedCache, Plan, epoch_windows, first_sample, shard_rows, steps, worker_samples

    cfg = Config.model_validate(config["cfg"])
    if config.get("init_adapter") is not None:  # the driver's folder, copied to this node
        cfg.train.init_adapter = str(config["init_adapter"].local())
    plan = Plan.from_dict(config["plan"])
    out_dir = Path(config["out_dir"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    distributed = dist.is_available() and dist.is_initialized() and world > 1

    torch.manual_seed(t.seed)  # identical LoRA init on every rank
    processor = AutoProcessor.from_pretrained(cfg.student.model)
    dtype = compute_dtype(t, device.type == "cuda")
    model = build_model(cfg, dtype)
    fsdp = t.strategy == "fsdp" and distributed
    if fsdp:  # FSDP2 directly (Ray Train's prepare_model offers FSDP on GPUs only)
        model = shard_model(model, device)
    else:
        model = ray.train.torch.prepare_model(model) if world > 1 else model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    # what this worker holds of the trainable weights (about 1/world of them under FSDP)
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)

    aft = t.loss == "aft"
    rope = rope_index(_unwrap(model)) if t.packing else None
    per_epoch, total, mine = plan.per_epoch, plan.total, plan.windows[rank]
    failed: dict[str, str] = {}  # samples whose encoding failed in Ray Data: left out of their step
    # one cache folder per run and rank on the node's disk: a worker restarted after a crash reuses it
    run_key = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:12]
    shard = EncodedCache(ray.train.get_dataset_shard("train"), t.encoded_cache_gb * 1e9,
                         Path(tempfile.gettempdir()) / "casseat-encoded" / f"{run_key}-rank{rank}")

    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=round(t.warmup_ratio * total), num_training_steps=total)
    start, skipped = 0, 0
    ckpt, passed_over = checkpoints.choose(ray.train.get_checkpoint())
    if rank == 0:
        for note in passed_over:
            _log(note)
    if ckpt:
        with ckpt.as_directory() as d:
            weights, opt_state, sched_state, state = checkpoints.read(d)
        load_trainable_state(model, weights)
        load_optimizer_state(optimizer, opt_state)
        scheduler.load_state_dict(sched_state)
        start, skipped = state["step"], state["skipped_nonfinite"]

    metrics_file = out_dir / "metrics.jsonl"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if start == 0:
            metrics_file.unlink(missing_ok=True)
        for reason, example in plan.examples.items():
            _log(f"dropped {plan.dropped[reason]} {reason} sample(s), e.g. {example}")
        _log(f"training: {plan.samples} samples ({plan.dropped['too_long']} over {t.cutoff_len} tokens, {plan.dropped['no_labels']} without "
             f"labels and {plan.dropped['malformed']} malformed dropped), {world} worker(s), "
             + (f"packed into {plan.units} rows of at most {t.cutoff_len} tokens, " if t.packing else "")
             + (f"AFT on {plan.aft_questions} questions with right and wrong responses, " if aft else "")
             + f"{per_epoch} steps/epoch, {total} steps" + (f", resuming at step {start}" if start else ""))

    def step_batches():
        """(step, epoch, micro-batches of units of (id, Encoded, AFT group)) from ``start`` on."""
        step = start
        try:
            while step < total:
                epoch, pos = divmod(step, per_epoch)
                order = epoch_windows(mine, t.seed, epoch)
                # each epoch reads its rows anew: the first pass from Ray Data, later ones from
                # the worker's disk where they fit (EncodedCache)
                rows = shard_rows(shard, failed, rope)
                for micro in steps(rows, order, pos, min(per_epoch - pos, total - step), t.batch_size, t.grad_accum):
                    yield step, epoch, [[[(sid, e, g) for sid, (e, g) in u] for u in m] for m in micro]
                    step += 1
                if step < total:
                    for _ in rows:  # the epoch's last window ends the pass: end it, so that the cache holds it whole
                        pass
        finally:
            shard.close()

    pad = processor.tokenizer.pad_token_id
    spare = None  # the last sample this worker trained on (see the empty micro-batch below)
    model.train()
    t0 = time.perf_counter()
    for step, epoch, micro in step_batches():  # t0..now: waiting for the step's data counts too
        torch.manual_seed(hash((t.seed, rank, step)) % 2**31)  # dropout: same draws after a resume
        # The step's loss is normalised by its label tokens (and AFT questions) on every worker:
        # each token weighs the same however the step's samples fall into micro-batches and
        # workers. Gradients are averaged over workers, so each worker's share is scaled back up.
        counts = torch.tensor([float(sum(e.n_label_tokens for members in micro for m in members for _, e, _ in m)),
                               float(sum(g is not None for members in micro for m in members for _, _, g in m) if aft and not t.packing else 0)],
                              device=device)
        if distributed:
            dist.all_reduce(counts)
        num_tokens, num_groups = counts[0].clamp_min(1), counts[1].clamp_min(1)
        losses, aligns, tokens, samples = [], [], 0, 0
        for k, members in enumerate(micro):
            refs = [e for m in members for _, e, _ in m]
            weight = 1.0
            if refs:
                spare = refs[0]
            elif not distributed:  # every sample of the micro-batch failed to encode
                continue
            else:  # the other workers wait for this one's gradients: a zero-weight pass over a
                # sample it already has keeps every worker in the step's collectives
                spare = spare or first_sample(shard, rope)
                members, weight = [[("", spare, None)]], 0.0
            groups = []
            if t.packing:
                batch = collate_packed([[e for _, e, _ in m] for m in members], pad)
            else:  # the reference samples, then (AFT) the candidate responses not already among
                # them: one forward pass (one backward per forward, as DDP requires)
                rows, groups = aft_rows([(e, g) for m in members for _, e, g in m])
                batch = collate(rows, pad)
            batch = {n: v.to(device) for n, v in batch.items()}
            sync = k == len(micro) - 1 or not distributed
            if fsdp:
                model.set_requires_gradient_sync(sync)
            ctxm = model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with ctxm, mixed_precision(device, dtype):
                if groups:
                    labels = batch.pop("labels")
                    logits = model(**batch, use_cache=False).logits
                    loss, align = aft_loss(logits, labels, len(refs), groups, t.aft.variant, t.aft.tau, t.aft.weight, num_tokens, num_groups)
                    aligns.append(align.detach().float())
                else:
                    loss = nll_loss(model, batch, num_tokens, compiled=t.compile)
                (loss * (world * weight)).backward()
            losses.append(loss.detach().float() * weight)
            tokens += sum(len(e) for e in refs)
            samples += len(refs)
        step_loss = torch.stack(losses).sum() if losses else torch.zeros((), device=device)  # this worker's share
        bad = torch.tensor([0.0 if torch.isfinite(step_loss) else 1.0], device=device)
        stats = torch.tensor([step_loss.item() if not bad.item() else 0.0, float(tokens), float(samples),
                              float(torch.stack(aligns).sum()) if aligns else 0.0], device=device)
        if distributed:
            dist.all_reduce(bad)
            dist.all_reduce(stats)
        if bad.item():
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            if t.nonfinite == "stop":
                raise FloatingPointError(f"non-finite loss at step {step + 1} (train.nonfinite=stop)")
            grad_norm = float("nan")
        elif not stats[2].item():  # no worker had a sample that encoded: nothing to learn from
            optimizer.zero_grad(set_to_none=True)
            grad_norm = None
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf")))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        seconds = time.perf_counter() - t0
        record = {
            "step": step + 1, "epoch": round((step + 1) / per_epoch, 4), "loss": stats[0].item() if not bad.item() and stats[2].item() else None,
            "lr": lr, "grad_norm": grad_norm, "tokens_per_s": round(stats[1].item() / seconds, 1),
            "samples_per_s": round(stats[2].item() / seconds, 3), "skipped_nonfinite": skipped, "time": round(time.time(), 3),
        }
        if aft:
            record["align_loss"] = stats[3].item() if counts[1].item() else None  # summed shares: the step's mean
        last = step + 1 == total
        if rank == 0:
            with metrics_file.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            if (step + 1) % t.log_every == 0 or step == start or last:  # the console is sampled, the file is not
                _log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "time"))
        if (step + 1) % t.checkpoint_every == 0 or last:
            weights, opt_state = trainable_state(model), optimizer_state(optimizer)  # every rank: collective under FSDP
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    checkpoints.write(tmp, weights, opt_state, scheduler.state_dict(),
                                      {"step": step + 1, "epoch": epoch, "skipped_nonfinite": skipped})
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(record, checkpoint=checkpoint)  # a barrier: every rank reports
        t0 = time.perf_counter()
    weights = trainable_state(model)
    if failed:
        _log(f"worker {rank}: {len(failed)} sample(s) failed to encode and were left out of their steps, e.g. {next(iter(failed.items()))}")
    me = {"rank": rank, "samples": worker_samples(mine, t.seed, per_epoch, total, t.batch_size * t.grad_accum, failed),
          "failed_encoding": len(failed), **peak_memory_mb(device)}
    workers = [None] * world
    if distributed:
        dist.all_gather_object(workers, me)
    else:
        workers = [me]
    if rank == 0:
        adapter = out_dir / "adapter"
        _unwrap(model).save_pretrained(adapter, state_dict=weights)
        processor.save_pretrained(adapter)
        (out_dir / "summary.json").write_text(json.dumps({
            "steps": total, "samples": plan.samples, "rows": plan.units, "dropped_too_long": plan.dropped["too_long"],
            "dropped_no_labels": plan.dropped["no_labels"], "dropped_malformed": plan.dropped["malformed"], "workers": workers,
            "skipped_nonfinite": skipped, "strategy": "fsdp" if fsdp else ("ddp" if distributed else "single"),
            "trainable_params": sum(p.numel() for p in params), "trainable_params_on_rank0": held, "adapter": str(adapter),
            "compiled_layers": sum(b._compiled_call_impl is not None for b in blocks(_unwrap(model))),
            **({"aft_questions": plan.aft_questions} if aft else {}),
        }, indent=2) + "\n")
        if config.get("out_uri"):
            from casseat_ray import storage

            storage.copy_tree(out_dir, config["out_uri"])


def _log(msg: str) -> None:
    print(f"[casseat train] {msg}", flush=True)


