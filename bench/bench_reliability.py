"""The reliability suite's summary: every case of the suite (bad input B*, faults F*), with the
figures its test under tests/reliability/ wrote (``out/reliability/<ID>.json``) and whether it
held. A case with no figures is listed with ``ok: null`` and the reason, never left out.

    python bench/bench_reliability.py          # read the figures of the last test run
    python bench/bench_reliability.py --run    # run every case of tests/reliability first (about 40 minutes on 2 cores)

Prints a table, then one JSON object ``{"cases": {"B1": {..., "ok": true}, ...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "B1": "200 clean rows: conservation, no duplicates, identical reruns",
    "B2": "truncated / zero-byte / text-as-JPEG / missing / null images rejected at validation",
    "B3": "decompression bomb rejected without a full decode",
    "B5": "empty, non-UTF-8, overlong questions and prompts rejected before the engine",
    "B7": "empty, unparsable or truncated teacher text rejected with stage and reason",
    "B8": "per-request engine errors reject those rows only",
    "B9": "a hanging request times out as a retryable reject, retried on rerun (evaluation items too)",
    "B10": "all-corrupt input or engine errors over budget: non-zero exit, nothing published as success",
    "B11": "training: over-length, label-less and non-finite samples dropped or skipped with counters",
    "F1": "a teacher actor dies mid-run: job completes, nothing lost or duplicated",
    "F3": "the engine dies inside its actor: the actor is replaced, no retry storm",
    "F4": "actor init fails once / always: completes / fails in bounded time",
    "F6": "a worker node removed mid-run: job completes, nothing lost or duplicated",
    "F7": "the driver killed mid-run, then rerun: only unfinished samples processed",
    "F8": "small object store, large images, slow engine: no object-store or memory errors",
    "F10": "a training worker dies mid-run: resumes from the last checkpoint, same weights",
    "F11": "a training run killed, then rerun with the same name: resumes, same weights",
    "F12": "the newest checkpoint torn: the previous complete one is used, and the log says why",
    "F13": "a training worker dies on every attempt: fails after max_failures + 1 attempts",
    "F14": "an input that kills the engine (or its actor's whole process) every time: its row's engine_crash reject in bounded restarts, the rest go on",
}


def figures_dir() -> Path:
    return Path(os.environ.get("CASSEAT_RELIABILITY_DIR", ROOT / "out" / "reliability"))


def collect(directory: Path, tests_dir: Path = ROOT / "tests" / "reliability") -> dict[str, dict]:
    """Each case's record from ``directory``, or why it has none (its test in ``tests_dir`` not run, or no test)."""
    tests = "".join(p.read_text() for p in tests_dir.glob("test_*.py"))
    cases = {}
    for case in CASES:
        path = directory / f"{case}.json"
        if path.exists():
            cases[case] = json.loads(path.read_text())
        elif f"def test_{case.lower()}_" in tests:
            cases[case] = {"ok": None, "reason": f"no figures in {directory} yet: run its test (an extended one with -m extended), or --run"}
        else:
            cases[case] = {"ok": None, "reason": "no test of this case yet"}
    return cases


def table(cases: dict[str, dict]) -> str:
    lines = ["| case | what | ok | figures |", "|---|---|---|---|"]
    for case, rec in cases.items():
        ok = {True: "yes", False: "NO", None: "-"}[rec["ok"]]
        shown = {k: v for k, v in rec.items() if k not in ("case", "test", "ok")}
        text = rec["reason"] if "reason" in rec else ", ".join(f"{k}={v}" for k, v in shown.items())
        lines.append(f"| {case} | {CASES[case]} | {ok} | {text} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="store_true", help="run tests/reliability first")
    args = p.parse_args()
    if args.run:
        # every case, the extended ones (left out of the default test run) included
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "extended or not extended", "tests/reliability"], cwd=ROOT, check=False)
    cases = collect(figures_dir())
    print(table(cases))
    print(json.dumps({"cases": cases}))
    return 1 if any(rec["ok"] is False for rec in cases.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
