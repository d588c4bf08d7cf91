"""Turning SFT rows into model inputs with the student's own processor and chat template.

An SFT row holds ``messages`` (role/content strings, ``<image>`` marking where the image goes
in the first user turn), ``images`` (encoded bytes) and ``loss_on`` ("all" or "last"). The
whole conversation is rendered with the student's chat template and tokenized once, as the
model reads it at inference (no special tokens added: the template writes its own); a
trained assistant turn's labels are the tokens whose characters lie inside that turn's
span, cut from the token offsets: its text and the template's closing where that holds the
end-of-sequence token (Qwen's ``<|im_end|>`` and line), else its text and the tokenizer's
end-of-sequence token inserted after it (LLaVA-1.5 closes a turn with a space), so the
student learns to stop. The processor then expands each image placeholder into
the image's exact number of tokens. Nothing is ever truncated: a sample over the length
budget is reported by the caller, so image token runs stay whole.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from casseat_ray.synth.mix import IMAGE_TOKEN  # the SFT set's image marker, written where samples are built

IGNORE = -100


class BadSample(ValueError):
    """A sample that cannot be trained on as it is (its images and markers disagree); the loop
    drops and counts it, where a problem of the template or model stops the run."""


class NoLabels(BadSample):
    """A sample without an assistant turn: nothing to put the loss on."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    images: dict  # the processor's image inputs (pixel_values, image_grid_thw, ...), {} without images
    token_types: list[int] | None = None  # mm_token_type_ids where the processor makes them (M-RoPE)
    positions: object | None = None  # torch.Tensor [3, len] of M-RoPE positions, set for packing

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def pixel_values(self):
        return self.images.get("pixel_values")

    @property
    def image_grid_thw(self):
        return self.images.get("image_grid_thw")

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def to_conversation(messages: list[dict]) -> list[dict]:
    """``<image>`` markers in string contents become image parts (in place, in order)."""
    conv = []
    for m in messages:
        parts = []
        for i, piece in enumerate(m["content"].split(IMAGE_TOKEN)):
            if i > 0:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        conv.append({"role": m["role"], "content": parts})
    return conv


def prompt_turns(messages: list[dict]) -> list[dict]:
    """The turns before the first assistant turn: what the model is asked (all of them when
    no assistant turn follows)."""
    return messages[: next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))]


def label_turns(messages: list[dict], loss_on: str, label_mode: str) -> list[int]:
    """Indices of the assistant messages that carry loss.

    Self-evaluation rows (``loss_on == "last"``) always train on their final turn only, and
    so does every row when ``label_mode`` is ``last_assistant``.
    """
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise NoLabels("sample has no assistant turn")
    if loss_on == "last" or label_mode == "last_assistant":
        return turns[-1:]
    return turns


def label_spans(messages: list[dict], processor, trained: list[int]) -> tuple[str, list[tuple[int, int, int]]]:
    """The whole rendered conversation and, per trained assistant turn, where its span starts,
    where its text ends (trailing whitespace left out) and where the rendered turn ends.

    A turn's span is what rendering up to and including it adds after the generation prompt.
    """
    render = processor.apply_chat_template
    full = render(to_conversation(messages), tokenize=False)
    spans = []
    for i in trained:
        prompt = render(to_conversation(messages[:i]), tokenize=False, add_generation_prompt=True)
        upto = render(to_conversation(messages[: i + 1]), tokenize=False)
        if not (full.startswith(upto) and upto.startswith(prompt)):
            raise ValueError("the chat template does not render turns as prefixes of each other; cannot find assistant spans")
        spans.append((len(prompt), len(upto.rstrip()), len(upto)))
    return full, spans


