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
- ``die``: question substrings; every request containing one kills the engine as ``die_once``
  does (an input that crashes the engine every time); with ``no_engine``, the engine reports
  itself dead (``EngineDead``) as vLLM's does.
- ``exit_on``: question substrings; every request containing one ends the actor's whole
  process (an input that crashes or exhausts the process preparing its request, every time).
- ``error``: question substrings; every request containing one fails as the backend fails a
  request it rejects (``engines.failed``), the engine itself unharmed.
- ``error_once``: question substrings; the first request containing one fails as ``error``
  does, later ones go to the engine (a failure of the moment, for a rerun to retry).
- ``reply``: ``{substring: {c1|c2: {text: str | null, finish: stop|length}}}``; that turn of
  the row gets the engine's real answer with its text replaced (``text``; null keeps the first
  half of the real text) and its finish reason set: empty, unparsable or cut-off output.
- ``fail_init``: ``once`` or ``always``; the engine's start raises before vLLM is touched (the
  first start only, or every start).
- ``no_engine``: true: no vLLM at all; every request fails (a backend that answers nothing).
- ``exit_after``: N: once per run, the actor's whole process exits (as a preempted or
  out-of-memory-killed actor does) right after its engine has answered N requests.
- ``delay_s``: seconds every request waits before it reaches the engine (a slow engine).
- ``log_requests``: true: every C1 request appends its question to ``requests-<pid>.log`` in
  ``marker_dir`` (which rows an engine computed, and how often).
- ``marker_dir``: where the once-markers and the per-start markers (``attempt-*`` for every
  start, ``start-*`` for every engine built) live.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

from casseat_ray.engines import EngineDead, failed
from casseat_ray.engines.vllm import VLLMEngine


def _kill_engine_processes() -> None:
    import signal

    import psutil

    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


INJECTED_ERROR = "injected: the backend rejected this request"


class FaultEngine:
    def __init__(self, model: str, engine_config, inner=None):
        """``inner``: an engine already running (a test's shared one) to put the faults in front of."""
        extra = dict(engine_config.extra)
        faults = extra.pop("faults", {})
        self.hang_once = list(faults.get("hang_once", []))
        self.die_once = list(faults.get("die_once", []))
        self.die = list(faults.get("die", []))
        self.exit_on = list(faults.get("exit_on", []))
        self.error = list(faults.get("error", []))
        self.error_once = list(faults.get("error_once", []))
        self.reply = dict(faults.get("reply", {}))
        self.markers = Path(faults.get("marker_dir", "."))
        self.exit_after = faults.get("exit_after")
        self.delay_s = float(faults.get("delay_s", 0))
        self.log_requests = bool(faults.get("log_requests"))
        self.answered = 0
        counted = "marker_dir" in faults
        if counted:
            (self.markers / f"attempt-{os.getpid()}-{time.time_ns()}").touch()
        fail = faults.get("fail_init")
        if fail == "always" or (fail == "once" and self._first_time("fail_init", "")):
            raise RuntimeError(f"injected: the engine failed to start (fail_init={fail})")
        self.inner = inner
        if inner is None and not faults.get("no_engine"):
            self.inner = VLLMEngine(model, engine_config.model_copy(update={"extra": extra, "backend": None}))
        self.model = model if self.inner is None else self.inner.model
        self.max_num_seqs = None if self.inner is None else self.inner.max_num_seqs
        if counted:  # one file per engine built: how often actors built one
            (self.markers / f"start-{os.getpid()}-{time.time_ns()}").touch()

    def _first_time(self, kind: str, key: str) -> bool:
        marker = self.markers / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        try:
            marker.touch(exist_ok=False)
            return True
        except FileExistsError:
            return False

    async def generate(self, conversation: list[dict], sampling=None, adapter: str | None = None):
        text = " ".join(p.get("text", "") for m in conversation for p in m["content"] if isinstance(p, dict))
        turn = "c1" if len(conversation) == 1 else "c2"
        if self.log_requests and turn == "c1":
            with open(self.markers / f"requests-{os.getpid()}.log", "a") as f:
                f.write(text.replace("\n", " ") + "\n")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        for key in self.hang_once:
            if key in text and self._first_time("hang", key):
                await asyncio.Event().wait()  # hangs until the caller gives up on it
        for key in self.die_once:
            if key in text and self._first_time("die", key):
                _kill_engine_processes()
        if any(key in text for key in self.exit_on):
            (self.markers / f"died-{os.getpid()}-{time.time_ns()}").touch()
            os._exit(1)
        if any(key in text for key in self.die):
            (self.markers / f"died-{os.getpid()}-{time.time_ns()}").touch()
            if self.inner is None:
                raise EngineDead("injected: the engine died on this request")
            _kill_engine_processes()
        if self.inner is None or any(key in text for key in self.error):
            return [failed(INJECTED_ERROR)]
        for key in self.error_once:
            if key in text and self._first_time("error", key):
                return [failed(INJECTED_ERROR)]
        out = await self.inner.generate(conversation, sampling, adapter)
        self.answered += 1
        if self.exit_after is not None and self.answered >= self.exit_after and self._first_time("exit", ""):
            os._exit(1)  # the whole actor process, mid-batch: nothing of its batches in flight is returned
        for key, turns in self.reply.items():
            fault = turns.get(turn) if key in text else None
            if fault:
                for c in out:
                    c.text = c.text[: len(c.text) // 2] if fault.get("text") is None else fault["text"]
                    c.finish_reason = fault.get("finish", "stop")
        return out

    def chat(self, conversations, sampling=None, adapter=None):
        return self.inner.chat(conversations, sampling, adapter)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
