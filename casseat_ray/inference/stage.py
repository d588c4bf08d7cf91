"""The one Ray Data actor class that owns an engine, and the stage specs pipelines loop over.

``EngineStage`` is an async callable class (as ``ray.data.llm``'s engine stage is): Ray Data
hands one actor several batches at once, and every pending row of every batch runs its own
coroutine (a *task*: a cascade, a direct answer, a judge call) on the shared engine, at most
``max_in_flight`` rows at a time. A batch returns when its own rows are done; the engine never
waits for a batch boundary. A row whose task raises becomes that row's reject; a dead engine
ends the actor's process so that Ray restarts it and retries its batches.

A row that kills the engine every time (a kernel crash on one input), or the actor's whole
process (a crash or an out-of-memory kill while its request is prepared), would have Ray
restart the actor and retry its batch for ever. The run's ``CrashLedger`` therefore knows
which rows each actor's engine is working on: an actor records its rows there before their
tasks start, a dying engine's actor reports them with the error before it exits, and an actor
whose process ended without a word has them counted when Ray restarts it. Rows on
``ISOLATE_AFTER`` dead engines are *suspects*: they run in groups with nothing else on the
engine, half a batch per group, and each further death halves the groups of the rows it had on
the engine (a bisection). A row on the engine alone when it died becomes an ``engine_crash``
reject: a poison row in a batch of ``b`` rows costs ``ISOLATE_AFTER + log2(b)`` engine
restarts, and the rows beside it go on, most of them many at a time (two transient deaths make
every row in flight a suspect; run one at a time, 256 of them would hold a GPU engine for
hours).

A task is a small picklable object with ``stage`` (the reject stage), ``fields`` (the columns
it adds), optionally ``key`` (the column naming a row; ``sample_id`` when absent) and
``async __call__(engine, row) -> dict`` of column values, where the key ``reject`` may hold
``(reason, detail)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from casseat_ray.answers import warm_up
from casseat_ray.config import EngineConfig, PlacementConfig
from casseat_ray.engines import ENGINE_CRASH, Completion, EngineDead, failed
from casseat_ray.rows import pending, reject, with_columns

log = logging.getLogger(__name__)
DEFAULT_MAX_NUM_SEQS = 256  # vLLM's own default for an offline engine on one device
ISOLATE_AFTER = 2  # dead engines a row was on before it is a suspect
PROCESS_DIED = "the actor's process ended (a crash, an out-of-memory kill or a lost node)"


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


class CrashLedger:
    """The rows on each engine that died, over the actor restarts of a stage (one Ray actor
    per driver; ``scope`` names the stage of one run): what each row may do next."""

    def __init__(self):
        self.deaths: Counter = Counter()  # (scope, row key) -> dead engines it was on
        self.crashed: dict[tuple, str] = {}  # (scope, row key) -> the reject detail
        # (scope, actor id) -> the rows its engine was working on at its last record: a
        # superset (rows that finished since count too), never missing a row that has started
        self.working: dict[tuple, list[str]] = {}

    def work(self, scope: str, actor: str, keys: list[str]) -> None:
        self.working[(scope, actor)] = keys

    def started(self, scope: str, actor: str) -> None:
        """An actor (re)starts: the rows its previous process was working on, if it ended
        without reporting them (Ray restarts an actor under the same id), were on a dead engine."""
        keys = self.working.pop((scope, actor), None)
        if keys:
            self.died(scope, keys, PROCESS_DIED)

    def died(self, scope: str, keys: list[str], error: str, actor: str | None = None) -> None:
        self.working.pop((scope, actor), None)
        for k in keys:
            self.deaths[(scope, k)] += 1
        if len(keys) == 1 and self.deaths[(scope, keys[0])] > ISOLATE_AFTER:
            n = self.deaths[(scope, keys[0])]
            self.crashed[(scope, keys[0])] = f"the engine died {n} times with this row on it, the last time alone: {error}"

    def verdicts(self, scope: str, keys: list[str]) -> dict[str, str | int]:
        """For the rows that may not run as usual: a reject detail, or a suspect's level (1 on
        ``ISOLATE_AFTER`` dead engines, one more for each further one): it runs in a group of at
        most its batch's rows halved that many times (``suspect_groups``)."""
        out = {}
        for k in keys:
            if (scope, k) in self.crashed:
                out[k] = self.crashed[(scope, k)]
            elif self.deaths[(scope, k)] >= ISOLATE_AFTER:
                out[k] = self.deaths[(scope, k)] - ISOLATE_AFTER + 1
        return out


def suspect_groups(suspects: dict[int, list], batch_rows: int, limit: int) -> list[list]:
    """A batch's suspects (by level) in the groups they run in, one group at a time with
    nothing else on the engine: at ``level``, the batch (or the engine's slots, when fewer)
    halved ``level`` times."""
    groups = []
    for level, these in sorted(suspects.items()):
        n = max(1, min(batch_rows, limit) >> level)
        groups += [these[k:k + n] for k in range(0, len(these), n)]
    return groups


