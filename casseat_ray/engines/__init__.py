"""The engine interface every teacher/student/judge generation goes through.

A conversation is a list of messages ``{"role": ..., "content": [parts]}`` whose parts are
``{"type": "text", "text": str}`` or ``{"type": "image", "image": PIL.Image | bytes}``. An
engine answers one conversation at a time, asynchronously (``generate``), so a caller keeps
many conversations in flight and sends each follow-up turn the moment its own previous turn is
done; ``chat`` is the blocking convenience for a whole list. Only the engine classes import
their backend (lazily), so everything else stays testable without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class EngineDead(RuntimeError):
    """The backend is gone; the owner (a Ray actor) must exit so Ray restarts it."""


@dataclass
class Completion:
    text: str
    finish_reason: str | None  # "stop", "length", "error" or PROMPT_TOO_LONG
    prompt_tokens: int
    output_tokens: int
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens the backend found in its prefix cache
    # With ``SamplingConfig.logprobs``: per generated token, its text and the top candidates'
    # (text -> logprob), the chosen token included.
    tokens: list[str] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


def failed(error: str) -> Completion:
    return Completion(text="", finish_reason="error", prompt_tokens=0, output_tokens=0, error=error)


# The finish reason of a request refused because its prompt (text and image tokens) does not
# fit the engine's context: a fact about the row, not a failure of the moment, so it is final.
PROMPT_TOO_LONG = "prompt_too_long"


def refused_too_long(detail: str) -> Completion:
    return Completion(text="", finish_reason=PROMPT_TOO_LONG, prompt_tokens=0, output_tokens=0, error=detail)


ENGINE_ERROR = "engine_error"
ENGINE_CRASH = "engine_crash"  # the row was on three engines that died, the last time alone on it: final
# A row a request failed for by a failure of the moment is asked again by a rerun; one whose
# prompt is over the context (``prompt_too_long``) would fail the same way and stands.
RETRYABLE = (ENGINE_ERROR,)


def failure_reason(finish_reason: str | None) -> str:
    """The reject reason a failed request gives its row: ``prompt_too_long`` (final: the same
    prompt never fits) or ``engine_error`` (a failure of the moment, retried by a rerun)."""
    return PROMPT_TOO_LONG if finish_reason == PROMPT_TOO_LONG else ENGINE_ERROR


@runtime_checkable
class Engine(Protocol):
    model: str

    async def generate(self, conversation: list[dict], sampling=None, adapter: str | None = None) -> list[Completion]:
        """``sampling.n`` completions of one conversation, awaitable from any event loop;
        ``adapter``: a LoRA adapter folder of this node, or an ``adapters.ShippedAdapter``.

        A conversation the backend rejects yields ``[failed(reason)]`` (``[refused_too_long(
        reason)]`` when its prompt does not fit the context); a dead backend raises
        :class:`EngineDead`.
        """
        ...

    def chat(self, conversations: list[list[dict]], sampling=None, adapter: str | None = None) -> list[list[Completion]]:
        """``generate`` for every conversation at once, blocking; results in order."""
        ...

    def close(self) -> None:
        """Stop the backend and free what it holds."""
        ...


def create(model: str, engine_config) -> Engine:
    """The engine ``engine_config.backend`` names (vLLM when None) for ``model``."""
    if engine_config.backend is None:
        from casseat_ray.engines.vllm import VLLMEngine

        return VLLMEngine(model, engine_config)
    import importlib

    module, name = engine_config.backend.split(":")
    return getattr(importlib.import_module(module), name)(model, engine_config)


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_part(image) -> dict:
    return {"type": "image", "image": image}


def user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [text_part(text)]}
