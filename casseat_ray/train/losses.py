"""Losses: token NLL and AFT's constrained alignment term (pure torch, no model code).

AFT scores a chain of thought c for question q by its length-normalized log-likelihood
s(c) = mean_t log p(c_t | c_<t, q). The alignment term pushes every better CoT above every
worse one, L_A = log(1 + sum_{better b, worse w} exp(s(w) - s(b))); alone it drives worse
scores down without limit, so it is constrained:

- ``detached``: no gradient flows into the worse scores (only better ones are pulled up);
- ``boundary``: worse scores keep their gradient but are penalized only down to a floor
  tau below the lowest (detached) better score: + sum_w max(0, min_b s(b) - tau - s(w)).

Positives/negatives are ranks 0/1; a ranked list uses every better/worse pair.
"""

from __future__ import annotations

import functools

import torch

IGNORE = -100


def label_tokens(labels: torch.Tensor) -> int:
    """The labelled next-token targets of a batch (what a causal LM's loss averages over)."""
    return int((labels[:, 1:] != IGNORE).sum())


def token_nll(logits: torch.Tensor, labels: torch.Tensor, num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy of the labelled tokens: their mean (what a causal LM's own
    ``loss`` is when given ``labels``), or with ``num_tokens`` their sum divided by it -- the
    step's label-token count over all micro-batches and workers, so that every token weighs the
    same however the step's samples are split."""
    target = labels[:, 1:]
    if num_tokens is None:
        return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=IGNORE)
    return _summed_nll(logits[:, :-1], target) / num_tokens


def _summed_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The summed fp32 cross-entropy of the labelled targets (``[batch, positions]``)."""
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose logits a next-token loss reads: those followed by a label in any row
    of the batch. Asking the model for these alone (``logits_to_keep``) spares the vocabulary
    projection and the fp32 logits of every prompt and image token."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)


def kept_nll(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
    """``token_nll`` with ``num_tokens`` from the logits of the positions ``keep`` alone."""
    return _summed_nll(logits, labels[:, keep + 1]) / num_tokens


@functools.cache
def compiled_kept_nll():
    """``kept_nll`` under torch.compile (``train.compile``), built once per process: the fp32
    upcast, log-softmax and pick fuse into kernels that read the half-precision logits, so
    neither an fp32 copy of the logits nor their log-softmax is kept for the backward pass."""
    return torch.compile(kept_nll, dynamic=True)


SCORE_CHUNK_TOKENS = 4096  # positions whose fp32 log-sum-exp is computed at once


def _label_logprobs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position: the target's logit minus the log-sum-exp of its row,
    in fp32, for one chunk of positions."""
    picked = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def sequence_scores(logits: torch.Tensor, labels: torch.Tensor, chunk: int = SCORE_CHUNK_TOKENS) -> torch.Tensor:
    """Mean log-probability of the labelled tokens of each row: ``[batch]``.

    ``logits`` [batch, seq, vocab] predict the next token; ``labels`` [batch, seq] hold the
    target ids at their own positions and IGNORE elsewhere (the usual causal-LM layout). Each
    row is scored over the span from its first to its last labelled position, ``chunk``
    positions at a time (views of ``logits``, no copy), each chunk under activation
    checkpointing: no fp32 copy of the full-vocabulary logits exists at once, in the forward
    pass or in the backward pass (which recomputes a chunk's log-sum-exp when it needs it).
    """
    from torch.utils.checkpoint import checkpoint

    target = labels[:, 1:]
    mask = target != IGNORE
    count = mask.sum(-1)
    if (count == 0).any():
        raise ValueError("a sequence without labelled tokens has no score")
    sums = []
    for b in range(logits.shape[0]):
        where = mask[b].nonzero().squeeze(-1)
        total = logits.new_zeros((), dtype=torch.float32)
        for j in range(int(where[0]), int(where[-1]) + 1, chunk):
            part = (logits[b, :-1][j:j + chunk], target[b, j:j + chunk].clamp_min(0))
            lp = checkpoint(_label_logprobs, *part, use_reentrant=False) if logits.requires_grad else _label_logprobs(*part)
            total = total + (lp * mask[b, j:j + chunk]).sum()
        sums.append(total)
    return torch.stack(sums) / count


def alignment_loss(scores: torch.Tensor, ranks: list[int], variant: str = "boundary", tau: float = 1.0) -> torch.Tensor:
    """Constrained alignment term for the CoTs of one question.

    ``scores[i]`` is s(c_i); ``ranks[i]`` its rank (0 best; equal ranks form no pair).
    Returns a scalar (zero, still attached to the graph, when there is no better/worse pair).
    """
    if variant not in ("detached", "boundary"):
        raise ValueError(f"unknown AFT variant {variant!r}")
    if len(ranks) != scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} scores but {len(ranks)} ranks")
    pairs = [(b, w) for b in range(len(ranks)) for w in range(len(ranks)) if ranks[b] < ranks[w]]
    if not pairs:
        return scores.sum() * 0.0
    worse_scores = scores.detach() if variant == "detached" else scores
    diffs = torch.stack([worse_scores[w] - scores[b] for b, w in pairs])
    # log(1 + sum exp(d)) computed stably as logsumexp over [0, d...]
    loss = torch.logsumexp(torch.cat([diffs.new_zeros(1), diffs]), dim=0)
    if variant == "boundary":
        for w in sorted({w for _, w in pairs}):
            floor = torch.stack([scores[b] for b, ww in pairs if ww == w]).detach().min() - tau
            loss = loss + torch.relu(floor - scores[w])
    return loss


def aft_loss(logits: torch.Tensor, labels: torch.Tensor, n_refs: int, groups: list[tuple[list[int], list[int]]],
             variant: str, tau: float, weight: float, num_tokens: int | torch.Tensor | None = None,
             num_groups: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL on the first ``n_refs`` rows (the reference samples) plus ``weight`` times the
    alignment term over the questions; ``groups`` give each question's candidate rows and
    ranks (as ``collate.aft_rows`` lays them out). Both are means over this batch, or with
    ``num_tokens`` / ``num_groups`` sums divided by the step's global counts (``token_nll``).
    Returns (loss, alignment term)."""
    # The candidate rows after the references are scored as a slice (no copy of their logits);
    # only the references some question reuses are gathered.
    reused = sorted({r for rows, _ in groups for r in rows if r < n_refs})
    scores = dict(zip(reused, sequence_scores(logits[reused], labels[reused]))) if reused else {}
    if logits.shape[0] > n_refs:
        scores.update(zip(range(n_refs, logits.shape[0]), sequence_scores(logits[n_refs:], labels[n_refs:])))
    terms = torch.stack([alignment_loss(torch.stack([scores[r] for r in rows]), ranks, variant, tau) for rows, ranks in groups])
    align = terms.mean() if num_groups is None else terms.sum() / num_groups
    return token_nll(logits[:n_refs], labels[:n_refs], num_tokens) + weight * align, align


def ranks_from_correct(correct: list[bool]) -> list[int]:
    """Positives (right final answer) rank 0, negatives rank 1."""
    return [0 if c else 1 for c in correct]


def response_ranks(row: dict, ranking: bool) -> list[int]:
    """Ranks of an SFT row's teacher responses: right vs wrong final answer, or the synthesis
    job's three-level feedback (right, wrong answer, no usable answer) when ``ranking``."""
    ranks = list(row["responses_rank"] or []) if ranking else ranks_from_correct(row["responses_correct"] or [])
    if len(ranks) != len(row["responses"] or []):
        raise ValueError(f"row {row.get('id')}: {len(row['responses'] or [])} responses but {len(ranks)} ranks")
    return ranks
