"""The real vLLM engine with faults a real one cannot be made to produce on demand, injected
through the config path every actor receives (``engine.backend`` names this class,
``engine.extra["faults"]`` says what to do). Faults that must happen once survive actor
restarts through marker files.

``faults``:
- ``hang_once``: question substrings; the first request whose conversation contains one never
  answers (until cancelled), later ones go to the engine.
- ``die_once``: question substrings; the first request whose conversation contains one kills
  the engine's own processes (vLLM's engine core, found among this process's children) with
  SIGKILL, as an out-of-memory kill or a crashed kernel would, then waits for its answer.
- ``marker_dir``: where the once-markers live.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

from casseat_ray.engines.vllm import VLLMEngine


def _kill_engine_processes() -> None:
    import signal

    import psutil

    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class FaultEngine:
    def __init__(self, model: str, engine_config):
        extra = dict(engine_config.extra)
        faults = extra.pop("faults", {})
        self.hang_once = list(faults.get("hang_once", []))
        self.die_once = list(faults.get("die_once", []))
        self.markers = Path(faults.get("marker_dir", "."))
        if "marker_dir" in faults:  # one file per engine start: how often actors built one
            (self.markers / f"start-{os.getpid()}-{time.time_ns()}").touch()
        self.inner = VLLMEngine(model, engine_config.model_copy(update={"extra": extra, "backend": None}))
        self.model, self.max_num_seqs = self.inner.model, self.inner.max_num_seqs

    def _first_time(self, kind: str, key: str) -> bool:
        marker = self.markers / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        try:
            marker.touch(exist_ok=False)
            return True
        except FileExistsError:
            return False

    async def generate(self, conversation: list[dict], sampling=None, adapter: str | None = None):
        text = " ".join(p.get("text", "") for m in conversation for p in m["content"] if isinstance(p, dict))
        for key in self.hang_once:
            if key in text and self._first_time("hang", key):
                await asyncio.Event().wait()  # hangs until the caller gives up on it
        for key in self.die_once:
            if key in text and self._first_time("die", key):
                _kill_engine_processes()
        return await self.inner.generate(conversation, sampling, adapter)

    def chat(self, conversations, sampling=None, adapter=None):
        return self.inner.chat(conversations, sampling, adapter)

    def close(self) -> None:
        self.inner.close()
