"""Reliability cases, each named after its id (``test_b2_...``, ``test_f12_...``). Every case
records its figures through the ``figures`` fixture; they land in ``out/reliability/<ID>.json``
(or ``$CASSEAT_RELIABILITY_DIR``) with ``ok`` set from the test's outcome, and
``bench/bench_reliability.py`` prints them as one table."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

CONFIG = ROOT / "jobs" / "configs" / "tiny-cpu.yaml"


def figures_dir() -> Path:
    return Path(os.environ.get("CASSEAT_RELIABILITY_DIR", ROOT / "out" / "reliability"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call":
        item.casseat_outcome = report


_RECORDED: dict[str, dict] = {}  # case -> its record so far in this session


def _as_list(x) -> list:
    return x if isinstance(x, list) else [x]


@pytest.fixture
def figures(request):
    """A dict the test fills with its figures; written with the case id and outcome after it."""
    found = re.match(r"test_([bf]\d+)_", request.node.name)
    assert found, f"reliability tests are named after their case id: {request.node.name}"
    case = found.group(1).upper()
    data: dict = {}
    t0 = time.time()
    yield data
    report = getattr(request.node, "casseat_outcome", None)
    record = {"case": case, "test": request.node.nodeid, "ok": bool(report and report.passed),
              "seconds": round(time.time() - t0, 1), **data}
    if report is not None and report.failed:
        record["failure"] = str(report.longrepr).splitlines()[-1][:300]
    prev = _RECORDED.get(case)
    if prev is not None:  # a case with several tests: one record, ok only when all passed
        record = {**prev, **record, "ok": prev["ok"] and record["ok"], "test": [*_as_list(prev["test"]), record["test"]],
                  "seconds": round(prev["seconds"] + record["seconds"], 1)}
    _RECORDED[case] = record
    out = figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{case}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def casseat(*args: str) -> tuple[int, str]:
    """The command in this process (on the session's Ray): its exit code and what it wrote to stderr."""
    import contextlib
    import io

    from casseat_ray import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(list(args))
    return code, err.getvalue()


def run_config(tmp: Path, tiny_models, source: Path, name: str, *extra: str):
    """The tiny CPU config on ``source`` under ``tmp`` (teacher batches of 4); ``extra`` overrides last."""
    from casseat_ray.config import load_config

    return load_config(CONFIG, [f"sources=[{{name: demo, format: canonical, path: {source}}}]", f"name={name}", f"output_dir={tmp}",
                                f"ray.storage_path={tmp / 'ray'}", f"teacher.model={tiny_models['teacher']}",
                                f"student.model={tiny_models['student']}", "teacher.batch_size=4", *extra])


def fault_config(tmp: Path, tiny_models, source: Path, name: str, faults: dict, *extra: str):
    """``run_config`` with the fault engine of tests/reliability/fault_engine.py as the teacher,
    doing ``faults``."""
    cfg = run_config(tmp, tiny_models, source, name, "teacher.engine.backend=fault_engine:FaultEngine", *extra)
    engine = cfg.teacher.engine.model_copy(update={"extra": {**cfg.teacher.engine.extra, "faults": faults}})
    return cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"engine": engine})})


def tag(i: int) -> str:
    return f"(item {i})"


def tagged_item(text: str) -> int | None:
    """The number ``tag`` put in ``text``, if any."""
    found = re.search(r"\(item (\d+)\)", text)
    return int(found.group(1)) if found else None


def tagged_source(directory: Path, rows: list[dict], schema) -> tuple[Path, list[dict]]:
    """``rows`` with every question made its own (the demo repeats questions over different
    images), so that a fault, or a request log, can name one row by its question."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r, question=f"{r['question']} {tag(i)}") for i, r in enumerate(rows)]
    path = directory / "tagged.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path, rows
