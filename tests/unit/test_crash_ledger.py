"""The crash ledger's rule, without Ray: which rows run as usual, alone, or not at all after the
engines they were on died (tests/reliability F14 runs it through Ray Data and actor restarts)."""

from casseat_ray.inference.stage import ALONE, ISOLATE_AFTER, CrashLedger


def test_a_row_runs_alone_after_two_dead_engines_and_is_rejected_when_it_kills_the_engine_alone():
    ledger = CrashLedger()
    assert ISOLATE_AFTER == 2 and ledger.verdicts("teacher-1", ["a", "b"]) == {}
    ledger.died("teacher-1", ["a", "b", "c"], "boom")  # a preempted node, an OOM kill: nothing to say yet
    assert ledger.verdicts("teacher-1", ["a", "b", "c"]) == {}
    ledger.died("teacher-1", ["a", "b"], "boom")
    assert ledger.verdicts("teacher-1", ["a", "b", "c"]) == {"a": ALONE, "b": ALONE}
    ledger.died("teacher-1", ["a"], "EngineCore died")  # alone on the engine: the row is the cause
    assert ledger.verdicts("teacher-1", ["a", "b"]) == {
        "a": "the engine died 3 times with this row on it, the last time alone: EngineCore died", "b": ALONE}
    assert ledger.verdicts("teacher-2", ["a"]) == {}  # another stage (or run) has a page of its own


def test_dying_alone_before_isolation_proves_nothing_yet():
    ledger = CrashLedger()
    ledger.died("s", ["a"], "x")  # the last row of a run on an engine that died for its own reasons
    ledger.died("s", ["a"], "x")
    assert ledger.verdicts("s", ["a"]) == {"a": ALONE}
