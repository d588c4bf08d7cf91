"""Resumable part files: the bookkeeping behind every job that can be killed and rerun.

A job writes each finished block of rows atomically as a *part* (named by the ids it holds)
under ``<work>/parts`` and records a *fingerprint* of what makes its outputs valid. A rerun with
the same fingerprint skips every id already in a part, so nothing is redone or duplicated; a
rerun with a different one is refused, naming the keys that changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from casseat_ray.config import ConfigError

PART_GLOB = "part-*.parquet"


def fingerprint(cfg, keys: tuple[str, ...], ignore: dict[str, tuple[str, ...]] | None = None, extra: dict | None = None) -> dict:
    """The config sections ``keys`` (less the scheduling keys ``ignore`` names per dotted
    section, which a resumed run may change) plus ``extra`` facts (prompt hashes, ...)."""
    dumped = cfg.model_dump(mode="json")
    out = {k: dumped[k] for k in keys}
    for section, names in (ignore or {}).items():
        node = out
        for part in section.split("."):
            node = (node or {}).get(part)
        for k in names:
            (node or {}).pop(k, None)
    out.update(extra or {})
    return out


def files_stamp(paths) -> dict[str, list[int] | None]:
    """Size and modification time of every file under ``paths`` (None for a path that is not
    there): what a run read, so a source changed in place between runs is a changed input to
    be refused, not a resume that mixes old and new rows."""
    out: dict[str, list[int] | None] = {}
    for p in map(Path, paths):
        if not p.exists():
            out[str(p)] = None
            continue
        for f in sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]:
            st = f.stat()
            out[str(f.resolve())] = [st.st_size, st.st_mtime_ns]
    return out


def changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += changed_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(prefix + k)
    return keys


def prepare(work: Path, stamp: dict, fresh: bool, where: str) -> Path:
    """The parts folder under ``work``. ``fresh`` empties it; a different ``stamp`` than the
    one recorded is refused (``where`` names the run in the message). The stamp is recorded
    with the first part (``record_stamp``), so a run stopped before any work (a mistyped
    path, a config that rejects every row) does not refuse its corrected rerun."""
    parts = work / "parts"
    stamp_file = work / "fingerprint.json"
    if fresh and work.exists():
        for f in parts.glob("*"):
            f.unlink()
        stamp_file.unlink(missing_ok=True)
    parts.mkdir(parents=True, exist_ok=True)
    if stamp_file.exists():
        changed = changed_keys(json.loads(stamp_file.read_text()), json.loads(json.dumps(stamp)))
        if changed:
            raise ConfigError(f"{where}: holds a run made with a different config (changed: {', '.join(changed[:8])}); "
                              "rerun with --fresh to start over, or choose another name=")
    for leftover in parts.glob("*.tmp"):  # a write the last run did not finish
        leftover.unlink()
    return parts


def record_stamp(parts: Path, stamp: dict) -> None:
    """Record what the parts depend on, once, before the first part is written."""
    stamp_file = parts.parent / "fingerprint.json"
    if not stamp_file.exists():
        atomic_write_text(stamp_file, json.dumps(stamp, indent=2, sort_keys=True))


def _standing(parts: Path, id_column: str, retry: tuple[str, ...]) -> tuple[list[Path], dict[str, tuple[int, int, bool]]]:
    """The part files in the order written, and for each id the row that stands: ``(file,
    row, final)``. A row rejected for a reason in ``retry`` (a transient failure: an engine
    error, a request that timed out) is not final; a later attempt replaces it, a final row
    stands whatever comes after it."""
    files = sorted(parts.glob(PART_GLOB), key=lambda f: (f.stat().st_mtime_ns, f.name))
    keep: dict[str, tuple[int, int, bool]] = {}
    for i, f in enumerate(files):
        t = pq.read_table(f, columns=[id_column, "reject_reason"] if retry else [id_column]).to_pydict()
        reasons = t.get("reject_reason") or [None] * len(t[id_column])
        for j, (key, reason) in enumerate(zip(t[id_column], reasons)):
            held = keep.get(key)
            if held is None or not held[2]:
                keep[key] = (i, j, reason is None or reason not in retry)
    return files, keep


def done_ids(parts: Path, id_column: str = "sample_id", retry: tuple[str, ...] = ()) -> set[str]:
    """Ids with a final row in a part; a rerun tries the others again."""
    return {key for key, (_, _, final) in _standing(parts, id_column, retry)[1].items() if final}


def read_parts(parts: Path, columns: list[str] | None = None, id_column: str = "sample_id", retry: tuple[str, ...] = ()):
    """Each part's table (``columns`` of it), holding one row per id over all parts: an id
    retried by a rerun keeps its final row, not the failed attempts before it; an id that
    failed on every attempt keeps its latest attempt."""
    files, keep = _standing(parts, id_column, retry)
    rows: dict[int, list[int]] = {}
    for i, j, _ in keep.values():
        rows.setdefault(i, []).append(j)
    for i, f in enumerate(files):
        t = pq.read_table(f, columns=columns)
        mine = sorted(rows.get(i, []))
        yield t if len(mine) == t.num_rows else t.take(pa.array(mine, pa.int64()))


def not_done(batch: pa.Table, done: set[str], id_column: str = "sample_id") -> pa.Table:
    """Accepted rows of ``batch`` whose id has no part yet."""
    keep = pc.is_null(batch["reject_reason"])
    if done:
        keep = pc.and_(keep, pc.invert(pc.is_in(batch[id_column], value_set=pa.array(sorted(done), pa.string()))))
    return batch.filter(keep)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with _naming(tmp):
        tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _naming(path: Path):
    """An OSError raised while writing ``path`` names it (a full disk's error otherwise may not)."""
    try:
        yield
    except OSError as e:
        e.filename = e.filename or str(path)
        raise


def write_part(parts: Path, table: pa.Table, id_column: str = "sample_id") -> Path:
    """One finished block, named by its ids; written whole or not at all."""
    ids = "\n".join(sorted(table[id_column].to_pylist()))
    path = parts / f"part-{hashlib.sha256(ids.encode()).hexdigest()[:16]}.parquet"
    tmp = path.with_name(path.name + ".tmp")
    with _naming(tmp):
        pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path
