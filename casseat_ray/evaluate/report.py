"""What a finished evaluation writes: items, report (JSON and Markdown), plots, console table.

Every number in the report is recomputed from ``items.parquet`` by the functions here, so a
reader can check any of them from that one file.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from casseat_ray.engines import RETRYABLE
from casseat_ray.evaluate.items import ITEM_SCHEMA, item_result
from casseat_ray.evaluate.metrics import bootstrap_ci, paired_bootstrap, reflection_cell, reflection_summary
from casseat_ray.parts import atomic_write_text, read_parts

BREAKDOWNS = ("answer_type", "subject", "level")
UPPER_BOUND = "upper bound (knows the ground truth): not a method result"


def _acc(rows: list[dict], b: int, seed: int) -> dict:
    values = [1.0 if r["correct"] else 0.0 for r in rows]
    acc = sum(values) / len(values) if values else float("nan")
    lo, hi = bootstrap_ci(values, b, seed)
    return {"n": len(values), "accuracy": acc, "ci95": [lo, hi]}


def compute(items: list[dict], b: int = 1000, seed: int = 0) -> dict:
    """The whole report from item rows (``ITEM_SCHEMA`` dicts)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in items:
        groups[(r["benchmark"], r["model"], r["mode"])].append(r)
    results, breakdowns, reflection, best_of_n = [], [], [], []
    for (bench, model, mode), rows in sorted(groups.items()):
        entry = {"benchmark": bench, "model": model, "mode": mode, **_acc(rows, b, seed),
                 "answer_share": sum(r["has_answer"] for r in rows) / len(rows),
                 "model_extracted_share": sum(r["extracted_by"] == "model" for r in rows) / len(rows),
                 "tokens_per_answer": sum(r["output_tokens"] for r in rows) / len(rows),
                 # items a request failed for (scored as wrong): reason -> count
                 "failures": dict(sorted(Counter(r["failure"] for r in rows if r.get("failure")).items()))}
        if mode == "cascade":
            entry["pass2_ran_share"] = sum(r["pass2_ran"] for r in rows) / len(rows)
            entry["verdict_share"] = sum(r["verdict"] is not None for r in rows) / len(rows)
            summary = reflection_summary([reflection_cell(r["pass1_correct"], r["verdict"], r["correct"]) for r in rows])
            reflection.append({"benchmark": bench, "model": model, **summary})
        if mode == "best_of_n":
            n_max = max(len(r["bon_correct_by_n"] or []) for r in rows)
            best_of_n.append({"benchmark": bench, "model": model,
                              "accuracy_by_n": [sum(r["bon_correct_by_n"][k] for r in rows) / len(rows) for k in range(n_max)],
                              "majority_vote": sum(r["majority_correct"] for r in rows) / len(rows),
                              "oracle_pass_at_n": sum(r["oracle_correct"] for r in rows) / len(rows), "oracle_note": UPPER_BOUND})
        results.append(entry)
        for field in BREAKDOWNS:
            by: dict[str, list[dict]] = defaultdict(list)
            for r in rows:
                if r[field] is not None:
                    by[r[field]].append(r)
            for value, sub in sorted(by.items()):
                breakdowns.append({"benchmark": bench, "model": model, "mode": mode, "by": field, "value": value, **_acc(sub, b, seed)})
    acc = {(e["benchmark"], e["model"], e["mode"]): e["accuracy"] for e in results}
    paired, gains, robustness = [], [], []
    for (bench, model, mode), rows in sorted(groups.items()):
        if model == "tuned" and (bench, "base", mode) in groups:
            base = {r["sample_id"]: r["correct"] for r in groups[(bench, "base", mode)]}
            common = sorted(set(base) & {r["sample_id"] for r in rows})
            tuned = {r["sample_id"]: r["correct"] for r in rows}
            paired.append({"benchmark": bench, "mode": mode, "from": "base", "to": "tuned",
                           **paired_bootstrap([float(base[s]) for s in common], [float(tuned[s]) for s in common], b, seed)})
        base_cot = acc.get((bench, "base", "cot"))
        if model != "base" and base_cot:
            gains.append({"benchmark": bench, "model": model, "mode": mode, "against": "base/cot",
                          "relative_gain": (acc[(bench, model, mode)] - base_cot) / base_cot})
        if mode == "cot" and (bench, model, "direct") in acc:
            robustness.append({"benchmark": bench, "model": model, "cot_minus_direct": acc[(bench, model, "cot")] - acc[(bench, model, "direct")]})
    return {"results": results, "breakdowns": breakdowns, "paired_differences": paired, "relative_gain": gains,
            "robustness": robustness, "reflection": reflection, "best_of_n": best_of_n,
            "retryable_items": sum(1 for r in items if r.get("failure") in RETRYABLE)}


