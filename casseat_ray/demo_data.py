"""Synthetic multimodal math questions drawn with PIL, with exact ground truth.

Each generator draws one picture and asks one question about it; together they cover every
answer type the scorer knows (multi_choice, integer, float with precision, text, list). The
output is canonical Parquet (see ``samples.py``) with the images embedded as PNG bytes.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

from casseat_ray.samples import image_hash, sample_id, to_table

SIZE = (224, 224)
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (230, 200, 30), "purple": (140, 60, 180)}


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", SIZE, (255, 255, 255))
    return img, ImageDraw.Draw(img)


def count_shapes(rng: random.Random):
    img, d = _canvas()
    target = rng.choice(["circle", "square", "triangle"])
    n_target, n_other = rng.randint(1, 7), rng.randint(0, 4)
    kinds = [target] * n_target + [rng.choice([k for k in ("circle", "square", "triangle") if k != target]) for _ in range(n_other)]
    rng.shuffle(kinds)
    cells = rng.sample(range(25), len(kinds))
    for kind, cell in zip(kinds, cells):
        x, y = 10 + (cell % 5) * 42, 10 + (cell // 5) * 42
        color = rng.choice(list(COLORS.values()))
        if kind == "circle":
            d.ellipse([x, y, x + 30, y + 30], fill=color)
        elif kind == "square":
            d.rectangle([x, y, x + 30, y + 30], fill=color)
        else:
            d.polygon([(x + 15, y), (x, y + 30), (x + 30, y + 30)], fill=color)
    return img, dict(question=f"How many {target}s are there in the image?", answer=str(n_target), answer_type="integer", task="count_shapes")


def tallest_bar(rng: random.Random):
    img, d = _canvas()
    names = rng.sample(list(COLORS), 4)
    heights = rng.sample(range(30, 190, 10), 4)
    for i, (name, h) in enumerate(zip(names, heights)):
        x = 20 + i * 50
        d.rectangle([x, 210 - h, x + 36, 210], fill=COLORS[name])
    d.line([(10, 210), (214, 210)], fill=(0, 0, 0), width=2)
    tallest = names[heights.index(max(heights))]
    return img, dict(question="Which bar is the tallest?", choices=names, answer=tallest, answer_type="multi_choice", task="tallest_bar")


def bar_value(rng: random.Random):
    img, d = _canvas()
    values = [rng.randint(1, 9) for _ in range(3)]
    for v in range(0, 10):  # gridlines every unit so the value can be read off
        d.line([(20, 200 - v * 20), (214, 200 - v * 20)], fill=(200, 200, 200))
    for i, v in enumerate(values):
        x = 30 + i * 60
        d.rectangle([x, 200 - v * 20, x + 40, 200], fill=COLORS["blue"])
        d.text((x + 15, 205), "ABC"[i], fill=(0, 0, 0))
    i = rng.randrange(3)
    return img, dict(question=f"Each gridline is one unit. What is the value of bar {'ABC'[i]}?", answer=str(values[i]), answer_type="integer", task="bar_value")


def line_length(rng: random.Random):
    img, d = _canvas()
    ref_units = rng.choice([2, 4, 5])
    other_tenths = rng.randint(5, 45)  # the other line in tenths of a unit
    scale = 180 / max(ref_units, other_tenths / 10)
    d.line([(20, 70), (20 + ref_units * scale, 70)], fill=(0, 0, 0), width=4)
    d.line([(20, 150), (20 + other_tenths / 10 * scale, 150)], fill=COLORS["red"], width=4)
    return img, dict(
        question=f"The black line is {ref_units} units long. How long is the red line? Answer to one decimal place.",
        answer=f"{other_tenths / 10:.1f}", answer_type="float", precision=1, unit="units", task="line_length",
    )


def largest_shape_color(rng: random.Random):
    img, d = _canvas()
    names = rng.sample(list(COLORS), 3)
    sizes = rng.sample([30, 50, 70, 90], 3)
    for i, (name, s) in enumerate(zip(names, sizes)):
        cx = 40 + i * 72
        d.ellipse([cx - s // 2.5, 112 - s // 2.5, cx + s // 2.5, 112 + s // 2.5], fill=COLORS[name])
    largest = names[sizes.index(max(sizes))]
    return img, dict(question="What color is the largest circle? Answer with one word.", answer=largest, answer_type="text", task="largest_color")


def clock_hour(rng: random.Random):
    img, d = _canvas()
    hour = rng.randint(1, 12)
    c, r = 112, 95
    d.ellipse([c - r, c - r, c + r, c + r], outline=(0, 0, 0), width=3)
    for h in range(12):
        a = math.radians(h * 30 - 90)
        d.line([(c + 0.85 * r * math.cos(a), c + 0.85 * r * math.sin(a)), (c + r * math.cos(a), c + r * math.sin(a))], fill=(0, 0, 0), width=3)
    a = math.radians(hour * 30 - 90)
    d.line([(c, c), (c + 0.5 * r * math.cos(a), c + 0.5 * r * math.sin(a))], fill=(0, 0, 0), width=6)
    d.line([(c, c), (c, c - 0.8 * r)], fill=(0, 0, 0), width=3)  # minute hand at 12
    return img, dict(question="The clock shows an exact hour. Which hour is it?", answer=str(hour), answer_type="integer", task="clock_hour")


def angle_size(rng: random.Random):
    img, d = _canvas()
    deg = rng.choice([30, 45, 60, 90, 120, 135])
    o = (40, 180)
    d.line([o, (210, 180)], fill=(0, 0, 0), width=3)
    a = math.radians(deg)
    d.line([o, (o[0] + 150 * math.cos(a), o[1] - 150 * math.sin(a))], fill=(0, 0, 0), width=3)
    options = sorted(rng.sample([x for x in (30, 45, 60, 90, 120, 135) if x != deg], 3) + [deg])
    return img, dict(question="What is the size of the angle between the two lines?", choices=[f"{x}°" for x in options], answer=f"{deg}°", answer_type="multi_choice", task="angle_size")


def digits_in_order(rng: random.Random):
    img, d = _canvas()
    digits = [rng.randint(0, 9) for _ in range(rng.randint(2, 4))]
    for i, dig in enumerate(digits):
        x = 20 + i * 50
        d.rectangle([x, 90, x + 40, 140], outline=(0, 0, 0), width=2)
        # Draw the digit as that many dots, so it is readable without fonts.
        for k in range(dig):
            d.ellipse([x + 4 + (k % 3) * 12, 95 + (k // 3) * 14, x + 12 + (k % 3) * 12, 103 + (k // 3) * 14], fill=(0, 0, 0))
    return img, dict(question="Each box holds some dots. List the number of dots in each box from left to right.", answer=str(digits), answer_type="list", task="dots_list")


GENERATORS = [count_shapes, tallest_bar, bar_value, line_length, largest_shape_color, clock_hour, angle_size, digits_in_order]
SOURCE = "demo"


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` canonical rows; generators take turns so every answer type appears once n >= 8."""
    rows, seen = [], set()
    rng = random.Random(seed)
    attempt = 0
    while len(rows) < n:
        gen = GENERATORS[attempt % len(GENERATORS)]
        attempt += 1
        img, item = gen(rng)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=False)
        data = buf.getvalue()
        sid = sample_id(SOURCE, image_hash(data), item["question"])
        if sid in seen:  # the same picture and question again: draw another
            continue
        seen.add(sid)
        rows.append(
            dict(
                sample_id=sid, source_id=f"demo-{seed}-{len(rows):05d}", image=data, image_format="PNG", width=img.width, height=img.height,
                question=item["question"], choices=item.get("choices", []), answer=item["answer"],
                answer_type=item["answer_type"], precision=item.get("precision"), unit=item.get("unit"),
                source=SOURCE, split="train", meta=json.dumps({"task": item["task"], "seed": seed}),
            )
        )
    return rows


def make_demo_data(out: str | Path, n: int = 64, seed: int = 0) -> Path:
    """Write ``n`` demo rows to ``out/demo.parquet``; returns the file path."""
    import pyarrow.parquet as pq

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo.parquet"
    pq.write_table(to_table(make_rows(n, seed)), path)
    return path
