"""The SFT set as Ray Data streams into the training workers.

Before training, one Ray Data pass measures every row (its tokens and label tokens, from the
tokenizer and the images' sizes: no pixel is prepared) and the driver plans the whole run
from those numbers alone (:func:`plan`): which samples are dropped, which share a packed row,
which worker trains on which unit, in what order each epoch. While training, each worker's
own rows are read and encoded (chat template, image processor, label masks) by Ray Data tasks
on the cluster's CPUs and stream into it in read order (:class:`RankSplit`); the worker keeps
the current shuffle window of its rows (:func:`steps`), never the set.

The order is a two-level shuffle, as streaming loaders do it: the set is cut into windows of
``train.shuffle_window`` samples in read order, and every epoch shuffles the units inside
each window by (seed, epoch, unit) hashes. A worker's units are fixed by the plan (round-robin
within each window) rather than by Ray's dynamic streaming split, so what a step trains on
never depends on timing and a resumed run replays exactly the steps it missed.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Collection, Iterable, Iterator

import pyarrow as pa

from ray.train import DataConfig

from casseat_ray.config import TrainConfig

DROP_REASONS = ("too_long", "no_labels", "malformed")
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- pure planning
def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices grouped into rows of at most ``capacity`` tokens: best-fit decreasing,
    ties by index, so the same lengths always give the same rows."""
    import bisect

    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), kept sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"sample {i} has {lengths[i]} tokens, over the row capacity {capacity}")
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at < len(room):
            free, r = room.pop(at)
        else:
            free, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        bisect.insort(room, (free - lengths[i], r))
    return [sorted(r) for r in rows]


def steps_per_epoch(units_per_rank: list[int], batch_size: int, grad_accum: int) -> int:
    """Steps every worker can fill from its own units (the fewest any worker has)."""
    per_worker = batch_size * grad_accum
    fewest = min(units_per_rank)
    if fewest < per_worker:
        raise ValueError(f"{sum(units_per_rank)} training units over {len(units_per_rank)} worker(s) cannot fill one step of "
                         f"{per_worker * len(units_per_rank)} (train.batch_size {batch_size} x train.grad_accum {grad_accum} x "
                         f"{len(units_per_rank)} workers)")
    return fewest // per_worker


def total_steps(epochs: float, per_epoch: int, max_steps: int | None) -> int:
    """Optimizer steps of the run: ``epochs`` passes, capped by ``max_steps`` (the schedule's
    length too, so warmup and decay fit the steps actually taken)."""
    import math

    total = max(1, math.ceil(epochs * per_epoch))
    return min(total, max_steps) if max_steps else total


@dataclass
class Plan:
    """The whole run's data, decided before the first step from the measured rows."""

    windows: list[list[list[list[str]]]]  # [rank][window][unit] -> sample ids, in read order
    per_epoch: int
    total: int
    samples: int  # samples kept
    units: int  # units over all workers: samples, or packed rows
    dropped: dict = field(default_factory=dict)  # reason -> count
    examples: dict = field(default_factory=dict)  # reason -> one "id: why"
    aft_questions: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(**d)


def plan(measured: list[dict], t: TrainConfig, world: int) -> Plan:
    """The run's plan from measured rows in read order (``id``, ``tokens``, ``label_tokens``,
    ``drop``, ``detail``, ``aft``): over-long, label-less and malformed samples are dropped and
    counted (never truncated); the rest are cut into windows, packed within each window when
    ``train.packing``, and each window's units dealt round-robin to the workers."""
    dropped, examples, kept = Counter(), {}, []
    for m in measured:
        reason = m["drop"] or ("no_labels" if m["label_tokens"] == 0 else "too_long" if m["tokens"] > t.cutoff_len else None)
        if reason:
            dropped[reason] += 1
            examples.setdefault(reason, f"{m['id']}: {m['detail'] or reason}")
        else:
            kept.append(m)
    windows: list[list] = [[] for _ in range(world)]
    units = 0
    for lo in range(0, len(kept), t.shuffle_window):
        win = kept[lo:lo + t.shuffle_window]
        groups = pack([m["tokens"] for m in win], t.cutoff_len) if t.packing else [[i] for i in range(len(win))]
        groups.sort()  # by first member: read order
        units += len(groups)
        for rank in range(world):
            windows[rank].append([[win[i]["id"] for i in g] for g in groups[rank::world]])
    if not kept:
        raise ValueError(f"no trainable samples: {sum(dropped.values())} dropped ({dict(dropped)}), e.g. {next(iter(examples.values()), '')}")
    per_epoch = steps_per_epoch([sum(len(w) for w in ws) for ws in windows], t.batch_size, t.grad_accum)
    return Plan(windows, per_epoch, total_steps(t.epochs, per_epoch, t.max_steps), len(kept), units,
                {r: dropped[r] for r in DROP_REASONS}, examples, sum(bool(m["aft"]) for m in kept))


