"""Adapters and canonicalization as pure functions (no Ray)."""

import base64
import io

import pytest
from PIL import Image

from casseat_ray.config import FieldMap, ImageConfig, SourceConfig
from casseat_ray.data import quotas, rule_reject
from casseat_ray.config import DDFSourceConfig
from casseat_ray.sources import RowError, adapt_mathv360k, item_to_row, parse_choices


def png(size=(64, 48), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def src(fmt="generic", **kw) -> SourceConfig:
    return SourceConfig(name="s", format=fmt, path="unused.jsonl", **kw)


@pytest.mark.parametrize(
    "value, expected",
    [
        (["3", "4"], ["3", "4"]),
        ("A. 3;B. 4;C. 5", ["3", "4", "5"]),
        ("(A) red; (B) blue", ["red", "blue"]),
        ("A) 1/2;B) 2/3", ["1/2", "2/3"]),
        ("yes;no", ["yes", "no"]),
        ("", []),
        (None, []),
    ],
)
def test_parse_choices(value, expected):
    assert parse_choices(value) == expected


def test_a_delimiter_inside_a_labelled_option_does_not_split_it():
    mixed = "A. ①; ③;B. ②; ③;C. ②; ④;D. ①; ④; E. No correct answer"
    choices = parse_choices(mixed)
    assert choices == ["①; ③", "②; ③", "②; ④", "①; ④", "No correct answer"]
    assert choices["ABCDE".index("B")] == "②; ③"  # answer B maps to its whole option


@pytest.mark.parametrize("value, expected", [
    ("A．①;B．②", ["①", "②"]),
    ("（A）3;（B）4;（C）5", ["3", "4", "5"]),
    ("A、甲；B、乙", ["甲", "乙"]),  # full-width delimiter too
    (["（A）x", "（B）y"], ["x", "y"]),
    ("A．①、②;B．②", ["①、②", "②"]),  # full-width punctuation inside an option is kept as written
])
def test_full_width_labels_are_recognised_and_stripped(value, expected):
    assert parse_choices(value) == expected


@pytest.mark.parametrize("value", ["3;B. 4", ["x", "B. y"], "B．①;A．②"])
def test_half_labelled_choices_are_rejected_not_half_parsed(value):
    with pytest.raises(RowError) as e:
        parse_choices(value)
    assert e.value.reason == "bad_choices"


@pytest.mark.parametrize("value", ["A. 3", "A. 3;C. 4", "just one long string without delimiter", 42])
def test_unparseable_choices(value):
    with pytest.raises(RowError) as e:
        parse_choices(value)
    assert e.value.reason == "bad_choices"


def test_image_references_of_every_kind(tmp_path):
    data = png()
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(data)
    fields = FieldMap(choices=None)
    forms = {
        "relative": "img/a.png",
        "absolute": str(tmp_path / "img" / "a.png"),
        "bytes": data,
        "base64": base64.b64encode(data).decode(),
        "data_url": "data:image/png;base64," + base64.b64encode(data).decode(),
        "hf_dict": {"bytes": data, "path": None},
    }
    ids = set()
    for name, ref in forms.items():
        row = item_to_row({"question": "How many?", "answer": "3", "image": ref}, src(fields=fields), tmp_path, ImageConfig())
        assert row["reject_reason"] is None, (name, row)
        assert row["answer_type"] == "integer" and row["width"] == 64
        ids.add(row["sample_id"])
    assert len(ids) == 1  # the same content gives the same id however it was referenced


def test_answer_types_inferred_unless_stated(tmp_path):
    base = {"question": "q?", "image": png()}
    cases = [("7", None, "integer", None), ("2.50", None, "float", 2), ("[1, 2]", None, "list", None), ("red", None, "text", None), ("7", "text", "text", None)]
    for answer, stated, kind, precision in cases:
        item = dict(base, answer=answer, kind=stated)
        row = item_to_row(item, src(fields=FieldMap(choices=None, answer_type="kind")), tmp_path, ImageConfig())
        assert (row["answer_type"], row["precision"]) == (kind, precision), answer
    mc = item_to_row(dict(base, answer="B", choices="A. 3;B. 4"), src(), tmp_path, ImageConfig())
    assert (mc["answer_type"], mc["answer"], mc["choices"]) == ("multi_choice", "4", ["3", "4"])


def test_mathv360k_inline_choices():
    item = {"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nHint: answer with a letter.\nQuestion: Which is larger?\nChoices:\n(A) 3\n(B) 5"},
        {"from": "gpt", "value": "B"}]}
    raw = adapt_mathv360k(item, FieldMap())
    assert raw["choices"] == ["3", "5"] and raw["answer"] == "5"
    assert raw["question"] == "Hint: answer with a letter.\nQuestion: Which is larger?"
    with pytest.raises(RowError, match="missing_field"):
        adapt_mathv360k({"id": "y", "image": "a.png", "conversations": []}, FieldMap())


