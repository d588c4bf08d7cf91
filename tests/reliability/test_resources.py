"""F8: a Ray head with a 128 MiB object store, 400 large images and a slow engine. `casseat
synthesize` runs against that head as a job's driver does (ray.address), the real tiny teacher
behind the fault engine, which delays every request. The run must finish without object-store
or memory errors; the test reports what Ray spilled to disk and the peak memory of every
process of the run (``-m extended``, about 11 minutes on 2 cores)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from PIL import Image

from casseat_ray.config import to_yaml
from tests.conftest import ROOT, casseat_cmd, ray_head_on_loopback
from tests.reliability.conftest import fault_config, tag

pytestmark = [pytest.mark.slow, pytest.mark.extended]
ROWS = 400
SIDE = 1200  # 1.44 MP of noise: about 1.3 MB as JPEG, downscaled by the run to its 1 MP budget
STORE = 128 * 1024 * 1024


def large_images(directory: Path) -> Path:
    from casseat_ray.demo_data import make_rows, to_table

    rng = np.random.default_rng(0)
    rows = make_rows(ROWS, 4)
    for i, r in enumerate(rows):
        pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        r.update(image=buf.getvalue(), image_format="JPEG", width=SIDE, height=SIDE, question=f"{r['question']} {tag(i)}")
    path = directory / "large.parquet"
    pq.write_table(to_table(rows), path)
    return path


class PeakMemory:
    """Samples the resident memory of the given processes and their descendants twice a second."""

    def __init__(self, roots):
        self.roots, self.per_process, self.total, self._stop = roots, {}, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            total = 0
            for p in {q.pid: q for root in self.roots() for q in [root, *root.children(recursive=True)]}.values():
                try:
                    rss, name = p.memory_info().rss, p.name()
                except psutil.Error:
                    continue
                total += rss
                self.per_process[name] = max(self.per_process.get(name, 0), rss)
            self.total = max(self.total, total)
            self._stop.wait(0.5)


def test_f8_a_small_object_store_large_images_and_a_slow_engine_finish_without_errors(tmp_path, tiny_models, figures):
    source = large_images(tmp_path)
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_AUTH_MODE": "disabled"}
    with ray_head_on_loopback(env, "--object-store-memory", str(STORE)) as head:
        cfg = fault_config(tmp_path, tiny_models, source, "small-store", {"delay_s": 0.5, "marker_dir": str(markers)},
                           f"ray.address={head['address']}", "teacher.batch_size=8")
        path = tmp_path / "small-store.yaml"
        path.write_text(to_yaml(cfg))
        raylet = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet" and any(head["temp_dir"] in a for a in p.cmdline())]
        t0 = time.time()
        with (tmp_path / "run.log").open("w") as log:
            proc = subprocess.Popen(casseat_cmd("synthesize", "--config", str(path), "--no-progress"), stdout=log, stderr=log, env=env)
            with PeakMemory(lambda: [psutil.Process(proc.pid), *raylet]) as memory:
                code = proc.wait(timeout=1500)
        seconds = time.time() - t0
        stats = subprocess.run([str(Path(sys.executable).parent / "ray"), "memory", "--stats-only", "--address", head["address"]],
                               capture_output=True, text=True, env=env, timeout=120).stdout
    out = (tmp_path / "run.log").read_text()
    spilled = re.search(r"Spilled (\d+) MiB", stats)
    mib = {name: round(rss / 2**20) for name, rss in sorted(memory.per_process.items(), key=lambda kv: -kv[1])[:6]}
    figures.update(rows=ROWS, image_side=SIDE, source_mib=round(source.stat().st_size / 2**20), object_store_mib=STORE // 2**20,
                   engine_delay_s=0.5, exit_code=code, seconds=round(seconds, 1), spilled_mib=int(spilled.group(1)) if spilled else 0,
                   peak_rss_mib_by_process=mib, peak_rss_mib_all=round(memory.total / 2**20))
    assert code == 0, out[-3000:]
    assert not re.search(r"ObjectStoreFull|OutOfMemoryError|out of memory", out, re.I), out[-3000:]
    result = json.loads((cfg.run_dir / "stats.json").read_text())
    stages = [st for name, st in result["stages"].items() if name != "mix"]
    assert stages[0]["in"] == ROWS and all(st["in"] == st["out"] + sum(st["rejected"].values()) for st in stages)
    assert all(later["in"] == earlier["out"] for earlier, later in zip(stages, stages[1:]))  # nothing lost between stages
    labeled = result["stages"]["ddf_labeled"]
    assert labeled["in"] > 0.9 * ROWS  # the large images were taken, not rejected
    ids = pq.read_table(cfg.run_dir / "work" / "parts", columns=["sample_id"])["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == labeled["in"]
    assert spilled and int(spilled.group(1)) > 0  # the store was too small for the data: Ray spilled instead of failing
