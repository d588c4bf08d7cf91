"""Source adapters: each dataset format becomes canonical rows (``samples.SCHEMA``) or rejects.

Two layers, both pure functions over plain dicts (tested without Ray):

1. an *adapter* turns one item of a format into a *raw row*: question, answer, choices (a list
   or one delimited string), stated answer type / precision / unit, an image reference (path,
   bytes, base64 text or a Hugging Face ``{bytes, path}`` dict), and meta;
2. ``canonicalize`` reads and validates the image, parses choices, types the answer (the
   source's own field wins; otherwise inferred) and computes the deterministic sample id.

``casseat_ray.data`` streams files through these with Ray Data.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path
from typing import Any, Callable

from casseat_ray.config import FieldMap, ImageConfig, SourceConfig
from casseat_ray.images import CheckedImage, check_image
from casseat_ray.rows import REJECT_FIELDS  # noqa: F401  (re-exported: the row schema names them)
from casseat_ray.samples import ANSWER_TYPES, LETTERS, image_hash, infer_answer_type, sample_id

_BASE64 = re.compile(r"[A-Za-z0-9+/=]{16,}")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")
_IMAGE_TAG = re.compile(r"\s*<image\d*>\s*", re.IGNORECASE)
_CHOICE_LABEL = re.compile(r"^\s*\(?([A-Za-z])\s*[.):：]\s*|^\s*\(([A-Za-z])\)\s*")
_CHOICES_BLOCK = re.compile(r"\n?\s*Choices:\s*\n((?:\s*\([A-Z]\)[^\n]*\n?)+)", re.IGNORECASE)


class RowError(ValueError):
    """A row that cannot become a sample; ``reason`` is the reject reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------- helpers
def strip_image_tags(question: str) -> str:
    """Drop ``<image>`` / ``<image1>`` placeholders; the image travels separately."""
    return _IMAGE_TAG.sub(" ", question).strip()


# Full-width punctuation (CJK sources) is read as its ASCII form to find labels and
# delimiters; one character for one, so positions found in the translation cut the original.
_FULL_WIDTH = str.maketrans({"．": ".", "（": "(", "）": ")", "：": ":", "、": ".", "；": ";", "，": ","})


def _label(letter: str) -> re.Pattern:
    """``letter`` as an option label at the start or after a separator: A. / A) / (A) / A:"""
    return re.compile(rf"(?:^|(?<=[\s;,]))(?:\({letter}\)|{letter}\s*[.):])\s*")


def _split_labelled(text: str) -> list[str] | None:
    """``"A. x; y;B. z"`` cut at its labels A, B, C, ... in order, so a delimiter inside an
    option's text stays in it; None when the text does not start with label A."""
    norm = text.translate(_FULL_WIDTH)
    first = _label("A").match(norm)
    if not first:
        return None
    pieces, pos = [], first.end()
    for letter in LETTERS[1:]:
        nxt = _label(letter).search(norm, pos)
        if not nxt:
            break
        pieces.append(text[pos:nxt.start()])
        pos = nxt.end()
    pieces.append(text[pos:])
    return [re.sub(r"[;,；，\s]+$", "", p.strip()) for p in pieces]