def text_tokens(messages: list[dict], processor, trained: list[int]) -> tuple[str, list[int], list[int]]:
    """(rendered text, token ids, labels) of a conversation before image expansion.

    Tokenized once as a whole; a token is labelled when its characters lie inside a trained
    span. A span holding the end-of-sequence token is labelled whole (the template's own
    closing, Qwen's ``<|im_end|>`` and its line, as the large fine-tuning frameworks do; the
    model stops at the token and never reaches the line); a span without one (LLaVA-1.5 closes
    a turn with a space) is labelled up to its text's end and gets the token inserted there.
    """
    full, spans = label_spans(messages, processor, trained)
    tok = processor.tokenizer
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    eos = tok.eos_token_id
    labelled, close = set(), set()
    for s, text_end, turn_end in spans:
        inside = [k for k, (a, b) in enumerate(offsets) if s <= a < b <= turn_end]
        if eos not in (ids[k] for k in inside):
            inside = [k for k in inside if offsets[k][1] <= text_end]
            if inside:
                close.add(inside[-1])
        labelled.update(inside)
    out_ids, labels = [], []
    for k, t in enumerate(ids):
        out_ids.append(t)
        labels.append(t if k in labelled else IGNORE)
        if k in close:
            out_ids.append(eos)
            labels.append(eos)
    return full, out_ids, labels


def _check_markers(messages: list[dict], n_images: int) -> None:
    n_markers = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if n_markers != n_images:
        raise BadSample(f"{n_markers} {IMAGE_TOKEN} markers but {n_images} images")


def _images(row: dict) -> list:
    from PIL import Image

    out = []
    for data in row.get("images") or []:
        img = Image.open(io.BytesIO(data))
        out.append(img.convert("RGB"))
    return out


def _expand(ids: list[int], labels: list[int], expanded: list[int], types: list[int] | None, image_id: int,
            eos: int) -> tuple[list[int], list[int], list[int]]:
    """``ids`` with each image placeholder replaced by its run in the processor's ``expanded``
    ids (the two agree elsewhere, but for the end-of-sequence tokens ``text_tokens`` inserted)."""
    out_ids, out_labels, out_types, j = [], [], [], 0
    for k, (t, lab) in enumerate(zip(ids, labels)):
        if t == image_id:
            if k and ids[k - 1] == image_id:
                continue  # adjacent placeholders: the run below covers them all
            n = 0
            while j + n < len(expanded) and expanded[j + n] == image_id:
                n += 1
            out_ids += expanded[j:j + n]
            out_labels += [IGNORE] * n
            out_types += types[j:j + n] if types else [0] * n
            j += n
        elif j < len(expanded) and expanded[j] == t:
            out_ids.append(t)
            out_labels.append(lab)
            out_types.append(types[j] if types else 0)
            j += 1
        elif t == eos and lab == eos:  # an end-of-sequence token text_tokens inserted
            out_ids.append(t)
            out_labels.append(lab)
            out_types.append(0)
        else:
            raise ValueError(f"the processor's tokens differ from its tokenizer's at token {k}; cannot place the labels")
    if j != len(expanded):
        raise ValueError(f"the processor made {len(expanded)} tokens, {j} of them placed; cannot place the labels")
    return out_ids, out_labels, out_types


def encode(row: dict, processor, label_mode: str = "last_assistant", like: Encoded | None = None) -> Encoded:
    """Tokenize one SFT row; labels are the tokens the student must generate in its trained
    assistant turns. ``like``: an encoding of a row with the same images (an AFT candidate's
    reference sample), whose image inputs and image-token runs are taken as they are instead of
    running the image processor again."""
    messages = list(row["messages"])
    n_images = len(row.get("images") or [])
    _check_markers(messages, n_images)
    trained = label_turns(messages, row.get("loss_on") or "all", label_mode)
    full, ids, labels = text_tokens(messages, processor, trained)
    if not n_images:
        return Encoded(ids, labels, {})
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(processor.image_token)
    if like is not None:
        expanded, types = _with_runs_of(like, ids, image_id)
        inputs = like.images
    else:
        enc = processor(text=[full], images=_images(row), return_tensors="pt", add_special_tokens=False)
        expanded = enc["input_ids"][0].tolist()
        types = enc["mm_token_type_ids"][0].tolist() if "mm_token_type_ids" in enc else None
        inputs = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    ids, labels, token_types = _expand(ids, labels, expanded, types, image_id, tok.eos_token_id)
    return Encoded(ids, labels, inputs, token_types if types is not None else None)


