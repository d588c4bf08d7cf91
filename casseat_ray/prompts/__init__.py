"""Prompt templates as text files, versioned by the hash of their text.

Placeholders are ``{{name}}`` (questions contain LaTeX braces and dollar signs, so neither
``str.format`` nor ``string.Template`` is safe). A config may point any template at a file of
its own; the hash recorded with every output row tells which text produced it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
NAMES = ("c1", "c2", "c2_hint", "seat", "direct", "extract", "judge")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    @property
    def fields(self) -> set[str]:
        return set(_PLACEHOLDER.findall(self.text))

    def render(self, **values: str) -> str:
        missing = self.fields - values.keys()
        if missing:
            raise KeyError(f"prompt {self.name!r} needs {sorted(missing)}")
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), self.text).strip()


def load(name: str, override: str | Path | None = None) -> Prompt:
    """The built-in template ``name``, or the text of ``override`` when given."""
    if name not in NAMES:
        raise ValueError(f"unknown prompt {name!r}; known: {', '.join(NAMES)}")
    path = Path(override) if override else HERE / f"{name}.txt"
    return Prompt(name, path.read_text(encoding="utf-8"))
