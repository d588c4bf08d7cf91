import io

import pyarrow.parquet as pq
from PIL import Image

from casseat_ray.demo_data import GENERATORS, make_rows
from casseat_ray.samples import ANSWER_TYPES, SCHEMA, image_hash, sample_id


def test_deterministic_per_seed():
    assert make_rows(12, seed=3) == make_rows(12, seed=3)
    assert [r["sample_id"] for r in make_rows(12, seed=3)] != [r["sample_id"] for r in make_rows(12, seed=4)]


def test_covers_every_answer_type_with_valid_ground_truth(demo_rows):
    assert {r["answer_type"] for r in demo_rows} == set(ANSWER_TYPES)
    assert len({r["sample_id"] for r in demo_rows}) == len(demo_rows)
    for r in demo_rows:
        img = Image.open(io.BytesIO(r["image"]))
        assert img.size == (r["width"], r["height"]) and img.format == "PNG"
        assert r["sample_id"] == sample_id("demo", image_hash(r["image"]), r["question"])
        if r["answer_type"] == "multi_choice":
            assert r["answer"] in r["choices"] and len(r["choices"]) >= 3
        elif r["answer_type"] == "integer":
            assert str(int(r["answer"])) == r["answer"]
        elif r["answer_type"] == "float":
            assert r["precision"] == 1 and len(r["answer"].split(".")[1]) == 1
        elif r["answer_type"] == "list":
            assert r["answer"].startswith("[") and all(x.strip().isdigit() for x in r["answer"][1:-1].split(","))
        else:
            assert r["answer"].isalpha()


def test_written_parquet_uses_canonical_schema(demo_parquet):
    table = pq.read_table(demo_parquet)
    assert table.schema.equals(SCHEMA)
    assert table.num_rows == 24


def test_cli_make_demo_data(tmp_path, capsys):
    from casseat_ray.cli import main

    assert main(["make-demo-data", str(tmp_path), "--n", "9", "--seed", "1"]) == 0
    assert pq.read_table(tmp_path / "demo.parquet").num_rows == 9
    assert main(["make-demo-data", str(tmp_path), "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    assert len(GENERATORS) >= 8
