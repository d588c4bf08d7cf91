"""Student LoRA training on real Ray Train with the tiny student on CPU."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from casseat_ray.config import ConfigError
from casseat_ray.demo import TINY_ENGINE
from casseat_ray.train import run as train_run
from casseat_ray.train.run import read_metrics
from tests.conftest import make_sft
from tests.conftest import train_config as _cfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, tiny_models, sft, ray_session):
    tmp = tmp_path_factory.mktemp("train2")
    cfg = _cfg(tmp, tiny_models, "two", num_workers=2)
    return cfg, train_run.run(cfg, data=sft)


def test_two_workers_lower_the_loss_and_train_only_lora(two_workers, tiny_models):
    cfg, summary = two_workers
    assert summary["samples"] == 32 and summary["steps"] == 16  # 32 / (2 x 2) x 2 epochs
    # each worker trains on its half of every step: 16 steps x 2 samples
    assert [w["rank"] for w in summary["workers"]] == [0, 1] and [w["samples"] for w in summary["workers"]] == [32, 32]
    assert all(w["peak_memory_mb"] > 100 for w in summary["workers"])
    records = read_metrics(train_run.train_dir(cfg) / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 17))
    first = sum(r["loss"] for r in records[:4]) / 4
    last = sum(r["loss"] for r in records[-4:]) / 4
    assert last < first - 0.3, (first, last)
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in records)
    assert [r["time"] for r in records] == sorted(r["time"] for r in records)  # wall-clock stamp per step
    assert (train_run.train_dir(cfg) / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # every LoRA matrix moved away from its initialization; nothing else is in the adapter
    from casseat_ray.train.loop import build_model

    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg, torch.float32)
    trainable = {n for n, p in init.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("visual" in n for n in trainable)
    saved = load_file(str(train_run.train_dir(cfg) / "adapter" / "adapter_model.safetensors"))
    start = {n.replace(".default", ""): p.detach() for n, p in init.named_parameters() if p.requires_grad}
    assert len(saved) == len(start)
    for name, value in saved.items():
        assert not torch.equal(value, start[name]), f"{name} did not change"


def test_fsdp_shards_the_student_and_matches_ddp(tmp_path, tiny_models, sft, two_workers, ray_session):
    cfg = _cfg(tmp_path, tiny_models, "fsdp", num_workers=2, strategy="fsdp")
    summary = train_run.run(cfg, data=sft)
    assert summary["strategy"] == "fsdp" and two_workers[1]["strategy"] == "ddp"
    assert summary["steps"] == two_workers[1]["steps"] == 16
    assert summary["trainable_params"] == two_workers[1]["trainable_params_on_rank0"] == two_workers[1]["trainable_params"]
    assert summary["trainable_params_on_rank0"] <= summary["trainable_params"] * 0.6  # each worker holds about half
    adapter = train_run.train_dir(cfg) / "adapter" / "adapter_model.safetensors"
    fsdp = load_file(str(adapter))
    ddp = load_file(str(train_run.train_dir(two_workers[0]) / "adapter" / "adapter_model.safetensors"))
    assert sorted(fsdp) == sorted(ddp)
    worst = max((fsdp[k] - ddp[k]).abs().max().item() for k in ddp)
    assert worst < 1e-4, worst  # same data, order, seeds and dropout: only the reduction order differs
    # the finished run resumed: its last checkpoint (gathered from both shards) is scattered
    # back into shards with the optimizer state, no step is left, and the same adapter results
    train_run.run(cfg, resume=True, data=sft)
    again = load_file(str(adapter))
    assert all(torch.equal(again[k], fsdp[k]) for k in fsdp)


def test_packed_rows_with_a_trainable_projector(tmp_path, family_students, sft, ray_session):
    # A LLaVA-1.5 student (the default Qwen2-VL's M-RoPE packing is checked in test_collate):
    # plain 1-D positions restarting per packed sample, EOS inserted after each trained turn.
    cfg = _cfg(tmp_path, {"student": family_students["llava"]}, "packed", packing=True, cutoff_len=1024, batch_size=1, epochs=2)
    cfg.student.lora.train_projector = True
    summary = train_run.run(cfg, data=sft)
    assert summary["samples"] == 32 and summary["rows"] < 16  # several samples share each row
    records = read_metrics(train_run.train_dir(cfg) / "metrics.jsonl")
    assert len(records) == summary["steps"] == 2 * summary["rows"]
    assert sum(r["loss"] for r in records[-2:]) < sum(r["loss"] for r in records[:2]) - 0.3
    assert sum(r["samples_per_s"] for r in records) > 0
    saved = load_file(str(train_run.train_dir(cfg) / "adapter" / "adapter_model.safetensors"))
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(family_students["llava"]).state_dict()
    projector = {k: v for k, v in saved.items() if ".multi_modal_projector." in k}
    assert projector, sorted(saved)[:5]  # the projector is saved whole with the adapter, and it trained
    for name, value in projector.items():
        original = next(v for k, v in base.items() if k.endswith(name.split("multi_modal_projector.", 1)[1]) and "multi_modal_projector" in k)
        assert not torch.equal(value, original), name
    # LoRA on the language model only: the vision tower has nothing in the adapter
    assert all(".language_model." in k for k in saved if k not in projector) and not any("vision_tower" in k for k in saved)


def test_adapter_loads_in_transformers_merges_and_changes_vllm_output(two_workers, tiny_models, demo_rows, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from casseat_ray import prompts
    from casseat_ray.config import EngineConfig, SamplingConfig
    from casseat_ray.engines.vllm import VLLMEngine
    from casseat_ray.inference.turns import c1_conversation
    from casseat_ray.train.collate import _images, to_conversation

    cfg, summary = two_workers
    adapter = summary["adapter"]
    out = train_run.export(cfg, merged=tmp_path / "merged")
    processor = AutoProcessor.from_pretrained(tiny_models["student"])
    msgs = [{"role": "user", "content": "<image>How many circles?"}]
    text = processor.apply_chat_template(to_conversation(msgs), tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=_images({"images": [demo_rows[0]["image"]]}), return_tensors="pt")
    base = AutoModelForImageTextToText.from_pretrained(tiny_models["student"]).eval()
    with torch.no_grad():
        plain = base(**inputs).logits
        tuned = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_models["student"]), adapter).eval()(**inputs).logits
        merged = AutoModelForImageTextToText.from_pretrained(out["merged"]).eval()(**inputs).logits
    assert not torch.allclose(plain, tuned, atol=1e-3)
    assert torch.allclose(tuned, merged, atol=1e-4)
    with pytest.raises(ConfigError, match="no peft adapter"):
        train_run.export(cfg, adapter=tmp_path)

    engine = VLLMEngine(str(tiny_models["student"]), EngineConfig(**TINY_ENGINE, enable_lora=True, max_lora_rank=8), SamplingConfig(max_tokens=24))
    try:
        convs = [c1_conversation(r, prompts.load("c1")) for r in demo_rows[:6]]
        without = [o[0].text for o in engine.chat(convs)]
        with_adapter = [o[0].text for o in engine.chat(convs, adapter=adapter)]
        assert all(o[0].error is None for o in engine.chat(convs[:1], adapter=adapter))
        assert with_adapter != without
        import asyncio

        async def mixed():  # base and adapter requests in flight together on the one engine
            return await asyncio.gather(*(engine.generate(c) for c in convs), *(engine.generate(c, adapter=adapter) for c in convs))

        outs = [o[0].text for o in asyncio.run(mixed())]
        assert outs[:6] == without and outs[6:] == with_adapter  # neither kind of request changes the other
    finally:
        engine.close()


def _answer_gap(model, processor, sft: Path, n: int = 8) -> float:
    """Mean s(right) - s(wrong) over the first ``n`` questions' teacher responses."""
    import pyarrow.parquet as pq

    from casseat_ray.train.collate import collate, encode, encode_responses
    from casseat_ray.train.losses import sequence_scores

    rows = [r for r in pq.read_table(sft).to_pylist() if r["kind"] == "cot"][:n]
    gaps = []
    for r in rows:
        right, wrong, _ = encode_responses(r, processor, encode(r, processor))
        batch = collate([right, wrong], processor.tokenizer.pad_token_id)
        labels = batch.pop("labels")
        with torch.no_grad():
            s = sequence_scores(model(**batch).logits, labels)
        gaps.append((s[0] - s[1]).item())
    return sum(gaps) / len(gaps)