def parse_choices(value: Any, delimiter: str = ";") -> list[str]:
    """Choices from a list or a delimited string such as ``"A. 3;B. 4;C. 5"``.

    A string that starts with label A is cut at its labels A, B, C, ... in order (a
    delimiter inside an option's text does not split it); otherwise at ``delimiter``. Labels
    (``A.``, ``(B)``, ``C)``, full-width ``B．`` ``（A）``) are removed and must run A, B, C,
    ... Raises :class:`RowError` (``bad_choices``) when the value cannot be read as two or
    more choices, or only partly: some pieces labelled and some not, labels out of order.
    """
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        items = [str(v) for v in (value.tolist() if hasattr(value, "tolist") else value) if v is not None]
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        items = _split_labelled(text)
        if items is not None:
            if len(items) < 2 or any(not i for i in items):
                raise RowError("bad_choices", f"cannot read {value!r} as two or more labelled choices")
            return items
        cuts = [i for i, ch in enumerate(text.translate(_FULL_WIDTH)) if ch == delimiter]
        items = [text[a + 1 if a >= 0 else 0:b] for a, b in zip([-1, *cuts], [*cuts, len(text)])]
    else:
        raise RowError("bad_choices", f"choices of type {type(value).__name__}")
    items = [i.strip() for i in items if i.strip()]
    if not items:
        return []
    labels = [_CHOICE_LABEL.match(i.translate(_FULL_WIDTH)) for i in items]
    if all(labels):
        found = [(m.group(1) or m.group(2)).upper() for m in labels]
        if found != list(LETTERS[: len(items)]):
            raise RowError("bad_choices", f"choice labels {found} are not A, B, C, ... in order")
        items = [i[m.end():].strip() for i, m in zip(items, labels)]
    elif any(m and _label(m.group(1) or m.group(2)).match(i.translate(_FULL_WIDTH)) for i, m in zip(items, labels)
             if m and (m.group(1) or m.group(2)).isupper()):
        raise RowError("bad_choices", f"some of {value!r} carry option labels and some do not")
    if len(items) < 2 or any(not i for i in items):
        raise RowError("bad_choices", f"cannot read {value!r} as two or more choices (delimiter {delimiter!r})")
    return items


def _split_inline_choices(question: str) -> tuple[str, list[str]]:
    """MathV360K-style questions carry ``Choices:\\n(A) ..`` inside the text."""
    m = _CHOICES_BLOCK.search(question)
    if not m:
        return question, []
    choices = [re.sub(r"^\s*\([A-Z]\)\s*", "", line).strip() for line in m.group(1).strip().splitlines() if line.strip()]
    return (question[: m.start()] + question[m.end():]).strip(), choices


def image_ref(value: Any) -> dict:
    """Normalize an image reference to ``{"path": str | None, "bytes": bytes | None}``."""
    if value is None:
        return {"path": None, "bytes": None}
    if isinstance(value, (bytes, bytearray)):
        return {"path": None, "bytes": bytes(value)}
    if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        return {"path": value.get("path"), "bytes": value.get("bytes")}
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("data:image") and "," in s:
            s = s.split(",", 1)[1]
        elif not _BASE64.fullmatch(s):
            return {"path": value, "bytes": None}
        try:
            data = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            return {"path": value, "bytes": None}
        # "img/a.png" is valid base64 too; only an image signature makes it encoded bytes.
        return {"path": None, "bytes": data} if data.startswith(_IMAGE_MAGIC) else {"path": value, "bytes": None}
    raise RowError("missing_image", f"image value of type {type(value).__name__}")


def _raw(question, answer, image, choices=None, answer_type=None, precision=None, unit=None, meta=None) -> dict:
    """Every adapter's output. Image placeholders (``<image>``) are dropped from the question
    here, for all formats: the image travels separately and the chat template places it."""
    if isinstance(question, str):
        question = strip_image_tags(question)
    return dict(question=question, answer=answer, image=image_ref(image), choices=choices, answer_type=answer_type, precision=precision, unit=unit, meta=meta or {})


# ---------------------------------------------------------------- adapters: item -> raw row
def adapt_mathv(item: dict, fields: FieldMap) -> dict:
    """MATH-V JSONL: options may be bare letters drawn in the image; answers may be LaTeX."""
    options = item.get("options") or []
    answer = str(item["answer"])
    if options:
        if answer in LETTERS[: len(options)]:
            answer = options[LETTERS.index(answer)]
    meta = {k: item.get(k) for k in ("id", "level", "subject", "solution") if k in item}
    return _raw(strip_image_tags(item["question"]), answer, item.get("image"), options, "multi_choice" if options else None, meta=meta)


def adapt_mathvista(item: dict, fields: FieldMap) -> dict:
    """MathVista testmini/test JSON values (the file is keyed by pid)."""
    choices = item.get("choices") or []
    kind = "multi_choice" if item.get("question_type") == "multi_choice" else item.get("answer_type")
    meta = {"pid": item.get("pid"), **(item.get("metadata") or {})}
    return _raw(item["question"], item.get("answer"), item.get("image"), choices, kind, item.get("precision"), item.get("unit"), meta)


