"""AFT on the student's own answers: the pure parts (the run itself: tests/ray/test_train.py)."""

from pathlib import Path

from casseat_ray import cluster, prompts
from casseat_ray.config import load_config
from casseat_ray.demo_data import make_rows
from casseat_ray.engines import Completion
from casseat_ray.synth.mix import self_eval_sample
from casseat_ray.train import aft

ROOT = Path(__file__).resolve().parents[2]
BIG = ROOT / "jobs" / "configs" / "qwen2vl-7b-mathv360k.yaml"


def test_the_student_is_asked_the_first_turn_it_was_trained_on_with_its_image():
    row = next(r for r in make_rows(8, seed=3) if r["choices"])
    sample = self_eval_sample(row, prompts.load("c1"), "Step 1 ...\nThe answer is 3.", prompts.load("c2"), "Evaluation: Accept")
    conv = aft.prompt_conversation(sample)
    assert [m["role"] for m in conv] == ["user"]  # the turns before the first assistant turn
    (image, text), = [m["content"] for m in conv]
    assert image == {"type": "image", "image": row["image"]}
    assert text == {"type": "text", "text": sample["messages"][0]["content"].removeprefix("<image>")}


def test_each_answer_is_ranked_by_the_ddf_scorer():
    row = next(r for r in make_rows(16, seed=3) if r["choices"])
    wrong = next(c for c in row["choices"] if c != row["answer"])
    done = lambda text, finish="stop": Completion(text, finish, 10, 5)  # noqa: E731
    outs = [done(f"The answer is {row['answer']}."), done(f"The answer is {wrong}."), done("I think", "length"),
            Completion("", "error", 0, 0, error="boom"), done(f"The answer is {wrong}.", "length")]
    got = aft.ranked(outs, {k: row[k] for k in ("answer", "answer_type", "choices", "precision")})
    assert got["responses_correct"] == [True, False, False, False, False]
    assert got["responses_rank"] == [0, 1, 2, 2, 2]  # cut off at the token limit: no usable answer


def test_the_stages_and_what_the_cluster_must_hold():
    cfg = load_config(BIG, ["train.loss=aft", "train.aft.samples=student", "train.aft.stage1_epochs=0.5", "train.packing=false"])
    one, two = aft.stage1_config(cfg), aft.stage2_config(cfg, Path("/a/stage1/adapter"))
    assert (one.train.loss, one.train.epochs, one.train.init_adapter) == ("nll", 0.5, None)
    assert (two.train.loss, two.train.epochs, two.train.init_adapter) == ("aft", cfg.train.epochs, "/a/stage1/adapter")
    assert aft.stage1_name(cfg) == f"{cfg.name}-aft-stage1" and aft.sampling(cfg).n == 4
    names = [d.what for d in cluster.demands(cfg)]
    assert "train: AFT student sampling engine actor" in names
    assert "train: AFT student sampling engine actor" not in [d.what for d in cluster.demands(load_config(BIG, ["train.packing=false"]))]


def test_samples_of_another_adapter_are_dropped_not_refused(tmp_path, caplog):
    import pyarrow as pa

    from casseat_ray import parts as partstore

    parts = aft.samples_parts(tmp_path / "s", {"adapter": "one"})
    partstore.record_stamp(parts, {"adapter": "one"})
    partstore.write_part(parts, pa.table({"id": ["q1"], "reject_reason": pa.nulls(1, pa.string())}), "id")
    assert aft.samples_parts(tmp_path / "s", {"adapter": "one"}) == parts and partstore.done_ids(parts, "id") == {"q1"}
    aft.samples_parts(tmp_path / "s", {"adapter": "two"})
    assert partstore.done_ids(parts, "id") == set() and "changed: adapter" in caplog.text
