"""What a finished synthesis run writes: SFT set, rejects, stats, dataset card, chart, exports.

Everything here reads the parts (teacher outputs and labels per row) and the source funnel;
it is cheap and deterministic, so it is simply redone whenever a run completes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from casseat_ray.config import Config
from casseat_ray.data import columns, is_written_reject
from casseat_ray.engines import ENGINE_CRASH, ENGINE_ERROR, RETRYABLE
from casseat_ray.inference.turns import run_prompts
from casseat_ray.parts import atomic_write_text, read_parts
from casseat_ray.rows import REJECT_SCHEMA
from casseat_ray.synth.mix import cot_sample, left_out, mix_questions, seat_sample, self_eval_sample

SFT_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("sample_id", pa.string()),
    pa.field("source_id", pa.string()),  # the source's own id of the question
    pa.field("kind", pa.string()),
    pa.field("messages", pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())]))),
    pa.field("images", pa.list_(pa.binary())),
    pa.field("loss_on", pa.string()),
    pa.field("source", pa.string()),
    pa.field("answer", pa.string()),
    pa.field("answer_type", pa.string()),
    pa.field("choices", pa.list_(pa.string())),  # with answer and precision: what scores an answer to the question
    pa.field("precision", pa.int32()),
    pa.field("verdict", pa.string()),
    pa.field("teacher_model", pa.string()),
    pa.field("teacher_sampling", pa.string()),
    pa.field("prompt_shas", pa.list_(pa.string())),
    pa.field("responses", pa.list_(pa.string())),  # every C1 sample of the question (AFT)
    pa.field("responses_correct", pa.list_(pa.bool_())),
    pa.field("responses_rank", pa.list_(pa.int64())),  # 0 right, 1 wrong answer, 2 no usable answer
])
LIGHT = ["sample_id", "source", "answer_type", "reject_stage", "reject_reason", "kinds", "too_long_kinds", "c2_skipped", "verdict",
         "c1_prompt_tokens", "c1_output_tokens", "c2_prompt_tokens", "c2_output_tokens", "seconds"]


def sft_rows(row: dict, kinds: set[str], ps: dict) -> list[dict]:
    """The SFT samples of one kept row, for the kinds the mix chose (pure)."""
    out = []
    cot = row["c1_texts"][0]
    if "self_eval" in kinds:
        out.append(self_eval_sample(row, ps["c1"], cot, ps["c2"], row["c2_texts"][0]))
    if "cot" in kinds:
        out.append(cot_sample(row, ps["c1"], cot))
    if "seat" in kinds:
        out.append(seat_sample(row, ps["seat"], cot))
    for s in out:
        shas = [row["c1_prompt_sha"]] + ([row["c2_prompt_sha"]] if s["kind"] == "self_eval" else [])
        s.update(answer_type=row["answer_type"], verdict=row.get("verdict"), teacher_model=row["model"],
                 teacher_sampling=row["sampling"], prompt_shas=shas,
                 responses=row["c1_texts"], responses_correct=row["c1_correct"], responses_rank=row["c1_rank"])
    return out


def choose(light: list[dict], cfg: Config) -> tuple[dict[str, set[str]], dict[str, tuple[str, list[str]]], int]:
    """sample_id -> the kinds that go into the SFT set (``mix_questions``: per kept question,
    by the configured ratio and cap); what it leaves out (``left_out``); the number of
    candidate samples."""
    questions = [r for r in light if r["reject_reason"] is None and r["kinds"]]
    m = cfg.mix
    ratio = m.self_eval_per_cot if cfg.synthesis.mode == "cascade" else 1.0  # one sample per question otherwise
    chosen = mix_questions(questions, ratio, m.max_samples, m.seed, m.keep_all_refine)
    return chosen, left_out(questions, chosen), sum(len(q["kinds"]) for q in questions)


def verdict_counts(light: list[dict], chosen: dict[str, set[str]] | None = None) -> dict[str, int]:
    """Self-evaluation samples by verdict: among the candidates, or among ``chosen``."""
    counts: Counter = Counter()
    for r in light:
        if r["reject_reason"] is None and "self_eval" in (r["kinds"] or []):
            if chosen is None or "self_eval" in chosen.get(r["sample_id"], ()):
                counts[r["verdict"]] += 1
    return {"accept": counts["Accept"], "refine": counts["Refine"]}


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def finalize(cfg: Config, source, source_funnel: dict, parts: Path, timing: dict) -> dict:
    run_dir = cfg.run_dir
    light = [r for t in read_parts(parts, LIGHT, retry=RETRY_REASONS) for r in t.to_pylist()]
    chosen, dropped, candidates = choose(light, cfg)
    ps = run_prompts(cfg)

    # One pass over the parts: the chosen rows become SFT shards, the rejected ones reject
    # rows; only the chosen rows (with their image bytes) become Python objects.
    tmp = run_dir / "sft.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    by_kind: Counter = Counter()
    by_source: Counter = Counter()
    shard = 0
    wanted = pa.array(sorted(chosen), pa.string())
    mixed_out = pa.array(sorted(dropped), pa.string())
    rejects = [  # the source's own rejects (no image bytes)
        r for b in columns(source, list(REJECT_SCHEMA.names))
        for r in b.to_pylist() if is_written_reject(r["reject_reason"], cfg.ddf_source.write_over_budget)
    ]
    for table in read_parts(parts, retry=RETRY_REASONS):
        rejected = table.select(list(REJECT_SCHEMA.names)).filter(pc.is_valid(table["reject_reason"]))
        rejects += rejected.to_pylist()
        for r in table.filter(pc.is_in(table["sample_id"], value_set=mixed_out)).select(list(REJECT_SCHEMA.names)).to_pylist():
            reason, kinds = dropped[r["sample_id"]]
            rejects += [dict(r, reject_stage="mix", reject_reason=reason, reject_detail=f"{k} sample left out by the mix") for k in kinds]
        rows = table.filter(pc.is_in(table["sample_id"], value_set=wanted)).to_pylist()
        samples = [s for r in rows for s in sft_rows(r, chosen[r["sample_id"]], ps)]
        if samples:
            pq.write_table(pa.Table.from_pylist(samples, schema=SFT_SCHEMA), tmp / f"sft-{shard:05d}.parquet")
            shard += 1
            by_kind.update(s["kind"] for s in samples)
            by_source.update(s["source"] for s in samples)
    _replace_dir(tmp, run_dir / "sft")

    tmp_rej = run_dir / "rejects.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), tmp_rej)
    os.replace(tmp_rej, run_dir / "rejects.parquet")

    stats = compute_stats(cfg, source_funnel, light, candidates, sum(by_kind.values()), dropped, timing)
    stats["self_eval_verdicts"] = {"before_mix": verdict_counts(light), "after_mix": verdict_counts(light, chosen)}
    stats["sft"] = {"samples": sum(by_kind.values()), "by_kind": dict(sorted(by_kind.items())), "by_source": dict(sorted(by_source.items())), "shards": shard}
    stats["failed"] = failure(stats, cfg.synthesis.max_error_share)
    atomic_write_text(run_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    atomic_write_text(run_dir / "README.md", dataset_card(cfg, stats, ps))
    funnel_chart(stats, run_dir / "funnel.png")
    export_llamafactory(run_dir / "sft", run_dir / "export" / "llamafactory", cfg.name)
    export_swift(run_dir / "sft", run_dir / "export" / "swift")
    return stats


ERROR_REASONS = (ENGINE_ERROR, ENGINE_CRASH, "stage_error", "label_error", "judge_error")  # failures, not the teacher's answers
# Failures of the moment (an engine error, a request that timed out), not of the row: a rerun
# of the same command tries these rows again. A bug on one row (stage_error, label_error)
# would fail the same way again.
RETRY_REASONS = (*RETRYABLE, "judge_error")


def failure(stats: dict, max_error_share: float) -> str | None:
    """Why a finished synthesis is not a success (None: it is): more questions lost to errors
    than ``max_error_share`` allows, or an empty SFT set. The outputs are still written, to be
    looked at; the command exits non-zero."""
    errors = {r: n for st in stats["stages"].values() for r, n in st["rejected"].items() if r in ERROR_REASONS}
    asked = stats["stages"]["ddf_model"]["in"]  # every question the engine stages were given
    if asked and sum(errors.values()) / asked > max_error_share:
        return (f"{sum(errors.values())} of {asked} questions failed with errors ({', '.join(f'{r} {n}' for r, n in sorted(errors.items()))}), "
                f"over synthesis.max_error_share={max_error_share}; see rejects.parquet for the messages")
    if stats["sft"]["samples"] == 0:
        reasons: Counter = Counter()
        for st in stats["stages"].values():
            reasons.update(st["rejected"])
        top = ", ".join(f"{r} {n}" for r, n in reasons.most_common(5))
        return f"the SFT set is empty: no question was kept (rejects: {top or 'none'})"
    return None


def compute_stats(cfg: Config, source_funnel: dict, light: list[dict], candidates: int, chosen: int,
                  dropped: dict[str, tuple[str, list[str]]], timing: dict) -> dict:
    """The funnel: per stage ``{"in", "out", "rejected": {reason: n}}``, plus teacher figures."""
    stages = dict(source_funnel["stages"])
    n = source_funnel["accepted"]
    # "teacher": the rows its engine stage rejects itself (a task that raised, engine_crash)
    for stage in ("ddf_model", "teacher", "ddf_labeled") + (("ddf_judge",) if cfg.ddf_labeled.judge.enabled else ()):
        rejected = Counter(r["reject_reason"] for r in light if r["reject_stage"] == stage)
        stages[stage] = {"in": n, "out": n - sum(rejected.values()), "rejected": dict(sorted(rejected.items()))}
        n = stages[stage]["out"]
    left: Counter = Counter()
    for reason, kinds in dropped.values():
        left[reason] += len(kinds)
    stages["mix"] = {"in": candidates, "out": chosen, "rejected": dict(sorted(left.items())), "unit": "samples"}
    taught = [r for r in light if r["c1_output_tokens"] is not None]
    tokens_in = sum((r["c1_prompt_tokens"] or 0) + sum(r["c2_prompt_tokens"] or []) for r in taught)
    tokens_out = sum(sum(r["c1_output_tokens"] or []) + sum(r["c2_output_tokens"] or []) for r in taught)
    skipped = Counter(r["c2_skipped"] for r in taught if r["c2_skipped"])
    too_long = Counter(k for r in light for k in r["too_long_kinds"] or [])
    loop = timing["loop_seconds"]
    return {
        "name": cfg.name,
        "mode": cfg.synthesis.mode,
        "stages": stages,
        "teacher": {
            "model": cfg.teacher.model,
            "rows": len(taught),
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "row_seconds": round(sum(r["seconds"] or 0 for r in taught), 3),  # summed per-row latencies (rows overlap)
            "c2_skipped": dict(sorted(skipped.items())),
        },
        "too_long_samples": dict(sorted(too_long.items())),  # samples over the student budget, dropped alone
        "rows_retryable": sum(r["reject_reason"] in RETRY_REASONS for r in light),  # a rerun retries these
        "rows_processed": timing["processed_rows"],
        "rows_resumed": timing["resumed_rows"],
        "rows_per_s": round(timing["processed_rows"] / loop, 3) if loop > 0 and timing["processed_rows"] else None,
        "loop_seconds": round(loop, 3),
        "wall_seconds": round(timing["wall_seconds"], 3),
    }


# ---------------------------------------------------------------- dataset card and chart
def dataset_card(cfg: Config, stats: dict, ps: dict) -> str:
    lines = [
        f"# {cfg.name}: a Cas-SEAT supervised fine-tuning set",
        "",
        f"Built by casseat_ray in `{cfg.synthesis.mode}` mode from {len(cfg.sources)} source(s) with teacher `{cfg.teacher.model}`.",
        f"{stats['sft']['samples']} samples: " + ", ".join(f"{k} {v}" for k, v in stats["sft"]["by_kind"].items()) + ".",
        "",
        "## Sources",
        "",
        "| source | format | path | license |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s.name} | {s.format} | `{s.path}` | {s.license or 'unknown'} |" for s in cfg.sources]
    lines += ["", "## Funnel", "", "| stage | in | out | rejected by reason |", "|---|---:|---:|---|"]
    for name, st in stats["stages"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in st["rejected"].items()) or "-"
        lines.append(f"| {name} | {st['in']} | {st['out']} | {reasons} |")
    f, mf = cfg.ddf_labeled, cfg.ddf_source.model_filter
    v = stats["self_eval_verdicts"]
    lines += [
        "",
        "## Filters",
        "",
        f"- Source rules: dedup={cfg.ddf_source.dedup}, question length {cfg.ddf_source.min_question_chars}-{cfg.ddf_source.max_question_chars} chars, "
        f"free-form answers up to {cfg.ddf_source.max_answer_chars} chars, per-source caps {cfg.ddf_source.per_source_cap or 'none'}, budget {cfg.ddf_source.budget}.",
        f"- Student model filter (too_easy): {'on' if mf.enabled else 'off'}.",
        f"- Teacher outputs: drop truncated={f.drop_truncated}, require answer={f.require_answer}, verdict={f.require_verdict}, "
        f"correct={f.require_correct}, consistent={f.require_consistent}; leakage phrases {f.leakage_phrases}; "
        f"at most {f.max_student_tokens} student tokens (image tokens included, never truncated).",
        "- Model judge: " + (f"`{cfg.judge_model}` ({'constrained verdict' if f.judge.constrained else 'free-form, last Verdict: line'}; "
                              f"no verdict: {f.judge.on_no_verdict})." if f.judge.enabled else "off."),
        "- A kept question gives a CoT sample only when its C1 answer is right (C1 alone is then a correct worked "
        "solution); a Refine question gives its self-evaluation sample only, whose C2 turn carries the correction.",
        f"- Mix (per kept question): {cfg.mix.self_eval_per_cot} self-evaluation samples per CoT sample, all Refine samples kept: "
        f"{cfg.mix.keep_all_refine}, cap {cfg.mix.max_samples}, seed {cfg.mix.seed}.",
        f"- Self-evaluation verdicts before the mix: Accept {v['before_mix']['accept']}, Refine {v['before_mix']['refine']}; "
        f"in the SFT set: Accept {v['after_mix']['accept']}, Refine {v['after_mix']['refine']}.",
        "",
        "## Prompts (template sha256, first 12 hex)",
        "",
    ]
    lines += [f"- {k}: `{p.sha}`" for k, p in ps.items()]
    t = stats["teacher"]
    lines += [
        "",
        "## Teacher",
        "",
        f"{t['rows']} questions, {t['tokens_in']} prompt tokens, {t['tokens_out']} generated tokens; "
        f"sampling `{cfg.teacher.sampling.model_dump(mode='json')}`; hidden ground-truth hint in C2: {cfg.synthesis.hint_ground_truth} "
        "(the student's prompts never contain the ground truth).",
        "",
        "## Files",
        "",
        "- `sft/*.parquet`: id, sample_id, source_id (the source's own id of the question), kind (cot | self_eval | seat), messages (`<image>` marks the image), images (bytes), "
        "loss_on (all | last), answer, answer_type, choices and precision (what scores an answer to the question), provenance (teacher, sampling, prompt hashes), responses, responses_correct and responses_rank (every C1 sample with its feedback, for AFT).",
        "- `rejects.parquet`: every dropped row with its sample_id and source_id, stage, reason and detail.",
        "- `stats.json`, `funnel.png`, `config.yaml` (the resolved config).",
        "- `export/llamafactory`, `export/swift`: the same samples for LLaMA-Factory and ms-swift.",
        "",
    ]
    return "\n".join(lines)


def funnel_chart(stats: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [(k, v) for k, v in stats["stages"].items() if k != "mix"]
    names = [k for k, _ in stages] + ["sft samples"]
    values = [v["out"] for _, v in stages] + [stats["sft"]["samples"]]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    bars = ax.barh(names[::-1], values[::-1], color="#4c72b0")
    ax.bar_label(bars, padding=3)
    ax.set_xlabel("rows left after the stage")
    ax.set_title(f"{stats['name']}: synthesis funnel ({stats['stages']['read']['in']} rows in)")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------- exporters
def _iter_sft(sft_dir: Path):
    for f in sorted(sft_dir.glob("*.parquet")):
        yield from pq.read_table(f).to_pylist()


def _save_images(row: dict, images_dir: Path) -> list[str]:
    import io

    from PIL import Image

    names = []
    for i, data in enumerate(row["images"]):
        fmt = (Image.open(io.BytesIO(data)).format or "PNG").lower()
        name = f"{row['sample_id']}-{i}.{'jpg' if fmt == 'jpeg' else fmt}"
        if not (images_dir / name).exists():
            (images_dir / name).write_bytes(data)
        names.append(name)
    return names


def export_llamafactory(sft_dir: Path, out: Path, name: str) -> Path:
    """sharegpt-style JSON + ``dataset_info.json``. Self-evaluation samples go to their own
    dataset, to be trained with ``mask_history: true`` (loss on the last turn only)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    groups: dict[str, list] = {"main": [], "self_eval": []}
    for row in _iter_sft(sft_dir):
        images = [f"images/{n}" for n in _save_images(row, tmp / "images")]
        groups["self_eval" if row["loss_on"] == "last" else "main"].append(
            {"id": row["id"], "source_id": row["source_id"], "messages": row["messages"], "images": images})  # ids ride along, unmapped
    info = {}
    for group, items in groups.items():
        if not items:
            continue
        ds_name = name if group == "main" else f"{name}_self_eval"
        (tmp / f"{ds_name}.json").write_text(json.dumps(items, ensure_ascii=False, indent=1))
        info[ds_name] = {
            "file_name": f"{ds_name}.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        }
    (tmp / "dataset_info.json").write_text(json.dumps(info, indent=2))
    _replace_dir(tmp, out)
    return out


def export_swift(sft_dir: Path, out: Path) -> Path:
    """ms-swift JSONL: ``messages`` (``<image>`` in the text) and ``images`` paths relative to
    the export folder (it can be moved; run ms-swift from it); an assistant turn that carries no
    loss says ``"loss": false``."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    with open(tmp / "train.jsonl", "w", encoding="utf-8") as fh:
        for row in _iter_sft(sft_dir):
            messages = [dict(m) for m in row["messages"]]
            if row["loss_on"] == "last":
                assistants = [m for m in messages if m["role"] == "assistant"]
                for m in assistants[:-1]:
                    m["loss"] = False
            images = [f"images/{n}" for n in _save_images(row, tmp / "images")]
            fh.write(json.dumps({"id": row["id"], "source_id": row["source_id"], "messages": messages, "images": images}, ensure_ascii=False) + "\n")
    _replace_dir(tmp, out)
    return out
