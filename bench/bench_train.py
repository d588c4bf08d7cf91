"""Training benchmarks on the tiny student (CPU), measured side by side in one run.

1. Ray Train overhead: steady-state samples/s of a 1-worker TorchTrainer run divided by a
   plain single-process loop with the same model, data, plan, batch order and optimizer.
   Steady state = wall time over the second half of the steps (model load and the first
   epoch, whose new batch shapes cost extra allocations on both sides, are excluded). The
   plain loop encodes every sample once before its clock starts; the Ray run's samples are
   encoded by Ray Data tasks on the same two CPUs while it trains (``train.data_cpus`` 0) in
   its first epoch and read back from the worker's disk after (``train.encoded_cache_gb``).
   Goal >= 0.95. Also the Ray run with that cache off (every epoch encoded anew), a plain
   loop that encodes each step's samples inside its clock (the same work as the Ray run
   without the cache, none of it overlapped), and the plain loop run by a Ray Train worker of
   the same Ray session right after the Ray run: what being a Ray worker among Ray's own
   processes costs on this machine, apart from the project's data pipeline and loop.
   Measured at each of ``--cpus`` (default 1 and 2): the worker's CPUs and the plain loop's
   torch threads. With 1 of the 2 CPUs, Ray's own processes (raylet, GCS, the Train
   controller, idle workers) have a core beside the loop, as on a node whose trainer does not
   own every core; with 2, every wake-up of theirs takes a core from one of the loop's two
   compute threads.
2. Packing vs padding: real tokens/s of forward + backward over the same samples, padded in
   batches of ``--batch`` or packed into rows of ``--pack-len`` tokens (attention sample by
   sample, as training runs packed rows; and, to show what that saves, transformers' SDPA
   over whole rows behind a block-diagonal mask). Goal >= 1.5. The samples carry a
   real synthesized length distribution: MATH-V testmini questions with their real images
   and a real model's chain-of-thought responses (``../shared/data/math-v/outputs``), built
   into CoT samples by the project's own sample builder and tokenized by the student.

3. Worker memory vs SFT-set size: peak resident memory of a 1-worker run over the real
   samples repeated to ``--memory-samples`` and to 10x as many (fresh ids), both runs the same
   steps (10 epochs of the small set, one of the large) and ``train.shuffle_window``: the
   worker holds one window of encoded samples, so its peak must stay flat as the set grows.

    python bench/bench_train.py [--steps 48] [--batch 4] [--samples 96] [--cpus 1 2] [--only ray|packing|memory]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "math-v"


def real_sft(out: Path, n: int, responses: str = "Qwen-VL-Max-CoT") -> Path:
    """CoT samples from MATH-V testmini with a real model's responses as the teacher text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from casseat_ray import prompts
    from casseat_ray.config import ImageConfig, SourceConfig
    from casseat_ray.sources import item_to_row
    from casseat_ray.synth.mix import cot_sample
    from casseat_ray.synth.outputs import SFT_SCHEMA

    said = {r["id"]: r["response"] for r in map(json.loads, (DATA / "outputs" / f"{responses}.jsonl").open())}
    src = SourceConfig(name="mathv", format="mathv", path=DATA / "testmini.jsonl", license="MIT")
    c1 = prompts.load("c1")
    samples = []
    for line in (DATA / "testmini.jsonl").open():
        item = json.loads(line)
        if str(item["id"]) not in said:
            continue
        row = item_to_row(item, src, DATA, ImageConfig())
        if row.get("reject_reason"):
            continue
        s = cot_sample(row, c1, said[str(item["id"])])
        s.update(answer_type=row["answer_type"], responses=[], responses_correct=[], responses_rank=[])
        samples.append(s)
    # a larger set than the data holds repeats it, each copy under fresh ids
    samples = [{**s, "id": f"{s['id']}-{i // len(samples)}" if i >= len(samples) else s["id"]}
               for i, s in ((i, samples[i % len(samples)]) for i in range(n))]
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(samples, schema=SFT_SCHEMA), out / "sft-00000.parquet")
    return out


