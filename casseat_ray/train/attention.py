"""Attention for packed rows that computes only what each sample may see.

transformers reads restarting position ids as sample boundaries and, under SDPA, turns them
into a dense block-diagonal mask: every query still meets every key of its row, so a packed
row of L tokens costs L^2 of attention however short its samples are, and SDPA's fused causal
kernels are off. FlashAttention's varlen kernel skips the blocks, but it exists only on CUDA
with the ``flash-attn`` package. ``packed_sdpa`` does the same with plain SDPA: one causal
call per sample (its span is where the text positions restart at 0), so a row costs the sum
of its samples' squared lengths. It is used whenever ``train.packing`` is on.

Qwen-family vision towers attend image by image too. Under any attention but FlashAttention
they split their patches per image with ``.tolist()`` (a host sync in each of the 32 blocks on
a GPU, and a graph break that recompiles a compiled block for every image count); a "flash"
implementation is handed the images' bounds (``cu_seqlens``) instead. ``varlen_sdpa`` takes
those bounds: on a GPU one call of PyTorch's own varlen FlashAttention kernel covers every
image, with no sync; elsewhere one SDPA call per image, as transformers does.
"""

from __future__ import annotations

import inspect

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

try:  # PyTorch's varlen FlashAttention (CUDA)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

PACKED_ATTENTION = "casseat_packed_sdpa"
# transformers hands the sequence bounds only to implementations whose name contains "flash"
VARLEN_ATTENTION = "casseat_varlen_flash_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers' attention signature; query ``[batch, heads, len, dim]``, output ``[batch, len, heads, dim]``.

    Anything that is not a causal self-attention over packed rows (a vision tower, a padded
    batch with its mask) goes to transformers' own SDPA unchanged."""
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if attention_mask is not None or position_ids is None or not causal or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, is_causal=causal, **kwargs)
    if position_ids.dim() == 3:  # M-RoPE [3, batch, len]: every row restarts where the text does
        position_ids = position_ids[0]
    position_ids = position_ids.expand(query.shape[0], -1)
    rows = []
    for r, qkv in enumerate(zip(query.split(1), key.split(1), value.split(1))):
        starts = torch.nonzero(position_ids[r] == 0).flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        lengths = [b - a for a, b in zip(starts, [*starts[1:], query.shape[2]])]
        rows.append(_each_span(module, *qkv, lengths, is_causal=True, **kwargs))
    return torch.cat(rows), None


def _each_span(module, query, key, value, lengths: list[int], **kwargs):
    """SDPA within each span of ``lengths`` consecutive positions, on its own: output
    ``[batch, len, heads, dim]``. The spans are split off, not sliced: the backward of a split
    is one concatenation, that of each slice a zero tensor of the whole input."""
    return torch.cat([sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]
                      for q, k, v in zip(*(t.split(lengths, dim=2) for t in (query, key, value)))], dim=1)


def register() -> str:
    """Makes ``PACKED_ATTENTION`` a name ``from_pretrained(attn_implementation=...)`` accepts
    (in the process that builds the model). Left out of the mask registry on purpose:
    transformers then builds no mask for it."""
    from transformers import AttentionInterface

    # under ``train.compile`` it runs eager between the compiled parts of a layer: its per-sample
    # split reads the positions, which would recompile the layer for every packing layout
    AttentionInterface.register(PACKED_ATTENTION, torch.compiler.disable(packed_sdpa))
    return PACKED_ATTENTION


def varlen_sdpa(module, query, key, value, attention_mask, cu_seq_lens_q=None, max_length_q=None, scaling=None,
                dropout=0.0, is_causal=False, **kwargs):
    """Non-causal attention within each of several sequences laid end to end (a vision
    tower's images): query ``[1, heads, total, dim]``, bounds ``cu_seq_lens_q``, output
    ``[1, total, heads, dim]``. Anything else goes to transformers' own SDPA."""
    if cu_seq_lens_q is None or is_causal or dropout or query.shape[0] != 1 or key.shape[1] != query.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    d = query.shape[-1]
    if varlen_attn is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256:
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [total, heads, dim]
        bounds = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
        return varlen_attn(q, k, v, bounds, bounds, max_length_q, max_length_q, scale=scaling).unsqueeze(0), None
    return _per_sequence(module, query, key, value, cu_seq_lens_q, scaling), None


# under ``train.compile`` it runs eager between a compiled block's parts: its split reads the
# bounds, which would recompile the block for every image count
@torch.compiler.disable
def _per_sequence(module, query, key, value, cu_seq_lens, scaling):
    return _each_span(module, query, key, value, cu_seq_lens.diff().tolist(), scaling=scaling, is_causal=False)


def register_varlen(model) -> bool:
    """Gives ``model``'s vision tower ``varlen_sdpa`` when its blocks take sequence bounds
    (``cu_seqlens``: the Qwen families); True when it did."""
    from transformers import AttentionInterface

    takes_bounds = any("cu_seqlens" in inspect.signature(kind.forward).parameters for kind in {type(m) for m in model.modules()})
    if getattr(model.config, "vision_config", None) is None or not takes_bounds:
        return False
    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa)
    model.set_attn_implementation({"vision_config": VARLEN_ATTENTION})
    return True
