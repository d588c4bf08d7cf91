"""Pure planning of training: the run's plan, the streamed steps, LoRA targets, checkpoint state."""

import pytest

from casseat_ray.config import LoraConfig, TrainConfig
from casseat_ray.train.loop import lora_targets
from casseat_ray.train.stream import epoch_windows, pack, plan, steps, total_steps, worker_samples


def _measured(n, tokens=10, **bad):
    """Measured rows in read order; ``bad`` maps an index to its drop reason."""
    return [{"id": f"s{i:03d}", "tokens": tokens, "label_tokens": 3, "drop": bad.get(f"i{i}"), "detail": None, "aft": False}
            for i in range(n)]


def _train(**kw):
    return TrainConfig(**{"batch_size": 2, "grad_accum": 2, "epochs": 2, "shuffle_window": 8, **kw})


def test_plan_drops_and_counts_then_deals_each_window_round_robin():
    rows = _measured(40, i3="malformed")
    rows[5]["tokens"] = 5000  # over cutoff_len
    rows[7]["label_tokens"] = 0
    p = plan(rows, _train(), world=2)
    assert p.samples == 37 and p.dropped == {"too_long": 1, "no_labels": 1, "malformed": 1}
    assert set(p.examples) == {"too_long", "no_labels", "malformed"} and p.examples["too_long"].startswith("s005")
    ids = [[s for w in ws for u in w for s in u] for ws in p.windows]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) + len(ids[1]) == 37  # disjoint, nothing lost
    assert [len(w) for w in p.windows[0]] == [4, 4, 4, 4, 3] and [len(w) for w in p.windows[1]] == [4, 4, 4, 4, 2]
    assert p.per_epoch == 18 // 4 and p.total == 2 * p.per_epoch  # the fewer units (18) decide
    with pytest.raises(ValueError, match="cannot fill one step"):
        plan(_measured(5), _train(), world=2)
    with pytest.raises(ValueError, match="no trainable samples"):
        plan(_measured(3, tokens=9999), _train(), world=1)


def test_packed_units_stay_inside_their_window():
    rows = _measured(20, tokens=300)
    p = plan(rows, _train(packing=True, cutoff_len=1000, shuffle_window=8), world=1)
    assert p.units == 3 + 3 + 2 and p.samples == 20  # 8, 8 and 4 samples of 300 tokens, three per row
    for w, win in enumerate(p.windows[0]):
        assert all(w * 8 <= int(s[1:]) < (w + 1) * 8 for u in win for s in u)


def test_epoch_order_depends_on_seed_and_epoch_not_on_arrival():
    windows = plan(_measured(32), _train(), world=1).windows[0]
    a = epoch_windows(windows, 0, 0)
    assert [sorted(w) for w in a] == [sorted(w) for w in windows]  # a permutation inside each window
    assert epoch_windows([list(reversed(w)) for w in windows], 0, 0) == a
    assert epoch_windows(windows, 0, 1) != a and epoch_windows(windows, 1, 0) != a


def _stream(order, consumed, failed=()):
    for sid in order:
        consumed.append(sid)
        yield sid, None if sid in failed else f"enc:{sid}"


def test_steps_stream_a_window_at_a_time_and_resume_exactly():
    t = _train()
    p = plan(_measured(64), t, world=2)
    mine = epoch_windows(p.windows[1], t.seed, 0)
    arrival = [s for w in p.windows[1] for u in w for s in u]  # read order
    consumed = []
    full = []
    for step in steps(_stream(arrival, consumed), mine, 0, p.per_epoch, t.batch_size, t.grad_accum):
        full.append(step)
        # streamed: a step is ready once its window has arrived, not the whole shard
        assert len(consumed) <= 4 * (len(full) + 1)
    assert len(full) == p.per_epoch == 8 and all(len(s) == t.grad_accum and all(len(m) == t.batch_size for m in s) for s in full)
    trained = [sid for s in full for m in s for u in m for sid, _ in u]
    assert sorted(trained) == sorted(arrival) and trained == [s for w in mine for u in w for s in u]
    # a resumed run gets the very steps it missed, whatever order the rows arrive in
    assert list(steps(_stream(reversed(arrival), []), mine, 5, 3, t.batch_size, t.grad_accum)) == full[5:]
    # a sample whose encoding failed is left out of its unit; the rest go on
    bad = full[0][0][0][0][0]
    again = list(steps(_stream(arrival, [], failed={bad}), mine, 0, 2, t.batch_size, t.grad_accum))
    assert again[0][0][0] == [] and again[1] == full[1]
    with pytest.raises(RuntimeError, match="ran out after 5 of 8 steps"):
        list(steps(_stream(arrival[:20], []), mine, 0, 8, t.batch_size, t.grad_accum))


