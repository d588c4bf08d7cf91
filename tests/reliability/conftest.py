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


def figures_dir() -> Path:
    return Path(os.environ.get("CASSEAT_RELIABILITY_DIR", ROOT / "out" / "reliability"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call":
        item.casseat_outcome = report


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
    out = figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{case}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