def unit_key(seed: int, epoch: int, unit: list[str]) -> str:
    return hashlib.sha256(f"{seed}:{epoch}:{'+'.join(unit)}".encode()).hexdigest()


def epoch_windows(windows: list[list[list[str]]], seed: int, epoch: int) -> list[list[list[str]]]:
    """One worker's windows with their units in this epoch's order: fixed by (seed, epoch) and
    the units themselves, not by the order rows arrive in."""
    return [sorted(w, key=lambda u: unit_key(seed, epoch, u)) for w in windows]


def worker_samples(windows: list[list[list[str]]], seed: int, per_epoch: int, total: int, per_worker: int,
                   left_out: Collection[str] = ()) -> int:
    """The samples one worker trains on over the whole run, every epoch's occurrence of the
    ``left_out`` ones (their encoding failed: it fails again each epoch) not counted."""
    n = 0
    for epoch in range((total + per_epoch - 1) // per_epoch):
        steps = min(per_epoch, total - epoch * per_epoch)
        order = [u for w in epoch_windows(windows, seed, epoch) for u in w]
        n += sum(sid not in left_out for u in order[:steps * per_worker] for sid in u)
    return n


# ---------------------------------------------------------------- the worker's side
def steps(rows: Iterable[tuple[str, object]], windows: list[list[list[str]]], first: int, count: int, batch_size: int,
          grad_accum: int) -> Iterator[list[list[list[tuple[str, object]]]]]:
    """This worker's steps ``first .. first + count - 1`` of an epoch from its rows as they
    stream in (``(id, sample)``, in read order; ``sample`` None where encoding failed): per
    step, its micro-batches, each a list of units, each a list of ``(id, sample)`` (a failed
    sample is left out of its unit).

    ``windows`` are in the epoch's order (:func:`epoch_windows`). A window's units are taken
    once all its rows are here; rows of windows wholly before ``first`` are dropped as they
    arrive (a resumed run reads, but does not keep, the part of the epoch it already trained).
    """
    per_worker = batch_size * grad_accum
    where = {sid: w for w, win in enumerate(windows) for u in win for sid in u}
    need = [sum(len(u) for u in win) for win in windows]
    ends, n = [], 0  # the epoch position after each window's last unit
    for win in windows:
        n += len(win)
        ends.append(n)
    skip = first * per_worker
    filled, held = [0] * len(windows), {}
    ready: list[list[str]] = []
    done, taken, complete = 0, 0, 0
    for sid, sample in rows:
        w = where.get(sid)
        if w is None:
            continue
        filled[w] += 1
        if ends[w] > skip:
            held[sid] = sample
        while complete < len(windows) and filled[complete] == need[complete]:
            for u in windows[complete]:
                if taken < skip:  # trained before the resume: its rows are not kept
                    taken += 1
                    for s in u:
                        held.pop(s, None)
                else:
                    ready.append(u)
            complete += 1
        while len(ready) >= per_worker and done < count:
            units, ready = ready[:per_worker], ready[per_worker:]
            units = [[(s, held.pop(s)) for s in u] for u in units]
            units = [[(s, e) for s, e in u if e is not None] for u in units]
            yield [units[i:i + batch_size] for i in range(0, per_worker, batch_size)]
            done += 1
        if done == count:
            return
    raise RuntimeError(f"the SFT set ran out after {done} of {count} steps ({sum(filled)} of {sum(need)} planned rows arrived): "
                       "did the SFT set change since the run was planned?")


# ---------------------------------------------------------------- Ray Data
@lru_cache(maxsize=2)
def _processor(model: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model)


def measure_batch(batch, model: str, train: dict) -> dict:
    """Ray Data UDF: one row of numbers per SFT row (see :func:`plan`)."""
    from casseat_ray.train.collate import BadSample, NoLabels, measure, prompt_turns
    from casseat_ray.train.losses import response_ranks

    t, processor = TrainConfig.model_validate(train), _processor(model)
    out = {k: [] for k in ("id", "tokens", "label_tokens", "drop", "detail", "aft")}
    for r in batch.to_pylist():
        tokens = labels = 0
        drop = detail = None
        aft = False
        try:
            tokens, labels = measure(r, processor, t.label_mode)
            if t.loss == "aft" and r.get("kind") != "self_eval" and r.get("responses"):
                prompt = prompt_turns(r["messages"])
                ranks = response_ranks(r, t.aft.ranking)
                fits = [measure({**r, "messages": prompt + [{"role": "assistant", "content": x}], "loss_on": "all"}, processor,
                                "all_assistant")[0] <= t.cutoff_len for x in r["responses"]]
                aft = len({k for k, ok in zip(ranks, fits) if ok}) > 1  # as collate.aft_group decides
        except BadSample as exc:
            drop, detail = ("no_labels" if isinstance(exc, NoLabels) else "malformed"), str(exc)
        except Exception as exc:  # noqa: BLE001 -- one bad row is that row's drop, never a dead run
            drop, detail = "malformed", f"{type(exc).__name__}: {exc}"
        for k, v in zip(out, (r["id"], tokens, labels, drop, detail, aft)):
            out[k].append(v)
    return out


def images_as(images: dict, dtype) -> dict:
    """A sample's image inputs with their floating tensors (pixel values) in the dtype the
    student computes in: the model casts them to it anyway, so a bf16 run streams and caches
    half the bytes (24 MB -> 12 MB for one Qwen2-VL megapixel image) for the same result."""
    import torch

    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in images.items()}