def test_worker_samples_count_what_the_steps_train():
    t = _train()
    p = plan(_measured(37), t, world=2)
    assert [worker_samples(ws, t.seed, p.per_epoch, p.total, 4) for ws in p.windows] == [2 * p.per_epoch * 4] * 2
    packed = plan(_measured(37, tokens=300), _train(packing=True, cutoff_len=1000, batch_size=1, grad_accum=1), world=1)
    assert worker_samples(packed.windows[0], t.seed, packed.per_epoch, packed.total, 1) == 2 * 37
    # a sample whose encoding failed is not trained in any epoch
    left_out = {p.windows[0][0][0][0]}
    assert worker_samples(p.windows[0], t.seed, p.per_epoch, p.total, 4, left_out) == 2 * p.per_epoch * 4 - 2


def test_lora_targets_the_language_model_only(tiny_models):
    import re

    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_models["student"])
    pattern = lora_targets(model, LoraConfig())
    names = [n for n, _ in model.named_modules()]
    hits = [n for n in names if re.fullmatch(pattern, n)]
    assert hits and all("visual" not in n for n in hits) and not any(n.endswith("lm_head") for n in hits)
    assert any(n.endswith("self_attn.q_proj") for n in hits) and any(n.endswith("mlp.down_proj") for n in hits)
    assert lora_targets(model, LoraConfig(target_modules=["q_proj"])) == ["q_proj"]


def test_pack_fills_rows_tightly_and_deterministically():
    lengths = [700, 300, 500, 200, 900, 100, 400, 250]
    rows = pack(lengths, 1000)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))  # every sample exactly once
    assert all(sum(lengths[i] for i in r) <= 1000 for r in rows)
    assert len(rows) == 4 == -(-sum(lengths) // 1000)  # 3,350 tokens need at least 4 rows
    assert pack(lengths, 1000) == rows
    with pytest.raises(ValueError, match="over the row capacity"):
        pack([1200], 1000)


def test_packing_with_aft_and_compile_with_fsdp_are_refused():
    from casseat_ray.config import Config

    with pytest.raises(ValueError, match="train.packing cannot be combined with train.loss=aft"):
        Config.model_validate(dict(train=dict(packing=True, loss="aft")))
    with pytest.raises(ValueError, match="train.compile cannot be combined with train.strategy=fsdp"):
        Config.model_validate(dict(train=dict(compile=True, strategy="fsdp")))
    Config.model_validate(dict(train=dict(compile=True, strategy="ddp", packing=True)))


def test_checkpoint_state_round_trips_weights_and_optimizer():
    import torch

    from casseat_ray.train.loop import load_optimizer_state, load_trainable_state, optimizer_state, trainable_state

    def make():
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        m[0].weight.requires_grad_(False)  # frozen: not part of the checkpoint
        return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)

    torch.manual_seed(0)
    a, opt_a = make()
    for _ in range(2):
        a(torch.randn(3, 4)).sum().backward()
        opt_a.step()
        opt_a.zero_grad()
    weights, state = trainable_state(a), optimizer_state(opt_a)
    assert sorted(weights) == ["0.bias", "1.bias", "1.weight"]
    torch.manual_seed(0)  # the same frozen weights; the trainable ones still differ until loaded
    b, opt_b = make()
    assert not torch.equal(b[1].weight, a[1].weight)
    load_trainable_state(b, weights)
    load_optimizer_state(opt_b, state)
    for n, p in b.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, dict(a.named_parameters())[n])
    x = torch.randn(3, 4)
    for m, o in ((a, opt_a), (b, opt_b)):  # the same next step from the restored state
        m[1](m[0](x).detach()).sum().backward()
        o.step()
    assert torch.equal(a[1].weight, b[1].weight)
    with pytest.raises(ValueError, match="checkpoint lacks trainable parameters"):
        load_trainable_state(b, {"1.weight": weights["1.weight"]})


def test_max_steps_caps_the_epochs():
    assert total_steps(3.0, 10, None) == 30
    assert total_steps(3.0, 10, 7) == 7  # the cap
    assert total_steps(0.25, 10, 100) == 3  # epochs decide when they end first
    from casseat_ray.config import Config

    assert Config.model_validate({"train": {"max_steps": 5}}).train.max_steps == 5