def test_aft_pulls_right_responses_above_wrong_ones(tmp_path, tiny_models, two_workers, ray_session):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    # the same questions and reference samples as the two-worker NLL run, plus three teacher
    # responses per question; the only difference between the runs is the alignment term
    sft = make_sft(tmp_path / "sft", aft=True)
    nll_cfg, nll = two_workers
    cfg = _cfg(tmp_path, tiny_models, "aft", num_workers=2, loss="aft", aft=dict(variant="boundary", tau=1.0, weight=2.0))
    summary = train_run.run(cfg, data=sft)
    assert summary["aft_questions"] == 16 and summary["steps"] == nll["steps"] and "aft_questions" not in nll
    records = read_metrics(train_run.train_dir(cfg) / "metrics.jsonl")
    aligned = [r["align_loss"] for r in records if r["align_loss"] is not None]
    assert len(aligned) >= len(records) // 2 and all(a > 0 for a in aligned)
    processor = AutoProcessor.from_pretrained(tiny_models["student"])
    base = lambda: AutoModelForImageTextToText.from_pretrained(tiny_models["student"]).eval()  # noqa: E731
    gap = {"base": _answer_gap(base(), processor, sft)}
    for name, s in {"nll": nll, "aft": summary}.items():
        gap[name] = _answer_gap(PeftModel.from_pretrained(base(), s["adapter"]).eval(), processor, sft)
    # plain NLL on the right CoT already helps; the alignment term widens the gap further
    # (measured: base 0.05, NLL 0.96, AFT 1.07 nats per token, the boundary holding it near tau)
    assert gap["aft"] > 1.05 * gap["nll"] > 0, gap


