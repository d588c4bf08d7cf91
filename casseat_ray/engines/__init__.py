"""The engine interface every teacher/student generation goes through.

A conversation is a list of messages ``{"role": ..., "content": [parts]}`` whose parts are
``{"type": "text", "text": str}`` or ``{"type": "image", "image": PIL.Image | bytes}``. An
engine answers a batch of conversations with ``n`` completions each. Only the engine classes
import their backend (lazily), so everything else stays testable without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable


class EngineDead(RuntimeError):
    """The backend is gone; the owner (a Ray actor) must exit so Ray restarts it."""


@dataclass
class Completion:
    text: str
    finish_reason: str | None  # "stop", "length", or "error"
    prompt_tokens: int
    output_tokens: int
    error: str | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    def to_dict(self) -> dict:
        return asdict(self)


def failed(error: str) -> Completion:
    return Completion(text="", finish_reason="error", prompt_tokens=0, output_tokens=0, error=error)


@runtime_checkable
class Engine(Protocol):
    model: str

    def chat(self, conversations: list[list[dict]], sampling=None, adapter: str | None = None) -> list[list[Completion]]:
        """One list of ``sampling.n`` completions per conversation, in order.

        A conversation the backend rejects yields ``[failed(reason)]`` instead of failing
        the batch; a dead backend raises :class:`EngineDead`.
        """
        ...


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_part(image) -> dict:
    return {"type": "image", "image": image}


def user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [text_part(text)]}