def _runs(ids: list[int], image_id: int) -> list[tuple[int, int]]:
    """(start, end) of each run of image tokens in ``ids``."""
    out = []
    for k, t in enumerate(ids):
        if t == image_id:
            if k and ids[k - 1] == image_id:
                out[-1] = (out[-1][0], k + 1)
            else:
                out.append((k, k + 1))
    return out


def _with_runs_of(like: Encoded, ids: list[int], image_id: int) -> tuple[list[int], list[int] | None]:
    """``ids`` (``text_tokens``', one placeholder run per image run) expanded as the processor
    expanded ``like``'s: each placeholder run becomes ``like``'s run at the same place, with its
    token types; what the processor returns for the same images, without preparing a pixel."""
    mine, theirs = _runs(ids, image_id), _runs(like.input_ids, image_id)
    if len(mine) != len(theirs):
        raise ValueError(f"{len(mine)} image placeholder runs but the reference encoding has {len(theirs)}")
    expanded, types, at = [], ([] if like.token_types is not None else None), 0
    for (s, e), (a, b) in zip(mine, theirs):
        expanded += ids[at:s] + like.input_ids[a:b]
        if types is not None:
            types += [0] * (s - at) + like.token_types[a:b]
        at = e
    expanded += ids[at:]
    if types is not None:
        types += [0] * (len(ids) - at)
    return expanded, types


def measure(row: dict, processor, label_mode: str = "last_assistant") -> tuple[int, int]:
    """(``len(encode(...))``, its label tokens) without preparing a pixel: the conversation
    through the tokenizer, each image counted as the placeholder tokens the processor expands
    it to, from its size alone (what planning and the length budget need, at a fraction of the
    cost)."""
    from PIL import Image

    messages = list(row["messages"])
    sizes = [Image.open(io.BytesIO(data)).size for data in row.get("images") or []]  # the header only
    _check_markers(messages, len(sizes))
    trained = label_turns(messages, row.get("loss_on") or "all", label_mode)
    _, ids, labels = text_tokens(messages, processor, trained)
    n_labels = sum(1 for t in labels if t != IGNORE)
    if not sizes:
        return len(ids), n_labels
    per_image = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])["num_image_tokens"]
    return len(ids) + sum(per_image) - len(per_image), n_labels  # one placeholder each is in the text already


def count_tokens(row: dict, processor) -> int:
    """``len(encode(row, processor))`` from :func:`measure`, with every assistant turn trained:
    the most end-of-sequence tokens ``encode`` can insert."""
    return measure(row, processor, "all_assistant")[0]


def encode_responses(row: dict, processor, ref: Encoded) -> list[Encoded]:
    """AFT candidates of a CoT (or SEAT) row: every teacher response to the row's first user
    turn, labelled on the response, sharing the image inputs of ``ref``, the row's own
    encoding (its images are processed once, not once per response). Self-evaluation rows give
    none, so each question's candidates are scored once, with its CoT sample."""
    if row.get("kind") == "self_eval" or not row.get("responses"):
        return []
    prompt = prompt_turns(list(row["messages"]))
    return [encode({**row, "messages": prompt + [{"role": "assistant", "content": text}], "loss_on": "all"}, processor, "all_assistant", like=ref)
            for text in row["responses"]]


def aft_group(ref: Encoded, cands: list[Encoded], ranks: list[int], cutoff_len: int) -> list[tuple[Encoded | None, int]] | None:
    """A question's AFT candidates with their ranks, or None when no better/worse pair is left.

    Over-long candidates are left out. A candidate identical to the reference sample (the
    teacher's kept response is one of its responses) becomes None: its score is read from the
    reference's own row instead of a second, identical forward row.
    """
    group = [(None if (c.input_ids == ref.input_ids and c.labels == ref.labels) else c, k)
             for c, k in zip(cands, ranks) if len(c) <= cutoff_len]
    return group if len({k for _, k in group}) > 1 else None


