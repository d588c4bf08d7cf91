"""The source data layer on real Ray Data: duplicates, real benchmark files, caps and formats
(every bad input and its reason: tests/reliability/test_bad_input.py)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from casseat_ray import data
from casseat_ray.config import load_config
from tests.conftest import shared_data
from tests.reliability.test_bad_input import bad_source, encode  # noqa: F401  (bad_source: a fixture)


def _load(ray_session, *overrides):
    cfg = load_config(None, list(overrides))
    ds = data.load(cfg).materialize()
    return ds.to_pandas(), data.funnel(ds)




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