def encode_batch(batch, model: str, train: dict, ids: frozenset) -> dict:
    """Ray Data UDF: this worker's rows of the batch encoded for training (pickled
    ``(Encoded, AFT group)``); a row whose encoding fails comes with its error instead."""
    import pyarrow as pa

    from casseat_ray.train.collate import aft_group, encode, encode_responses
    from casseat_ray.train.loop import compute_dtype
    from casseat_ray.train.losses import response_ranks

    t, processor = TrainConfig.model_validate(train), _processor(model)
    dtype = compute_dtype(t, t.use_gpu)
    batch = batch.filter(pa.array([i in ids for i in batch["id"].to_pylist()], pa.bool_()))
    out = {"id": [], "sample": [], "error": []}
    for r in batch.to_pylist():
        sample = error = None
        try:
            e = encode(r, processor, t.label_mode)
            e.images = images_as(e.images, dtype)
            group = None
            if t.loss == "aft":
                cands = encode_responses(r, processor, e)  # e's image inputs: one copy in the pickle, not 1 + k
                group = aft_group(e, cands, response_ranks(r, t.aft.ranking) if cands else [], t.cutoff_len)
            sample = pickle.dumps((e, group))
        except Exception as exc:  # noqa: BLE001 -- measured fine, failed on its pixels: the worker leaves it out
            error = f"{type(exc).__name__}: {exc}"
        out["id"].append(r["id"])
        out["sample"].append(sample)
        out["error"].append(error)
    return out


def measure_set(ds, model: str, t: TrainConfig) -> list[dict]:
    """Every row's numbers, in read order."""
    ds = ds.map_batches(measure_batch, fn_kwargs={"model": model, "train": t.model_dump(mode="json")}, batch_format="pyarrow",
                        num_cpus=t.data_cpus)
    ds.context.execution_options.preserve_order = True
    return ds.take_all()


# Rows read per encoding batch: each batch's encoded rows leave the task as one block, so
# this bounds what a task holds (16 one-megapixel Qwen2-VL images are ~400 MB of pixels).
ENCODE_BATCH_ROWS = 16


class RankSplit(DataConfig):
    """Each worker's own rows of the SFT set, encoded by Ray Data: the dataset read in order,
    filtered to the plan's ids for that worker before anything is decoded, then encoded. The
    worker iterates its shard once per epoch: a fresh streaming pass each time, unless its
    :class:`EncodedCache` kept the first whole one.
    Ray's streaming split hands blocks to whichever worker asks first; training needs each
    worker's rows fixed in advance, so that steps replay exactly on resume."""

    def __init__(self, model: str, t: TrainConfig, ids_per_rank: list[frozenset]):
        super().__init__(datasets_to_split=[])
        self.model, self.train, self.ids, self.num_cpus = model, t.model_dump(mode="json"), ids_per_rank, t.data_cpus

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if world_size != len(self.ids):
            raise ValueError(f"the run was planned for {len(self.ids)} workers, Ray Train started {world_size}")
        out = []
        for rank in range(world_size):
            its = {}
            for name, ds in datasets.items():
                mine = ds.map_batches(encode_batch, batch_format="pyarrow", batch_size=ENCODE_BATCH_ROWS, num_cpus=self.num_cpus,
                                      fn_kwargs={"model": self.model, "train": self.train, "ids": self.ids[rank]})
                mine.context.execution_options = self._resolve_execution_options(name)
                mine.context.execution_options.preserve_order = True
                mine.context.enable_progress_bars = False  # the steps' own lines report progress
                its[name] = mine.iterator()
            out.append(its)
        return out