def aft_rows(samples: list[tuple[Encoded, list | None]]) -> tuple[list[Encoded], list[tuple[list[int], list[int]]]]:
    """Rows of one AFT forward pass from (reference sample, its ``aft_group``) pairs: the
    references first, then each candidate that is not a reference; and per question, the rows
    holding its candidates with their ranks."""
    rows = [e for e, _ in samples]
    groups = []
    for i, (_, group) in enumerate(samples):
        if group:
            at = []
            for c, _ in group:
                at.append(i if c is None else len(rows))
                if c is not None:
                    rows.append(c)
            groups.append((at, [k for _, k in group]))
    return rows, groups


def collate(batch: list[Encoded], pad_id: int) -> dict:
    """Right-pad a batch; image patches and grids are concatenated in sample order.

    No attention mask: the padding is on the right and attention is causal, so no real token
    ever sees a pad (a pad's own outputs carry no label), and SDPA runs its fused causal
    kernel instead of a masked one."""
    import torch

    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
    out = {"input_ids": ids, "labels": labels}
    if any(e.token_types is not None for e in batch):
        types = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            if e.token_types is not None:
                types[i, : len(e)] = torch.tensor(e.token_types)
        out["mm_token_type_ids"] = types
    return out | _image_inputs(batch)


def rope_positions(e: Encoded, rope_index) -> object | None:
    """A sample's own M-RoPE positions ``[3, len]`` from the model's ``get_rope_index`` (None
    for a model without M-RoPE, whose positions are plain 0..len-1)."""
    import torch

    if rope_index is None:
        return None
    types = torch.tensor([e.token_types if e.token_types is not None else [0] * len(e)])
    pos, _ = rope_index(torch.tensor([e.input_ids]), types, e.image_grid_thw)
    return pos[:, 0]


def collate_packed(rows: list[list[Encoded]], pad_id: int) -> dict:
    """Several samples per row, each attending only to itself.

    Positions restart at 0 for every sample (and for the padding that closes a row); with no
    attention mask, transformers reads those restarts as sample boundaries and builds a
    block-diagonal causal mask (only when the forward pass runs without a KV cache:
    ``use_cache=False``). M-RoPE models get ``[4, batch, len]`` positions: the text
    positions that mark boundaries, then each sample's own three M-RoPE rows. A boundary is
    never a trained prediction, because every sample starts with untrained prompt tokens.
    """
    import torch

    width = max(sum(len(e) for e in row) for row in rows)
    mrope = any(e.positions is not None for row in rows for e in row)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    text = torch.zeros((len(rows), width), dtype=torch.long)
    pos3 = torch.zeros((3, len(rows), width), dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e)
            if e.labels[0] != IGNORE:
                raise ValueError("a packed sample must start with an untrained token")
            ids[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at:at + n] = torch.tensor(e.labels)
            text[r, at:at + n] = torch.arange(n)
            pos3[:, r, at:at + n] = e.positions if e.positions is not None else torch.arange(n)
            if e.token_types is not None:
                types[r, at:at + n] = torch.tensor(e.token_types)
            at += n
        text[r, at:] = torch.arange(width - at)
        pos3[:, r, at:] = torch.arange(width - at)
    out = {"input_ids": ids, "labels": labels, "position_ids": torch.cat([text[None], pos3]) if mrope else text}
    if any(e.token_types is not None for row in rows for e in row):
        out["mm_token_type_ids"] = types
    return out | _image_inputs([e for row in rows for e in row])


def _image_inputs(samples: list[Encoded]) -> dict:
    """The samples' image inputs (patches, grids, ...), each concatenated in the order their
    image tokens appear. LLaVA-NeXT's ``[images, tiles, 3, h, w]`` pixels are zero-padded to the
    most tiles, as its processor pads a batch (the model reads each image's tiles from its size)."""
    import torch

    with_images = [e.images for e in samples if e.images]
    out = {}
    for k in with_images[0] if with_images else ():
        parts = [im[k] for im in with_images]
        if parts[0].dim() == 5:
            most = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in parts]
        out[k] = torch.cat(parts)
    return out