def crash_ledger():
    """The driver's ``CrashLedger`` actor (started at its first engine stage), on the driver's
    node: it lives as long as the run, not as long as some worker node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(CrashLedger).options(name="casseat-crash-ledger", get_if_exists=True, num_cpus=0,
                                           scheduling_strategy=here).remote()


class EngineStage:
    """Owns one engine; runs ``task`` for every pending row of the batches it is handed.
    ``ledger``: the driver's ``CrashLedger`` and ``scope`` this stage's page of it (None: a dead
    engine just ends the process)."""

    def __init__(self, task, model: str, engine_config: EngineConfig, engine=None, ledger=None, scope: str = ""):
        self.actor = _actor_id() if ledger is not None else None  # None: nothing to record
        if self.actor is not None:
            try:
                import ray

                ray.get(ledger.started.remote(scope, self.actor), timeout=60)
            except Exception as e:  # without the ledger the rows run as usual
                log.warning("crash ledger unreachable (%s); rows on a dead process go unrecorded", e)
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
        self.task, self.engine, self.ledger, self.scope = task, engine, ledger, scope
        self.key = getattr(task, "key", "sample_id")  # the column naming a row
        # the engine knows its real max_num_seqs once started; the config's value when set
        self.limit = engine_config.max_in_flight or getattr(engine, "max_num_seqs", None) or in_flight_limit(engine_config)
        self._slots: asyncio.Semaphore | None = None
        self._exclusive: asyncio.Lock | None = None
        self._on_engine: set[str] = set()  # keys of the rows whose task is running
        self._changes = self._recorded = 0  # rows started; rows started when the ledger's copy was taken
        self._recording: asyncio.Lock | None = None
        self._dying = False

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self._slots is None:  # created on the loop Ray Data runs this actor's batches on
            self._slots, self._exclusive, self._recording = asyncio.Semaphore(self.limit), asyncio.Lock(), asyncio.Lock()
        rows = batch.to_pylist()
        todo = pending(rows)
        verdicts = {}
        if self.ledger is not None and todo:
            try:
                verdicts = await self.ledger.verdicts.remote(self.scope, [str(rows[i][self.key]) for i in todo])
            except Exception as e:  # without the ledger the rows run as usual
                log.warning("crash ledger unreachable (%s); the batch's rows run as usual", e)
        usual, suspects = [], {}  # suspects by level
        for i in todo:
            verdict = verdicts.get(str(rows[i][self.key]))
            if isinstance(verdict, str):
                reject(rows[i], self.task.stage, ENGINE_CRASH, verdict)
            elif verdict is None:
                usual.append(rows[i])
            else:
                suspects.setdefault(verdict, []).append(rows[i])
        groups = suspect_groups(suspects, len(rows), self.limit)
        await asyncio.gather(*(self._row(r) for r in usual), *(self._group(g) for g in groups))
        return with_columns(batch, rows, self.task.fields)

    @contextlib.asynccontextmanager
    async def _engine_to_itself(self):
        """Every slot of the engine: what runs inside has nothing else beside it."""
        async with self._exclusive:
            for _ in range(self.limit):
                await self._slots.acquire()
            try:
                yield
            finally:
                for _ in range(self.limit):
                    self._slots.release()

    async def _group(self, rows: list[dict]) -> None:
        """Suspect rows, together and with nothing else on the engine (see ``CrashLedger``)."""
        async with self._engine_to_itself():
            await asyncio.gather(*(self._row(r, slot=False) for r in rows))

    async def _row(self, row: dict, slot: bool = True) -> None:
        key = str(row[self.key])
        async with self._slots if slot else contextlib.nullcontext():
            self._on_engine.add(key)
            try:
                await self._record()
                values = await self.task(self.engine, row)
            except EngineDead as e:
                await self._exit(e)
            except Exception as e:  # a bug or bad data in this row only: its reject, not a dead job
                log.warning("row %s failed in %s: %s: %s", row.get("sample_id"), self.task.stage, type(e).__name__, e)
                values = {"reject": ("stage_error", f"{type(e).__name__}: {e}")}
            finally:
                self._on_engine.discard(key)
        hit = values.pop("reject", None)
        row.update(values)
        if hit:
            reject(row, self.task.stage, *hit)

    async def _record(self) -> None:
        """Before a row's task starts, the ledger's copy of ``_on_engine`` holds it, so that a
        process that ends without a word (``CrashLedger.started``) still names its rows. One
        call covers every row that started while the one before it was on its way."""
        if self.actor is None:
            return
        self._changes += 1
        mine = self._changes
        async with self._recording:
            if self._dying:  # the dead engine's rows are reported; a later copy would count them twice
                await asyncio.Event().wait()
            if self._recorded >= mine:
                return
            taken = self._changes
            try:
                await self.ledger.work.remote(self.scope, self.actor, sorted(self._on_engine))
            except Exception as e:  # without the ledger the rows run as usual
                log.warning("crash ledger unreachable (%s); rows on a dead process go unrecorded", e)
                self.actor = None
            self._recorded = taken

    async def _exit(self, error: EngineDead) -> None:
        """Tell the ledger which rows were on the dead engine, then end the process so that Ray
        restarts this actor and retries its batches."""
        if self._dying:  # another row saw it first and is reporting
            await asyncio.Event().wait()
        self._dying = True
        log.error("engine dead (%s) with %d rows on it; exiting so that Ray restarts this actor", error, len(self._on_engine))
        if self.ledger is not None:
            try:
                await asyncio.wait_for(self.ledger.died.remote(self.scope, sorted(self._on_engine), str(error)[:300], self.actor), 30)
            except Exception as e:  # the restart matters more than the record
                log.error("could not record the dead engine's rows: %s", e)
        os._exit(1)


def _actor_id() -> str | None:
    """This Ray actor's id (kept across its restarts); None outside an actor."""
    try:
        import ray

        return ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    except Exception:
        return None


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
    kwargs = {"task": task, "model": model, "engine_config": engine, "ledger": crash_ledger(), "scope": f"{name}-{uuid.uuid4().hex}"}
    return StageSpec(name, EngineStage, kwargs, concurrency, batch_size, resources, batches)
