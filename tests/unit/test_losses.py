"""AFT's alignment loss against values computed by hand on small tensors."""

import math

import pytest
import torch

from casseat_ray.train.losses import IGNORE, alignment_loss, ranks_from_correct, sequence_scores


def test_sequence_scores_are_mean_logprobs_of_labelled_tokens():
    # vocab 2; logits chosen so p(token 1) = sigmoid(x)
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [0.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE, 1, 1, IGNORE]])  # position t is predicted by logits t-1
    s = sequence_scores(logits, labels)
    expected = (math.log(0.5) + math.log(0.75)) / 2
    assert s.shape == (1,) and s.item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError):
        sequence_scores(logits, torch.full((1, 4), IGNORE))


def test_alignment_loss_by_hand():
    s = torch.tensor([-1.0, -2.0, -3.5], requires_grad=True)
    ranks = ranks_from_correct([True, False, False])
    # pairs (0,1), (0,2): log(1 + e^{-1} + e^{-2.5})
    expected = math.log(1 + math.exp(-1.0) + math.exp(-2.5))
    assert alignment_loss(s, ranks, "detached").item() == pytest.approx(expected, abs=1e-6)
    # boundary, tau 0.5: floor = -1 - 0.5 = -1.5; s1=-2 is 0.5 under it, s2=-3.5 is 2.0 under it
    assert alignment_loss(s, ranks, "boundary", tau=0.5).item() == pytest.approx(expected + 0.5 + 2.0, abs=1e-6)
    assert alignment_loss(s, ranks, "boundary", tau=5.0).item() == pytest.approx(expected, abs=1e-6)


def test_detached_sends_no_gradient_into_negatives():
    s = torch.tensor([-1.0, -2.0, -3.5], requires_grad=True)
    alignment_loss(s, [0, 1, 1], "detached").backward()
    e1, e2 = math.exp(-1.0), math.exp(-2.5)
    z = 1 + e1 + e2
    assert s.grad[1].item() == 0.0 and s.grad[2].item() == 0.0
    assert s.grad[0].item() == pytest.approx(-(e1 + e2) / z, abs=1e-6)  # the positive is pulled up
    b = torch.tensor([-1.0, -2.0, -3.5], requires_grad=True)
    alignment_loss(b, [0, 1, 1], "boundary", tau=0.5).backward()
    # boundary: negatives get the softmax push down plus -1 from each active floor term
    assert b.grad[1].item() == pytest.approx(e1 / z - 1.0, abs=1e-6)
    assert b.grad[2].item() == pytest.approx(e2 / z - 1.0, abs=1e-6)
    assert b.grad[0].item() == pytest.approx(-(e1 + e2) / z, abs=1e-6)  # the floor is detached from positives


def test_ranking_uses_every_better_worse_pair_and_no_pair_means_zero():
    s = torch.tensor([-1.0, -1.5, -2.0], requires_grad=True)
    # ranks 0 > 1 > 2: pairs (0,1), (0,2), (1,2)
    expected = math.log(1 + math.exp(-0.5) + math.exp(-1.0) + math.exp(-0.5))
    assert alignment_loss(s, [0, 1, 2], "detached").item() == pytest.approx(expected, abs=1e-6)
    zero = alignment_loss(s, [0, 0, 0])
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ValueError):
        alignment_loss(s, [0, 1], "detached")
    with pytest.raises(ValueError):
        alignment_loss(s, [0, 1, 1], "margin")


def test_response_ranks_pick_the_feedback_the_config_asks_for():
    from casseat_ray.train.losses import response_ranks

    row = {"id": "q", "responses": ["a", "b", "c"], "responses_correct": [True, False, False], "responses_rank": [0, 1, 2]}
    assert response_ranks(row, ranking=False) == [0, 1, 1]
    assert response_ranks(row, ranking=True) == [0, 1, 2]
    with pytest.raises(ValueError, match="3 responses but 2 ranks"):
        response_ranks({**row, "responses_rank": [0, 1]}, ranking=True)


def _reference_scores(logits, labels):
    """The direct computation: fp32 log-softmax over the whole vocabulary at every position."""
    target = labels[:, 1:]
    mask = target != IGNORE
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1) / mask.sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_sequence_scores_equal_the_full_fp32_computation(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 40, 97) * 3).to(dtype).requires_grad_()
    labels = torch.full((3, 40), IGNORE)
    labels[0, 5:30] = torch.randint(0, 97, (25,))
    labels[1, 2:4] = torch.randint(0, 97, (2,))
    labels[1, 20:39] = torch.randint(0, 97, (19,))  # two labelled spans in one row
    labels[2, 39] = 7
    weights = torch.tensor([1.0, -2.0, 0.5])
    ref = _reference_scores(logits, labels)
    (ref * weights).sum().backward()
    ref_grad, logits.grad = logits.grad.clone(), None
    got = sequence_scores(logits, labels, chunk=7)  # spans cut into several chunks
    (got * weights).sum().backward()
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(logits.grad.float(), ref_grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_global_token_count_makes_micro_batches_equal_one_batch():
    from casseat_ray.train.losses import label_tokens, token_nll

    torch.manual_seed(1)
    vocab, weight = 11, torch.randn(11, 11, requires_grad=True)
    ids = torch.randint(0, vocab, (4, 12))
    labels = ids.clone()
    labels[:, :3] = IGNORE
    labels[0, 4:] = IGNORE  # a short answer (one label token) beside long ones
    labels[2, 9:] = IGNORE

    def logits(rows):
        return weight[ids[rows]]

    token_nll(logits(slice(0, 4)), labels).backward()  # one batch: the mean over its tokens
    one_batch, weight.grad = weight.grad.clone(), None
    n = label_tokens(labels)
    for r in range(4):  # four micro-batches of one sample, each divided by the step's count
        token_nll(logits(slice(r, r + 1)), labels[r:r + 1], n).backward()
    assert torch.allclose(weight.grad, one_batch, atol=1e-6)
    weight.grad = None
    for r in range(4):  # what a mean of micro-batch means gives instead: the short answer weighs more
        (token_nll(logits(slice(r, r + 1)), labels[r:r + 1]) / 4).backward()
    assert not torch.allclose(weight.grad, one_batch, atol=1e-3)
