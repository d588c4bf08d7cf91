"""Attention for packed rows that computes only what each sample may see.

transformers reads restarting position ids as sample boundaries and, under SDPA, turns them
into a dense block-diagonal mask: every query still meets every key of its row, so a packed
row of L tokens costs L^2 of attention however short its samples are, and SDPA's fused causal
kernels are off. FlashAttention's varlen kernel skips the blocks, but it exists only on CUDA
with the ``flash-attn`` package. ``packed_sdpa`` does the same with plain SDPA: one causal
call per sample (its span is where the text positions restart at 0), so a row costs the sum
of its samples' squared lengths. It is used whenever ``train.packing`` is on.
"""

from __future__ import annotations

PACKED_ATTENTION = "casseat_packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers' attention signature; query ``[batch, heads, len, dim]``, output ``[batch, len, heads, dim]``.

    Anything that is not a causal self-attention over packed rows (a vision tower, a padded
    batch with its mask) goes to transformers' own SDPA unchanged."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if attention_mask is not None or position_ids is None or not causal or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, is_causal=causal, **kwargs)
    if position_ids.dim() == 3:  # M-RoPE [3, batch, len]: every row restarts where the text does
        position_ids = position_ids[0]
    position_ids = position_ids.expand(query.shape[0], -1)
    rows = []
    for r in range(query.shape[0]):
        starts = torch.nonzero(position_ids[r] == 0).flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        bounds = [*starts, query.shape[2]]
        rows.append(torch.cat([
            sdpa_attention_forward(module, query[r:r + 1, :, a:b], key[r:r + 1, :, a:b], value[r:r + 1, :, a:b], None,
                                   is_causal=True, **kwargs)[0]
            for a, b in zip(bounds, bounds[1:])], dim=1))
    return torch.cat(rows), None


def register() -> str:
    """Makes ``PACKED_ATTENTION`` a name ``from_pretrained(attn_implementation=...)`` accepts
    (in the process that builds the model). Left out of the mask registry on purpose:
    transformers then builds no mask for it."""
    import torch
    from transformers import AttentionInterface

    # under ``train.compile`` it runs eager between the compiled parts of a layer: its per-sample
    # split reads the positions, which would recompile the layer for every packing layout
    AttentionInterface.register(PACKED_ATTENTION, torch.compiler.disable(packed_sdpa))
    return PACKED_ATTENTION