def _config(root: Path, student: Path, name: str, steps: int, batch: int, n: int, cpus: int = 2, **train):
    from casseat_ray.config import Config

    return Config.model_validate(dict(
        name=name, output_dir=str(root / "out"), student=dict(model=str(student)),
        train=dict(dict(epochs=steps * batch / n, lr=1e-4, batch_size=batch, grad_accum=1, num_workers=1, cutoff_len=4096,
                        checkpoint_every=10_000, warmup_ratio=0.0, cpus_per_worker=cpus, data_cpus=0), **train),
        ray=dict(num_cpus=2, storage_path=str(root / "ray")),
    ))


def _encoded(cfg, sft: Path):
    """The processor, the rows in read order and every row's encoding by id."""
    import pyarrow.parquet as pq
    from transformers import AutoProcessor

    from casseat_ray.train.collate import encode

    processor = AutoProcessor.from_pretrained(cfg.student.model)
    rows = pq.read_table(sft).to_pylist()
    return processor, rows, {r["id"]: encode(r, processor, cfg.train.label_mode) for r in rows}


def _timed_steps(model, optimizer, batches, make_batch=lambda b: b) -> list[float]:
    """Collate (``make_batch``) + forward + backward + optimizer step per batch; the clock after each."""
    import torch

    from casseat_ray.train.loop import nll_loss
    from casseat_ray.train.losses import label_tokens

    model.train()
    ends = []
    for item in batches:
        batch = make_batch(item)
        loss = nll_loss(model, batch, label_tokens(batch["labels"]))  # the training loop's loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return ends


def plain_loop(cfg, sft: Path, steps: int, encode_inline: bool = False) -> float:
    """Samples/s of the same steps without Ray: same model build, plan, order, batches, optimizer.
    ``encode_inline``: each step encodes its own samples inside the clock (the work the Ray run's
    data pipeline does every epoch, done in the loop as a DataLoader with no workers would)."""
    import pyarrow.parquet as pq
    import torch

    from casseat_ray.train import stream
    from casseat_ray.train.collate import collate, encode
    from casseat_ray.train.loop import build_model

    t = cfg.train
    torch.set_num_threads(int(t.cpus_per_worker))  # what Ray gives its worker (OMP_NUM_THREADS)
    processor, rows, encoded = _encoded(cfg, sft)
    numbers = stream.measure_batch(pq.read_table(sft), cfg.student.model, t.model_dump(mode="json"))
    p = stream.plan([dict(zip(numbers, v)) for v in zip(*numbers.values())], t, 1)
    read = [(r["id"], (encoded[r["id"]], None)) for r in rows]
    torch.manual_seed(t.seed)
    model = build_model(cfg, torch.float32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr)
    batches = []
    for step in range(steps):
        epoch, pos = divmod(step, p.per_epoch)
        (micro,) = next(stream.steps(read, stream.epoch_windows(p.windows[0], t.seed, epoch), pos, 1, t.batch_size, 1))
        batches.append([sid for unit in micro for sid, _ in unit])
    by_id = {r["id"]: r for r in rows}

    def make_batch(ids):  # collated inside the timed loop, as the Ray Train worker does
        samples = [encode(by_id[i], processor, t.label_mode) for i in ids] if encode_inline else [encoded[i] for i in ids]
        return collate(samples, processor.tokenizer.pad_token_id)

    ends = _timed_steps(model, optimizer, batches, make_batch)
    half = steps // 2
    return (steps - half) * t.batch_size / (ends[-1] - ends[half - 1])


def ray_train(cfg, sft: Path) -> tuple[float, int]:
    from casseat_ray.train import run as train_run

    summary = train_run.run(cfg, data=sft)
    records = train_run.read_metrics(train_run.train_dir(cfg) / "metrics.jsonl")
    half = len(records) // 2
    return (len(records) - half) * cfg.train.batch_size / (records[-1]["time"] - records[half - 1]["time"]), summary["steps"]


