"""Local Ray, shared per session: the canonical Parquet streams through Ray Data."""

import io

from PIL import Image


def _decode_sizes(batch):
    # Images travel as bytes and are decoded only inside the stage that needs pixels.
    batch["decoded"] = [Image.open(io.BytesIO(b)).size == (w, h) for b, w, h in zip(batch["image"], batch["width"], batch["height"])]
    return batch


def test_demo_parquet_streams_through_ray_data(ray_session, demo_parquet, demo_rows):
    import ray

    ds = ray.data.read_parquet(str(demo_parquet)).map_batches(_decode_sizes, batch_size=8, batch_format="numpy")
    rows = ds.take_all()
    assert len(rows) == len(demo_rows)
    assert all(r["decoded"] for r in rows)
    assert sorted(r["sample_id"] for r in rows) == sorted(r["sample_id"] for r in demo_rows)
    assert ray.cluster_resources()["CPU"] == 2


class _WherePlaced:
    """Stands in for an engine-owning stage: reports the placement group it runs in, and
    the one a child task it starts lands in (as vLLM's Ray workers would)."""

    def __init__(self):
        import ray

        @ray.remote(num_cpus=0.25)
        def child():
            pg = ray.util.get_current_placement_group()
            return pg.id.hex() if pg else None

        self.pg = ray.util.get_current_placement_group()
        self.child_pg = ray.get(child.remote())

    def __call__(self, batch):
        batch["pg"] = [self.pg.id.hex() if self.pg else None] * len(batch["id"])
        batch["bundles"] = [len(self.pg.bundle_specs) if self.pg else 0] * len(batch["id"])
        batch["child_pg"] = [self.child_pg] * len(batch["id"])
        return batch


def test_multi_device_engine_actors_get_a_placement_group_each(ray_session):
    import ray
    from ray.data import ActorPoolStrategy

    from casseat_ray.config import EngineConfig, PlacementConfig
    from casseat_ray.runtime import engine_actor_args

    # tensor x pipeline = 2 x 1 devices; CPU bundles so the placement is real on this machine
    resources, engine = engine_actor_args(EngineConfig(tensor_parallel_size=2), 0.25, 1.0,
                                          PlacementConfig(bundle={"CPU": 0.25}, strategy="PACK"))
    assert engine.distributed_executor_backend == "ray" and resources["num_gpus"] == 0
    # materialized first, as synthesis does: the groups hold CPUs Ray Data's budget does not see
    source = ray.data.range(8, override_num_blocks=2).materialize()
    ds = source.map_batches(_WherePlaced, batch_size=4, compute=ActorPoolStrategy(size=2), **resources)
    rows = ds.take_all()
    assert len(rows) == 8 and all(r["bundles"] == 2 for r in rows)
    groups = {r["pg"] for r in rows}
    assert None not in groups and 1 <= len(groups) <= 2  # one group per actor
    assert all(r["child_pg"] == r["pg"] for r in rows)  # the engine's workers stay in the actor's group
    from ray.util.placement_group import PlacementGroup

    for pg in ray.util.placement_group_table().values():  # leave the session as it was
        if pg["state"] == "CREATED":
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg["placement_group_id"]))))


_UNDER_UV = """
import ray, sys
from casseat_ray.config import RayConfig
from casseat_ray.runtime import init_ray

init_ray(RayConfig(num_cpus=1))
env = dict(ray.get_runtime_context().runtime_env)
where = ray.get(ray.remote(lambda: sys.executable).remote())
print("RESULT", sorted(env), where == sys.executable)
"""


