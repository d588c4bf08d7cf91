"""Scoring throughput on MathVista's 24,000 published scoring cases, on one core.

Prints rows/s of the full ``score`` rule path (extract + normalize + judge, MathVista
protocol) next to ``normalize_answer`` alone, measured in the same run. Target: the rule
path above 20,000 rows/s.

    uv run --extra cpu python bench/bench_scoring.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from casseat_ray.answers import _edit_distance, normalize_answer, score

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mathvista" / "scoring_cases.jsonl"


def main(repeats: int = 3) -> None:
    rows = [json.loads(line) for line in DATA.open()]
    samples = [
        {"choices": r["choices"] or [], "answer": r["answer"], "answer_type": "multi_choice" if r["question_type"] == "multi_choice" else r["answer_type"], "precision": r["precision"]}
        for r in rows
    ]
    best = {"score": 0.0, "normalize": 0.0}
    for _ in range(repeats):
        _edit_distance.cache_clear()  # no warm cache carried between repeats
        t = time.perf_counter()
        for r, s in zip(rows, samples):
            score(r["extraction"], s, protocol="mathvista")
        best["score"] = max(best["score"], len(rows) / (time.perf_counter() - t))
        _edit_distance.cache_clear()
        t = time.perf_counter()
        for r in rows:
            normalize_answer(r["extraction"], r["choices"], r["answer_type"], r["precision"], r["question_type"])
        best["normalize"] = max(best["normalize"], len(rows) / (time.perf_counter() - t))
    print(f"rows: {len(rows)}")
    print(f"score (extract + normalize + judge): {best['score']:>10,.0f} rows/s")
    print(f"normalize_answer alone:              {best['normalize']:>10,.0f} rows/s")
    print(f"ratio score / normalize:             {best['score'] / best['normalize']:.2f}")
    print(f"target 20,000 rows/s: {'met' if best['score'] > 20_000 else 'NOT met'}")


if __name__ == "__main__":
    main()
