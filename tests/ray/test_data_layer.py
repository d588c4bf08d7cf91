"""The source data layer on real Ray Data: every bad input gets its reason, nothing is lost."""

import io
import json
import struct
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from casseat_ray import data
from casseat_ray.config import load_config
from tests.conftest import shared_data


def encode(img, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header(w, h) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


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


def _load(ray_session, *overrides):
    cfg = load_config(None, list(overrides))
    ds = data.load(cfg).materialize()
    return ds.to_pandas(), data.funnel(ds)


def test_every_bad_input_gets_its_reason(ray_session, bad_source):
    rows, f = _load(ray_session, f"sources=[{{name: bad, format: generic, path: {bad_source}}}]")
    expected = {q: reason for _, _, q, _, _, reason in BAD_CASES}
    by_question = {}
    for r in rows.to_dict("records"):
        if r["reject_stage"] != "read":  # unreadable lines have no question to look up
            by_question.setdefault(r["question"], []).append(r)
    for question, reason in expected.items():
        got = by_question[question.strip()]
        if question == "How many circles?":  # the row and its duplicate, which names it by its id
            assert sorted(str(r["reject_reason"]) for r in got) == ["None", "duplicate"]
            dup = next(r for r in got if r["reject_reason"] == "duplicate")
            assert dup["source_id"] == "row0-copy" and dup["reject_detail"].startswith("same image and question as bad item row0 ")
            continue
        assert len(got) == 1 and got[0]["reject_reason"] == reason, (question, got[0]["reject_reason"], got[0]["reject_detail"])
        assert got[0]["source_id"] == f"row{[c[2] for c in BAD_CASES].index(question)}"  # rejects at every stage keep the id
    assert f["rejected"]["not_utf8"] == 1 and f["rejected"]["bad_json"] == 1
    assert f["in"] == len(BAD_CASES) + 3
    assert f["accepted"] == 6
    assert f["in"] == f["accepted"] + sum(f["rejected"].values())
    for name, stage in f["stages"].items():
        assert stage["in"] == stage["out"] + sum(stage["rejected"].values()), name
    ok = rows[rows.reject_reason.isna()]
    assert set(ok.answer_type) == {"integer", "multi_choice", "text", "float"}
    assert all(Image.open(io.BytesIO(b)).mode == "RGB" for b in ok.image)


def test_duplicates_kept_on_purpose_get_ids_of_their_own(ray_session, bad_source):
    spec = f"sources=[{{name: bad, format: generic, path: {bad_source}}}]"
    rows, f = _load(ray_session, spec, "ddf_source.dedup=false")
    ok = rows[rows.reject_reason.isna()]
    assert f["accepted"] == 7 and ok.sample_id.is_unique  # the duplicate is kept, under an id of its own
    twins = sorted(ok[ok.question == "How many circles?"].sample_id)
    assert len(twins) == 2 and twins[1] == twins[0] + "-1"
    again, _ = _load(ray_session, spec, "ddf_source.dedup=false")
    assert sorted(again[again.reject_reason.isna()].sample_id) == sorted(ok.sample_id)  # named alike on every rerun


def test_real_math_v_and_mathvista(ray_session):
    mathv = shared_data("math-v", "testmini.jsonl")
    vista = shared_data("mathvista", "testmini.json")
    rows, f = _load(ray_session, f"sources=[{{name: mathv, format: mathv, path: {mathv}}}, {{name: vista, format: mathvista, path: {vista}}}]")
    assert f["by_source"]["mathv"] == {"accepted": 304}
    assert f["by_source"]["vista"] == {"rejected": 1000} and f["rejected"] == {"missing_image": 1000}
    raw = {json.loads(line)["id"]: json.loads(line) for line in mathv.open()}
    got = rows[rows.source == "mathv"]
    assert set(got.source_id) == set(raw)
    vista_ids = set(json.loads(vista.read_text()))
    assert set(rows[rows.source == "vista"].source_id) == vista_ids  # the rejects name their pid
    for r in got.to_dict("records"):
        item = raw[r["source_id"]]
        if item["options"]:
            assert r["answer_type"] == "multi_choice" and r["answer"] == item["options"]["ABCDE".index(item["answer"])]
        else:
            assert r["answer_type"] in ("integer", "float", "text") and r["answer"] == item["answer"]
        assert "<image1>" not in r["question"]
    assert f["by_answer_type"] == {"float": 2, "integer": 110, "multi_choice": 190, "text": 2}


def test_caps_and_budget_are_stratified_and_deterministic(ray_session):
    mathv = shared_data("math-v", "testmini.jsonl")
    spec = f"sources=[{{name: mathv, format: mathv, path: {mathv}}}]"
    rows, f = _load(ray_session, spec, "ddf_source.budget=40", "seed=3")
    assert f["accepted"] == 40 and f["rejected"] == {"over_budget": 264}
    shares = f["by_answer_type"]
    assert shares["multi_choice"] == 25 and shares["integer"] == 15  # 25.0 and 14.47 of 40; largest remainder
    again, _ = _load(ray_session, spec, "ddf_source.budget=40", "seed=3")
    keep = lambda t: sorted(t[t.reject_reason.isna()].sample_id)  # noqa: E731
    assert keep(rows) == keep(again)
    _, capped = _load(ray_session, spec, "ddf_source.per_source_cap={mathv: 100}")
    assert capped["accepted"] == 100 and capped["rejected"] == {"over_source_cap": 204}
    _, limited = _load(ray_session, spec, "sources.0.max_samples=30")
    assert limited["in"] == 30 and limited["accepted"] == 30  # read no more than asked


def test_csv_hf_arrow_and_canonical_sources(ray_session, tmp_path, demo_parquet):
    img = encode(Image.new("RGB", (60, 60), (30, 60, 90)))
    (tmp_path / "pic.png").write_bytes(img)
    (tmp_path / "d.csv").write_text("q,a,opts,file\nWhich?,B,A. 1;B. 2,pic.png\nHow many?,5,,pic.png\n")
    table = pa.table({"question": ["Area?"], "answer": ["2.5"], "image": [{"bytes": img, "path": None}]})
    with pa.ipc.new_stream(tmp_path / "data-00000-of-00001.arrow", table.schema) as w:
        w.write_table(table)
    (tmp_path / "hf").mkdir()
    (tmp_path / "data-00000-of-00001.arrow").rename(tmp_path / "hf" / "data-00000-of-00001.arrow")
    pq.write_table(table, tmp_path / "hf.parquet")
    # MathV360K: one JSON list, choices inside the question text
    (tmp_path / "m360.json").write_text(json.dumps([
        {"id": "m1", "image": "pic.png", "conversations": [{"from": "human", "value": "<image>\nWhich is bigger?\nChoices:\n(A) 3\n(B) 5"}, {"from": "gpt", "value": "B"}]},
        {"id": "m2", "image": "pic.png", "conversations": [{"from": "human", "value": "<image>\nHow many sides?"}, {"from": "gpt", "value": "4"}]},
    ]))
    csv_fields = "{question: q, answer: a, choices: opts, image: file}"
    rows, f = _load(
        ray_session,
        f"sources=[{{name: csv, format: generic, path: {tmp_path}/d.csv, fields: {csv_fields}}},"
        f" {{name: hfarrow, format: hf, path: {tmp_path}/hf}}, {{name: hfpq, format: hf, path: {tmp_path}/hf.parquet}},"
        f" {{name: demo, format: canonical, path: {demo_parquet}}}, {{name: m360, format: mathv360k, path: {tmp_path}/m360.json}}]",
    )
    assert f["by_source"]["m360"] == {"accepted": 2}
    bigger = rows[rows.question == "Which is bigger?"].iloc[0]
    assert list(bigger.choices) == ["3", "5"] and bigger.answer == "5" and bigger.answer_type == "multi_choice"
    # The Arrow and Parquet copies hold the same image and question: a duplicate across sources.
    assert f["rejected"] == {"duplicate": 1}, rows[rows.reject_reason.notna()][["question", "reject_reason", "reject_detail"]]
    assert f["by_source"]["csv"] == {"accepted": 2} and f["by_source"]["demo"] == {"accepted": 24}
    hf = [f["by_source"][s] for s in ("hfarrow", "hfpq")]
    assert sorted(hf, key=str) == sorted([{"accepted": 1}, {"rejected": 1}], key=str)
    which = rows[rows.question == "Which?"].iloc[0]
    assert list(which.choices) == ["1", "2"] and which.answer == "2"
    demo = pq.read_table(demo_parquet).to_pandas()
    assert sorted(rows[rows.source == "demo"].sample_id) == sorted(demo.sample_id)  # ids survive a reload