def test_local_ray_workers_share_the_interpreter_under_uv_run():
    # Under `uv run` Ray would start every worker with `uv run` in a copy of the working
    # directory (a second environment, built by racing workers); a local run must not.
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv not on PATH")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_UV_RUN_RUNTIME_ENV"}
    root = Path(__file__).resolve().parents[2]
    try:
        r = subprocess.run([uv, "run", "--no-sync", "--python", sys.executable, "python", "-c", _UNDER_UV], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a task on local Ray started under `uv run` did not finish in 120 s")
    result = [line for line in r.stdout.splitlines() if line.startswith("RESULT")]
    assert r.returncode == 0 and result, r.stderr[-2000:]
    assert result[0] == "RESULT [] True"


class _Overlap:
    """An async stage that records how many of its calls ran at once."""

    def __init__(self):
        self.now = self.peak = 0

    async def __call__(self, batch):
        import asyncio

        self.now += 1
        self.peak = max(self.peak, self.now)
        await asyncio.sleep(0.2)
        self.now -= 1
        return batch.append_column("peak", [[self.peak] * batch.num_rows])


def test_an_async_stage_runs_its_in_flight_batches_at_once_without_deprecated_ray_remote_args(ray_session):
    import warnings

    import ray

    from casseat_ray.inference.stage import StageSpec

    spec = StageSpec("overlap", _Overlap, {}, concurrency=1, batch_size=2, resources={"num_cpus": 0.25}, in_flight_batches=3)
    with warnings.catch_warnings():
        # Ray 2.64 drops map_batches' **ray_remote_args: what the stage asks for goes through
        # named parameters and the actor pool strategy
        warnings.filterwarnings("error", message=".*ray_remote_args. is deprecated")
        ds = spec.apply(ray.data.range(16, override_num_blocks=8).map_batches(lambda t: t, batch_format="pyarrow"))
    peaks = [r["peak"] for r in ds.take_all()]
    assert len(peaks) == 16
    assert 1 < max(peaks) <= 3  # calls overlapped, never more than the batches it was handed


def test_actor_threads_gives_a_process_the_threads_ray_gives_an_actor_of_those_cpus(ray_session, monkeypatch):
    # A benchmark's engine outside Ray must compute with the threads the job's engine actor gets.
    import os

    from casseat_ray.runtime import actor_thread_count, actor_threads

    @ray_session.remote
    class Threads:
        def omp(self):
            return os.environ.get("OMP_NUM_THREADS")

    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # restored afterwards, whatever it was
    for cpus in (0.5, 1.5):
        actor = Threads.options(num_cpus=cpus).remote()
        given = ray_session.get(actor.omp.remote())
        ray_session.kill(actor)
        with actor_threads(cpus):
            assert os.environ["OMP_NUM_THREADS"] == given == str(actor_thread_count(cpus)) == "1"
        assert os.environ["OMP_NUM_THREADS"] == "7"
    with actor_threads(None):  # no actor to match: the variable is left as it is
        assert os.environ["OMP_NUM_THREADS"] == "7"
    monkeypatch.delenv("OMP_NUM_THREADS")
    with actor_threads(2):
        assert os.environ["OMP_NUM_THREADS"] == "2"
    assert "OMP_NUM_THREADS" not in os.environ
    with actor_threads(None):
        assert "OMP_NUM_THREADS" not in os.environ


def test_a_shipped_adapter_reaches_a_worker_that_cannot_read_the_drivers_folder(ray_session, tmp_path):
    # A URI output's adapter sits in the driver's staging folder: engine actors and training
    # workers on other nodes load a copy that travelled through the object store.
    import os
    import shutil
    from pathlib import Path

    from casseat_ray.adapters import local_path, ship

    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (src / "adapter_model.safetensors").write_bytes(os.urandom(1 << 16))
    expected = {f.name: f.read_bytes() for f in src.iterdir()}
    shipped = ship(src)
    shutil.rmtree(src)  # as the folder is on another node: only the object store has it

    @ray_session.remote(num_cpus=0)
    def load(adapter):
        path = Path(local_path(adapter))
        return str(path), {f.name: f.read_bytes() for f in path.iterdir()}

    path, files = ray_session.get(load.remote(shipped))
    assert files == expected and path != str(src) and str(shipped) == str(src)  # outputs still name the driver's folder
    assert ray_session.get(load.remote(shipped))[0] == path  # one copy per node and content
    assert not [p for p in Path(path).parent.iterdir() if p.name.startswith(f".{shipped.digest}")]  # no half-written copy
    shipped.drop_local()
    assert not Path(path).exists()
    src.mkdir()
    (src / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 16}')
    assert ship(src).digest != shipped.digest  # other content, another copy
