"""The one Ray Data actor class that owns an engine, and the stage specs pipelines loop over.

``EngineStage`` is an async callable class (as ``ray.data.llm``'s engine stage is): Ray Data
hands one actor several batches at once, and every pending row of every batch runs its own
coroutine (a *task*: a cascade, a direct answer, a judge call) on the shared engine, at most
``max_in_flight`` rows at a time. A batch returns when its own rows are done; the engine never
waits for a batch boundary. A row whose task raises becomes that row's reject; a dead engine
ends the actor's process so that Ray restarts it and retries its batches.

A task is a small picklable object with ``stage`` (the reject stage), ``fields`` (the columns
it adds) and ``async __call__(engine, row) -> dict`` of column values, where the key
``reject`` may hold ``(reason, detail)``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from dataclasses import dataclass, field

import pyarrow as pa

from casseat_ray.answers import warm_up
from casseat_ray.config import EngineConfig, PlacementConfig
from casseat_ray.engines import Completion, EngineDead, failed
from casseat_ray.rows import pending, reject, with_columns

log = logging.getLogger(__name__)
DEFAULT_MAX_NUM_SEQS = 256  # vLLM's own default for an offline engine on one device


def in_flight_limit(engine: EngineConfig) -> int:
    return engine.max_in_flight or engine.max_num_seqs or DEFAULT_MAX_NUM_SEQS


class TimedEngine:
    """``engine`` whose requests fail as engine errors after ``timeout`` seconds. The timeout
    cancels the caller's await, and the cancellation reaches the backend (vLLM aborts the
    request), so a hung request neither holds its row nor keeps the engine busy."""

    def __init__(self, engine, timeout: float):
        self.inner, self.timeout, self.model = engine, timeout, engine.model

    async def generate(self, conversation: list[dict], sampling=None, adapter: str | None = None) -> list[Completion]:
        try:
            return await asyncio.wait_for(self.inner.generate(conversation, sampling, adapter), self.timeout)
        except TimeoutError:
            return [failed(f"timeout: no reply within {self.timeout:g}s (engine.request_timeout_s)")]

    def __getattr__(self, name: str):  # chat, close, max_num_seqs, ...: the engine's own
        return getattr(self.inner, name)


class EngineStage:
    """Owns one engine; runs ``task`` for every pending row of the batches it is handed."""

    def __init__(self, task, model: str, engine_config: EngineConfig, engine=None):
        # The answer scorer's first calls cost ~2 s (imports, parser set-up): pay them while the
        # engine starts, not on the first rows with the actor's event loop blocked.
        warm = threading.Thread(target=warm_up, name="scorer-warm-up", daemon=True)
        warm.start()
        if engine is None:
            from casseat_ray.engines import create

            engine = create(model, engine_config)
        warm.join()
        if engine_config.request_timeout_s:
            engine = TimedEngine(engine, engine_config.request_timeout_s)
        self.task, self.engine = task, engine
        # the engine knows its real max_num_seqs once started; the config's value when set
        self.limit = engine_config.max_in_flight or getattr(engine, "max_num_seqs", None) or in_flight_limit(engine_config)
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self._slots is None:  # created on the loop Ray Data runs this actor's batches on
            self._slots = asyncio.Semaphore(self.limit)
        rows = batch.to_pylist()
        await asyncio.gather(*(self._row(rows[i]) for i in pending(rows)))
        return with_columns(batch, rows, self.task.fields)

    async def _row(self, row: dict) -> None:
        async with self._slots:
            try:
                values = await self.task(self.engine, row)
            except EngineDead as e:
                log.error("engine dead (%s); exiting so that Ray restarts this actor", e)
                os._exit(1)
            except Exception as e:  # a bug or bad data in this row only: its reject, not a dead job
                log.warning("row %s failed in %s: %s: %s", row.get("sample_id"), self.task.stage, type(e).__name__, e)
                values = {"reject": ("stage_error", f"{type(e).__name__}: {e}")}
        hit = values.pop("reject", None)
        row.update(values)
        if hit:
            reject(row, self.task.stage, *hit)


@dataclass
class StageSpec:
    """One ``map_batches`` of a pipeline: a callable class, its arguments and resources."""

    name: str
    cls: type
    kwargs: dict
    concurrency: int
    batch_size: int
    resources: dict = field(default_factory=dict)
    in_flight_batches: int | None = None  # batches one (async) actor works on at once; None: Ray Data's default

    def apply(self, ds):
        from ray.data import ActorPoolStrategy

        # the batches Ray Data sends one actor and the calls that actor runs at once (for an
        # async class: coroutines on its event loop) are the same number
        compute = ActorPoolStrategy(size=self.concurrency, max_tasks_in_flight_per_actor=self.in_flight_batches,
                                    max_concurrent_calls_per_actor=self.in_flight_batches)
        return ds.map_batches(self.cls, fn_constructor_kwargs=self.kwargs, batch_format="pyarrow", compute=compute,
                              batch_size=self.batch_size, **self.resources)


def engine_stage(name: str, task, model: str, engine: EngineConfig, *, concurrency: int, batch_size: int, num_cpus: float,
                 num_gpus: float, placement: PlacementConfig) -> StageSpec:
    """The spec of an ``EngineStage``: enough batches per actor to keep ``max_in_flight`` rows
    busy with one more queued, and the engine's placement (one group per multi-device engine)."""
    from casseat_ray.runtime import engine_actor_args

    resources, engine = engine_actor_args(engine, num_cpus, num_gpus, placement)
    batches = math.ceil(in_flight_limit(engine) / batch_size) + 1
    return StageSpec(name, EngineStage, {"task": task, "model": model, "engine_config": engine}, concurrency, batch_size, resources, batches)
