"""The installed ``casseat`` command, as a user runs it."""

import json
import shutil
import subprocess

import pytest

SUBCOMMANDS = ["validate", "make-tiny", "make-demo-data", "data", "synthesize", "train", "export", "evaluate", "run", "demo"]


def casseat(*args, timeout=600):
    from tests.conftest import casseat_cmd

    return subprocess.run(casseat_cmd(*args), capture_output=True, text=True, timeout=timeout)


def test_help_reads_like_a_manual():
    top = casseat("--help")
    assert top.returncode == 0
    for sub in SUBCOMMANDS:
        assert sub in top.stdout
        r = casseat(sub, "--help")
        assert r.returncode == 0, r.stderr
        assert "usage: casseat " + sub in r.stdout and len(r.stdout) > 300
    assert casseat().returncode == 2  # no subcommand: help + usage error
    bad = casseat("frobnicate")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_validate_misspelled_key_exits_2(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\nteacher:\n  model: Qwen/Qwen2-VL-7B-Instruct\n  samplng: {}\n")
    r = casseat("validate", str(f))
    assert r.returncode == 2
    assert f"{f}: teacher.samplng: unknown key" in r.stderr
    assert casseat("validate", str(tmp_path / "none.yaml")).returncode == 2
    r = casseat("validate", "--config", str(f), "train.lr=0.5", "--no-check-paths")  # like every other command
    assert r.returncode == 2 and "teacher.samplng: unknown key" in r.stderr
    f.write_text("name: x\n")
    r = casseat("validate", "--config", str(f), "train.max_steps=7", "--no-check-paths")
    assert r.returncode == 0 and "max_steps: 7" in r.stdout
    inspect_help = casseat("data", "inspect", "--help").stdout
    assert "Nothing is written unless --rejects" in " ".join(inspect_help.split())


@pytest.mark.slow
def test_make_tiny_cli(tmp_path):
    r = casseat("make-tiny", str(tmp_path / "t"), "--role", "student", "--seed", "2")
    assert r.returncode == 0, r.stderr
    assert "fingerprint" in r.stdout
    assert (tmp_path / "t" / "config.json").is_file() and (tmp_path / "t" / "tokenizer.json").is_file()
    assert casseat("make-tiny", str(tmp_path / "u"), "--role", "oracle").returncode == 2


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_a_rerun_skips_it(tmp_path, tiny_models):
    out = tmp_path / "demo"
    for role, path in tiny_models.items():  # the session's tiny models: same recipe, so the demo reuses them
        shutil.copytree(path, out / "models" / role)
    r = casseat("demo", "--out", str(out), "--n", "8", "--heldout", "6", "evaluate.modes=[cot, cascade]", "--no-progress", timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["questions"] == 8 and summary["funnel"]["ddf_labeled"]["in"] == 8
    assert summary["kept"] * 4 >= summary["questions"], summary["funnel"]  # the tiny teacher knows these questions
    assert summary["sft"]["samples"] > 0 and summary["train"]["final_loss"] < summary["train"]["first_loss"]
    assert {m: sorted(v) for m, v in summary["eval"].items()} == {"base": ["cascade", "cot"], "tuned": ["cascade", "cot"]}
    assert all(c["n"] == 6 and 0 <= c["accuracy"] <= 1 and len(c["ci95"]) == 2 for v in summary["eval"].values() for c in v.values())
    assert list(summary["steps"]) == ["build", "synthesize", "train", "evaluate"]
    run = out / "tiny-cpu"
    for name in ("README.md", "funnel.png", "rejects.parquet", "config.yaml", "train/adapter/adapter_config.json",
                 "train/loss.png", "eval/report.md", "eval/accuracy.png", "run.json", "summary.json"):
        assert (run / name).is_file(), name
    assert "evaluation accuracy" in r.stdout and "kept " in r.stdout
    # the same run again: every step is finished, nothing starts (not even Ray)
    again = casseat("run", "--config", str(out / "config.yaml"), "--no-progress", timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("finished earlier") == 3 and "Started a local Ray" not in again.stderr
    assert json.loads((run / "summary.json").read_text())["eval"] == summary["eval"]
    changed = casseat("run", "--config", str(out / "config.yaml"), "train.epochs=1", "--no-progress", timeout=300)
    assert changed.returncode == 2 and "rerun with --from train" in changed.stderr


@pytest.mark.slow
def test_data_inspect_json_and_bad_config(tmp_path, demo_parquet):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"sources:\n  - {{name: demo, format: canonical, path: {demo_parquet}}}\nray: {{num_cpus: 2}}\n")
    r = casseat("data", "inspect", "--config", str(cfg), "--json", "ddf_source.budget=10", "ddf_source.write_over_budget=true",
                "--rejects", str(tmp_path / "rejects"), "--show", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 accepted rows as the teacher sees them" in r.stderr and r.stderr.count("C1 prompt (after the image):") == 2
    import pyarrow.parquet as pq

    written = pq.read_table(tmp_path / "rejects")
    assert written.num_rows == 14 and set(written.column("reject_reason").to_pylist()) == {"over_budget"}
    assert "image" not in written.column_names
    from casseat_ray.rows import REJECT_SCHEMA

    assert written.column_names == REJECT_SCHEMA.names  # the schema of rejects.parquet too
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out) >= {"in", "accepted", "rejected", "by_source", "by_answer_type"}
    assert out["in"] == 24 and out["accepted"] == 10 and out["rejected"] == {"over_budget": 14}
    missing = casseat("data", "inspect", "--config", str(cfg), f"sources.0.path={tmp_path}/nope.parquet")
    assert missing.returncode == 2 and f"sources.0.path: source data not found: {tmp_path}/nope.parquet" in missing.stderr
