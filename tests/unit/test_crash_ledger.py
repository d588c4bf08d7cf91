"""The crash ledger's rule, without Ray: which rows run as usual, as suspects in shrinking
groups, or not at all after the engines they were on died (tests/reliability F14 runs it
through Ray Data and actor restarts)."""

from casseat_ray.inference.stage import ISOLATE_AFTER, PROCESS_DIED, CrashLedger, suspect_groups


def test_a_row_is_a_suspect_after_two_dead_engines_and_is_rejected_when_it_kills_the_engine_alone():
    ledger = CrashLedger()
    assert ISOLATE_AFTER == 2 and ledger.verdicts("teacher-1", ["a", "b"]) == {}
    ledger.died("teacher-1", ["a", "b", "c"], "boom")  # a preempted node, an OOM kill: nothing to say yet
    assert ledger.verdicts("teacher-1", ["a", "b", "c"]) == {}
    ledger.died("teacher-1", ["a", "b"], "boom")
    assert ledger.verdicts("teacher-1", ["a", "b", "c"]) == {"a": 1, "b": 1}
    ledger.died("teacher-1", ["a"], "EngineCore died")  # alone on the engine: the row is the cause
    assert ledger.verdicts("teacher-1", ["a", "b"]) == {
        "a": "the engine died 3 times with this row on it, the last time alone: EngineCore died", "b": 1}
    assert ledger.verdicts("teacher-2", ["a"]) == {}  # another stage (or run) has a page of its own


def test_dying_alone_before_isolation_proves_nothing_yet():
    ledger = CrashLedger()
    ledger.died("s", ["a"], "x")  # the last row of a run on an engine that died for its own reasons
    ledger.died("s", ["a"], "x")
    assert ledger.verdicts("s", ["a"]) == {"a": 1}


def test_suspect_groups_halve_with_each_level_down_to_one_row():
    rows = [f"r{i}" for i in range(16)]
    assert suspect_groups({1: rows}, 16, 256) == [rows[:8], rows[8:]]
    assert suspect_groups({2: rows[:8], 1: rows[8:]}, 16, 256) == [rows[8:], rows[:4], rows[4:8]]  # lower levels first
    assert suspect_groups({1: rows[:3]}, 16, 4) == [rows[:2], rows[2:3]]  # never more than half the engine's slots
    assert suspect_groups({9: rows[:2]}, 16, 256) == [rows[:1], rows[1:2]]


def test_a_poison_row_among_a_batch_in_flight_is_found_by_halving_and_the_others_run_many_at_a_time():
    # what the engine actors do with the ledger's verdicts, replayed: a batch of 16 is retried
    # after each death; its suspects run group by group; the group holding the poison row dies
    ledger, batch, poison = CrashLedger(), [f"r{i}" for i in range(16)], "r11"
    ledger.died("s", batch, "boom")  # two deaths with the whole batch on the engine
    ledger.died("s", batch, "boom")
    deaths, groups_run = 2, []
    while True:
        verdicts = ledger.verdicts("s", batch)
        if isinstance(verdicts[poison], str):
            break
        suspects = {}
        for k in batch:
            suspects.setdefault(verdicts[k], []).append(k)
        for group in suspect_groups(suspects, len(batch), 256):
            groups_run.append(len(group))
            if poison in group:
                ledger.died("s", group, "boom")
                deaths += 1
                break
    assert deaths == ISOLATE_AFTER + 4  # log2(16) halvings
    assert verdicts[poison].startswith("the engine died 6 times with this row on it, the last time alone")
    assert all(isinstance(verdicts[k], int) for k in batch if k != poison)  # the others run (and finish) next time
    # 13 rounds with the engine to themselves; one suspect at a time took 27 (11 before the poison
    # row, itself, then the 15 others of its retried batch), and 256 with a GPU engine's rows in flight
    assert groups_run == [8, 8, 8, 4, 8, 4, 2, 2, 8, 4, 2, 1, 1]


def test_a_process_that_ended_without_a_word_has_its_recorded_rows_counted_when_its_actor_restarts():
    ledger = CrashLedger()
    ledger.started("s", "actor-1")  # a first start: nothing to count
    ledger.work("s", "actor-1", ["a", "b"])
    ledger.work("s", "actor-2", ["c"])
    ledger.work("s", "actor-1", ["a", "b", "d"])  # each record replaces the one before
    ledger.started("s", "actor-1")  # Ray restarted actor-1 under the same id: its process had died
    ledger.started("s", "actor-1")  # a second restart with nothing recorded since counts nothing more
    ledger.work("s", "actor-1", ["a", "b"])
    ledger.started("s", "actor-1")
    assert ledger.verdicts("s", ["a", "b", "c", "d"]) == {"a": 1, "b": 1}
    ledger.work("s", "actor-1", ["a"])
    ledger.started("s", "actor-1")
    assert ledger.verdicts("s", ["a"]) == {"a": f"the engine died 3 times with this row on it, the last time alone: {PROCESS_DIED}"}


def test_an_engine_death_its_actor_reported_is_not_counted_again_at_the_restart():
    ledger = CrashLedger()
    ledger.work("s", "actor-1", ["a", "b"])
    ledger.died("s", ["a"], "EngineCore died", "actor-1")  # the rows on the engine, as the actor saw them
    ledger.started("s", "actor-1")
    ledger.work("s", "actor-1", ["a"])
    ledger.died("s", ["a"], "EngineCore died", "actor-1")
    ledger.started("s", "actor-1")
    assert ledger.verdicts("s", ["a", "b"]) == {"a": 1}
