"""Session-wide fixtures: one set of tiny models, one vLLM engine, one local Ray.

vLLM takes about a minute to start and Ray about ten seconds on these machines, so every test
that needs one shares the same instance.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# Workers share the test interpreter, also under `uv run pytest` (see casseat_ray.runtime).
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# vLLM's CPU build otherwise starts a separate worker process under each engine core (one more
# vLLM import, about 20 s of every engine start here); with this the engine core runs the model
# itself, as vLLM does by default on one GPU. Inherited by the commands, Ray heads and Ray
# workers the tests start.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def casseat_cmd(*args: str) -> list[str]:
    """The installed ``casseat`` command, or its module when the command is not on PATH."""
    import shutil
    import sys

    exe = shutil.which("casseat")
    return [exe, *args] if exe else [sys.executable, "-m", "casseat_ray.cli", *args]


def shared_data(*parts: str) -> Path:
    """A file under ../shared/data, or a skip that says what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real benchmark data not found at {path} (expected ../shared/data beside the project)")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny teacher and student, built for the session (a few minutes), or kept in
    ``$CASSEAT_TEST_MODELS`` and reused while their recipe is unchanged."""
    from casseat_ray.demo import ensure_tiny

    kept = os.environ.get("CASSEAT_TEST_MODELS")
    root = Path(kept) if kept else tmp_path_factory.mktemp("tiny")
    return {role: ensure_tiny(root / role, role, 0) for role in ("teacher", "student")}


@pytest.fixture(scope="session")
def family_students(tiny_models) -> dict[str, Path]:
    """A tiny student of every family the method names (random weights, seconds to build),
    kept beside the tiny models like them."""
    from casseat_ray.demo import ensure_tiny

    root = tiny_models["student"].parent
    return {"qwen2_vl": tiny_models["student"],
            **{f: ensure_tiny(root / f"student-{f}", "student", 0, family=f) for f in ("qwen2_5_vl", "llava", "llava_next")}}


@pytest.fixture(scope="session")
def demo_parquet(tmp_path_factory) -> Path:
    from casseat_ray.demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo"), n=24, seed=0)


@pytest.fixture(scope="session")
def demo_rows(demo_parquet) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(demo_parquet).to_pylist()


@pytest.fixture(scope="session")
def teacher_engine(tiny_models):
    """The one vLLM engine of the test session (tiny teacher, CPU)."""
    from casseat_ray.config import EngineConfig, SamplingConfig
    from casseat_ray.demo import TINY_ENGINE
    from casseat_ray.engines.vllm import VLLMEngine

    engine = VLLMEngine(str(tiny_models["teacher"]), EngineConfig(**TINY_ENGINE), SamplingConfig(max_tokens=24))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from casseat_ray.runtime import LOCAL_SYSTEM_CONFIG

    # Workers unpickle functions defined in test modules by module name, so they need the
    # test directories on their path (pytest put them on the driver's).
    test_dirs = [str(ROOT / "tests")] + [str(p) for p in (ROOT / "tests").iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]
    env = {"PYTHONPATH": os.pathsep.join(test_dirs + [os.environ.get("PYTHONPATH", "")])}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env}, _system_config=LOCAL_SYSTEM_CONFIG)
    yield ray
    ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    import socket
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _head_processes(temp_dir: str) -> list:
    """The processes of the Ray nodes using ``temp_dir`` (their command lines name it) and their
    descendants: the workers, whose titles vLLM and Ray rewrite."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or []):
                found[p.pid] = p
                found.update((c.pid, c) for c in p.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def _stop_head(temp_dir: str) -> None:
    """Stop what a head started (its processes, see ``_head_processes``)."""
    _stop(_head_processes(temp_dir))


def _stop(procs: list) -> None:
    """Terminate ``procs``, then kill the stragglers."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@contextlib.contextmanager
def ray_head_on_loopback(env: dict, *extra: str, dashboard: bool = False):
    """A Ray head (2 CPUs) on loopback with its own temp dir and ports, started with ``env`` and
    the extra `ray start` flags; yields its ``address`` (GCS), ``dashboard`` (the job API's
    address when ``dashboard``) and ``temp_dir``. Stopped by the processes it started, also
    when the test fails."""
    import shutil
    import subprocess
    import sys
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="casseat-rt-", dir="/tmp")  # short: Ray's socket paths have an OS limit
    port, dash = free_port(), free_port()
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--include-dashboard", str(dashboard).lower(), "--num-cpus", "2", "--temp-dir", temp_dir,
           "--disable-usage-stats", "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
           *extra]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
        if dashboard:
            wait_for_port(dash, timeout=60)
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "temp_dir": temp_dir}
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def ray_cluster(head_cpus: int, *node_cpus: int):
    """A ``ray.cluster_utils.Cluster`` of a head and one worker node per
    ``node_cpus``, in a temp dir of its own (needs ``RAY_AUTH_MODE=disabled``); yields
    ``(cluster, worker nodes)``. ``Cluster.shutdown`` (and ``remove_node``) end the nodes' own
    processes but can leave a worker behind (a replaced teacher actor's, seen alive minutes
    later, its parent gone), so afterwards every process any of its raylets started (they carry
    ``RAY_RAYLET_PID``) is killed too, also when the test fails."""
    import shutil
    import tempfile

    import psutil
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    def raylet(node) -> int:
        return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid

    temp_dir = tempfile.mkdtemp(prefix="casseat-mn-", dir="/tmp")  # short: socket paths have a length limit
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False, "temp_dir": temp_dir})
    raylets = {str(raylet(cluster.head_node))}
    try:
        nodes = [cluster.add_node(num_cpus=n, temp_dir=temp_dir) for n in node_cpus]
        raylets.update(str(raylet(n)) for n in nodes)
        yield cluster, nodes
    finally:
        left = _head_processes(temp_dir)
        cluster.shutdown()
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.environ().get("RAY_RAYLET_PID") in raylets:
                    left.append(p)
        _stop(left)
        shutil.rmtree(temp_dir, ignore_errors=True)


S3_ENV = {"AWS_ACCESS_KEY_ID": "casseat", "AWS_SECRET_ACCESS_KEY": "casseat", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto's server mode) on loopback with one bucket; yields the
    URI prefix to use (its endpoint in the query, as pyarrow and Ray Train read it)."""
    import subprocess
    import sys

    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    try:
        wait_for_port(port)
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(Bucket="casseat-test")
        yield {"port": port, "query": f"endpoint_override=127.0.0.1:{port}&scheme=http",
               "uri": lambda path: f"s3://casseat-test/{path}?endpoint_override=127.0.0.1:{port}&scheme=http"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def aft_responses(row: dict) -> list[str]:
    """Right, wrong and unfinished responses to a demo question."""
    truth = row["answer"]
    wrong = next((c for c in row.get("choices") or [] if c != truth), None) or f"{truth}0"
    step = "Step 1: I look at the image.\nStep 2: I read the values it shows."
    return [f"{step}\nThe answer is {truth}.", f"I guess without looking.\nThe answer is {wrong}.", "I am not sure what it"]


@pytest.fixture(scope="session")
def sft(tmp_path_factory) -> Path:
    """The small scripted SFT set the training tests share (read-only)."""
    return make_sft(tmp_path_factory.mktemp("sft") / "sft")


def train_config(tmp: Path, tiny_models, name: str, **train):
    """A training config for the tiny student on 2 CPUs, checkpoints under ``tmp/ray``."""
    from casseat_ray.config import Config
    from casseat_ray.demo import TINY_ENGINE

    # two 0.5-CPU workers leave one of the 2 CPUs to two 0.5-CPU Ray Data tasks that encode their samples
    t = dict(epochs=2, lr=2e-3, batch_size=2, grad_accum=1, num_workers=1, checkpoint_every=3, warmup_ratio=0.1, cpus_per_worker=0.5, data_cpus=0.5)
    t.update(train)
    return Config.model_validate(dict(
        name=name, output_dir=str(tmp), student=dict(model=str(tiny_models["student"]), engine=TINY_ENGINE),
        train=t, ray=dict(num_cpus=2, storage_path=str(tmp / "ray")),
    ))


def make_sft(out: Path, n_rows: int = 16, seed: int = 5, aft: bool = False) -> Path:
    """A small SFT set in the synthesis job's schema: CoT and self-evaluation samples with
    scripted teacher texts for demo questions. With ``aft`` every question also carries three
    teacher responses as AFT needs them: right, wrong, and without an answer."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from casseat_ray import prompts
    from casseat_ray.demo_data import make_rows
    from casseat_ray.synth.mix import cot_sample, self_eval_sample
    from casseat_ray.synth.outputs import SFT_SCHEMA
    from casseat_ray.tiny import scripted_targets

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    c1, c2 = prompts.load("c1"), prompts.load("c2")
    samples = []
    for row in make_rows(n_rows, seed=seed):
        t = scripted_targets(row, rng)
        for s in (cot_sample(row, c1, t["c1"]), self_eval_sample(row, c1, t["c1"], c2, t["c2"])):
            s.update(answer_type=row["answer_type"], responses=[t["c1"]], responses_correct=[True], responses_rank=[0])
            if aft:
                s.update(responses=aft_responses(row), responses_correct=[True, False, False], responses_rank=[0, 1, 2])
            samples.append(s)
    pq.write_table(pa.Table.from_pylist(samples, schema=SFT_SCHEMA), out / "sft-00000.parquet")
    return out
