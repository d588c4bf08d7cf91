"""The real vLLM engine with faults a real one cannot be made to produce on demand, injected
through the config path every actor receives (``engine.backend`` names this class,
``engine.extra["faults"]`` says what to do). Faults that must happen once survive actor
restarts through marker files.

``faults``:
- ``hang_once``: question substrings; the first request whose conversation contains one never
  answers (until cancelled), later ones go to the engine.
- ``marker_dir``: where the once-markers live.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from casseat_ray.engines.vllm import VLLMEngine


class FaultEngine:
    def __init__(self, model: str, engine_config):
        extra = dict(engine_config.extra)
        faults = extra.pop("faults", {})
        self.hang_once = list(faults.get("hang_once", []))
        self.markers = Path(faults.get("marker_dir", "."))
        self.inner = VLLMEngine(model, engine_config.model_copy(update={"extra": extra, "backend": None}))
        self.model, self.max_num_seqs = self.inner.model, self.inner.max_num_seqs

    def _first_time(self, key: str) -> bool:
        marker = self.markers / f"hang-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        try:
            marker.touch(exist_ok=False)
            return True
        except FileExistsError:
            return False

    async def generate(self, conversation: list[dict], sampling=None, adapter: str | None = None):
        text = " ".join(p.get("text", "") for m in conversation for p in m["content"] if isinstance(p, dict))
        for key in self.hang_once:
            if key in text and self._first_time(key):
                await asyncio.Event().wait()  # hangs until the caller gives up on it
        return await self.inner.generate(conversation, sampling, adapter)

    def chat(self, conversations, sampling=None, adapter=None):
        return self.inner.chat(conversations, sampling, adapter)

    def close(self) -> None:
        self.inner.close()
