"""Source loading on Ray Data vs a plain loop, side by side in one run.

Both sides read the real MATH-V testmini annotations (replicated ``--copies`` times with
distinct questions so there is enough work), read and validate every image (header checks,
decode, RGB), apply the DDF level-1 rules and drop duplicates, using the same pure
functions. The plain loop is pyarrow's JSON reader + a for loop in one process; the Ray path
is ``casseat_ray.data.load`` with 1 and then 2 CPUs. Prints rows/s and the ratios.

    uv run --extra cpu python bench/bench_data.py --copies 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

MATHV = Path(__file__).resolve().parents[2] / "shared" / "data" / "math-v"


def make_input(folder: Path, copies: int) -> Path:
    items = [json.loads(line) for line in (MATHV / "testmini.jsonl").open()]
    out = folder / "mathv_x.jsonl"
    with out.open("w") as f:
        for c in range(copies):
            for it in items:
                f.write(json.dumps(dict(it, question=f"{it['question']} (copy {c})", image=str(MATHV / it["image"]))) + "\n")
    return out


def plain_loop(path: Path, cfg) -> tuple[int, float]:
    import pyarrow.json as pj

    from casseat_ray.data import dedup_key, rule_reject
    from casseat_ray.sources import item_to_row

    t = time.perf_counter()
    source = cfg.sources[0]
    seen, accepted = set(), 0
    for item in pj.read_json(path).to_pylist():
        row = item_to_row(item, source, path.parent, cfg.images)
        if row["reject_reason"] is None and rule_reject(row, cfg.ddf_source) is None:
            key = dedup_key(row)
            if not cfg.ddf_source.dedup or key not in seen:
                seen.add(key)
                accepted += 1
    return accepted, time.perf_counter() - t


def ray_path(path: Path, cfg, cpus: int) -> tuple[int, float]:
    import ray

    from casseat_ray import data

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        data.funnel(data.load(cfg))  # warm-up: worker start-up stays out of the timing
        t = time.perf_counter()
        f = data.funnel(data.load(cfg))
        return f["accepted"], time.perf_counter() - t
    finally:
        ray.shutdown()


def main() -> None:
    from casseat_ray.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("overrides", nargs="*", help="config overrides for both sides, e.g. ddf_source.dedup=false")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_input(Path(tmp), args.copies)
        cfg = load_config(None, [f"sources=[{{name: mathv, format: generic, path: {path}, fields: {{choices: options}}}}]", *args.overrides])
        n_in = 304 * args.copies
        n_plain, t_plain = plain_loop(path, cfg)
        n1, t1 = ray_path(path, cfg, 1)
        n2, t2 = ray_path(path, cfg, 2)
    assert n_plain == n1 == n2, (n_plain, n1, n2)
    rate = lambda t: n_in / t  # noqa: E731
    print(f"rows in: {n_in}, accepted: {n_plain}")
    print(f"plain loop (1 process): {rate(t_plain):8.1f} rows/s  ({t_plain:.1f} s)")
    print(f"Ray Data, 1 CPU:        {rate(t1):8.1f} rows/s  ({t1:.1f} s)   ratio vs plain {t_plain / t1:.2f} (goal >= 0.8)")
    print(f"Ray Data, 2 CPUs:       {rate(t2):8.1f} rows/s  ({t2:.1f} s)   ratio vs plain {t_plain / t2:.2f} (goal > 1)")


if __name__ == "__main__":
    main()
