"""Rows in flight: the one reject schema and the helpers every stage uses to mark and pass rows.

A row that fails a stage keeps flowing with ``reject_stage / reject_reason / reject_detail``
set; later stages see it as not pending and pass it through untouched, so
``in == out + rejected`` holds per stage. Rejects are written (``rejects.parquet``, ``casseat
data inspect --rejects``) in ``REJECT_SCHEMA``, without image bytes.
"""

from __future__ import annotations

import pyarrow as pa

REJECT_FIELDS = ("reject_stage", "reject_reason", "reject_detail")
REJECT_SCHEMA = pa.schema([pa.field(n, pa.string()) for n in
                           ("sample_id", "source_id", "source", "split", *REJECT_FIELDS, "question", "answer", "meta")])


def reject(row: dict, stage: str, reason: str, detail: str) -> None:
    row.update(reject_stage=stage, reject_reason=reason, reject_detail=str(detail)[:500])


def pending(rows: list[dict]) -> list[int]:
    """Indices of the rows no stage has rejected yet."""
    return [i for i, r in enumerate(rows) if r.get("reject_reason") is None]


def with_columns(batch: pa.Table, rows: list[dict], fields: list[pa.Field]) -> pa.Table:
    """``batch`` with the reject columns refreshed from ``rows`` and ``fields`` set (appended
    when new) from them."""
    for name in REJECT_FIELDS:
        batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array([r.get(name) for r in rows], pa.string()))
    for field in fields:
        values = pa.array([r.get(field.name) for r in rows], field.type)
        if field.name in batch.schema.names:
            batch = batch.set_column(batch.schema.get_field_index(field.name), field, values)
        else:
            batch = batch.append_column(field, values)
    return batch