def finalize(cfg, out_dir: Path, parts: Path, funnel: dict, timing: dict, retry: tuple[str, ...]) -> dict:
    """Items (each work row's last attempt), report and plots from the parts."""
    items = [item_result(r) for t in read_parts(parts, id_column="key", retry=retry) for r in t.to_pylist()]
    items.sort(key=lambda r: (r["benchmark"], r["model"], r["mode"], r["sample_id"]))
    tmp = out_dir / "items.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(items, schema=ITEM_SCHEMA), tmp)
    os.replace(tmp, out_dir / "items.parquet")
    rep = compute(items, cfg.evaluate.bootstrap, cfg.evaluate.seed)
    rep.update(name=cfg.name, funnel={"in": funnel["in"], "scored_items": funnel["accepted"], "rejected": funnel["rejected"]},
               wall_seconds=round(timing["wall_seconds"], 1))
    atomic_write_text(out_dir / "report.json", json.dumps(rep, indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", markdown(rep))
    plots(rep, out_dir)
    return rep


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}"


def table(rep: dict) -> list[str]:
    lines = ["| benchmark | model | mode | n | accuracy % | 95% CI |", "|---|---|---|---:|---:|---|"]
    for e in rep["results"]:
        lines.append(f"| {e['benchmark']} | {e['model']} | {e['mode']} | {e['n']} | {_pct(e['accuracy'])} | "
                     f"{_pct(e['ci95'][0])}-{_pct(e['ci95'][1])} |")
    return lines


def markdown(rep: dict) -> str:
    lines = [f"# Evaluation: {rep['name']}", "", f"{rep['funnel']['scored_items']} items scored of {rep['funnel']['in']} read"
             + (f"; not scored: {rep['funnel']['rejected']}" if rep["funnel"]["rejected"] else "") + ".", "", "## Accuracy", ""]
    lines += table(rep)
    failed = [e for e in rep["results"] if e.get("failures")]
    if failed:
        lines += ["", "Items a request failed for count as wrong: " + "; ".join(
            f"{e['benchmark']} {e['model']} {e['mode']}: " + ", ".join(f"{r} {n}" for r, n in e["failures"].items()) for e in failed)
            + (f". A rerun of the same command retries the {rep['retryable_items']} `engine_error` items." if rep.get("retryable_items") else ".")]
    if rep["paired_differences"]:
        lines += ["", "## Base -> tuned (paired bootstrap over the same items)", "", "| benchmark | mode | n | difference (points) | 95% CI |",
                  "|---|---|---:|---:|---|"]
        lines += [f"| {p['benchmark']} | {p['mode']} | {p['n']} | {_pct(p['diff'])} | {_pct(p['ci95'][0])} to {_pct(p['ci95'][1])} |"
                  for p in rep["paired_differences"]]
    if rep["relative_gain"]:
        lines += ["", "## Relative gain against the base student's CoT", ""]
        lines += [f"- {g['benchmark']} {g['model']} {g['mode']}: {_pct(g['relative_gain'])}%" for g in rep["relative_gain"]]
    if rep["robustness"]:
        lines += ["", "## Robustness (accuracy of CoT minus direct, points)", ""]
        lines += [f"- {r['benchmark']} {r['model']}: {_pct(r['cot_minus_direct'])}" for r in rep["robustness"]]
    for r in rep["reflection"]:
        lines += ["", f"## Self-evaluation in the cascade: {r['benchmark']} / {r['model']}", "",
                  f"Accept after a right pass 1: {_pct(r['accept_after_right'])}%; Refine after a wrong one: {_pct(r['refine_after_wrong'])}%; "
                  f"fixes (wrong -> right): {_pct(r['fixes'])}%; breaks (right -> wrong): {_pct(r['breaks'])}%; "
                  f"a verdict at all: {_pct(r['verdict_share'])}%.", "", "| pass 1 | verdict | pass 2 | items |", "|---|---|---|---:|"]
        lines += [f"| {k.replace('|', ' | ')} | {v} |" for k, v in r["matrix"].items()]
    for b in rep["best_of_n"]:
        lines += ["", f"## Best of N: {b['benchmark']} / {b['model']}", "",
                  "Accuracy by N (pick by P(Accept)): " + ", ".join(f"N={k + 1}: {_pct(a)}%" for k, a in enumerate(b["accuracy_by_n"])) + ".",
                  f"Majority vote: {_pct(b['majority_vote'])}%. Oracle pass@N: {_pct(b['oracle_pass_at_n'])}% ({b['oracle_note']})."]
    lines += ["", "## Other figures", "", "| benchmark | model | mode | parsable answer % | answers from the model extractor % | tokens per answer |",
              "|---|---|---|---:|---:|---:|"]
    lines += [f"| {e['benchmark']} | {e['model']} | {e['mode']} | {_pct(e['answer_share'])} | {_pct(e.get('model_extracted_share', 0.0))} | "
              f"{e['tokens_per_answer']:.1f} |" for e in rep["results"]]
    return "\n".join(lines) + "\n"


def plots(rep: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = rep["results"]
    labels = [f"{e['benchmark']}\n{e['mode']}" for e in res if e["model"] == res[0]["model"]] if res else []
    models = sorted({e["model"] for e in res})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) + 2), 4))
    width = 0.8 / max(len(models), 1)
    for j, m in enumerate(models):
        es = [e for e in res if e["model"] == m]
        xs = [i + j * width for i in range(len(es))]
        ys = [100 * e["accuracy"] for e in es]
        err = [[100 * (e["accuracy"] - e["ci95"][0]) for e in es], [100 * (e["ci95"][1] - e["accuracy"]) for e in es]]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=m)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(labels))], labels)
    ax.set_ylabel("accuracy % (95% bootstrap interval)")
    ax.set_title("accuracy by mode and model")
    ax.legend()
    _save(fig, out_dir / "accuracy.png")
    if rep["best_of_n"]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for b in rep["best_of_n"]:
            ax.plot(range(1, len(b["accuracy_by_n"]) + 1), [100 * a for a in b["accuracy_by_n"]], marker="o", label=f"{b['benchmark']}/{b['model']}")
        ax.set_xlabel("N (samples, pick by P(Accept))")
        ax.set_ylabel("accuracy %")
        ax.legend()
        _save(fig, out_dir / "best_of_n.png")
    if rep["reflection"]:
        fig, axes = plt.subplots(1, len(rep["reflection"]), figsize=(4 * len(rep["reflection"]), 3.2), squeeze=False)
        for ax, r in zip(axes[0], rep["reflection"]):
            rows, cols = ["right", "wrong"], ["Accept", "Refine", "none"]
            grid = [[sum(v for k, v in r["matrix"].items() if k.startswith(f"{a}|{c}|")) for c in cols] for a in rows]
            ax.imshow(grid, cmap="Blues")
            for i, a in enumerate(rows):
                for j, c in enumerate(cols):
                    ax.text(j, i, grid[i][j], ha="center", va="center")
            ax.set_xticks(range(3), cols)
            ax.set_yticks(range(2), [f"pass 1 {a}" for a in rows])
            ax.set_title(f"{r['benchmark']}/{r['model']}: verdicts")
        _save(fig, out_dir / "reflection.png")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


class _Bars:
    """One progress bar per benchmark x model x mode, fed from finished blocks."""

    def __init__(self, bars: dict):
        self.bars = bars

    def update(self, block: pa.Table) -> None:
        counts: dict[tuple, int] = defaultdict(int)
        for b, m, mode in zip(*(block[c].to_pylist() for c in ("benchmark", "eval_model", "eval_mode"))):
            counts[(b, m, mode)] += 1
        for k, n in counts.items():
            if k in self.bars:
                self.bars[k].update(n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def progress_bars(e, funnel: dict, enabled: bool, done: set[str]) -> _Bars:
    from tqdm import tqdm

    bars = {}
    for i, (b, m, mode) in enumerate((b.name, m, mode) for b in e.benchmarks for m in e.models for mode in e.modes):
        total = funnel["by_source"].get(b, {}).get("accepted", 0)
        already = sum(1 for k in done if k.startswith(f"{b}/{m}/{mode}/"))
        bars[(b, m, mode)] = tqdm(total=total, initial=already, desc=f"{b} {m} {mode}", unit="item", position=i, disable=not enabled,
                                  dynamic_ncols=True, leave=True)
    return _Bars(bars)


def console_table(rep: dict) -> str:
    return "\n".join(table(rep))