def test_rule_filters():
    rules = DDFSourceConfig(max_question_chars=50, max_answer_chars=10)
    ok = {"question": "How many?", "answer": "3", "answer_type": "integer", "choices": []}
    assert rule_reject(ok, rules) is None
    assert rule_reject(dict(ok, question="   "), rules)[0] == "empty_question"
    assert rule_reject(dict(ok, question="x" * 51), rules)[0] == "question_too_long"
    assert rule_reject(dict(ok, answer=""), rules)[0] == "empty_answer"
    assert rule_reject(dict(ok, answer="three"), rules)[0] == "unverifiable_answer"
    assert rule_reject(dict(ok, answer="3.5"), rules)[0] == "unverifiable_answer"
    assert rule_reject(dict(ok, answer_type="float", answer="x1"), rules)[0] == "unverifiable_answer"
    assert rule_reject(dict(ok, answer_type="list", answer="[1, 2"), rules)[0] == "unverifiable_answer"
    assert rule_reject(dict(ok, answer_type="text", answer="a very long free answer"), rules)[0] == "unverifiable_answer"
    assert rule_reject(dict(ok, answer_type="multi_choice", answer="9", choices=["3", "4"]), rules)[0] == "unverifiable_answer"


def test_quotas_caps_then_budget():
    counts = {("a", "integer"): 60, ("a", "text"): 40, ("b", "integer"): 10}
    assert quotas(counts, {}, None) == counts
    capped = quotas(counts, {"a": 50}, None)
    assert capped == {("a", "integer"): 30, ("a", "text"): 20, ("b", "integer"): 10}
    budget = quotas(counts, {"a": 50}, 30)
    assert sum(budget.values()) == 30 and all(budget[k] <= capped[k] for k in counts)


def test_image_placeholders_are_dropped_by_every_adapter():
    from casseat_ray.sources import ADAPTERS

    fm = FieldMap()
    items = {
        "generic": {"question": "<image>\nHow many sides?", "answer": "4", "image": "a.png"},
        "hf": {"question": "How many <image1> sides?", "answer": "4", "image": "a.png"},
        "mathvista": {"question": "<image>How many sides?", "answer": "4", "image": "a.png", "pid": "1", "answer_type": "integer"},
        "mathv": {"question": "<image1>How many sides?", "answer": "4", "image": "a.png"},
        "mathv360k": {"id": "m", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nHow many sides?"}, {"from": "gpt", "value": "4"}]},
    }
    for fmt, item in items.items():
        question = ADAPTERS[fmt](item, fm)["question"]
        assert "<image" not in question and "sides?" in question, (fmt, question)


def test_source_ids_are_carried_by_accepted_rows_and_by_rejects(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    good = {"qid": "q-17", "question": "How many?", "answer": "3", "image": "a.png"}
    named = src(fields=FieldMap(choices=None, id="qid"))
    assert item_to_row(dict(good), named, tmp_path, ImageConfig())["source_id"] == "q-17"
    # adapter- and validation-level rejects keep the id (they carried empty meta before)
    missing = item_to_row(dict(good, image="absent.png"), named, tmp_path, ImageConfig())
    assert (missing["reject_reason"], missing["source_id"]) == ("missing_image", "q-17")
    no_answer = {k: v for k, v in good.items() if k != "answer"}
    lost = item_to_row(no_answer, named, tmp_path, ImageConfig())
    assert (lost["reject_reason"], lost["source_id"]) == ("missing_field", "q-17")
    # a named id column the row lacks is the row's missing_field, named
    unnamed = item_to_row({k: v for k, v in good.items() if k != "qid"}, named, tmp_path, ImageConfig())
    assert unnamed["reject_reason"] == "missing_field" and "'qid'" in unnamed["reject_detail"]
    # without a field map entry: the format's own id field, else none
    assert item_to_row(dict(good, id=5), src(fields=FieldMap(choices=None)), tmp_path, ImageConfig())["source_id"] == "5"
    assert item_to_row(dict(good), src(fields=FieldMap(choices=None)), tmp_path, ImageConfig())["source_id"] is None
    vista = {"pid": "12", "question": "How many?", "answer": "3", "image": "a.png", "question_type": "free_form", "answer_type": "integer"}
    assert item_to_row(vista, src("mathvista"), tmp_path, ImageConfig())["source_id"] == "12"


def test_a_duplicate_names_the_row_it_duplicates_by_its_source_id():
    from casseat_ray.data import plan_selection

    light = [dict(_key="k", _uid=u, _content="c", sample_id="s1", source_id=i, source="bench", answer_type="integer")
             for u, i in (("u2", "b"), ("u1", "c"), ("u3", "a"))]
    duplicates, *_ = plan_selection(light, DDFSourceConfig(), seed=0)
    # the kept row is the one with the smallest source id, whatever order the rows came in
    assert duplicates == {"u1": "bench item a (sample s1)", "u2": "bench item a (sample s1)"}
    no_ids = [dict(r, source_id=None) for r in light]
    assert set(plan_selection(no_ids, DDFSourceConfig(), seed=0)[0].values()) == {"bench sample s1"}
