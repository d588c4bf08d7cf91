"""Source data on Ray Data: read -> validate -> DDF level-1 rules -> dedup -> caps/budget.

Every stage maps rows to rows; a row that fails carries ``reject_stage / reject_reason /
reject_detail`` from then on and later stages pass it through untouched, so
``in == out + rejected`` holds per stage and nothing is silently lost. Files are read by Ray
workers, never by the driver; rules are pure functions over plain dicts.

Stages and their reasons
- read: not_utf8, bad_json
- validate: missing_image, empty_image, not_an_image, image_too_large, image_too_small,
  extreme_aspect_ratio, corrupt_image, bad_choices, bad_answer_type, missing_field, malformed_row
- ddf_rules: empty_question, question_too_long, empty_answer, unverifiable_answer
- dedup: duplicate
- sample: over_source_cap, over_budget
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa

from casseat_ray.config import Config, DDFSourceConfig, ImageConfig, SourceConfig
from casseat_ray.samples import SCHEMA, normalize_question
from casseat_ray.sources import REJECT_FIELDS, item_to_row

STAGES = ("read", "validate", "ddf_rules", "dedup", "sample")
ROW_SCHEMA = SCHEMA.append(pa.field("reject_stage", pa.string())).append(pa.field("reject_reason", pa.string())).append(pa.field("reject_detail", pa.string()))
ROWS_PER_BLOCK = 64


# ---------------------------------------------------------------- reading (runs in Ray workers)
def explode_jsonl(file_row: dict) -> list[dict]:
    """One item per line; a line that is not UTF-8 or not JSON becomes a read error."""
    out = []
    for n, line in enumerate(file_row["bytes"].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append({"item": None, "error": f"not_utf8: line {n}: {e}", "line": n})
            continue
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            out.append({"item": None, "error": f"bad_json: line {n}: {e}", "line": n})
            continue
        out.append({"item": text, "error": None, "line": n})
    return out


def explode_json(file_row: dict) -> list[dict]:
    """A JSON list of items, or an object keyed by id (MathVista's pid), one item each."""
    try:
        doc = json.loads(file_row["bytes"].decode("utf-8"))
    except UnicodeDecodeError as e:
        return [{"item": None, "error": f"not_utf8: {e}", "line": 0}]
    except json.JSONDecodeError as e:
        return [{"item": None, "error": f"bad_json: {e}", "line": 0}]
    if isinstance(doc, dict):
        items = [{"pid": k, **v} if isinstance(v, dict) else {"pid": k, "value": v} for k, v in doc.items()]
    elif isinstance(doc, list):
        items = doc
    else:
        return [{"item": None, "error": "bad_json: top level is neither a list nor an object", "line": 0}]
    return [{"item": json.dumps(it, ensure_ascii=False), "error": None, "line": i + 1} for i, it in enumerate(items)]


def _file_kind(path: Path, fmt: str) -> str:
    if fmt in ("mathv",):
        return "jsonl"
    if fmt in ("mathvista", "mathv360k"):
        return "json"
    if fmt == "canonical":
        return "parquet"
    name = path.name.lower()
    for ext, kind in ((".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet"), (".csv", "csv"), (".arrow", "arrow")):
        if name.endswith(ext):
            return kind
    if path.is_dir():
        files = {f.suffix.lower() for f in path.iterdir() if f.is_file()}
        return "arrow" if ".arrow" in files and ".parquet" not in files else "parquet"
    raise ValueError(f"cannot tell the file type of {path}; use .jsonl, .json, .parquet, .csv or .arrow")


def explode_arrow(file_row: dict) -> list[dict]:
    """Arrow files written by Hugging Face ``datasets.save_to_disk`` (IPC stream format)."""
    import pyarrow.ipc as ipc

    buf = pa.py_buffer(file_row["bytes"])
    try:
        table = ipc.open_stream(buf).read_all()
    except pa.ArrowInvalid:
        table = ipc.open_file(buf).read_all()
    return [{"item": None, "error": None, "line": i + 1, "row": r} for i, r in enumerate(table.to_pylist())]


def read_items(source: SourceConfig):
    """A Ray Dataset with one row per source item: ``item`` (JSON text) or the table's own columns."""
    import ray

    path = Path(source.path)
    kind = _file_kind(path, source.format)
    if kind in ("jsonl", "json"):
        files = ray.data.read_binary_files(str(path), file_extensions=None)
        return files.flat_map(explode_jsonl if kind == "jsonl" else explode_json).repartition(target_num_rows_per_block=ROWS_PER_BLOCK)
    if kind == "arrow":
        files = ray.data.read_binary_files(str(path), file_extensions=["arrow"])
        return files.flat_map(explode_arrow).repartition(target_num_rows_per_block=ROWS_PER_BLOCK)
    if kind == "csv":
        return ray.data.read_csv(str(path)).repartition(target_num_rows_per_block=ROWS_PER_BLOCK)
    return ray.data.read_parquet(str(path)).repartition(target_num_rows_per_block=ROWS_PER_BLOCK)


def _image_root(source: SourceConfig) -> Path:
    if source.image_root is not None:
        return Path(source.image_root)
    path = Path(source.path)
    return path if path.is_dir() else path.parent


def validate_batch(batch: pa.Table, source: SourceConfig, images: ImageConfig) -> pa.Table:
    """read + validate stages for one batch: items in, canonical or reject rows out."""
    root = _image_root(source)
    rows = []
    for rec in batch.to_pylist():
        if "item" in rec and "error" in rec and "line" in rec:  # a JSON/JSONL/Arrow item
            if rec["error"]:
                item = {"_read_error": rec["error"], "_line": rec["line"]}
            elif rec.get("row") is not None:
                item = rec["row"]
            else:
                item = json.loads(rec["item"])
        else:
            item = rec
        rows.append(item_to_row(item, source, root, images))
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


# ---------------------------------------------------------------- DDF level-1 rules (pure)
def _verifiable(answer: str, kind: str, choices: list[str], max_chars: int) -> str | None:
    """Why an answer cannot be checked by rule for its type, or None when it can."""
    if kind == "multi_choice":
        return None if answer in choices else f"answer {answer[:40]!r} is not one of the {len(choices)} choices"
    if kind == "integer":
        try:
            ok = float(answer) == int(float(answer))
        except ValueError:
            ok = False
        return None if ok else f"{answer[:40]!r} is not an integer"
    if kind == "float":
        try:
            float(answer)
            return None
        except ValueError:
            return f"{answer[:40]!r} is not a number"
    if kind == "list":
        try:
            return None if isinstance(ast.literal_eval(answer), (list, tuple)) else f"{answer[:40]!r} is not a list"
        except (ValueError, SyntaxError):
            return f"{answer[:40]!r} is not a list"
    return None if len(answer) <= max_chars else f"text answer of {len(answer)} chars > {max_chars}"


def rule_reject(row: dict, cfg: DDFSourceConfig) -> tuple[str, str] | None:
    """DDF level-1 rule filters for one accepted row: ``(reason, detail)`` or None."""
    q = row["question"].strip()
    if len(q) < max(cfg.min_question_chars, 1):
        return "empty_question", f"{len(q)} chars"
    if len(q) > cfg.max_question_chars:
        return "question_too_long", f"{len(q)} chars > {cfg.max_question_chars}"
    answer = (row["answer"] or "").strip()
    if not answer:
        return "empty_answer", "no ground truth"
    why = _verifiable(answer, row["answer_type"], list(row["choices"] or []), cfg.max_answer_chars)
    return ("unverifiable_answer", why) if why else None


def rules_batch(batch: pa.Table, cfg: DDFSourceConfig) -> pa.Table:
    rows = batch.to_pylist()
    for row in rows:
        if row["reject_reason"] is None:
            hit = rule_reject(row, cfg)
            if hit:
                _reject(row, "ddf_rules", *hit)
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def _reject(row: dict, stage: str, reason: str, detail: str) -> None:
    row.update(reject_stage=stage, reject_reason=reason, reject_detail=detail, image=b"")


def dedup_key(row: dict) -> str:
    """Same image content and same normalized question; rejects never collide."""
    if row["reject_reason"] is not None:
        return "reject:" + row["sample_id"] + ":" + (row["reject_detail"] or "")
    return hashlib.sha256(row["image"]).hexdigest() + "\x1f" + normalize_question(row["question"])


def dedup_group(group: pa.Table) -> pa.Table:
    """Keep the accepted row with the smallest sample_id of a duplicate group."""
    rows = group.to_pylist()
    live = sorted((r for r in rows if r["reject_reason"] is None), key=lambda r: r["sample_id"])
    for dup in live[1:]:
        _reject(dup, "dedup", "duplicate", f"same image and question as {live[0]['sample_id']}")
    return pa.Table.from_pylist([{k: v for k, v in r.items() if k != "_key"} for r in rows], schema=ROW_SCHEMA)


def _rank(sample_id: str, seed: int) -> str:
    """A deterministic pseudo-random order for sampling."""
    return hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()


def quotas(counts: dict[tuple[str, str], int], caps: dict[str, int], budget: int | None) -> dict[tuple[str, str], int]:
    """Rows to keep per (source, answer_type): per-source caps first, then the total budget
    split across strata in proportion to their size (largest remainders), never above a
    stratum's size."""
    keep = dict(counts)
    by_source: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key in counts:
        by_source[key[0]].append(key)
    for src, cap in caps.items():
        keys = by_source.get(src, [])
        total = sum(keep[k] for k in keys)
        if total > cap:
            keep.update(_proportional({k: keep[k] for k in keys}, cap))
    if budget is not None and sum(keep.values()) > budget:
        keep = _proportional(keep, budget)
    return keep


def _proportional(sizes: dict, total: int) -> dict:
    whole = sum(sizes.values())
    if whole == 0:
        return dict(sizes)
    exact = {k: total * v / whole for k, v in sizes.items()}
    out = {k: min(sizes[k], int(x)) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: (exact[k] - int(exact[k]), k), reverse=True):
        if sum(out.values()) >= total:
            break
        if out[k] < sizes[k]:
            out[k] += 1
    return out


def sample_batch(batch: pa.Table, thresholds: dict[tuple[str, str], str | None], caps_hit: set, seed: int) -> pa.Table:
    rows = batch.to_pylist()
    for row in rows:
        if row["reject_reason"] is not None:
            continue
        key = (row["source"], row["answer_type"])
        limit = thresholds.get(key, "")
        if limit is not None and _rank(row["sample_id"], seed) > limit:
            reason = "over_source_cap" if row["source"] in caps_hit else "over_budget"
            _reject(row, "sample", reason, f"stratum {key[0]}/{key[1]} keeps its first rows by seeded hash")
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


# ---------------------------------------------------------------- the pipeline
def load(cfg: Config):
    """Source rows (accepted and rejected) as one lazy Ray Dataset in ``ROW_SCHEMA``.

    The stages read top to bottom; only per-source caps or a budget need a second look at
    the data (counts per stratum), so only then is the dataset materialized.
    """
    if not cfg.sources:
        raise ValueError("no sources configured (sources: [...])")
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    # The driver's context governs every dataset it builds; casseat owns the driver.
    DataContext.get_current().shuffle_strategy = (
        ShuffleStrategy.SORT_SHUFFLE_PULL_BASED if cfg.ddf_source.shuffle == "sort" else ShuffleStrategy.HASH_SHUFFLE
    )
    parts = [
        read_items(s).map_batches(validate_batch, batch_format="pyarrow", fn_kwargs={"source": s, "images": cfg.images}, batch_size=ROWS_PER_BLOCK)
        for s in cfg.sources
    ]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.map_batches(rules_batch, batch_format="pyarrow", fn_kwargs={"cfg": cfg.ddf_source})
    if cfg.ddf_source.dedup:
        ds = ds.add_column("_key", lambda b: pa.array([dedup_key(r) for r in b.to_pylist()]), batch_format="pyarrow")
        ds = ds.groupby("_key", num_partitions=_shuffle_partitions()).map_groups(dedup_group, batch_format="pyarrow")
    if cfg.ddf_source.per_source_cap or cfg.ddf_source.budget:
        ds = _apply_sampling(ds.materialize(), cfg.ddf_source, cfg.seed)
    return ds


def _shuffle_partitions() -> int:
    """Two shuffle partitions per cluster CPU (Ray's default of 200 swamps a small machine)."""
    import ray

    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


def _apply_sampling(ds, rules: DDFSourceConfig, seed: int):
    ranks: dict[tuple[str, str], list[str]] = defaultdict(list)
    for batch in ds.select_columns(["sample_id", "source", "answer_type", "reject_reason"]).iter_batches(batch_format="pyarrow"):
        for r in batch.to_pylist():
            if r["reject_reason"] is None:
                ranks[(r["source"], r["answer_type"])].append(_rank(r["sample_id"], seed))
    counts = {k: len(v) for k, v in ranks.items()}
    keep = quotas(counts, rules.per_source_cap, rules.budget)
    thresholds = {k: (sorted(ranks[k])[keep[k] - 1] if keep[k] else "") if keep[k] < counts[k] else None for k in counts}
    caps_hit = {s for s, cap in rules.per_source_cap.items() if sum(c for (src, _), c in counts.items() if src == s) > cap}
    return ds.map_batches(sample_batch, batch_format="pyarrow", fn_kwargs={"thresholds": thresholds, "caps_hit": caps_hit, "seed": seed})


def funnel(ds) -> dict:
    """Counts from one pass over the light columns: totals, per stage, per source and type."""
    total, accepted = 0, 0
    rejected: Counter = Counter()
    by_stage: dict[str, Counter] = {s: Counter() for s in STAGES}
    by_source: dict[str, Counter] = defaultdict(Counter)
    by_type: Counter = Counter()
    cols = ["source", "answer_type", "reject_stage", "reject_reason"]
    for batch in ds.select_columns(cols).iter_batches(batch_format="pyarrow"):
        for r in batch.to_pylist():
            total += 1
            if r["reject_reason"] is None:
                accepted += 1
                by_type[r["answer_type"]] += 1
                by_source[r["source"]]["accepted"] += 1
            else:
                rejected[r["reject_reason"]] += 1
                by_stage[r["reject_stage"]][r["reject_reason"]] += 1
                by_source[r["source"]]["rejected"] += 1
    stages, remaining = {}, total
    for s in STAGES:
        n_rej = sum(by_stage[s].values())
        stages[s] = {"in": remaining, "out": remaining - n_rej, "rejected": dict(sorted(by_stage[s].items()))}
        remaining -= n_rej
    return {
        "in": total,
        "accepted": accepted,
        "rejected": dict(sorted(rejected.items())),
        "by_source": {k: dict(v) for k, v in sorted(by_source.items())},
        "by_answer_type": dict(sorted(by_type.items())),
        "stages": stages,
    }


__all__ = ["load", "funnel", "rule_reject", "quotas", "STAGES", "ROW_SCHEMA", "REJECT_FIELDS"]
