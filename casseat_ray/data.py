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
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from casseat_ray.config import Config, DDFSourceConfig, ImageConfig, SourceConfig
from casseat_ray.samples import SCHEMA, normalize_question
from casseat_ray.rows import REJECT_FIELDS, REJECT_SCHEMA, reject
from casseat_ray.sources import item_to_row

STAGES = ("read", "validate", "ddf_rules", "dedup", "sample")
ROW_SCHEMA = pa.schema(list(SCHEMA) + [pa.field(name, pa.string()) for name in REJECT_FIELDS])
# While the pipeline runs: the dedup key of accepted rows, a per-row id, and a hash of what two
# rows with the same sample id may still differ in (answer, choices, meta).
WORK_SCHEMA = ROW_SCHEMA.append(pa.field("_key", pa.string())).append(pa.field("_uid", pa.string())).append(pa.field("_content", pa.string()))
WORK_COLUMNS = ["_key", "_uid", "_content"]
ROWS_PER_BLOCK = 64


# ---------------------------------------------------------------- reading (runs in Ray workers)
def explode_jsonl(file_row: dict) -> list[dict]:
    """One item per line; a line that is not UTF-8 becomes a read error (JSON is parsed,
    once, by ``validate_batch``)."""
    out = []
    for n, line in enumerate(file_row["bytes"].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append({"item": line.decode("utf-8"), "error": None, "line": n})
        except UnicodeDecodeError as e:
            out.append({"item": None, "error": f"not_utf8: line {n}: {e}", "line": n})
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
        items = ray.data.read_binary_files(str(path), file_extensions=None).flat_map(explode_jsonl if kind == "jsonl" else explode_json)
    elif kind == "arrow":
        items = ray.data.read_binary_files(str(path), file_extensions=["arrow"]).flat_map(explode_arrow)
    elif kind == "csv":
        items = ray.data.read_csv(str(path))
    else:
        items = ray.data.read_parquet(str(path))
    if source.max_samples is not None:
        items = items.limit(source.max_samples)
    return items.repartition(target_num_rows_per_block=ROWS_PER_BLOCK)


def _image_root(source: SourceConfig) -> Path:
    if source.image_root is not None:
        return Path(source.image_root)
    path = Path(source.path)
    return path if path.is_dir() else path.parent


def validate_batch(batch: pa.Table, source: SourceConfig, images: ImageConfig, rules: DDFSourceConfig | None) -> pa.Table:
    """read, validate and ddf_rules for one batch: items in, canonical or reject rows out,
    each with its dedup ``_key`` and a ``_uid`` (one Python pass while the bytes are at hand).
    ``rules=None`` skips the DDF level-1 rules (a benchmark is scored as it is)."""
    root = _image_root(source)
    rows = []
    for rec in batch.to_pylist():
        if "item" in rec and "error" in rec and "line" in rec:  # a JSON/JSONL/Arrow item
            if rec["error"]:
                item = {"_read_error": rec["error"], "_line": rec["line"]}
            elif rec.get("row") is not None:
                item = rec["row"]
            else:
                try:
                    item = json.loads(rec["item"])
                except json.JSONDecodeError as e:
                    item = {"_read_error": f"bad_json: line {rec['line']}: {e}", "_line": rec["line"]}
        else:
            item = rec
        row = item_to_row(item, source, root, images)
        if row["reject_reason"] is None and rules is not None:
            hit = rule_reject(row, rules)
            if hit:
                _reject(row, "ddf_rules", *hit)
        row["_key"] = dedup_key(row) if row["reject_reason"] is None else None
        row["_uid"] = uuid.uuid4().hex
        row["_content"] = content_key(row) if row["reject_reason"] is None else None
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


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


def _reject(row: dict, stage: str, reason: str, detail: str) -> None:
    reject(row, stage, reason, detail)
    row["image"] = b""  # a rejected row carries no image bytes further


def dedup_key(row: dict) -> str:
    """Same image content and same normalized question (across sources too)."""
    return hashlib.sha256(row["image"]).hexdigest() + "\x1f" + normalize_question(row["question"])


def content_key(row: dict) -> str:
    facts = [row.get(k) for k in ("answer", "choices", "answer_type", "precision", "unit", "meta")]
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


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


def select_batch(batch: pa.Table, duplicates: dict[str, str], thresholds: dict, caps_hit: set, seed: int,
                 renamed: dict[str, str] | None = None) -> pa.Table:
    """Mark duplicates (``_uid`` -> the kept row's name) and rows over a cap or the budget; give
    duplicates kept on purpose their own ids (``renamed``: ``_uid`` -> id).

    Columnar: only the small columns become Python objects; image bytes stay in Arrow.
    """
    cols = {c: batch[c].to_pylist() for c in ("_uid", "sample_id", "source", "answer_type", "reject_stage", "reject_reason", "reject_detail")}
    drop = []
    for i, uid in enumerate(cols["_uid"]):
        if renamed and uid in renamed:
            cols["sample_id"][i] = renamed[uid]
        if cols["reject_reason"][i] is not None:
            drop.append(False)
            continue
        hit = None
        if uid in duplicates:
            hit = ("dedup", "duplicate", f"same image and question as {duplicates[uid]}")
        else:
            key = (cols["source"][i], cols["answer_type"][i])
            limit = thresholds.get(key)
            if limit is not None and _rank(cols["sample_id"][i], seed) > limit:
                reason = "over_source_cap" if key[0] in caps_hit else "over_budget"
                hit = ("sample", reason, f"stratum {key[0]}/{key[1]} keeps its rows with the lowest seeded hash")
        if hit:
            cols["reject_stage"][i], cols["reject_reason"][i], cols["reject_detail"][i] = hit
        drop.append(hit is not None)
    out = batch.drop_columns(WORK_COLUMNS)
    out = out.set_column(out.schema.get_field_index("sample_id"), "sample_id", pa.array(cols["sample_id"], pa.string()))
    mask = pa.array(drop, pa.bool_())
    out = out.set_column(out.schema.get_field_index("image"), "image", pc.if_else(mask, pa.scalar(b"", pa.binary()), out["image"]))
    for c in REJECT_FIELDS:
        out = out.set_column(out.schema.get_field_index(c), c, pa.array(cols[c], pa.string()))
    return out


def _named(row: dict) -> str:
    """A kept row as a duplicate's detail names it: by its source's own id when it has one."""
    if row.get("source_id") is not None:
        return f"{row['source']} item {row['source_id']} (sample {row['sample_id']})"
    return f"{row['source']} sample {row['sample_id']}"


def plan_selection(light: list[dict], rules: DDFSourceConfig, seed: int) -> tuple[dict, dict, set, dict]:
    """From ``(_key, _uid, _content, sample_id, source_id, source, answer_type)`` of accepted
    rows: which rows are duplicates (all but the smallest sample id of each key; ``_uid`` -> the
    kept row, named by its source id), the rank threshold per
    stratum, and, with dedup off, new ids for rows that share a sample id (``<id>-1``,
    ``<id>-2``, ... in the order of their content, so every rerun names them alike).
    Pure: the driver runs it on the light columns only."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in light:
        groups[r["_key"]].append(r)
    duplicates: dict[str, str] = {}
    kept: list[dict] = []
    for members in groups.values():
        # the smallest sample id, then the smallest source id: the same row is kept on every run
        members.sort(key=lambda r: (r["sample_id"], r["source_id"] is None, r["source_id"] or "", r["_uid"]))
        kept.append(members[0])
        if rules.dedup:
            duplicates.update({m["_uid"]: _named(members[0]) for m in members[1:]})
        else:
            kept.extend(members[1:])
    ranks: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in kept:
        ranks[(r["source"], r["answer_type"])].append(_rank(r["sample_id"], seed))
    renamed: dict[str, str] = {}
    by_id: dict[str, list[dict]] = defaultdict(list)
    for r in kept:
        by_id[r["sample_id"]].append(r)
    for sid, members in by_id.items():
        members.sort(key=lambda r: (r["_content"], r["_uid"]))  # equal content: interchangeable rows
        renamed.update({m["_uid"]: f"{sid}-{k}" for k, m in enumerate(members[1:], start=1)})
    counts = {k: len(v) for k, v in ranks.items()}
    keep = quotas(counts, rules.per_source_cap, rules.budget)
    thresholds = {k: (sorted(ranks[k])[keep[k] - 1] if keep[k] else "") for k in counts if keep[k] < counts[k]}
    caps_hit = {s for s, cap in rules.per_source_cap.items() if sum(c for (src, _), c in counts.items() if src == s) > cap}
    return duplicates, thresholds, caps_hit, renamed


# ---------------------------------------------------------------- the pipeline
def load(cfg: Config, sources: list[SourceConfig] | None = None, filtered: bool = True):
    """Source rows (accepted and rejected) as one Ray Dataset in ``ROW_SCHEMA``.

    read -> validate -> rules stream; dedup, caps and budget need to see every row's key, so
    the validated rows are materialized once, the keys are read back (light columns only, no
    image bytes move) and one more map marks the rows to drop. ``sources`` defaults to the
    config's; ``filtered=False`` (benchmarks) reads and validates only: no DDF level-1 rules,
    dedup, caps or budget.
    """
    sources = cfg.sources if sources is None else sources
    if not sources:
        raise ValueError("no sources configured (sources: [...])")
    rules = cfg.ddf_source if filtered else None
    parts = [
        read_items(s).map_batches(validate_batch, batch_format="pyarrow", batch_size=ROWS_PER_BLOCK,
                                  fn_kwargs={"source": s, "images": cfg.images, "rules": rules})
        for s in sources
    ]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if rules is None:
        return ds.drop_columns(WORK_COLUMNS)
    ds = ds.materialize()
    light = [
        r
        for b in columns(ds, ["_key", "_uid", "_content", "sample_id", "source_id", "source", "answer_type"])
        for r in b.to_pylist()
        if r["_key"] is not None
    ]
    duplicates, thresholds, caps_hit, renamed = plan_selection(light, rules, cfg.seed)
    return ds.map_batches(select_batch, batch_format="pyarrow", fn_kwargs={"duplicates": duplicates, "thresholds": thresholds, "caps_hit": caps_hit,
                                                                            "seed": cfg.seed, "renamed": renamed})


def is_written_reject(reason: str | None, write_over_budget: bool) -> bool:
    """A reject that goes into rejects files: every one but over_budget (a row the budget left
    out, not a bad row) unless asked for."""
    return reason is not None and (write_over_budget or reason != "over_budget")


def write_rejects(ds, path: str | Path, write_over_budget: bool = False) -> int:
    """Write the rejected rows (no image bytes) as Parquet under ``path``; returns the count."""
    rejects = ds.select_columns(REJECT_SCHEMA.names).filter(lambda r: is_written_reject(r["reject_reason"], write_over_budget)).materialize()
    rejects.write_parquet(str(path))
    return rejects.count()


def nothing_accepted(f: dict) -> str:
    """What to say when no source row survives: the reasons, most frequent first, each with
    one example (a missing column's detail lists the columns the file has; a missing image's
    names the path it resolved to)."""
    lines = [f"no source row was accepted: all {f['in']} rows were rejected"]
    for reason, n in sorted(f["rejected"].items(), key=lambda kv: (-kv[1], kv[0]))[:6]:
        example = (f.get("examples") or {}).get(reason)
        lines.append(f"  {reason}: {n}" + (f" (e.g. {example})" if example else ""))
    lines.append("check the sources' path, format, fields and image_root (casseat data inspect shows the rejects)")
    return "\n".join(lines)


def columns(ds, names: list[str]):
    """``names`` of every block of ``ds``, selected here on the driver: for a materialized
    dataset no Ray task runs (``select_columns`` would be one, waiting for a free CPU while
    engine actors hold them)."""
    for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        yield block.select(names)


def funnel(ds) -> dict:
    """Counts from one pass over the light columns: totals, per stage, per source and type."""
    total, accepted = 0, 0
    rejected: Counter = Counter()
    by_stage: dict[str, Counter] = {s: Counter() for s in STAGES}
    by_source: dict[str, Counter] = defaultdict(Counter)
    by_type: Counter = Counter()
    examples: dict[str, str] = {}  # one detail per reason, to say what went wrong
    cols = ["source", "answer_type", "reject_stage", "reject_reason", "reject_detail"]
    for batch in columns(ds, cols):
        for r in batch.to_pylist():
            total += 1
            if r["reject_reason"] is None:
                accepted += 1
                by_type[r["answer_type"]] += 1
                by_source[r["source"]]["accepted"] += 1
            else:
                examples.setdefault(r["reject_reason"], r["reject_detail"])
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
        "examples": dict(sorted(examples.items())),
    }


__all__ = ["load", "funnel", "rule_reject", "quotas", "STAGES", "ROW_SCHEMA", "REJECT_FIELDS"]
