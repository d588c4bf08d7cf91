"""Inference modes as one coroutine per row: ``run_mode(engine, row, call)``.

- ``direct``: one turn with the direct-answer prompt.
- ``cot``: C1 (``n`` samples).
- ``seat``: the single long SEAT prompt (``n`` samples).
- ``cascade``: C1, then C2 as a second user turn on the first C1 sample's conversation.
- ``best_of_n``: ``n`` sampled C1 answers, each self-evaluated by the same model (C2), with the
  probability of ``Accept`` read from the verdict token's log-probabilities.

A row's C2 is submitted the moment its own C1 is done, while other rows are still in their C1:
there is no batch barrier. The result holds mode-neutral columns (``RESULT_FIELDS``); every
answer is scored once, here, and the scores travel with the row.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from casseat_ray.answers import EXTRACT_MAX_TOKENS, ScoredAnswer, extraction_conversation, parse_extraction, score
from casseat_ray.config import SamplingConfig
from casseat_ray.engines import Completion, failed, failure_reason
from casseat_ray.inference.turns import c1_conversation, c2_conversation
from casseat_ray.prompts import Prompt

MODES = ("direct", "cot", "seat", "cascade", "best_of_n")
FIRST_PROMPT = {"direct": "direct", "cot": "c1", "seat": "seat", "cascade": "c1", "best_of_n": "c1"}

SCORE_TYPE = pa.struct([pa.field("extraction", pa.string()), pa.field("prediction", pa.string()),
                        pa.field("correct", pa.bool_()), pa.field("method", pa.string())])
RESULT_FIELDS = [
    pa.field("mode", pa.string()),
    pa.field("model", pa.string()),
    pa.field("adapter", pa.string()),
    pa.field("sampling", pa.string()),
    pa.field("c1_prompt_sha", pa.string()),
    pa.field("c1_texts", pa.list_(pa.string())),
    pa.field("c1_finish", pa.list_(pa.string())),
    pa.field("c1_errors", pa.list_(pa.string())),
    pa.field("c1_prompt_tokens", pa.int64()),
    pa.field("c1_output_tokens", pa.list_(pa.int64())),
    pa.field("c1_scores", pa.list_(SCORE_TYPE)),  # one per C1 sample; null for an engine error
    pa.field("c2_prompt_sha", pa.string()),
    pa.field("c2_texts", pa.list_(pa.string())),  # one per self-evaluated C1 sample
    pa.field("c2_finish", pa.list_(pa.string())),
    pa.field("c2_errors", pa.list_(pa.string())),
    pa.field("c2_prompt_tokens", pa.list_(pa.int64())),
    pa.field("c2_output_tokens", pa.list_(pa.int64())),
    pa.field("c2_scores", pa.list_(SCORE_TYPE)),
    pa.field("c2_accept_prob", pa.list_(pa.float64())),  # best_of_n: P(Accept) at the verdict token
    pa.field("c2_skipped", pa.string()),  # why C2 did not run (c1_error, or the skip rule's reason)
    pa.field("started_at", pa.float64()),  # when the row's first request was sent (Unix time)
    pa.field("seconds", pa.float64()),  # the row's own time from first request to last answer
]

# Skip rule for C2: (first C1 completion, its score) -> a reason to skip, or None to run C2.
SkipRule = Callable[[Completion, ScoredAnswer | None], str | None]


@dataclass(frozen=True)
class ModeCall:
    """How to run one mode: prompts, sampling per turn, scoring, adapter."""

    mode: str
    prompts: dict[str, Prompt]  # "c1" / "seat" / "direct" for the first turn, "c2" for C2
    model: str
    sampling: SamplingConfig  # the first turn; its ``n`` is the number of samples
    c2_sampling: SamplingConfig | None = None  # default: the first turn's, one sample
    protocol: str = "math"  # scoring protocol (answers.PROTOCOLS)
    adapter: Any = None  # LoRA adapter for every request of the row: a folder or an adapters.ShippedAdapter
    c2_skip: SkipRule | None = None  # cascade only: skip C2 after a C1 that cannot be kept
    # The few-shot extraction prompt: a reply no rule parses is sent back to the same model (its
    # adapter included: vLLM's CPU build must not mix adapters in one step) and scored on what
    # it extracts.
    extractor: Prompt | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")

    @property
    def second(self) -> SamplingConfig:
        base = self.c2_sampling or self.sampling.model_copy(update={"n": 1})
        if self.mode == "best_of_n" and base.logprobs is None:
            base = base.model_copy(update={"logprobs": 20})
        return base


def scored_dict(s: ScoredAnswer | None) -> dict | None:
    return None if s is None else {"extraction": s.extraction, "prediction": s.prediction, "correct": s.correct, "method": s.method}


def as_scored(d: dict | None) -> ScoredAnswer | None:
    return None if d is None else ScoredAnswer(d["extraction"], d["prediction"], bool(d["correct"]), d["method"])


_ANCHOR = re.compile(r"evaluation\s*[:：]?\s*[\[\(\{<]?\s*\**\s*$", re.IGNORECASE)


def accept_probability(c: Completion) -> float | None:
    """P(Accept) / (P(Accept) + P(Refine)) at the token where the verdict word starts, from
    the candidates' log-probabilities; None without a verdict or without log-probabilities."""
    text = ""
    for tok, top in zip(c.tokens, c.top_logprobs):
        if _ANCHOR.search(text) and tok.strip():
            mass = {"accept": 0.0, "refine": 0.0}
            for cand, lp in top.items():
                word = cand.strip().lower()
                for verdict in mass:
                    if word and verdict.startswith(word):
                        mass[verdict] += math.exp(lp)
            total = mass["accept"] + mass["refine"]
            return mass["accept"] / total if total > 0 else None
        text += tok
    return None


