"""bench/bench_reliability.py: every case listed, with its figures, or with why it has none."""

from __future__ import annotations

import importlib.util
import json

from tests.conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench_reliability", ROOT / "bench" / "bench_reliability.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_case_is_listed_with_its_figures_or_the_reason_it_has_none(tmp_path):
    bench = _bench()
    (tmp_path / "B1.json").write_text(json.dumps({"case": "B1", "ok": True, "rows": 200}))
    cases = bench.collect(tmp_path)
    assert list(cases) == list(bench.CASES)
    assert cases["B1"] == {"case": "B1", "ok": True, "rows": 200}
    assert cases["F7"]["ok"] is None and cases["F7"]["reason"].startswith(f"no figures in {tmp_path} yet")  # tested, not run
    assert all(c["ok"] is None for k, c in cases.items() if k != "B1")  # every other case has a test that has not run here
    table = bench.table(cases)
    assert "| B1 | 200 clean rows" in table and "| yes | rows=200 |" in table and "| F6 |" in table


def test_a_case_without_a_test_says_so(tmp_path):
    bench = _bench()
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_some.py").write_text("def test_f7_a_driver_killed():\n    pass\n")
    cases = bench.collect(tmp_path, tmp_path / "tests")
    assert cases["F7"]["reason"].startswith(f"no figures in {tmp_path} yet")
    assert cases["F6"] == {"ok": None, "reason": "no test of this case yet"}
    assert "| F6 |" in bench.table(cases)
