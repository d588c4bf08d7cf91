"""The canonical sample row: the one schema every source adapter produces.

| column       | type          | meaning                                                        |
|--------------|---------------|----------------------------------------------------------------|
| sample_id    | string        | sha256(source, image content hash, normalized question)[:16]   |
| source_id    | string / null | the source's own id of the item (``fields.id``, MATH-V ``id``, |
|              |               | MathVista ``pid``); carried into rejects, SFT set, eval items  |
| image        | binary        | encoded image bytes (decoded to PIL only where pixels matter)  |
| image_format | string        | PNG, JPEG, ...                                                 |
| width        | int32         | pixels                                                         |
| height       | int32         | pixels                                                         |
| question     | string        | question text, without choices                                 |
| choices      | list<string>  | choice texts in order (letters A, B, ... implied); [] if none  |
| answer       | string        | ground truth (for multiple choice: the choice text)            |
| answer_type  | string        | multi_choice, integer, float, text or list                     |
| precision    | int32 / null  | decimal places for float answers                               |
| unit         | string / null | unit of the answer                                             |
| source       | string        | source name from the config                                    |
| split        | string        | split name                                                     |
| meta         | string        | JSON of every other source field                               |
"""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa

ANSWER_TYPES = ("multi_choice", "integer", "float", "text", "list")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # option letters, in order

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source_id", pa.string()),
        ("image", pa.binary()),
        ("image_format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("question", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("answer", pa.string()),
        ("answer_type", pa.string()),
        ("precision", pa.int32()),
        ("unit", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("meta", pa.string()),
    ]
)

_WS = re.compile(r"\s+")


def normalize_question(question: str) -> str:
    """Whitespace-collapsed, case-folded question: the text part of the duplicate key."""
    return _WS.sub(" ", question).strip().casefold()


def image_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sample_id(source: str, image_sha256: str, question: str) -> str:
    """Deterministic id from content, so reruns and resumes recognise finished rows."""
    key = "\x1f".join((source, image_sha256, normalize_question(question)))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


_INT = re.compile(r"^[-+]?\d+$")
_DECIMAL = re.compile(r"^[-+]?\d*\.(\d+)$")


def infer_answer_type(answer: str, choices: list[str] | None = None) -> tuple[str, int | None]:
    """``(answer_type, precision)`` for a source that does not state it.

    With choices: multi_choice. Otherwise an integer, a decimal (precision = its decimal
    places), a ``[...]`` list, or text. A source's own answer-type field always wins.
    """
    if choices:
        return "multi_choice", None
    a = str(answer).strip()
    if _INT.match(a):
        return "integer", None
    m = _DECIMAL.match(a)
    if m:
        return "float", len(m.group(1))
    if a.startswith("[") and a.endswith("]"):
        return "list", None
    return "text", None


def format_choices(choices: list[str]) -> str:
    """``Choices:`` followed by one ``(A) text`` line per choice, as benchmarks write them."""
    return "Choices:\n" + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