def test_a_failed_training_run_reads_as_its_workers_own_error_in_one_line():
    from ray.train import WorkerGroupError

    from casseat_ray.train.run import TrainingFailed, training_failure

    tb = "Traceback (most recent call last):\n  File \"loop.py\", line 1\nsafetensors_rust.SafetensorError: Error while deserializing header"
    error = WorkerGroupError("2 workers failed", {1: RuntimeError("ValueError: rank 1"), 0: RuntimeError(tb)})
    failed = training_failure(error, 1, None)
    assert isinstance(failed, TrainingFailed) and "\n" not in str(failed)
    assert str(failed) == ("training failed on worker 0, 2 time(s) in a row (train.max_failures=1): safetensors_rust.SafetensorError: "
                           "Error while deserializing header; no checkpoint was written: fix the cause and rerun")
    assert "kept (/ckpt/checkpoint_3): fix the cause and rerun with --resume" in str(training_failure(error, 0, "/ckpt/checkpoint_3"))
    other = KeyError("not the workers'")
    assert training_failure(other, 0, None) is other


def test_a_sample_that_measures_fine_but_fails_on_its_pixels_is_that_rows_error(tiny_models, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from casseat_ray.train.stream import encode_batch, measure_batch
    from tests.conftest import make_sft

    table = pq.read_table(make_sft(tmp_path / "sft", n_rows=2))
    rows = table.to_pylist()
    assert rows[0]["images"]
    cut = dict(rows[0], id="cut", images=[rows[0]["images"][0][:64]])  # the header (its size) survives, the pixels do not
    batch = pa.Table.from_pylist(rows + [cut], schema=table.schema)
    model, train = str(tiny_models["student"]), TrainConfig().model_dump(mode="json")
    measured = measure_batch(batch, model, train)
    assert measured["drop"] == [None] * len(batch)  # planning reads sizes only: the cut row is planned like the others
    ids = frozenset([rows[1]["id"], "cut"])  # this worker's rows: the others are left out before decoding
    out = encode_batch(batch, model, train, ids)
    assert out["id"] == [rows[1]["id"], "cut"]
    assert out["sample"][0] is not None and out["error"][0] is None
    assert out["sample"][1] is None and out["error"][1]  # the row's own error; the rest of the batch goes on


def test_encoded_samples_carry_pixels_in_the_training_dtype_and_aft_candidates_share_them(tiny_models, tmp_path):
    import pickle

    import pyarrow.parquet as pq
    import torch
    from transformers import AutoProcessor

    from casseat_ray.train.collate import encode
    from casseat_ray.train.stream import encode_batch
    from tests.conftest import make_sft

    table = pq.read_table(make_sft(tmp_path / "sft", n_rows=2, aft=True))
    row = next(r for r in table.to_pylist() if r["kind"] != "self_eval")
    assert row["images"] and len(row["responses"]) == 3
    model = str(tiny_models["student"])
    processor = AutoProcessor.from_pretrained(model)
    ids = frozenset([row["id"]])

    def sample(**train):
        out = encode_batch(table, model, TrainConfig(loss="aft", **train).model_dump(mode="json"), ids)
        assert out["error"] == [None]
        return out["sample"][0]

    fp32, bf16 = sample(), sample(precision="bf16")
    (e32, group32), (e16, _) = pickle.loads(fp32), pickle.loads(bf16)
    reference = encode(row, processor, "all_assistant")
    # CPU (auto): fp32 pixels as the processor makes them; bf16 run: the same pixels cast as the model would cast them
    assert e32.pixel_values.dtype == torch.float32 and torch.equal(e32.pixel_values, reference.pixel_values)
    assert e16.pixel_values.dtype == torch.bfloat16 and torch.equal(e16.pixel_values, reference.pixel_values.to(torch.bfloat16))
    assert torch.equal(e16.image_grid_thw, reference.image_grid_thw)  # integer inputs keep their dtype
    # every AFT candidate holds the row's image inputs and the pickle holds them once: a sample
    # with 3 candidates is not 4 images' worth of bytes
    cands = [c for c, _ in group32 if c is not None]
    assert cands and all(c.images is e32.images for c in cands)
    pixels = reference.pixel_values.numel() * 4
    assert len(fp32) < 1.5 * pixels and len(bf16) < 0.75 * pixels < len(fp32)
