"""Connecting to Ray the way the config says (local for tests and laptops, a cluster address
for `ray job submit`), and placing the actors that own an engine."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys

from casseat_ray.config import EngineConfig, PlacementConfig, RayConfig


# A local Ray's settings for a run on one machine.
LOCAL_SYSTEM_CONFIG = {
    # Ray starts workers at nice 15 so that its own daemons stay responsive; here the workers
    # are the engines and the trainers doing the run's work, and on a small machine nice 15
    # hands their CPU to the driver's polling (measured: the teacher stage at 0.78 of the
    # engine's own rate at nice 15, 0.90 at 0).
    "worker_niceness": 0,
    # Ray keeps only as many idle task workers as CPUs and ends the rest after 1 s; each Ray
    # Data task process of a run imports transformers afresh (15-20 s), so the training data's
    # measuring and encoding tasks keep theirs warm for the next pass (measured on 2 CPUs: a
    # second tiny training run in 62 s instead of 110 s). Not more, and the rest still end
    # after Ray's 1 s: every Ray process wakes 100 times a second (its signal check), and on a
    # small machine each wake-up preempts a compute thread of the engine or the trainer (10
    # idle workers kept for 10 minutes cost the training step 12%: 29.3-30.5 against
    # 33.1-33.6 samples/s with 6).
    "num_workers_soft_limit": 6,
}


def init_ray(cfg: RayConfig, quiet: bool = True, worker_output: bool = False) -> None:
    """``worker_output`` forwards what workers print (the training loop's progress lines)."""
    address = cfg.address or os.environ.get("RAY_ADDRESS")  # set inside `ray job submit`
    if not address:
        _share_this_interpreter()
    import ray

    _data_context(cfg)
    if ray.is_initialized():
        return
    kwargs = dict(include_dashboard=False, ignore_reinit_error=True)
    if quiet:
        kwargs.update(logging_level=logging.WARNING, log_to_driver=worker_output)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cfg.num_cpus, _system_config=LOCAL_SYSTEM_CONFIG, **kwargs)
        from casseat_ray import reaper

        reaper.start()  # this Ray's processes end with this process, also when it is killed
    if quiet:
        from ray.data import DataContext

        DataContext.get_current().print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def _data_context(cfg: RayConfig) -> None:
    """Ray Data's own replacement of actors whose start fails, from the config. A constructor
    that raises (or a process that dies while starting) ends that actor; a fresh one, in a
    fresh process (no half-started engine left over), takes its place, up to
    ``actor_init_retries`` times in a row; then the run fails with the start's last error
    (see ``actor_start_failure``)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.actor_init_retry_on_errors = False  # retried in place, a start that always fails would cost retries squared
    ctx.max_consecutive_actor_init_deaths = cfg.actor_init_retries
    # Ray Data's newer Parquet reader starts 32 footer-reading actors for every read, whatever
    # the file count: 8-12 s for a 32-row file on 2 CPUs, against 0.3-0.6 s for the classic
    # reader; training reads the SFT set once per worker and epoch.
    ctx.use_datasource_v2 = False


def actor_start_failure(exc: BaseException) -> str | None:
    """What made an actor's start fail for good (the original error's last line), when ``exc``
    is Ray's report of such a failure; None for any other error."""
    from ray.exceptions import RayActorError

    if not (isinstance(exc, RayActorError) and getattr(exc, "actor_init_failed", False)):
        return None
    return last_line(exc)


def last_line(exc: BaseException) -> str:
    """The last non-blank line of an error's text (where a remote traceback names its cause),
    or its type's name when it has no text."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _share_this_interpreter() -> None:
    """Workers of a local Ray run this process's interpreter and packages.

    Under ``uv run`` Ray would otherwise give every worker a copy of the working directory and
    start it with ``uv run`` there, which builds a second environment inside the copy; workers
    starting together race on it and die with half-installed packages. That is meant for
    clusters, where workers are other machines; here they share this one.
    """
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"  # read when ray is first imported
    if "ray" in sys.modules:  # already imported: the same switch, applied late
        from ray._private import ray_constants

        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False


def engine_actor_args(engine: EngineConfig, num_cpus: float, num_gpus: float, placement: PlacementConfig) -> tuple[dict, EngineConfig]:
    """``map_batches`` resources for an actor owning one engine, and the engine config it runs.

    A one-device engine asks for ``num_gpus`` on the actor. An engine spanning tensor x
    pipeline devices gets its own placement group of that many bundles; the actor takes no
    GPU itself and vLLM's Ray executor starts one worker per bundle inside the group (the
    group captures the actor's child tasks).
    """
    devices = engine.devices
    if devices == 1:
        return {"num_cpus": num_cpus, "num_gpus": num_gpus}, engine
    bundle = dict(placement.bundle)
    if placement.accelerator_type:
        bundle[f"accelerator_type:{placement.accelerator_type}"] = 0.001
    fn = functools.partial(placement_group_args, [bundle] * devices, placement.strategy)
    return {"num_cpus": num_cpus, "num_gpus": 0, "ray_remote_args_fn": fn}, engine.model_copy(update={"distributed_executor_backend": "ray"})


def placement_group_args(bundles: list[dict], strategy: str) -> dict:
    """Remote args placing one new actor in a placement group of its own (Ray Data calls this
    once per actor it starts, through ``ray_remote_args_fn``, as ``ray.data.llm`` does; the
    group lives as long as the job)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = ray.util.placement_group(bundles, strategy=strategy)
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)}


def actor_thread_count(num_cpus: float) -> int:
    """The compute threads Ray gives an actor of ``num_cpus`` CPUs (``OMP_NUM_THREADS``: the
    floor, at least 1)."""
    return max(1, int(num_cpus))


@contextlib.contextmanager
def actor_threads(num_cpus: float | None):
    """Inside: ``OMP_NUM_THREADS`` as Ray sets it for an actor of ``num_cpus`` CPUs, for a
    process started here, such as a vLLM engine's core on CPU; the variable as it was
    afterwards. A benchmark's engine outside Ray then runs with the threads the job's engine
    actor gets. None leaves the variable as it is (unset: torch's default, every core)."""
    if num_cpus is None:
        yield
        return
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(actor_thread_count(num_cpus))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


def in_ray_job() -> bool:
    """True in the driver of a `ray job submit` entrypoint (the job supervisor sets this)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def job_output_problems(cfg) -> list[str]:
    """Output locations a Ray job would lose. A job runs in a temporary copy of its working
    directory, which Ray deletes when the job ends: relative outputs must not land there."""
    from pathlib import Path

    from casseat_ray.storage import is_uri

    if not in_ray_job():
        return []
    problems = []
    for key, value in (("output_dir", cfg.output_dir), ("ray.storage_path", cfg.ray.storage_path)):
        if not is_uri(value) and not Path(value).expanduser().is_absolute():
            problems.append(
                f"{key}: {value!r} is relative; inside a Ray job it would resolve to {Path(value).resolve()}, in the "
                "job's temporary copy of the working directory, which Ray deletes when the job ends. Give shared "
                "storage: an absolute path every node sees (NFS) or a URI (s3://bucket/runs, gs://bucket/runs)")
    return problems