def adapt_mathv360k(item: dict, fields: FieldMap) -> dict:
    """MathV360K: ``{id, image, conversations: [{from: human, value}, {from: gpt, value}]}``."""
    turns = item.get("conversations") or []
    human = next((t["value"] for t in turns if t.get("from") == "human"), None)
    gpt = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
    if human is None or gpt is None:
        raise RowError("missing_field", "conversations need one human and one gpt turn")
    question, choices = _split_inline_choices(strip_image_tags(human))
    answer = gpt.strip()
    if choices and answer.strip("()").upper() in LETTERS[: len(choices)] and len(answer.strip("()")) == 1:
        answer = choices[LETTERS.index(answer.strip("()").upper())]
    return _raw(question, answer, item.get("image"), choices, "multi_choice" if choices else None, meta={"id": item.get("id")})


def adapt_mapped(item: dict, fields: FieldMap) -> dict:
    """Any table: the config's field map says which column holds what."""
    def get(name: str | None, required: bool = False):
        if name is None:
            return None
        if name not in item:
            if required:
                raise RowError("missing_field", f"column {name!r} not in row (columns: {sorted(item)[:12]})")
            return None
        return item[name]

    choices = parse_choices(get(fields.choices), fields.choices_delimiter)
    answer = get(fields.answer, required=True)
    answer = None if answer is None else str(answer)
    if choices and answer is not None and answer.strip() in LETTERS[: len(choices)]:
        answer = choices[LETTERS.index(answer.strip())]
    used = {fields.question, fields.answer, fields.image, fields.choices, fields.answer_type, fields.precision, fields.unit}
    meta = {k: v for k, v in item.items() if k not in used and isinstance(v, (str, int, float, bool, type(None)))}
    return _raw(get(fields.question, required=True), answer, get(fields.image, required=True), choices,
                get(fields.answer_type), get(fields.precision), get(fields.unit), meta)


def adapt_canonical(item: dict, fields: FieldMap) -> dict:
    """Rows already in the canonical schema (e.g. written by ``casseat make-demo-data``)."""
    meta = json.loads(item.get("meta") or "{}")
    return _raw(item["question"], item["answer"], item["image"], list(item.get("choices") or []),
                item.get("answer_type"), item.get("precision"), item.get("unit"), meta)


ADAPTERS: dict[str, Callable[[dict, FieldMap], dict]] = {
    "mathv": adapt_mathv,
    "mathvista": adapt_mathvista,
    "mathv360k": adapt_mathv360k,
    "generic": adapt_mapped,
    "hf": adapt_mapped,
    "canonical": adapt_canonical,
}


# ---------------------------------------------------------------- raw row -> canonical row
def _read_image(ref: dict, image_root: Path | None) -> bytes | None:
    if ref.get("bytes") is not None:
        return bytes(ref["bytes"])
    path = ref.get("path")
    if not path:
        return None
    p = Path(path)
    if not p.is_absolute() and image_root is not None:
        p = image_root / p
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise RowError("missing_image", f"file not found: {p}") from None
    except (IsADirectoryError, PermissionError, OSError) as e:
        raise RowError("missing_image", f"cannot read {p}: {e}") from None


def _typed_answer(answer: str, choices: list[str], stated_type, stated_precision) -> tuple[str, str, int | None]:
    kind, precision = infer_answer_type(answer, choices)
    if stated_type not in (None, "") and not (isinstance(stated_type, float) and stated_type != stated_type):
        if stated_type not in ANSWER_TYPES:
            raise RowError("bad_answer_type", f"{stated_type!r} is not one of {ANSWER_TYPES}")
        kind = stated_type
    if stated_precision is not None and stated_precision == stated_precision:  # not NaN
        precision = int(float(stated_precision))
    if kind != "float":
        precision = None
    return answer, kind, precision


# Where each format keeps its own item id when the field map names none.
ID_FIELDS = {"mathvista": "pid", "canonical": "source_id"}