ENCODED_SCHEMA = pa.schema([("id", pa.string()), ("sample", pa.binary()), ("error", pa.string())])


class EncodedCache:
    """A worker's shard that encodes once: the first whole pass streams from Ray Data (read,
    decode, image processor) and writes each block to the worker's local disk on the way; later
    passes read the blocks back, as a plain loop that tokenizes its dataset once would, and the
    Ray Data pipeline never restarts at an epoch start. Either way one block is in memory at a
    time, so the worker's memory stays flat as the set grows. (Ray Data's ``materialize()``
    would encode the whole set into the object store before the first step.) A shard whose
    blocks outgrow ``limit_bytes`` is not kept: every pass streams from Ray Data, as with 0.

    Answers ``iter_batches`` like the Ray Data iterator it wraps; a pass stopped before its end
    keeps nothing, and the next pass writes again."""

    def __init__(self, shard, limit_bytes: float, directory: Path | None = None):
        """``directory``: where to keep the rows (emptied first: a worker restarted after a crash
        takes over what its predecessor left); None: a fresh temp directory."""
        self.shard, self.limit = shard, limit_bytes
        self.dir = None
        if limit_bytes > 0 and directory is None:
            self.dir = Path(tempfile.mkdtemp(prefix="casseat-encoded-"))
        elif limit_bytes > 0:
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            self.dir = directory
        self.complete = self.writing = False

    @property
    def path(self) -> Path | None:
        return None if self.dir is None else self.dir / "rows.arrow"

    def iter_batches(self, **kwargs) -> Iterator[pa.Table]:
        if self.complete:
            with pa.OSFile(str(self.path)) as f:  # read, not mapped: the block's memory is freed with it
                reader = pa.ipc.open_file(f)
                for i in range(reader.num_record_batches):
                    yield pa.Table.from_batches([reader.get_batch(i)])
            return
        # one pass writes at a time (a stand-in sample is read while an epoch's pass is open)
        owner = self.dir is not None and not self.writing
        writer = pa.ipc.new_file(str(self.path), ENCODED_SCHEMA) if owner else None
        self.writing = self.writing or owner
        written = 0
        try:
            for b in self.shard.iter_batches(**kwargs):
                if writer is not None:
                    block = b.select(ENCODED_SCHEMA.names).cast(ENCODED_SCHEMA)
                    written += block.nbytes
                    if written > self.limit:
                        writer.close()
                        writer = None
                        log.warning("the worker's encoded samples pass encoded_cache_gb (%.1f GB): every epoch encodes them", self.limit / 1e9)
                        self.close()
                    else:
                        writer.write_table(block)
                yield b
            if writer is not None:
                writer.close()
                writer = None
                self.complete = True
        finally:
            if writer is not None:  # stopped early: what was written is not a whole pass
                writer.close()
            if owner:
                self.writing = False

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir, self.complete = None, False


def first_sample(shard, rope=None):
    """The first sample of a worker's shard that encoded (one more pass over it, stopped there)."""
    for _, sample in shard_rows(shard, {}, rope):
        if sample is not None:
            return sample[0]
    raise RuntimeError("none of this worker's samples could be encoded")


def shard_rows(shard, failed: dict, rope=None) -> Iterator[tuple[str, object]]:
    """One pass over a worker's dataset shard: ``(id, (Encoded, AFT group))``, unpickled, with
    the sample's M-RoPE positions when ``rope`` (the model's position function) is given; a
    sample whose encoding failed comes as None and its error goes to ``failed``."""
    from casseat_ray.train.collate import rope_positions

    for b in shard.iter_batches(batch_format="pyarrow", batch_size=None):
        for sid, blob, error in zip(*(b[c].to_pylist() for c in ("id", "sample", "error"))):
            if blob is None:
                failed[sid] = error
                yield sid, None
                continue
            e, group = pickle.loads(blob)
            if rope is not None:
                e.positions = rope_positions(e, rope)
            yield sid, (e, group)
