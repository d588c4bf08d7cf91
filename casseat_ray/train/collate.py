"""Turning SFT rows into model inputs with the student's own processor and chat template.

An SFT row holds ``messages`` (role/content strings, ``<image>`` marking where the image goes
in the first user turn), ``images`` (encoded bytes) and ``loss_on`` ("all" or "last"). The
rendered conversation is cut into segments at assistant-turn boundaries; each segment is
tokenized on its own (the processor expands the image placeholder into the image's exact
number of tokens), and only assistant segments get labels. Nothing is ever truncated: a
sample over the length budget is reported by the caller, so image token runs stay whole.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

IMAGE_TOKEN = "<image>"
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
    pixel_values: object | None  # torch.Tensor [patches, dim], or None without images
    image_grid_thw: object | None  # torch.Tensor [n_images, 3]
    token_types: list[int] | None = None  # mm_token_type_ids where the processor makes them (M-RoPE)
    positions: object | None = None  # torch.Tensor [3, len] of M-RoPE positions, set for packing

    def __len__(self) -> int:
        return len(self.input_ids)

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


def segments(messages: list[dict], processor, trained: list[int]) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, carries_loss)`` pieces, in order.

    An assistant turn's span is what rendering up to and including it adds after the
    generation prompt: its content and the end-of-turn marker, so the student learns to stop.
    """
    render = processor.apply_chat_template
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(to_conversation(messages[:i]), tokenize=False, add_generation_prompt=True)
        full = render(to_conversation(messages[: i + 1]), tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the chat template does not render turns as prefixes of each other; cannot find assistant spans")
        pieces.append((prompt[len(done):], False))
        pieces.append((full[len(prompt):], i in trained))
        done = full
    tail = render(to_conversation(messages), tokenize=False)[len(done):]
    if tail:
        pieces.append((tail, False))
    return [(t, lab) for t, lab in pieces if t]


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


def encode(row: dict, processor, label_mode: str = "last_assistant") -> Encoded:
    """Tokenize one SFT row; labels are the token ids inside trained assistant spans."""
    messages = list(row["messages"])
    images = _images(row)
    _check_markers(messages, len(images))
    trained = label_turns(messages, row.get("loss_on") or "all", label_mode)
    tok = processor.tokenizer
    image_token = getattr(processor, "image_token", None)
    ids: list[int] = []
    labels: list[int] = []
    types: list[int] = []
    has_types = False
    pixel_values = grid = None
    pending = list(images)
    for text, carries_loss in segments(messages, processor, trained):
        n_here = text.count(image_token) if image_token else 0
        if n_here:
            enc = processor(text=[text], images=pending[:n_here], return_tensors="pt")
            pending = pending[n_here:]
            piece = enc["input_ids"][0].tolist()
            if "mm_token_type_ids" in enc:
                has_types = True
                types.extend(enc["mm_token_type_ids"][0].tolist())
            else:
                types.extend([0] * len(piece))
            pixel_values, grid = _cat(pixel_values, enc["pixel_values"]), _cat(grid, enc["image_grid_thw"])
        else:
            piece = tok(text, add_special_tokens=False)["input_ids"]
            types.extend([0] * len(piece))
        ids.extend(piece)
        labels.extend(piece if carries_loss else [IGNORE] * len(piece))
    return Encoded(ids, labels, pixel_values, grid, types if has_types else None)


def count_tokens(row: dict, processor) -> int:
    """``len(encode(row, processor))`` without preparing a pixel: the same segments through the
    tokenizer, each image counted as the placeholder tokens the processor expands it to, from
    its size alone (what the length budget needs, at a fraction of the cost)."""
    from PIL import Image

    messages = list(row["messages"])
    sizes = [Image.open(io.BytesIO(data)).size for data in row.get("images") or []]  # the header only
    _check_markers(messages, len(sizes))
    image_token = getattr(processor, "image_token", None)
    per_image = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])["num_image_tokens"] if sizes else []
    trained = label_turns(messages, row.get("loss_on") or "all", "all_assistant")
    total, seen = 0, 0
    for text, _ in segments(messages, processor, trained):
        total += len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        n_here = text.count(image_token) if image_token else 0
        total += sum(n - 1 for n in per_image[seen:seen + n_here])  # one placeholder each is in the text already
        seen += n_here
    return total


def encode_responses(row: dict, processor) -> list[Encoded]:
    """AFT candidates of a CoT (or SEAT) row: every teacher response to the row's first user
    turn, labelled on the response. Self-evaluation rows give none, so each question's
    candidates are scored once, with its CoT sample."""
    if row.get("kind") == "self_eval" or not row.get("responses"):
        return []
    messages = list(row["messages"])
    prompt = messages[: next(i for i, m in enumerate(messages) if m["role"] == "assistant")]
    return [encode({**row, "messages": prompt + [{"role": "assistant", "content": text}], "loss_on": "all"}, processor, "all_assistant")
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


def _cat(a, b):
    import torch

    return b if a is None else torch.cat([a, b])


def collate(batch: list[Encoded], pad_id: int) -> dict:
    """Right-pad a batch; image patches and grids are concatenated in sample order."""
    import torch

    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
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
    """Image patches and grids of ``samples``, concatenated in the order their image tokens appear."""
    import torch

    pixels = [e.pixel_values for e in samples if e.pixel_values is not None]
    if not pixels:
        return {}
    return {"pixel_values": torch.cat(pixels),
            "image_grid_thw": torch.cat([e.image_grid_thw for e in samples if e.image_grid_thw is not None])}