def test_a_run_starts_from_an_existing_adapter(tmp_path, tiny_models, sft, two_workers, ray_session):
    trained = train_run.train_dir(two_workers[0]) / "adapter"
    before = load_file(str(trained / "adapter_model.safetensors"))
    # one step at a negligible learning rate: what comes out is what went in. The run also
    # compiles its blocks and loss (train.compile) in the Ray Train worker, its compile workers
    # included (that compiled blocks compute what eager ones do: tests/unit/test_families.py)
    cfg = _cfg(tmp_path, tiny_models, "from-adapter", max_steps=1, lr=1e-9, warmup_ratio=0.0, compile=True)
    cfg.train.init_adapter = str(trained)
    assert train_run.run(cfg, data=sft)["compiled_layers"] == 4  # the tiny student's two decoder layers and two vision blocks
    after = load_file(str(train_run.train_dir(cfg) / "adapter" / "adapter_model.safetensors"))
    assert sorted(after) == sorted(before)
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-6
    # an adapter of another shape stops the run before any work, naming both shapes
    other = cfg.model_copy(deep=True)
    other.name, other.student.lora.r = "other-rank", 4
    with pytest.raises(ConfigError, match="rank 8 and alpha 16; student.lora asks for rank 4"):
        train_run.run(other, data=sft)
    assert not train_run.train_dir(other).exists()


def test_a_workers_rows_arrive_with_their_positions_and_the_first_good_one_stands_in(tmp_path, tiny_models, ray_session):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data
    from transformers import AutoModelForImageTextToText

    from casseat_ray.config import TrainConfig
    from casseat_ray.train.collate import rope_positions
    from casseat_ray.train.stream import encode_batch, first_sample, shard_rows

    table = pq.read_table(make_sft(tmp_path / "sft", n_rows=1))
    rows = table.to_pylist()
    cut = dict(rows[0], id="cut", images=[rows[0]["images"][0][:64]])
    batch = pa.Table.from_pylist([cut] + rows, schema=table.schema)
    model, ids = str(tiny_models["student"]), frozenset(["cut"] + [r["id"] for r in rows])
    encoded = pa.Table.from_pydict(encode_batch(batch, model, TrainConfig().model_dump(mode="json"), ids))
    shard = ray.data.from_arrow(encoded).iterator()  # a worker's shard, as Ray Train hands it over
    rope = AutoModelForImageTextToText.from_pretrained(model).model.get_rope_index  # Qwen2-VL's M-RoPE
    failed = {}
    got = list(shard_rows(shard, failed, rope))
    assert [sid for sid, _ in got] == encoded["id"].to_pylist() and got[0][1] is None and list(failed) == ["cut"]
    for _, (e, group) in got[1:]:
        assert e.positions is not None and torch.equal(e.positions, rope_positions(e, rope)) and group is None
    assert all(s[0].positions is None for _, s in shard_rows(shard, {}) if s)  # no position function: plain positions
    # the stand-in for an empty micro-batch: the first sample that encoded, positions included
    spare = first_sample(shard, rope)
    assert spare.input_ids == got[1][1][0].input_ids and torch.equal(spare.positions, got[1][1][0].positions)


