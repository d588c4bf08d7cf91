"""Answer extraction, normalization and scoring (MathVista's protocol, MATH-V's LaTeX answers).

Public API (stable names):

- ``extract_answer(text, choices=None, answer_type=None)`` -> the answer string or ``None``
- ``parse_verdict(text)`` -> ``"Accept"``, ``"Refine"`` or ``None`` (absent or contradictory)
- ``normalize_answer(extraction, choices, answer_type, precision)`` -> MathVista's prediction
- ``is_correct(prediction, answer, answer_type, precision=None, choices=None)`` -> bool
- ``score(response, sample)`` -> ``ScoredAnswer(extraction, prediction, correct, method)``
- ``build_query(sample)`` -> the MathVista-style benchmark query

Extraction never guesses: a long text with no recognisable final answer gives ``None``, and
the optional model extractor (``model_extract``) is the only thing that reads such text.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from decimal import Decimal
from functools import lru_cache

from casseat_ray.samples import LETTERS, format_choices

# ---------------------------------------------------------------- extraction patterns
# "The answer is X", "the final answer is: X", "Answer: X", "**Final Answer:** X", ...
_ANSWER_IS = re.compile(
    r"(?:the\s+)?(?:final\s+|correct\s+)?answer\s*(?:is|:|should\s+be|would\s+be)\s*:?\s*(?P<ans>[^\n]+)",
    re.IGNORECASE,
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_LETTER_FORMS = [
    re.compile(r"^\(?([A-Z])\)?[.:]?$"),  # "B", "(B)", "B.", "B)", "B:"
    re.compile(r"^\(([A-Z])\)\s"),  # "(B) text"
    re.compile(r"^([A-Z])[.)]\s"),  # "B. text", "B) text"
    re.compile(r"^(?:option|choice)\s*\(?([A-Z])\)?\b", re.IGNORECASE),  # "option B"
]
_OPTION_NAMED = re.compile(r"\b(?:option|choice)\s*\(?([A-Z])\)?(?![\w])", re.IGNORECASE)
_NUMBER = re.compile(r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+−]?\.\d+")
_ELIDED = re.compile(r"\.\.\.|…|\\[lc]?dots")  # "[9, 8, ..., 4", "1, 8, 8, …": cut off or elided
_VALUE_LIST = re.compile(r"\d\s*[,;]\s*[-+−]?\.?\d")  # "3, 4": two values where one is asked for
_MARKDOWN = re.compile(r"\*\*|__|`|^#+\s*", re.MULTILINE)  # bold, code, headings; not LaTeX's _
_TEXT = re.compile(r"\\(?:text|mbox)\s*\{([^{}]*)\}")
_FORMATTING = re.compile(r"\\(?:text|textbf|mathbf|mathrm|textit|mbox)\s*\{([^{}]*)\}")
_VERDICT = re.compile(
    r"evaluation\s*[:：]?\s*[\[\(\{<]?\s*\**\s*(accept(?:ed)?|refine[ds]?)\b", re.IGNORECASE
)


def _last_boxed(text: str) -> tuple[int, str] | None:
    """Position and content of the last ``\\boxed{...}``, with nested braces balanced."""
    found = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = (m.start(), text[m.end() : i - 1])
    return found


def _clean(candidate: str, literal: bool = False) -> str:
    """Strip the wrapping a model puts around a final answer (``literal``: keep \\textbf etc.)."""
    s = candidate.strip()
    boxed = _last_boxed(s)
    if boxed:
        s = boxed[1]
    s = _MARKDOWN.sub("", s).strip()
    s = re.sub(r"\s*[.。]+$", "", s).strip()  # sentence end, not a decimal point
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    s = re.sub(r"^\\\(|\\\)$", "", s).strip()
    s = re.sub(r"\s*[.。]+$", "", s).strip()
    s = (_TEXT if literal else _FORMATTING).sub(r"\1", s)
    if s.count("=") == 1 and not s.startswith("="):  # "x = 5" or "2160/2 = 1080": the value
        s = s.split("=")[1].strip()
    return s.strip().strip('"').strip("'").strip()


def _letter(candidate: str, n_choices: int) -> str | None:
    s = candidate.strip()
    for pattern in _LETTER_FORMS:
        m = pattern.match(s)
        if m and LETTERS.index(m.group(1).upper()) < n_choices:
            return m.group(1).upper()
    return None


def _bare_letter(candidate: str, n_choices: int) -> str | None:
    """A letter only when the candidate is nothing but the letter ("B", "(B)", "B.")."""
    m = _LETTER_FORMS[0].match(candidate.strip())
    return m.group(1).upper() if m and LETTERS.index(m.group(1).upper()) < n_choices else None


def _number(candidate: str) -> str | None:
    """The single number in a short candidate ("1,000 cm" -> "1000", "45%" -> "45")."""
    nums = _NUMBER.findall(candidate)
    if len(nums) != 1:
        return None
    return nums[0].replace(",", "").replace("−", "-")


def _final_candidate(text: str, literal: bool = False) -> tuple[str, str] | None:
    """The text after the last final-answer phrase or inside the last box, whichever is later."""
    best: tuple[int, str, str] | None = None
    for m in _ANSWER_IS.finditer(text):
        best = (m.start(), m.group("ans"), "answer_is")
    boxed = _last_boxed(text)
    if boxed and (best is None or boxed[0] > best[0]):
        best = (boxed[0], boxed[1], "boxed")
    if best is None:
        return None
    cand = _clean(best[1], literal)
    return (cand, best[2]) if cand else None


def extract_with_method(text: str | None, choices: list[str] | None = None, answer_type: str | None = None, literal: bool = False) -> tuple[str | None, str]:
    """``(extraction, method)``; method names the rule that fired, or ``"none"``.

    ``literal=True`` reads an option letter only when the final answer is nothing but the
    letter (MATH-V's scorer), instead of also from ``(B) 105`` or ``option B``.
    """
    letter_of = _bare_letter if literal else _letter
    if text is None:
        return None, "none"
    text = str(text).strip()
    if not text:
        return None, "none"
    choices = list(choices or [])
    numeric = answer_type in ("integer", "float")

    final = _final_candidate(text, literal)
    if final is not None:
        cand, method = final
        # A final answer is one value (or the list the answer type asks for): an elided or
        # cut-off answer line, or several values for a numeric answer, is no answer at all.
        if _ELIDED.search(cand):
            return None, "none"
        if numeric and len(_NUMBER.findall(cand)) > 1 and _VALUE_LIST.search(cand):
            return None, "none"
        if choices:
            letter = letter_of(cand, len(choices))
            if letter:
                return letter, method
        if numeric:
            return (_number(cand) or cand), method
        return cand, method

    whole = _clean(text, literal)
    if choices:
        letter = letter_of(whole, len(choices))
        if letter:
            return letter, "option_letter"
    if literal:  # the reply itself, unsalvaged
        return (whole, "literal") if whole else (None, "none")
    if choices:
        named = {m.upper() for m in _OPTION_NAMED.findall(text) if LETTERS.index(m.upper()) < len(choices)}
        if len(named) == 1:  # "I pick option C": one option named, however often
            return named.pop(), "option_letter"
        # An exact choice text that is the whole reply, or the only choice mentioned.
        for c in choices:
            if whole.casefold() == c.strip().casefold():
                return c, "choice_text"
        mentioned = [c for c in choices if c.strip() and re.search(rf"(?<!\w){re.escape(c.strip())}(?!\w)", text)]
        if len(mentioned) == 1 and len(text) <= 200:
            return mentioned[0], "choice_text"
    # A bare number, possibly with thousands separators, a unit or a percent sign.
    if len(whole) <= 40:
        num = _number(whole)
        if num is not None and re.fullmatch(r"[\s\w%°$.,:+\-−/()\\{}^]*", whole):
            return num, "number"
    # A short reply that is itself the answer (a word, a list, a LaTeX expression).
    if "\n" not in whole and len(whole) <= 40 and not numeric and not choices and len(whole.split()) <= 4:
        return whole, "short_reply"
    return None, "none"


def extract_answer(text: str | None, choices: list[str] | None = None, answer_type: str | None = None) -> str | None:
    """The final answer in ``text``, or ``None`` when there is none (never a guess).

    Multiple-choice answers come back as the option letter when a letter was given,
    numeric answers as the bare number.
    """
    return extract_with_method(text, choices, answer_type)[0]


def parse_verdict(text: str | None) -> str | None:
    """``Accept`` / ``Refine`` from ``Evaluation: ...``; ``None`` if absent or contradictory."""
    verdicts = find_verdicts(text)
    return verdicts[0] if verdicts and len(set(verdicts)) == 1 else None


def find_verdicts(text: str | None) -> list[str]:
    """Every verdict in order (a self-evaluation should hold exactly one)."""
    if not text:
        return []
    out = []
    for m in _VERDICT.finditer(_MARKDOWN.sub("", text)):
        out.append("Accept" if m.group(1).lower().startswith("accept") else "Refine")
    return out


# ---------------------------------------------------------------- MathVista normalization
@lru_cache(maxsize=65536)
def _edit_distance(a: str, b: str) -> int:
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(a, b)


def _most_similar(extraction: str, choices: list[str]) -> str:
    distances = [_edit_distance(extraction, c) for c in choices]
    return choices[distances.index(min(distances))]


def normalize_answer(extraction, choices: list[str] | None, answer_type: str | None, precision=None, question_type: str | None = None) -> str | None:
    """MathVista's normalization of an extraction into a prediction.

    multiple choice: ``(X)`` or a bare letter -> that choice's text, else the nearest choice by
    edit distance; integer: ``str(int(float(x)))``; float: ``str(round(float(x), precision))``;
    list and text: ``str(x)``. ``None`` when a number does not parse.
    """
    if question_type == "multi_choice" or (question_type is None and answer_type == "multi_choice") or (choices and question_type is None):
        if not choices:
            return None
        extraction = extraction.strip() if isinstance(extraction, str) else str(extraction)
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        letters = [LETTERS[i] for i in range(len(choices))]
        if extraction in letters:
            return choices[letters.index(extraction)]
        return _most_similar(extraction, list(choices))
    if answer_type == "integer":
        try:
            return str(int(float(extraction)))
        except (TypeError, ValueError, OverflowError):
            return None
    if answer_type == "float":
        try:
            return str(round(float(extraction), int(precision)))
        except (TypeError, ValueError, OverflowError):
            return None
    if extraction is None:
        return None
    return str(extraction)


# ---------------------------------------------------------------- equivalence
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _as_latex(s: str) -> str:
    s = s.strip()
    return s if s.startswith("$") or s.startswith("\\(") or s.startswith("\\[") else f"${s}$"


@lru_cache(maxsize=65536)
def _parsed(s: str):
    from math_verify import parse

    # No signal-based timeout: it only works in a process's main thread, and Ray actors may not be.
    return parse(_as_latex(s), parsing_timeout=None)


_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_PLAIN_LIST = re.compile(r"([\[(])([-+.\d\s]+(?:,[-+.\d\s]+)+)([\])])")


def _numbers_equal(a: str, b: str, rounding: int) -> bool | None:
    gap = abs(Decimal(a) - Decimal(b))
    if gap == 0:
        return True
    return False if gap > Decimal(1).scaleb(-rounding) else None  # rounding moves each by at most half a unit


def _plain_values_equal(a: str, b: str, rounding: int) -> bool | None:
    """Equality of plain answers without the symbolic parser (a few ms a call, the largest
    per-row cost of a teacher stage); None for anything else, which the parser decides.

    Two plain decimal numbers: the same value is equal, values more than ``10**-rounding``
    apart are not, as the parser rules; near-equal ones go to it. Two lists of plain numbers in
    the same brackets (``[2, 3, 8]``): element by element, in order, as the parser compares
    them (a tuple; with two elements an interval, whose ends decide)."""
    a, b = a.strip().strip("$").strip(), b.strip().strip("$").strip()
    if _PLAIN_NUMBER.fullmatch(a) and _PLAIN_NUMBER.fullmatch(b):
        return _numbers_equal(a, b, rounding)
    la, lb = _PLAIN_LIST.fullmatch(a), _PLAIN_LIST.fullmatch(b)
    if not (la and lb and la[1] + la[3] == lb[1] + lb[3]):
        return None
    xs, ys = [x.strip() for x in la[2].split(",")], [y.strip() for y in lb[2].split(",")]
    if not all(_PLAIN_NUMBER.fullmatch(v) for v in xs + ys):
        return None
    if len(xs) != len(ys):
        return False
    verdicts = [_numbers_equal(x, y, rounding) for x, y in zip(xs, ys)]
    if False in verdicts:
        return False
    return True if all(verdicts) else None


def warm_up() -> None:
    """Imports the symbolic checker and runs it once on each answer shape it meets (fractions,
    degrees, lists, words): its first calls cost about 2 s of imports and parser set-up, which
    a stage would otherwise pay on its first rows with its event loop blocked."""
    for a, b in (("\\frac{1}{2}", "0.5"), ("45°", "30°"), ("[5, 8]", "[1, 3]"), ("blue", "red"), ("x+1", "2x")):
        math_equal(a, b)


@lru_cache(maxsize=65536)
def math_equal(a: str, b: str, rounding: int = 6) -> bool:
    """Mathematical equivalence of two answers (fractions, roots, pi, degrees, decimals),
    numbers compared at ``rounding`` decimals."""
    if a is None or b is None:
        return False
    if a.strip() == b.strip():
        return True
    plain = _plain_values_equal(a, b, rounding)
    return symbolic_equal(a, b, rounding) if plain is None else plain


def symbolic_equal(a: str, b: str, rounding: int = 6) -> bool:
    """``math_verify``'s verdict: both answers parsed as LaTeX and compared by sympy."""
    from math_verify import verify

    pa, pb = _parsed(a), _parsed(b)
    if not pa or not pb:
        return False
    try:
        return bool(verify(pa, pb, float_rounding=rounding, timeout_seconds=None))
    except Exception:  # sympy can fail on odd input; not equal is the honest answer
        return False


_DECORATED = re.compile(r"\\(?:mathrm|circ|text|mbox|operatorname)|~|°")
_SEQUENCE = re.compile(r"^\s*\d+(?:\s*-\s*\d+){2,}\s*$")  # "5-2-3-1-4" is an order, not arithmetic


def same_value(a: str | None, b: str | None) -> bool:
    """Equal as written, or mathematically equal; orders such as ``5-2-3-1-4`` only as written."""
    if a is None or b is None:
        return False
    if a.strip().casefold() == b.strip().casefold():
        return True
    if _SEQUENCE.match(a.strip("$ ")) or _SEQUENCE.match(b.strip("$ ")):
        return a.replace(" ", "").strip("$") == b.replace(" ", "").strip("$")
    return math_equal(a, b)


def mathv_equal(extraction: str | None, answer: str | None) -> bool:
    """MATH-V's equality: the extraction (case, spaces and ``$`` dropped) equals the answer key
    as written (lower-cased), or both are plain math with the same value at 2 decimals; an
    answer key with units, degrees or text markup never matches by value."""
    if extraction is None or answer is None:
        return False
    na, nb = extraction.casefold().replace(" ", "").replace("$", ""), answer.casefold().strip()
    if na == nb:
        return True
    if not na or not nb or _DECORATED.search(na) or _DECORATED.search(nb) or _SEQUENCE.match(na) or _SEQUENCE.match(nb.strip("$")):
        return False
    return math_equal(na, nb.strip("$"), rounding=2)


def is_correct(prediction, answer, answer_type: str | None, precision=None, choices: list[str] | None = None, protocol: str = "mathvista") -> bool:
    """Whether a normalized prediction is right.

    ``mathvista``: MathVista's rule, the prediction string equals the ground-truth string.
    ``math``: also mathematically equal for free-form answers (MATH-V's LaTeX answers); a
    chosen option is still right only if it is the answer's option.
    """
    if prediction is None or answer is None:
        return False
    if str(prediction) == str(answer):
        return True
    if protocol == "mathvista" or choices or answer_type == "multi_choice":
        return False
    return (mathv_equal if protocol == "mathv" else same_value)(str(prediction), str(answer))


# ---------------------------------------------------------------- scoring
PROTOCOLS = ("math", "mathv", "mathvista")


@dataclass
class ScoredAnswer:
    extraction: str | None
    prediction: str | None
    correct: bool
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def score(response: str | None, sample: dict, protocol: str = "math", extraction: str | None = None, method: str | None = None) -> ScoredAnswer:
    """Extract, normalize and judge ``response`` against a canonical ``sample``.

    ``protocol="mathvista"`` is MathVista's scorer exactly: a letter picks its choice, any other
    text picks the nearest choice by edit distance, numbers are normalized, strings compared.
    ``protocol="math"`` (default; MATH-V's rule, and what the data filters use) never guesses a
    choice: a letter must be the answer's letter, or the text must equal the answer's option
    by value (``96`` for ``$3 \\cdot 2^{5}$``); free-form answers are compared mathematically.
    A ready ``extraction`` (e.g. from the model extractor) skips the rule-based step.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    choices = list(sample.get("choices") or [])
    answer_type = "multi_choice" if choices else sample.get("answer_type")
    precision, answer = sample.get("precision"), sample.get("answer")
    if extraction is None:
        extraction, method = extract_with_method(response, choices, answer_type, literal=protocol == "mathv")
    method = method or "given"
    if extraction is None:
        return ScoredAnswer(None, None, False, method)
    if protocol == "mathvista" or not choices:
        prediction = normalize_answer(extraction, choices, answer_type, precision)
        if prediction is None and protocol == "math" and answer_type in ("integer", "float"):
            prediction = extraction  # LaTeX such as \frac{12}{2}: let equivalence decide
        return ScoredAnswer(extraction, prediction, is_correct(prediction, answer, answer_type, precision, choices, protocol), method)
    # MATH-V's own scorer takes the final answer literally: "(D) 105" is neither the letter D
    # nor the value 105 there, so its published numbers count it wrong.
    letter = _letter(extraction, len(choices)) if protocol == "math" else _bare_letter(extraction, len(choices))
    if letter is not None:
        prediction = choices[LETTERS.index(letter)]
        return ScoredAnswer(extraction, prediction, prediction == answer, method)
    named = next((c for c in choices if c.strip("$ ").casefold() == extraction.strip("$ ").casefold()), None)
    if named is not None and protocol == "math":  # an option as written: right only if it is the answer's, no parser needed
        return ScoredAnswer(extraction, named, named == answer, method)
    equal = mathv_equal if protocol == "mathv" else same_value
    return ScoredAnswer(extraction, answer, True, method) if equal(extraction, answer) else ScoredAnswer(extraction, named, False, method)


# ---------------------------------------------------------------- benchmark query
_HINTS = {
    "multi_choice": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
    "integer": "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.",
    "list": "Hint: Please answer the question requiring a Python list as an answer and provide the final list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.",
    "text": "Hint: Please answer the question and provide the final answer at the end.",
}


def _float_hint(precision) -> str:
    p = int(precision or 1)
    if p == 1:
        return "Hint: Please answer the question requiring a floating-point number with one decimal place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end."
    if p == 2:
        return "Hint: Please answer the question requiring a floating-point number with two decimal places and provide the final value, e.g., 1.23, 1.34, 1.45, at the end."
    return "Hint: Please answer the question requiring a floating-point number and provide the final value, e.g., 1.2, 1.3, 1.4, at the end."


def build_query(sample: dict) -> str:
    """MathVista-style query: answer-type hint, question (with unit), ``Choices:`` lines."""
    choices = list(sample.get("choices") or [])
    kind = "multi_choice" if choices else (sample.get("answer_type") or "text")
    hint = _float_hint(sample.get("precision")) if kind == "float" else _HINTS.get(kind, _HINTS["text"])
    question = sample["question"].strip()
    if sample.get("unit"):
        question += f" (Unit: {sample['unit']})"
    parts = [hint, f"Question: {question}"]
    if choices:
        parts.append(format_choices(choices))
    return "\n".join(parts)


EXTRACT_MAX_TOKENS = 32  # an extraction is one short line


def extraction_conversation(response: str | None, sample: dict, prompt) -> list[dict]:
    """MathVista's few-shot extraction request for one response (``prompt``: the extract template)."""
    from casseat_ray.engines import text_part, user

    return [user(text_part(prompt.render(query=build_query(sample), response=response or "")))]


def parse_extraction(text: str) -> str | None:
    """The extractor's reply: its first line, or None when it says nothing."""
    text = text.strip()
    return text.splitlines()[0].strip() or None if text else None


def model_extract(engine, items: list[tuple[str, dict]], prompt=None) -> list[str | None]:
    """MathVista's few-shot extraction through the project's engine, for text no rule parses.

    ``items`` are ``(response, sample)`` pairs; returns one extraction (or ``None``) each.
    """
    from casseat_ray import prompts
    from casseat_ray.config import SamplingConfig

    prompt = prompt or prompts.load("extract")
    outs = engine.chat([extraction_conversation(r, s, prompt) for r, s in items], SamplingConfig(temperature=0.0, max_tokens=EXTRACT_MAX_TOKENS))
    return [None if o[0].error else parse_extraction(o[0].text) for o in outs]
