"""Evaluation items a request failed for: `casseat evaluate` on real MATH-V items with the
student's engine behind tests/reliability/fault_engine.py (real tiny vLLM inside), in this
process on the session's Ray."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from casseat_ray.config import to_yaml
from tests.conftest import shared_data
from tests.reliability.conftest import CONFIG, casseat
from tests.reliability.fault_engine import INJECTED_ERROR

pytestmark = pytest.mark.slow
N = 6  # MATH-V testmini items


def _requests(markers, after: dict | None = None) -> list[str]:
    """The C1 requests the engines logged (one file per engine process), or only those logged
    since ``after`` (``_logged``'s snapshot): file names order processes by pid, not by time."""
    after = after or {}
    return [line for f in sorted(markers.glob("requests-*.log")) for line in f.read_text().splitlines()[after.get(f.name, 0):]]


def _logged(markers) -> dict:
    return {f.name: len(f.read_text().splitlines()) for f in markers.glob("requests-*.log")}


def test_b9_evaluation_items_the_engine_failed_are_scored_wrong_said_and_retried_alone_by_a_rerun(tmp_path, tiny_models, ray_session, figures):
    from casseat_ray.config import load_config

    mathv = shared_data("math-v", "testmini.jsonl")
    questions = [json.loads(line)["question"] for line in mathv.open()][:N]
    failing = [q.split("\n")[0] for q in questions[1:3]]  # two items' first requests fail once
    markers = tmp_path / "markers"
    markers.mkdir()
    faults = {"error_once": failing, "log_requests": True, "marker_dir": str(markers)}
    cfg = load_config(CONFIG, ["name=evf", f"output_dir={tmp_path}", f"ray.storage_path={tmp_path / 'ray'}", f"student.model={tiny_models['teacher']}",
                               f"evaluate.benchmarks=[{{name: mathv, format: mathv, path: {mathv}, protocol: mathv, max_samples: {N}}}]",
                               "evaluate.models=[base]", "evaluate.modes=[cot]", "evaluate.sampling.max_tokens=16",
                               "student.engine.backend=fault_engine:FaultEngine"])
    engine = cfg.student.engine.model_copy(update={"extra": {**cfg.student.engine.extra, "faults": faults}})
    cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"engine": engine})})
    path = tmp_path / "evf.yaml"
    path.write_text(to_yaml(cfg))

    code, err = casseat("evaluate", "--config", str(path), "--no-progress")
    assert code == 0, err[-2000:]
    out = tmp_path / "evf" / "eval"
    first = json.loads((out / "report.json").read_text())
    items = pq.read_table(out / "items.parquet").to_pylist()
    failed = sorted(i["source_id"] for i in items if i["failure"])
    figures.update(items=N, injected_once=len(failing), first_run_failures=first["results"][0]["failures"],
                   first_run_retryable=first["retryable_items"], first_run_requests=len(_requests(markers)))
    assert first["retryable_items"] == 2 and first["results"][0]["failures"] == {"engine_error": 2}
    assert len(failed) == 2 and all(i["error"] == INJECTED_ERROR and not i["correct"] for i in items if i["failure"])
    assert "2 item(s) failed with engine errors or timeouts" in err and "retries the 2 `engine_error` items" in (out / "report.md").read_text()
    assert len(_requests(markers)) == N
    seen = _logged(markers)

    code, err = casseat("evaluate", "--config", str(path), "--no-progress")  # the same command
    assert code == 0, err[-2000:]
    again = json.loads((out / "report.json").read_text())
    items = pq.read_table(out / "items.parquet").to_pylist()
    retried = _requests(markers, after=seen)
    figures.update(rerun_requests=len(retried), rerun_failures=again["results"][0]["failures"], final_items=len(items))
    assert len(retried) == 2 and all(any(f in r for f in failing) for r in retried)  # only the two failed items ran again
    assert again["retryable_items"] == 0 and again["results"][0]["failures"] == {} and again["results"][0]["n"] == N
    assert len(items) == len({i["sample_id"] for i in items}) == N and not any(i["failure"] or i["error"] for i in items)
    assert "failed with engine errors" not in err