def source_item_id(item: dict, source: SourceConfig) -> str | None:
    """The source's own id of an item, as text: the field map's ``id`` column, else the
    format's id field (``pid`` for MathVista, ``source_id`` for canonical files, ``id`` for the
    rest) when the item has it. A named ``id`` column the item lacks is a ``missing_field``."""
    name = source.fields.id
    if name is not None and name not in item:
        raise RowError("missing_field", f"id column {name!r} not in row (columns: {sorted(item)[:12]})")
    value = item.get(name or ID_FIELDS.get(source.format, "id"))
    if value is None or (isinstance(value, float) and value != value):  # absent, null or NaN
        return None
    return str(value)


def canonicalize(raw: dict, source: SourceConfig, image_root: Path | None, images: ImageConfig) -> dict:
    """A canonical row; raises :class:`RowError` with the reject reason when it cannot be one."""
    question = raw.get("question")
    if question is not None and not isinstance(question, str):
        question = str(question)
    data = _read_image(raw["image"], image_root)
    checked = check_image(data, images)
    if not isinstance(checked, CheckedImage):
        raise RowError(checked.reason, checked.detail)
    answer = "" if raw.get("answer") is None else str(raw["answer"]).strip()
    choices = [str(c) for c in (raw.get("choices") or [])]
    answer, kind, precision = _typed_answer(answer, choices, raw.get("answer_type"), raw.get("precision"))
    unit = raw.get("unit")
    return dict(
        sample_id=sample_id(source.name, image_hash(data), question or ""),
        source_id=None,  # set by item_to_row from the item itself
        image=checked.data,
        image_format=checked.format,
        width=checked.width,
        height=checked.height,
        question=(question or "").strip(),
        choices=choices,
        answer=answer,
        answer_type=kind,
        precision=precision,
        unit=None if unit in (None, "") or unit != unit else str(unit),
        source=source.name,
        split=source.split,
        meta=json.dumps(raw.get("meta") or {}, ensure_ascii=False, default=str, sort_keys=True),
    )


def reject_row(source: SourceConfig, stage: str, reason: str, detail: str, raw: dict | None = None, source_id: str | None = None) -> dict:
    """A reject in the same schema as a canonical row (image and answer emptied)."""
    raw = raw or {}
    question = raw.get("question") if isinstance(raw.get("question"), str) else ""
    ident = json.dumps(raw.get("meta") or {}, sort_keys=True, default=str) + (source_id or "") + detail
    return dict(
        sample_id=sample_id(source.name, image_hash(ident.encode("utf-8", "replace")), question),
        source_id=source_id,
        image=b"", image_format="", width=0, height=0, question=question, choices=[], answer=str(raw.get("answer") or ""),
        answer_type="", precision=None, unit=None, source=source.name, split=source.split,
        meta=json.dumps(raw.get("meta") or {}, ensure_ascii=False, default=str, sort_keys=True),
        reject_stage=stage, reject_reason=reason, reject_detail=detail[:500],
    )


def _identity(item: dict, source: SourceConfig) -> dict:
    """What a reject keeps of an item the adapter could not read: its question and ids."""
    question = item.get(source.fields.question, item.get("question"))
    return {"question": question if isinstance(question, str) else None, "meta": {k: item.get(k) for k in ("id", "pid") if k in item}}


def item_to_row(item: dict, source: SourceConfig, image_root: Path | None, images: ImageConfig) -> dict:
    """Adapter + canonicalize for one item: a canonical row, or a reject row with its reason."""
    error = item.pop("_read_error", None)
    if error:
        reason, _, detail = error.partition(": ")
        return reject_row(source, "read", reason, detail, {"meta": {"line": item.get("_line")}})
    raw = ident = None
    try:
        ident = source_item_id(item, source)
        raw = ADAPTERS[source.format](item, source.fields)
        row = canonicalize(raw, source, image_root, images)
    except RowError as e:
        return reject_row(source, "validate", e.reason, e.detail, raw or _identity(item, source), ident)
    except (KeyError, TypeError, ValueError) as e:
        return reject_row(source, "validate", "malformed_row", f"{type(e).__name__}: {e}", raw or _identity(item, source), ident)
    row.update(source_id=ident, reject_stage=None, reject_reason=None, reject_detail=None)
    return row
