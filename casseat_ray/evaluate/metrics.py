"""Evaluation arithmetic (pure): which answer a mode's outputs give, best-of-N selection,
bootstrap intervals, paired differences and the self-evaluation (reflection) matrix."""

from __future__ import annotations

import random
from collections import Counter

from casseat_ray.answers import find_verdicts


def _rng(seed: int) -> random.Random:
    return random.Random(seed)


def bootstrap_ci(values: list[float], b: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (0/1 for accuracy)."""
    n = len(values)
    if n == 0:
        return (float("nan"), float("nan"))
    rng = _rng(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(b))
    lo = means[int((1 - level) / 2 * (b - 1))]
    hi = means[int((1 + level) / 2 * (b - 1))]
    return (lo, hi)


def paired_bootstrap(a: list[float], b_: list[float], b: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """The mean of ``b_ - a`` over the same items with a paired percentile interval (the same
    resampled items on both sides), and the share of resamples where the difference is <= 0."""
    if len(a) != len(b_):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b_)}")
    diffs = [y - x for x, y in zip(a, b_)]
    n = len(diffs)
    if n == 0:
        return {"n": 0, "diff": float("nan"), "ci95": [float("nan"), float("nan")], "p_not_better": float("nan")}
    rng = _rng(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(b))
    lo, hi = means[int((1 - level) / 2 * (b - 1))], means[int((1 + level) / 2 * (b - 1))]
    return {"n": n, "diff": sum(diffs) / n, "ci95": [lo, hi], "p_not_better": sum(m <= 0 for m in means) / b}


def verdict_of(text: str | None) -> str | None:
    """The self-evaluation's one verdict, or None (no verdict, or contradictory ones)."""
    found = set(find_verdicts(text))
    return found.pop() if len(found) == 1 else None


def majority(predictions: list[str | None]) -> str | None:
    """The most frequent non-empty prediction; ties go to the one seen first."""
    counts = Counter(p for p in predictions if p is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(p for p in predictions if p is not None and counts[p] == best)


def pick_best_of_n(predictions: list[str | None], accept_probs: list[float | None]) -> int | None:
    """Index of the sample to answer with: the highest probability of ``Accept`` (a missing
    probability counts as 0), ties broken by the majority prediction among the tied, then by
    order; None when no sample has a prediction."""
    candidates = [i for i, p in enumerate(predictions) if p is not None]
    if not candidates:
        return None
    score = {i: (accept_probs[i] if accept_probs[i] is not None else 0.0) for i in candidates}
    top = max(score.values())
    tied = [i for i in candidates if score[i] == top]
    winner = majority([predictions[i] for i in tied])
    return next(i for i in tied if predictions[i] == winner)


def reflection_cell(pass1_correct: bool, verdict: str | None, pass2_correct: bool) -> str:
    """One cascade item's cell: ``right|Accept|right`` and so on (verdict ``none`` if absent)."""
    return f"{'right' if pass1_correct else 'wrong'}|{verdict or 'none'}|{'right' if pass2_correct else 'wrong'}"


def reflection_summary(cells: list[str]) -> dict:
    """The pass-1 x verdict x pass-2 counts and the shares that say how good the self-check is."""
    counts = Counter(cells)
    n = len(cells)

    def share(pred) -> float:
        return sum(v for k, v in counts.items() if pred(*k.split("|"))) / n if n else float("nan")

    right1 = sum(v for k, v in counts.items() if k.startswith("right|"))
    wrong1 = n - right1
    return {
        "n": n,
        "matrix": dict(sorted(counts.items())),
        "accept_after_right": (sum(v for k, v in counts.items() if k.startswith("right|Accept|")) / right1) if right1 else float("nan"),
        "refine_after_wrong": (sum(v for k, v in counts.items() if k.startswith("wrong|Refine|")) / wrong1) if wrong1 else float("nan"),
        "fixes": share(lambda a, v, b: a == "wrong" and b == "right"),
        "breaks": share(lambda a, v, b: a == "right" and b == "wrong"),
        "verdict_share": share(lambda a, v, b: v != "none"),
    }
