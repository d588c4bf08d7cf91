"""Pure planning of the training loop: deterministic order, disjoint shards, LoRA targets."""

import pytest

from casseat_ray.config import LoraConfig
from casseat_ray.train.loop import epoch_order, lora_targets, step_rows, steps_per_epoch, total_steps


def test_epoch_order_depends_on_seed_epoch_and_ids_not_arrival():
    ids = [f"s{i}" for i in range(20)]
    a = epoch_order(ids, 0, 0)
    assert sorted(a) == list(range(20))
    shuffled = list(reversed(ids))
    assert [shuffled[i] for i in epoch_order(shuffled, 0, 0)] == [ids[i] for i in a]
    assert epoch_order(ids, 0, 1) != a and epoch_order(ids, 1, 0) != a


def test_step_rows_split_a_step_disjointly_across_workers():
    order = list(range(100))
    per_epoch = steps_per_epoch(100, batch_size=2, grad_accum=3, world=4)
    assert per_epoch == 4
    seen = []
    for step in range(per_epoch):
        for rank in range(4):
            micro = step_rows(order, step, rank, 2, 3, 4)
            assert len(micro) == 3 and all(len(m) == 2 for m in micro)
            seen += [i for m in micro for i in m]
    assert len(seen) == len(set(seen)) == 96
    with pytest.raises(ValueError, match="cannot fill one step"):
        steps_per_epoch(5, batch_size=2, grad_accum=2, world=2)


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
    from casseat_ray.train.loop import pack

    lengths = [700, 300, 500, 200, 900, 100, 400, 250]
    rows = pack(lengths, 1000)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))  # every sample exactly once
    assert all(sum(lengths[i] for i in r) <= 1000 for r in rows)
    assert len(rows) == 4 == -(-sum(lengths) // 1000)  # 3,350 tokens need at least 4 rows
    assert pack(lengths, 1000) == rows
    with pytest.raises(ValueError, match="over the row capacity"):
        pack([1200], 1000)


def test_packing_and_aft_together_are_refused():
    from casseat_ray.config import Config

    with pytest.raises(ValueError, match="train.packing cannot be combined with train.loss=aft"):
        Config.model_validate(dict(train=dict(packing=True, loss="aft")))


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
