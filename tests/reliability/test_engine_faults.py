"""What the teacher's engine can do wrong, and what a run makes of it: empty, unparsable or
cut-off replies (B7), requests the backend fails (B8), an engine that will not start (F4) and a
run whose errors exceed its budget (B10). The faults come from tests/reliability/fault_engine.py,
in front of the session's real tiny teacher (B7, B8) or of no engine at all (whole
`casseat synthesize` runs in this process on the session's Ray: F4, B10)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from casseat_ray.config import Config, EngineConfig, load_config, to_yaml
from casseat_ray.data import ROW_SCHEMA
from casseat_ray.demo import TINY_ENGINE
from casseat_ray.inference.stage import PROCESS_DIED, EngineStage
from casseat_ray.synth.stages import LabelStage, TeacherTask
from casseat_ray.synth.outputs import ERROR_REASONS
from casseat_ray.tiny import scripted_targets
from tests.reliability.conftest import CONFIG, casseat, fault_config, tag, tagged_source
from tests.reliability.fault_engine import INJECTED_ERROR, FaultEngine

pytestmark = pytest.mark.slow
ERRORS = [0, 1, 2, 3, 4]  # B8: the backend fails every request of these rows
GARBAGE = "%%% ### ??? ~~~"
C1_FAULTS = {5: ("", "stop"), 6: (GARBAGE, "stop"), 7: (None, "length")}  # B7 at C1: empty, unparsable, cut off
C2_FAULTS = {8: ("", "stop"), 9: (GARBAGE, "stop"), 10: (None, "length")}  # B7 at C2, after a usable C1
EXPECTED = {5: ("no_answer", "C1 has no final answer; C2 not run"), 6: ("no_answer", "C1 has no final answer; C2 not run"),
            7: ("truncated", "C1 hit the token budget; C2 not run"),
            8: ("no_answer", "C2 has no final answer"), 9: ("no_answer", "C2 has no final answer"), 10: ("truncated", "C2 hit the token budget")}
KEPT = 11  # a right, well-formed C1 and C2 beside the faults: the row DDF must keep


@pytest.fixture(scope="module")
def tagged(tmp_path_factory, demo_parquet, demo_rows) -> tuple[Path, list[dict]]:
    return tagged_source(tmp_path_factory.mktemp("tagged"), demo_rows, pq.read_schema(demo_parquet))


def synthesize(tmp: Path, tiny_models, source: Path, name: str, faults: dict, *extra: str) -> tuple[int, str, float]:
    """`casseat synthesize` with the fault engine as the teacher; (exit code, stderr, seconds)."""
    path = tmp / f"{name}.yaml"
    path.write_text(to_yaml(fault_config(tmp, tiny_models, source, name, faults, *extra)))
    t0 = time.time()
    code, err = casseat("synthesize", "--config", str(path), "--no-progress")
    return code, err, time.time() - t0


def markers(directory: Path, kind: str) -> int:
    return len(list(directory.glob(f"{kind}-*")))


@pytest.fixture(scope="module")
def cascaded(tiny_models, teacher_engine, tagged) -> list[dict]:
    """B7 and B8: one batch of 16 rows through the teacher stage (the engine actor's class, as
    Ray Data drives it) and DDF level 2, in this process, on the session's engine behind the
    fault engine. A stage that exited over a failed request would end this process."""
    rows = tagged[1][:16]
    cfg = Config.model_validate(dict(
        teacher=dict(model=str(tiny_models["teacher"]), engine=TINY_ENGINE, sampling=dict(max_tokens=96)),
        student=dict(model=str(tiny_models["student"]), engine=TINY_ENGINE), ddf_labeled=dict(max_student_tokens=1024)))
    rng = random.Random(0)
    reply = {tag(i): {"c1": {"text": text, "finish": finish}} for i, (text, finish) in C1_FAULTS.items()}
    for i, (text, finish) in C2_FAULTS.items():  # a right, well-formed C1 first, so that only C2 is at fault
        reply[tag(i)] = {"c1": {"text": scripted_targets(rows[i], rng)["c1"], "finish": "stop"}, "c2": {"text": text, "finish": finish}}
    right = scripted_targets(rows[KEPT], rng, wrong_rate=0)
    reply[tag(KEPT)] = {"c1": {"text": right["c1"], "finish": "stop"}, "c2": {"text": right["c2"], "finish": "stop"}}
    faults = {"error": [tag(i) for i in ERRORS], "reply": reply}
    engine = FaultEngine(teacher_engine.model, EngineConfig(**TINY_ENGINE, extra={"faults": faults}), inner=teacher_engine)
    stage = EngineStage(TeacherTask(cfg), engine.model, EngineConfig(**TINY_ENGINE), engine=engine)
    batch = pa.Table.from_pylist([dict(r, reject_stage=None, reject_reason=None, reject_detail=None) for r in rows], schema=ROW_SCHEMA)
    return LabelStage(cfg)(asyncio.run(stage(batch))).to_pylist()


@pytest.fixture(scope="module")
def erring(tmp_path_factory, tiny_models, tagged, ray_session) -> dict:
    """F4 and B10: a run whose engine fails to start once, then answers no request at all."""
    tmp = tmp_path_factory.mktemp("erring")
    (tmp / "markers").mkdir()
    code, err, seconds = synthesize(tmp, tiny_models, tagged[0], "erring", {"fail_init": "once", "no_engine": True, "marker_dir": str(tmp / "markers")})
    return {"code": code, "err": err, "seconds": seconds, "tmp": tmp, "markers": tmp / "markers",
            "stats": json.loads((tmp / "erring" / "stats.json").read_text())}


def test_b7_empty_unparsable_and_cut_off_replies_are_rejected_with_stage_and_reason(cascaded, figures):
    got = {i: (cascaded[i]["reject_stage"], cascaded[i]["reject_reason"], cascaded[i]["reject_detail"]) for i in EXPECTED}
    figures.update({f"{'C1' if i in C1_FAULTS else 'C2'} {['empty', 'unparsable', 'cut off'][(i - 5) % 3]}": f"{r} ({d})"
                    for i, (_, r, d) in got.items()})
    for i, (reason, detail) in EXPECTED.items():
        assert got[i] == ("ddf_labeled", reason, detail), (i, got[i])
    assert [cascaded[i]["c2_skipped"] for i in C1_FAULTS] == ["c1_no_answer", "c1_no_answer", "c1_truncated"]
    assert all(cascaded[i]["c2_texts"] for i in C2_FAULTS)  # C2 ran: the fault is C2's own
    # the right row beside the faults is kept; every other row went through untouched (what the
    # tiny teacher's own replies earn varies with the machine's numerics, so only its kind is checked)
    assert (cascaded[KEPT]["reject_stage"], cascaded[KEPT]["reject_reason"]) == (None, None), cascaded[KEPT]["reject_detail"]
    others = [r for i, r in enumerate(cascaded) if i not in EXPECTED and i not in ERRORS and i != KEPT]
    reasons = Counter(r["reject_reason"] for r in others)
    figures.update(neighbours=len(others), neighbour_outcomes=dict(reasons))
    assert not set(reasons) & set(ERROR_REASONS)
    assert all(r["c1_finish"] != ["error"] and r["c1_texts"][0] and r["c1_texts"][0] != GARBAGE for r in others)


def test_b8_requests_the_backend_fails_reject_those_rows_only(cascaded, erring, figures):
    errored = [cascaded[i] for i in ERRORS]
    figures.update(rows=len(cascaded), injected_errors=len(ERRORS), rejected_engine_error=sum(r["reject_reason"] == "engine_error" for r in cascaded),
                   run_failed_requests=erring["stats"]["stages"]["ddf_labeled"]["rejected"].get("engine_error", 0),
                   run_engines_built=markers(erring["markers"], "start"))
    assert all((r["reject_stage"], r["reject_reason"]) == ("ddf_labeled", "engine_error") for r in errored)
    assert all(r["reject_detail"] == f"C1: {INJECTED_ERROR}" for r in errored)  # the engine's own message
    assert sum(r["reject_reason"] == "engine_error" for r in cascaded) == len(ERRORS)
    assert all(r["c1_finish"] != ["error"] for i, r in enumerate(cascaded) if i not in ERRORS)  # the engine went on answering the rest
    # in a whole run, an engine failing every request is never restarted for it: one engine, built once
    stats = erring["stats"]
    assert stats["stages"]["ddf_labeled"]["rejected"]["engine_error"] == stats["teacher"]["rows"] == stats["stages"]["ddf_labeled"]["in"] > 0
    assert markers(erring["markers"], "start") == 1


def test_f4_an_engine_that_fails_to_start_once_is_replaced_and_one_that_always_fails_ends_the_run(
        erring, tmp_path, tiny_models, tagged, ray_session, figures):
    # once: Ray Data replaced the actor and the run went on to judge every row
    figures.update(once_start_attempts=markers(erring["markers"], "attempt"), once_engines_built=markers(erring["markers"], "start"),
                   once_rows_judged=erring["stats"]["stages"]["ddf_labeled"]["in"], once_seconds=round(erring["seconds"], 1))
    assert markers(erring["markers"], "attempt") == 2 and markers(erring["markers"], "start") == 1
    assert erring["stats"]["stages"]["ddf_labeled"]["in"] == len(tagged[1])
    # always: the run ends after ray.actor_init_retries replacements, with the start's own error
    (tmp_path / "markers").mkdir()
    code, err, seconds = synthesize(tmp_path, tiny_models, tagged[0], "never", {"fail_init": "always", "marker_dir": str(tmp_path / "markers")},
                                    "ray.actor_init_retries=1")
    attempts = markers(tmp_path / "markers", "attempt")
    figures.update(always_exit_code=code, always_start_attempts=attempts, always_seconds=round(seconds, 1))
    assert code == 1, err[-3000:]
    assert ("error: an actor could not start, 2 times in a row (ray.actor_init_retries=1): "
            "RuntimeError: injected: the engine failed to start (fail_init=always)") in err
    assert "Traceback" not in err and attempts == 2
    assert seconds < 120  # bounded: no engine was ever built, nothing waits on one


def test_b10_input_that_is_all_bad_or_errors_over_budget_never_end_as_a_success(erring, tmp_path, tiny_models, figures):
    # every row corrupt: stopped before any engine, nothing written that binds the corrected rerun
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"q": f"How many {i}?", "answer": "3", "image": "x.png"}) + "\n" for i in range(3)))
    cfg = load_config(CONFIG, [f"sources=[{{name: mine, format: generic, path: {data}}}]", "name=mine", f"output_dir={tmp_path}",
                               f"teacher.model={tiny_models['teacher']}", f"student.model={tiny_models['student']}",
                               f"ray.storage_path={tmp_path / 'ray'}"])
    (tmp_path / "mine.yaml").write_text(to_yaml(cfg))
    code, err = casseat("synthesize", "--config", str(tmp_path / "mine.yaml"), "--no-progress")
    figures.update(corrupt_rows=3, corrupt_exit_code=code)
    assert code == 2, err[-2000:]
    assert "no source row was accepted: all 3 rows were rejected" in err
    assert "missing_field: 3 (e.g. column 'question' not in row (columns: ['answer', 'image', 'q']))" in err
    assert not (tmp_path / "mine" / "work" / "fingerprint.json").exists()
    # every request fails (a backend that answers nothing): over synthesis.max_error_share
    stats, rows = erring["stats"], erring["stats"]["teacher"]["rows"]
    figures.update(erring_rows=rows, erring_exit_code=erring["code"], erring_failed=stats["failed"])
    assert erring["code"] == 1, erring["err"][-2000:]
    assert (f"synthesis failed: {rows} of {rows} questions failed with errors (engine_error {rows}), "
            "over synthesis.max_error_share=0.1") in erring["err"]
    # and what it wrote is not taken for a training set
    code, err = casseat("train", "--config", str(erring["tmp"] / "erring.yaml"))
    figures["train_on_it_exit_code"] = code
    assert code == 2 and "written by a synthesis that failed" in err and "pass --data to train on it anyway" in err


@pytest.mark.timeout(300)  # the failure this guards against restarts the engine for ever
@pytest.mark.parametrize("kills, reported", [("die", "injected: the engine died"), ("exit_on", PROCESS_DIED)],
                         ids=["engine", "actor-process"])
def test_f14_an_input_that_kills_the_engine_every_time_becomes_its_rows_reject_in_bounded_restarts(
        kills, reported, tmp_path, tiny_models, tagged, ray_session, figures):
    # Ray restarts a dead engine's actor and retries its batch: a row that kills every engine
    # would do so for ever. The run's crash ledger isolates it instead (no vLLM here: the fault
    # engine's deaths cost no engine start, and every other request fails as a backend's would).
    # ``die``: the engine dies and its actor reports the rows on it; ``exit_on``: the actor's
    # whole process ends without a word, and its restart reports the rows it had recorded.
    poison, n = 5, 12
    (tmp_path / "markers").mkdir()
    faults = {"no_engine": True, kills: [tag(poison)], "delay_s": 0.3, "marker_dir": str(tmp_path / "markers")}
    code, err, seconds = synthesize(tmp_path, tiny_models, tagged[0], "poison", faults, f"sources.0.max_samples={n}",
                                    "teacher.batch_size=4", "synthesis.max_error_share=1.0")
    rows = pq.read_table(tmp_path / "poison" / "work" / "parts", columns=["question", "reject_stage", "reject_reason", "reject_detail"]).to_pylist()
    crashed = [r for r in rows if r["reject_reason"] == "engine_crash"]
    deaths, starts = markers(tmp_path / "markers", "died"), markers(tmp_path / "markers", "attempt")
    figures[{"die": "engine_dies", "exit_on": "actor_process_ends"}[kills]] = dict(
        rows=n, engine_deaths=deaths, actor_starts=starts, seconds=round(seconds, 1), exit_code=code,
        rejected=dict(Counter(r["reject_reason"] for r in rows)))
    stats = json.loads((tmp_path / "poison" / "stats.json").read_text())
    # the run ends: with no engine behind the faults no question is kept, which it says
    assert code == 1 and "the SFT set is empty" in err, err[-3000:]
    assert stats["stages"]["teacher"] == {"in": n, "out": n - 1, "rejected": {"engine_crash": 1}}
    assert len(rows) == len({r["question"] for r in rows}) == n  # every row once, none lost
    assert [tag(poison) in r["question"] for r in crashed] == [True]
    assert crashed[0]["reject_stage"] == "teacher"
    assert f"the engine died 4 times with this row on it, the last time alone: {reported}" in crashed[0]["reject_detail"]
    # the rows beside it were on the first two dead engines, ran in halves of the batch, then
    # quarters, and got their answers (here: the backend's failures)
    assert all(r["reject_reason"] == "engine_error" for r in rows if r not in crashed)
    assert deaths == 4 and starts == 5  # two deaths, then one per halving of its batch of 4; a fifth engine finished the run