def test_a_workers_encoded_rows_are_read_back_from_its_disk_after_one_whole_pass(tmp_path, tiny_models, ray_session):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from casseat_ray.config import TrainConfig
    from casseat_ray.train.stream import ENCODED_SCHEMA, EncodedCache, encode_batch, first_sample, shard_rows

    table = pq.read_table(make_sft(tmp_path / "sft", n_rows=3))
    rows = table.to_pylist()
    model, ids = str(tiny_models["student"]), frozenset(r["id"] for r in rows)
    encoded = pa.Table.from_pydict(encode_batch(table, model, TrainConfig().model_dump(mode="json"), ids))
    shard = ray.data.from_arrow(encoded).repartition(3).iterator()  # three blocks, as Ray Train hands a shard over

    def whole(source) -> pa.Table:
        return pa.concat_tables([b.select(["id", "sample", "error"]) for b in source.iter_batches(batch_format="pyarrow", batch_size=None)])

    first = whole(shard)
    cache = EncodedCache(shard, 1e9)
    stopped = shard_rows(cache, {})
    next(stopped)
    stopped.close()  # a pass stopped early keeps nothing
    assert not cache.complete and not cache.writing
    open_pass = shard_rows(cache, {})
    sid, sample = next(open_pass)
    assert first_sample(cache).input_ids == sample[0].input_ids  # a stand-in read while the pass is open does not write
    rest = list(open_pass)
    assert [sid] + [s for s, _ in rest] == first["id"].to_pylist() and cache.complete
    assert cache.path.stat().st_size > 0
    cache.shard = None  # from here on the passes cannot reach Ray Data
    assert whole(cache).equals(first.cast(ENCODED_SCHEMA)) and whole(cache).num_rows == len(rows)
    directory = cache.dir
    cache.close()
    assert not directory.exists() and cache.dir is None

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "rows.arrow").write_bytes(b"left by a worker that crashed")
    again = EncodedCache(shard, 1e9, tmp_path / "cache")  # a restarted worker's folder: emptied, then filled anew
    assert not (tmp_path / "cache" / "rows.arrow").exists()
    streamed = whole(again)
    assert again.complete and again.path == tmp_path / "cache" / "rows.arrow" and whole(again).equals(streamed.cast(ENCODED_SCHEMA))
    again.close()

    small = EncodedCache(shard, 16)  # the blocks outgrow it: nothing kept, every pass from Ray Data
    assert whole(small).num_rows == whole(small).num_rows == len(rows)
    assert not small.complete and small.dir is None


