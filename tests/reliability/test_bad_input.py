"""Bad source data on the real data layer (Ray Data): broken images (B2), decompression bombs
(B3) and questions no engine should see (B5). One load of a source holding every case; each
bad row is a reject with its stage and reason, the good rows pass, nothing is lost."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from casseat_ray import data
from casseat_ray.config import load_config

pytestmark = pytest.mark.slow


def encode(img, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_header(w, h) -> bytes:
    """A PNG that declares ``w`` x ``h`` pixels and holds almost nothing."""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + _chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _chunk(b"IEND", b"")


def png_bomb(w, h) -> bytes:
    """A valid black RGB PNG of ``w`` x ``h``: a few MB on disk, ``3 w h`` bytes decoded."""
    packer, row, out = zlib.compressobj(9), b"\0" * (1 + 3 * w), []
    out += [packer.compress(row) for _ in range(h)]
    body = b"".join(out) + packer.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


B2 = {"corrupt_image", "empty_image", "not_an_image", "missing_image", "image_too_small"}
B5 = {"empty_question", "question_too_long", "not_utf8", "bad_json"}
BAD_CASES = [
    # (image file name, file bytes or None, question, answer, choices, expected reason or None)
    ("good1.png", encode(Image.new("RGB", (64, 64), (1, 2, 3))), "How many circles?", "3", None, None),
    ("good2.png", encode(Image.new("RGB", (80, 64), (9, 9, 9))), "Which is longer?", "B", "A. 3 cm;B. 4 cm", None),
    ("cmyk.jpg", encode(Image.new("CMYK", (64, 64), (0, 255, 0, 0)), "JPEG"), "What colour?", "red", None, None),
    ("palette.png", encode(Image.new("P", (64, 64), 7)), "How many dots?", "2", None, None),
    ("rgba.png", encode(Image.new("RGBA", (64, 64), (0, 0, 255, 128))), "How many lines?", "4", None, None),
    ("sixteen.png", encode(Image.new("I;16", (64, 64), 30000)), "How bright?", "1.5", None, None),
    ("corrupt.jpg", encode(Image.new("RGB", (300, 300), (5, 5, 5)), "JPEG")[:400], "Q corrupt?", "1", None, "corrupt_image"),
    ("zero.jpg", b"", "Q zero?", "1", None, "empty_image"),
    ("text.jpg", b"just some text, not a picture\n", "Q text?", "1", None, "not_an_image"),
    ("absent.png", None, "Q absent?", "1", None, "missing_image"),
    (None, None, "Q none?", "1", None, "missing_image"),
    ("bomb.png", png_header(20000, 20000), "Q bomb?", "1", None, "image_too_large"),
    ("strip.png", encode(Image.new("RGB", (1, 300))), "Q strip?", "1", None, "image_too_small"),
    ("good1.png", None, "   ", "1", None, "empty_question"),
    ("good2.png", None, "", "1", None, "empty_question"),
    ("good1.png", None, "How many? " + "very " * 40_000, "1", None, "question_too_long"),  # 200k characters
    ("good2.png", None, "Pick one", "A", "A. 3", "bad_choices"),
]


@pytest.fixture(scope="module")
def bad_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "images").mkdir()
    lines = []
    for i, (name, blob, question, answer, choices, _) in enumerate(BAD_CASES):
        if name and blob is not None:
            (root / "images" / name).write_bytes(blob)
        item = {"id": f"row{i}", "question": question, "answer": answer, "image": f"images/{name}" if name else None}
        if choices:
            item["choices"] = choices
        lines.append(json.dumps(item).encode())
    lines.append(lines[0].replace(b'"row0"', b'"row0-copy"'))  # a duplicate of the first row under its own id
    lines.append(b'{"question": "caf\xe9 latin-1 text", "answer": "1", "image": "images/good1.png"}')  # not UTF-8
    lines.append(b'{"question": "broken json", ')
    (root / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root / "data.jsonl"


@pytest.fixture(scope="module")
def loaded(ray_session, bad_source):
    cfg = load_config(None, [f"sources=[{{name: bad, format: generic, path: {bad_source}}}]"])
    ds = data.load(cfg).materialize()
    rows, f = ds.to_pandas(), data.funnel(ds)
    by_id = {}
    for r in rows.to_dict("records"):
        if r["reject_stage"] != "read":  # unreadable lines have no id to look up
            by_id.setdefault(r["source_id"], []).append(r)
    return rows, f, by_id


def _check(by_id, reasons: set[str]) -> dict:
    """Every case with one of ``reasons``: its row, under its own id, rejected for it; their details."""
    seen = {}
    for i, (_, _, question, _, _, reason) in enumerate(BAD_CASES):
        if reason not in reasons:
            continue
        (got,) = by_id[f"row{i}"]
        assert got["reject_reason"] == reason, (question[:40], got["reject_reason"], got["reject_detail"])
        assert got["reject_stage"] in ("validate", "ddf_rules")
        seen[f"row{i}"] = f"{reason} at {got['reject_stage']} ({got['reject_detail'][:60]})"
    return seen


def test_b2_broken_and_missing_images_are_rejected_at_validation(loaded, figures):
    rows, f, by_id = loaded
    figures.update(_check(by_id, B2))
    assert f["rejected"]["corrupt_image"] == f["rejected"]["empty_image"] == f["rejected"]["not_an_image"] == 1
    assert f["rejected"]["missing_image"] == 2  # a path that does not exist, and no image at all
    # the good rows beside them: accepted, every image decoded and normalized to RGB
    (kept,), (dup,) = by_id["row0"], by_id["row0-copy"]  # a row and its duplicate, which names it by its id
    assert kept["reject_reason"] is None and dup["reject_reason"] == "duplicate"
    assert dup["reject_detail"].startswith("same image and question as bad item row0 ")
    ok = rows[rows.reject_reason.isna()]
    figures.update(rows_in=f["in"], accepted=f["accepted"], rejected=dict(f["rejected"]))
    assert f["accepted"] == 6 and set(ok.answer_type) == {"integer", "multi_choice", "text", "float"}
    assert all(Image.open(io.BytesIO(b)).mode == "RGB" for b in ok.image)
    assert f["in"] == len(BAD_CASES) + 3 == f["accepted"] + sum(f["rejected"].values())  # nothing lost
    for name, stage in f["stages"].items():
        assert stage["in"] == stage["out"] + sum(stage["rejected"].values()), name


# VmHWM (the peak resident set of this process image; getrusage's ru_maxrss would also count
# the forking parent's peak, kept across exec)
DECODE = """
import re, sys
from casseat_ray.images import check_image
out = check_image(open(sys.argv[1], "rb").read())
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(type(out).__name__, getattr(out, "reason", ""), getattr(out, "width", ""), getattr(out, "height", ""), peak_kb // 1024)
"""


def test_b3_a_decompression_bomb_is_rejected_without_a_full_decode(loaded, tmp_path, figures):
    _, f, by_id = loaded
    figures.update(_check(by_id, {"image_too_large"}))  # 20000x20000 declared in the header, in the load
    # The decode as the validation tasks run it, in a process of its own: its peak memory.
    # A real bomb over the header limit (1.2 GB decoded), the largest image under it, and a
    # small one for the process's own footprint (Python, PIL, the package).
    peaks = {}
    for name, (w, h) in {"small": (64, 64), "bomb": (20000, 20000), "largest_allowed": (7900, 7900)}.items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(png_bomb(w, h))
        out = subprocess.run([sys.executable, "-c", DECODE, str(path)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        kind, *rest = out.stdout.split()
        peaks[name] = {"file_mb": round(path.stat().st_size / 2**20, 1), "decoded_mb": round(3 * w * h / 2**20), "result": kind,
                       "detail": " ".join(rest[:-1]), "peak_rss_mb": int(rest[-1])}
    figures.update(peaks)
    assert peaks["bomb"]["result"] == "ImageReject" and peaks["bomb"]["detail"].startswith("image_too_large")
    assert peaks["bomb"]["peak_rss_mb"] - peaks["small"]["peak_rss_mb"] < 64  # rejected from its header: nothing decoded
    assert peaks["largest_allowed"]["result"] == "CheckedImage" and peaks["largest_allowed"]["detail"] == "1001 1001"  # downscaled
    assert peaks["largest_allowed"]["peak_rss_mb"] < 1024


def test_b5_questions_no_engine_should_see_are_rejected_before_it(loaded, figures):
    _, f, by_id = loaded
    figures.update(_check(by_id, {"empty_question", "question_too_long"}))
    assert f["rejected"]["empty_question"] == 2 and f["rejected"]["question_too_long"] == 1
    assert f["rejected"]["not_utf8"] == 1 and f["rejected"]["bad_json"] == 1  # lines that are not a row at all
    # every one of them before any engine: at the read, validate or source-rule stage
    stages = {name: dict(st["rejected"]) for name, st in f["stages"].items() if set(st["rejected"]) & B5}
    figures.update(rejected_at=stages)
    assert set(stages) <= {"read", "validate", "ddf_rules"}


def test_b5_a_prompt_over_the_teachers_context_is_a_final_reject_the_engine_never_runs(tiny_models, teacher_engine, demo_rows, figures):
    """A question within the character limit whose prompt is over ``max_model_len`` in tokens:
    the teacher stage (the engine actor's class, on the session's real engine) and DDF level 2
    reject it as ``prompt_too_long``, final; vLLM's renderer refuses it in the actor process
    before the engine core, and its neighbour in the batch is answered."""
    import asyncio

    import pyarrow as pa

    from casseat_ray.config import Config, EngineConfig
    from casseat_ray.data import ROW_SCHEMA
    from casseat_ray.demo import TINY_ENGINE
    from casseat_ray.inference.stage import EngineStage
    from casseat_ray.synth.outputs import RETRY_REASONS
    from casseat_ray.synth.stages import LabelStage, TeacherTask

    cfg = Config.model_validate(dict(
        teacher=dict(model=str(tiny_models["teacher"]), engine=TINY_ENGINE, sampling=dict(max_tokens=16)),
        student=dict(model=str(tiny_models["student"]), engine=TINY_ENGINE)))
    long_question = "Evaluate " + "\u2211" * 700  # 709 characters, about 2,100 of the teacher's tokens
    assert len(long_question) < cfg.ddf_source.max_question_chars  # the source rules let it through
    rows = [dict(demo_rows[0], sample_id="short"), dict(demo_rows[1], sample_id="long", question=long_question)]
    batch = pa.Table.from_pylist([dict(r, reject_stage=None, reject_reason=None, reject_detail=None) for r in rows], schema=ROW_SCHEMA)
    stage = EngineStage(TeacherTask(cfg), teacher_engine.model, EngineConfig(**TINY_ENGINE), engine=teacher_engine)
    short, long = LabelStage(cfg)(asyncio.run(stage(batch))).to_pylist()
    figures.update(question_chars=len(long_question), max_model_len=TINY_ENGINE["max_model_len"],
                   reject=f"{long['reject_stage']}/{long['reject_reason']}", detail=long["reject_detail"][:160],
                   prompt_tokens_sent=long["c1_prompt_tokens"], neighbour_answered=bool(short["c1_texts"][0]))
    assert (long["reject_stage"], long["reject_reason"]) == ("ddf_labeled", "prompt_too_long")
    assert "maximum context length is 2048 tokens" in long["reject_detail"] and long["reject_reason"] not in RETRY_REASONS
    assert long["c1_finish"] == ["prompt_too_long"] and long["c1_prompt_tokens"] == 0 and long["c2_skipped"] == "c1_error"
    assert short["c1_finish"][0] in ("stop", "length") and short["c1_texts"][0] and short["c1_prompt_tokens"] > 0