def plain_in_ray_worker(cfg, sft: Path, steps: int) -> float:
    """``plain_loop`` run by a 1-worker TorchTrainer in the Ray session the Ray run left."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from casseat_ray.train.run import storage_root

    out = Path(cfg.output_dir) / "plain-in-ray-worker.json"  # one machine: the worker writes, the driver reads

    def loop(_):
        out.write_text(json.dumps(plain_loop(cfg, sft, steps)))

    TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
                 run_config=RunConfig(name=f"{cfg.name}-plain-in-worker", storage_path=storage_root(cfg))).fit()
    return json.loads(out.read_text())


def packing_vs_padding(cfg, sft: Path, batch: int, pack_len: int, rounds: int = 3) -> dict:
    """Real tokens/s over the same samples, padded vs packed (the fastest of ``rounds`` passes
    each, the arms taking turns, each pass after a one-batch warm-up). Packed twice: as training runs it (attention sample by sample) and with
    transformers' SDPA over the whole row behind a block-diagonal mask."""
    import torch

    from casseat_ray.train.collate import collate, collate_packed, rope_positions
    from casseat_ray.train.loop import build_model, rope_index
    from casseat_ray.train.stream import pack

    # the worker's threads, whatever the benchmarks run before in this process set
    torch.set_num_threads(int(cfg.train.cpus_per_worker))
    processor, _, encoded = _encoded(cfg, sft)
    samples = [e for e in encoded.values() if len(e) <= pack_len]
    pad = processor.tokenizer.pad_token_id
    lengths = [len(e) for e in samples]
    rows = pack(lengths, pack_len)

    def model(packing: bool):
        torch.manual_seed(0)
        m = build_model(cfg.model_copy(update={"train": cfg.train.model_copy(update={"packing": packing})}), torch.float32)
        return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)

    padded_model, masked_model = model(False), model(False)
    for e in samples:
        e.positions = rope_positions(e, rope_index(padded_model[0]))
    padded = [collate(samples[i:i + batch], pad) for i in range(0, len(samples), batch)]
    packed = [collate_packed([[samples[i] for i in r]], pad) for r in rows]
    out = {"samples": len(samples), "tokens": sum(lengths), "mean_len": sum(lengths) / len(samples),
           "min_len": min(lengths), "max_len": max(lengths)}
    arms = (("padding", padded_model, padded), ("packing", model(True), packed), ("packing_dense_mask", masked_model, packed))
    seconds = {name: [] for name, _, _ in arms}
    for _ in range(rounds):  # the arms take turns, each round; the fastest pass of each counts
        for name, (m, optimizer), batches in arms:
            _timed_steps(m, optimizer, batches[:1])  # warm-up
            t0 = time.perf_counter()
            _timed_steps(m, optimizer, batches)
            seconds[name].append(time.perf_counter() - t0)
    for name, _, batches in arms:
        best = min(seconds[name])
        slots = sum(b["input_ids"].numel() for b in batches)
        out[name] = {"batches": len(batches), "seconds": round(best, 2), "tokens_per_s": round(out["tokens"] / best, 1),
                     "pad_share": round(1 - out["tokens"] / slots, 3),
                     # query-key pairs attention computes: per row, or per sample when packing runs it
                     "attention_pairs": sum(n * n for n in lengths) if name == "packing"
                     else sum(b["input_ids"].shape[0] * b["input_ids"].shape[1] ** 2 for b in batches)}
    out["packing_over_padding"] = round(out["packing"]["tokens_per_s"] / out["padding"]["tokens_per_s"], 3)
    out["dense_mask_packing_over_padding"] = round(out["packing_dense_mask"]["tokens_per_s"] / out["padding"]["tokens_per_s"], 3)
    # what removing the padding alone could give if a step's cost were linear in its tokens
    out["padding_free_bound"] = round(1 / (1 - out["padding"]["pad_share"]), 3)
    out["torch_threads"] = torch.get_num_threads()
    return out