def test_a_sample_that_fails_to_encode_is_left_out_of_its_step_and_counted(tmp_path, tiny_models, ray_session):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # a sample whose image header survives (planning reads sizes only) but whose pixels do not:
    # planned like the others, it fails in its worker's Ray Data encoding
    data = make_sft(tmp_path / "sft", n_rows=2)
    table = pq.read_table(data)
    rows = table.to_pylist()
    rows[1] = dict(rows[1], id="cut", images=[rows[1]["images"][0][:64]])
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), next(data.glob("*.parquet")))
    # one worker, one sample per step: the cut sample's step has nothing to train on (no
    # loss, no update) and the run goes on
    one = train_run.run(_cfg(tmp_path, tiny_models, "cut-one", epochs=1, batch_size=1), data=data)
    assert one["samples"] == 4 and one["steps"] == 4
    assert one["workers"][0]["failed_encoding"] == 1 and one["workers"][0]["samples"] == 3
    records = read_metrics(train_run.train_dir(_cfg(tmp_path, tiny_models, "cut-one")) / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert sorted(r["loss"] is None for r in records) == [False] * 3 + [True]
    # two workers: the cut sample's worker has an empty step while the other trains; it takes
    # part in the gradient sync with a zero-weight pass, and every other sample trains
    cfg = _cfg(tmp_path, tiny_models, "cut-two", epochs=2, batch_size=1, num_workers=2)
    two = train_run.run(cfg, data=data)
    assert two["steps"] == 4 and sorted(w["failed_encoding"] for w in two["workers"]) == [0, 1]
    assert sorted(w["samples"] for w in two["workers"]) == [2, 4]  # 2 epochs x 2 samples, one of them cut
    records = read_metrics(train_run.train_dir(cfg) / "metrics.jsonl")
    assert len(records) == 4 and all(r["loss"] is not None and r["grad_norm"] > 0 for r in records)


def test_aft_on_the_students_own_answers_runs_in_two_stages(tmp_path, tiny_models, sft, ray_session):
    import pyarrow.parquet as pq

    from casseat_ray.answers import score
    from casseat_ray.train import aft

    # The format-trained tiny teacher plays the student, so that its samples carry answers; at
    # temperature 1.5 some are right, more wrong or unusable (at 1.0 its four samples are one
    # text); ranking=True also pairs a wrong answer with an unusable one.
    cfg = _cfg(tmp_path, tiny_models, "aft-student", loss="aft", epochs=1,
               aft=dict(samples="student", k=4, temperature=1.5, max_tokens=48, ranking=True, stage1_epochs=1))
    cfg.student.model = str(tiny_models["teacher"])
    # an SFT set written before it carried choices cannot be scored: refused before any work
    old = tmp_path / "old-sft"
    old.mkdir()
    pq.write_table(pq.read_table(sft).drop_columns(["choices", "precision"]), old / "sft-00000.parquet")
    with pytest.raises(ConfigError, match="no choices, precision column"):
        train_run.run(cfg, data=old)
    assert not train_run.train_dir(cfg).exists()

    summary = train_run.run(cfg, data=sft, progress=False)
    out = train_run.train_dir(cfg)
    stage1 = aft.read_summary(out / aft.STAGE1_DIR)
    assert summary["aft"]["samples"] == "student" and summary["aft"]["stage1"]["adapter"] == stage1["adapter"]
    assert stage1["steps"] == summary["steps"] == 16 and "aft_questions" not in stage1  # 32 samples / 2 per step, 1 epoch each
    assert not any(r.get("align_loss") for r in read_metrics(out / aft.STAGE1_DIR / "metrics.jsonl"))
    # stage 2 started from the stage-1 adapter (how a run loads one: test_a_run_starts_from_an_existing_adapter)
    assert summary["init_adapter"] == stage1["adapter"]
    # every CoT question got k answers from the student, scored by DDF's rule; the
    # self-evaluation samples none; everything else is the SFT set as it was
    before = {r["id"]: r for r in pq.read_table(sft).to_pylist()}
    after = {r["id"]: r for r in pq.read_table(out / aft.SFT_DIR).to_pylist()}
    assert sorted(after) == sorted(before)
    pairs = 0
    for rid, r in after.items():
        assert {k: v for k, v in r.items() if not k.startswith("responses")} == {k: v for k, v in before[rid].items() if not k.startswith("responses")}
        if r["kind"] == "self_eval":
            assert r["responses"] == []
            continue
        assert len(r["responses"]) == 4 and r["responses"] != before[rid]["responses"]
        for text, correct, rank in zip(r["responses"], r["responses_correct"], r["responses_rank"]):
            s = score(text, r)
            assert correct == s.correct and (rank == 0) == s.correct and (rank == 1) <= (s.extraction is not None)
        pairs += len(set(r["responses_rank"])) > 1
    sampled = summary["aft"]["sampling"]
    assert sampled["questions"] == sampled["asked"] == 16 and sampled["answers"] == 64 and sampled["failed"] == {}
    assert sampled["right"] + sampled["wrong"] + sampled["unusable"] == 64 and sampled["right"] > 0
    assert summary["aft_questions"] == pairs > 0
    aligned = [r["align_loss"] for r in read_metrics(out / "metrics.jsonl") if r["align_loss"] is not None]
    assert aligned and all(a > 0 for a in aligned)
    # a rerun with --resume keeps stage 1 and the samples (no engine is started) and finds
    # stage 2 finished
    stamp = (out / aft.STAGE1_DIR / "summary.json").stat().st_mtime_ns
    again = train_run.run(cfg, resume=True, data=sft, progress=False)
    assert again["aft"]["sampling"]["asked"] == 0 and again["aft"]["sampling"]["questions"] == 16
    assert (out / aft.STAGE1_DIR / "summary.json").stat().st_mtime_ns == stamp
