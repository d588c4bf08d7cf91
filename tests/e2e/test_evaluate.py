"""`casseat evaluate` as a user runs it: base and tuned student on real MATH-V testmini items
(the first N of the file, to keep the suite short) in every mode, one engine serving both
(the tuned one through a LoRA adapter)."""

import json

import pyarrow.parquet as pq
import pytest

from casseat_ray.tiny import make_tiny_adapter
from tests.conftest import ROOT, shared_data
from tests.e2e.test_cli import casseat

pytestmark = pytest.mark.slow
CONFIG = ROOT / "jobs" / "configs" / "tiny-cpu.yaml"
MODES = ["direct", "cot", "seat", "cascade", "best_of_n"]
N = 48  # of the 304 testmini items


def _args(tmp, student, adapter, *extra):
    mathv = shared_data("math-v", "testmini.jsonl")
    return ["--config", str(CONFIG), "name=ev", f"output_dir={tmp}", f"student.model={student}", f"evaluate.adapter={adapter}",
            f"evaluate.benchmarks=[{{name: mathv, format: mathv, path: {mathv}, protocol: mathv, max_samples: {N}}}]", f"evaluate.modes=[{', '.join(MODES)}]",
            f"ray.storage_path={tmp / 'ray'}", *extra, "--no-progress"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_models):
    # The format-trained tiny teacher plays the student here, so answers and verdicts exist.
    tmp = tmp_path_factory.mktemp("eval")
    adapter = make_tiny_adapter(tiny_models["teacher"], tmp / "adapter")
    args = _args(tmp, tiny_models["teacher"], adapter, "evaluate.best_of_n=1", "evaluate.best_of_n_temperature=0", "evaluate.sampling.max_tokens=32")
    r = casseat("evaluate", *args, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "ev" / "eval", args, r


def test_every_mode_scores_every_item_for_base_and_tuned(evaluated):
    out, _, r = evaluated
    items = pq.read_table(out / "items.parquet").to_pylist()
    ids = {json.loads(line)["id"] for line in shared_data("math-v", "testmini.jsonl").open()}
    assert len(ids) == 304
    scored = {i["source_id"] for i in items}
    assert len(scored) == N and scored <= ids
    for model in ("base", "tuned"):
        for mode in MODES:
            got = [i for i in items if i["model"] == model and i["mode"] == mode]
            assert {i["source_id"] for i in got} == scored, (model, mode)
    assert len(items) == N * 2 * len(MODES)
    cascade = [i for i in items if i["mode"] == "cascade"]
    assert all(i["pass2_ran"] for i in cascade)  # pass 2 on every item, not only the wrong ones
    assert any(i["verdict"] is not None for i in cascade)  # the format-trained model gives verdicts
    # best of N=1 at temperature 0 is the CoT answer (its self-check runs, but there is one sample to pick)
    for model in ("base", "tuned"):
        cot = {i["sample_id"]: i["prediction"] for i in items if i["model"] == model and i["mode"] == "cot"}
        bon = {i["sample_id"]: i["prediction"] for i in items if i["model"] == model and i["mode"] == "best_of_n"}
        assert bon == cot
    base = {(i["mode"], i["sample_id"]): i["prediction"] for i in items if i["model"] == "base"}
    assert sum(base[(i["mode"], i["sample_id"])] != i["prediction"] for i in items if i["model"] == "tuned") > 10  # the adapter is applied
    assert f"| mathv | tuned | cascade | {N} |" in r.stdout  # the console summary table


def test_report_equals_a_recomputation_from_the_items(evaluated):
    from casseat_ray.evaluate.report import compute

    out, _, _ = evaluated
    rep = json.loads((out / "report.json").read_text())
    again = compute(pq.read_table(out / "items.parquet").to_pylist(), 1000, 0)
    assert json.loads(json.dumps(again["results"])) == rep["results"]
    assert {(e["model"], e["mode"]) for e in rep["results"]} == {(m, x) for m in ("base", "tuned") for x in MODES}
    for e in rep["results"]:
        assert e["n"] == N and e["ci95"][0] <= e["accuracy"] <= e["ci95"][1]
    assert len(rep["paired_differences"]) == len(MODES) and rep["reflection"] and rep["best_of_n"][0]["oracle_note"]
    assert {b["by"] for b in rep["breakdowns"]} == {"answer_type", "subject", "level"}
    for name in ("report.md", "accuracy.png", "best_of_n.png", "reflection.png"):
        assert (out / name).stat().st_size > 500, name


def test_a_rerun_resumes_without_starting_an_engine(evaluated):
    out, args, _ = evaluated
    before = pq.read_table(out / "items.parquet").to_pylist()
    r = casseat("evaluate", *args, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert pq.read_table(out / "items.parquet").to_pylist() == before


def test_a_bad_adapter_stops_before_any_inference(tmp_path, tiny_models):
    r = casseat("evaluate", *_args(tmp_path, tiny_models["student"], tmp_path / "nope"))
    assert r.returncode == 2 and "evaluate.adapter" in r.stderr and str(tmp_path / "nope") in r.stderr
    other = make_tiny_adapter(tiny_models["teacher"], tmp_path / "teacher-adapter")  # trained on another model
    r = casseat("evaluate", *_args(tmp_path, tiny_models["student"], other))
    assert r.returncode == 2 and "was trained on" in r.stderr
    assert not (tmp_path / "ev").exists()