def memory_vs_set_size(root: Path, student: Path, n: int, batch: int, window: int) -> dict:
    """Peak worker memory over ``n`` and ``10 n`` real samples: same steps, same window."""
    from casseat_ray.train import run as train_run

    out = {"shuffle_window": window}
    steps = 10 * n // batch  # both runs take the same steps (10 epochs of the small set, 1 of the large)
    for size in (n, 10 * n):
        sft = real_sft(root / f"sft-{size}", size)
        cfg = _config(root, student, f"memory-{size}", steps, batch, size, shuffle_window=window)
        summary = train_run.run(cfg, data=sft)
        out[str(size)] = {"samples": summary["samples"], "steps": summary["steps"],
                          **{k: summary["workers"][0].get(k) for k in ("peak_memory_mb", "private_memory_mb")}}
    for k in ("peak_memory_mb", "private_memory_mb"):
        out[f"growth_{k}"] = round(out[str(10 * n)][k] / out[str(n)][k], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp/casseat-bench-train"))
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--pack-len", type=int, default=2048)
    ap.add_argument("--cpus", type=int, nargs="+", default=[1, 2],
                    help="CPUs (torch threads) of the worker and of the plain loop; the Ray Train benchmark runs at each")
    ap.add_argument("--memory-samples", type=int, default=64, help="the smaller set of the memory benchmark (the larger is 10x)")
    ap.add_argument("--window", type=int, default=32, help="train.shuffle_window of the Ray Train and memory runs")
    ap.add_argument("--only", choices=["ray", "packing", "memory"], help="run one of the benchmarks")
    args = ap.parse_args()
    from casseat_ray.tiny import make_tiny

    shutil.rmtree(args.root / "ray", ignore_errors=True)
    shutil.rmtree(args.root / "out", ignore_errors=True)
    student = args.root / "student"
    if not (student / "config.json").exists():
        make_tiny(student, role="student", seed=0)
    sft = real_sft(args.root / "sft", args.samples)
    cfg = _config(args.root, student, "bench", args.steps, args.batch, args.samples, max(args.cpus), shuffle_window=args.window)

    result = {}
    if args.only in (None, "ray"):
        import ray

        configs = {c: _config(args.root, student, f"bench-cpus{c}", args.steps, args.batch, args.samples, c, shuffle_window=args.window)
                   for c in args.cpus}
        # every plain loop before any Ray starts: an idle local Ray in the process slows a loop by ~10%
        plain = {c: plain_loop(cfg, sft, args.steps) for c, cfg in configs.items()}
        inline = {c: plain_loop(cfg, sft, args.steps, encode_inline=True) for c, cfg in configs.items()}
        result["ray_train"] = {}
        for c, cfg in configs.items():  # each in a Ray session of its own
            on_ray, steps = ray_train(cfg, sft)
            assert steps == args.steps, (steps, args.steps)
            in_worker = plain_in_ray_worker(cfg, sft, args.steps)
            uncached, _ = ray_train(cfg.model_copy(update={"name": f"{cfg.name}-uncached", "train": cfg.train.model_copy(update={"encoded_cache_gb": 0})}), sft)
            ray.shutdown()
            result["ray_train"][f"cpus_{c}"] = {
                "steps": steps, "batch": args.batch, "cpus": c, "shuffle_window": args.window, "ray_samples_per_s": round(on_ray, 3),
                "plain_samples_per_s": round(plain[c], 3), "ratio": round(on_ray / plain[c], 3),
                "plain_in_ray_worker_samples_per_s": round(in_worker, 3), "ratio_plain_in_ray_worker": round(in_worker / plain[c], 3),
                "ray_encoding_every_epoch_samples_per_s": round(uncached, 3), "ratio_encoding_every_epoch": round(uncached / plain[c], 3),
                "plain_encoding_inline_samples_per_s": round(inline[c], 3), "ratio_vs_encoding_inline": round(on_ray / inline[c], 3)}
            print(json.dumps(result), flush=True)
    if args.only in (None, "packing"):
        result["packing"] = packing_vs_padding(cfg, sft, args.batch, args.pack_len)
        print(json.dumps(result), flush=True)
    if args.only in (None, "memory"):
        result["memory"] = memory_vs_set_size(args.root, student, args.memory_samples, args.batch, args.window)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