def first_failure(out: dict) -> tuple[str, str] | None:
    """``(reason, detail)`` of a result row's first failed request (``engines.failure_reason``:
    ``engine_error`` or ``prompt_too_long``), or None when every request was answered."""
    for turn in ("c1", "c2"):
        for finish, error in zip(out[f"{turn}_finish"] or [], out[f"{turn}_errors"] or []):
            if error:
                return failure_reason(finish), f"{turn.upper()}: {error}"
    return None


async def _turn(engine, outs: list[Completion], row: dict, call: ModeCall) -> tuple[list[Completion], list[dict | None]]:
    """A turn's completions with their scores (None for an engine error); with an extractor,
    the replies no rule parses are scored on the model's extraction (method ``model``)."""
    scores = [None if o.error else score(o.text, row, call.protocol) for o in outs]
    if call.extractor is not None:
        unparsed = [i for i, s in enumerate(scores) if s is not None and s.extraction is None and outs[i].text.strip()]
        sampling = SamplingConfig(temperature=0.0, max_tokens=EXTRACT_MAX_TOKENS)
        replies = await asyncio.gather(*(engine.generate(extraction_conversation(outs[i].text, row, call.extractor), sampling, call.adapter)
                                         for i in unparsed))
        for i, (reply,) in zip(unparsed, replies):
            extraction = None if reply.error else parse_extraction(reply.text)
            if extraction is not None:
                scores[i] = score(outs[i].text, row, call.protocol, extraction=extraction, method="model")
    return outs, [scored_dict(s) for s in scores]


async def run_mode(engine, row: dict, call: ModeCall) -> dict:
    """Run ``call.mode`` for one row on ``engine``; returns the ``RESULT_FIELDS`` values."""
    started_at, t0 = time.time(), time.perf_counter()
    first = call.prompts[FIRST_PROMPT[call.mode]]
    c1, c1_scores = await _turn(engine, await engine.generate(c1_conversation(row, first), call.sampling, call.adapter), row, call)
    out = dict(
        mode=call.mode, model=call.model, adapter=None if call.adapter is None else str(call.adapter),
        sampling=json.dumps(call.sampling.model_dump(mode="json"), sort_keys=True), c1_prompt_sha=first.sha,
        c1_texts=[o.text for o in c1], c1_finish=[o.finish_reason for o in c1], c1_errors=[o.error for o in c1],
        c1_prompt_tokens=c1[0].prompt_tokens, c1_output_tokens=[o.output_tokens for o in c1], c1_scores=c1_scores,
        c2_prompt_sha=None, c2_texts=None, c2_finish=None, c2_errors=None, c2_prompt_tokens=None, c2_output_tokens=None,
        c2_scores=None, c2_accept_prob=None, c2_skipped=None,
    )
    if call.mode in ("cascade", "best_of_n"):
        evaluated = c1[: 1 if call.mode == "cascade" else len(c1)]
        if all(o.error for o in evaluated):
            out["c2_skipped"] = "c1_error"
        elif call.mode == "cascade" and call.c2_skip is not None:
            out["c2_skipped"] = call.c2_skip(c1[0], as_scored(c1_scores[0]))
        if out["c2_skipped"] is None:
            c2p = call.prompts["c2"]

            async def check(o: Completion) -> list[Completion]:
                if o.error:  # this C1 sample failed: nothing to evaluate
                    return [failed(f"C1 failed: {o.error}")]
                return await engine.generate(c2_conversation(row, call.prompts["c1"], o.text, c2p), call.second, call.adapter)

            answers = await asyncio.gather(*(check(o) for o in evaluated))
            c2, c2_scores = await _turn(engine, [a[0] for a in answers], row, call)
            out.update(c2_prompt_sha=c2p.sha, c2_texts=[o.text for o in c2], c2_finish=[o.finish_reason for o in c2],
                       c2_errors=[o.error for o in c2], c2_prompt_tokens=[o.prompt_tokens for o in c2],
                       c2_output_tokens=[o.output_tokens for o in c2], c2_scores=c2_scores,
                       c2_accept_prob=[accept_probability(o) for o in c2] if call.mode == "best_of_n" else None)
    out.update(started_at=started_at, seconds=time.perf_counter() - t0)
    return out
