"""Local Ray, shared per session: the canonical Parquet streams through Ray Data."""

import io

from PIL import Image


def _decode_sizes(batch):
    # Images travel as bytes and are decoded only inside the stage that needs pixels.
    batch["decoded"] = [Image.open(io.BytesIO(b)).size == (w, h) for b, w, h in zip(batch["image"], batch["width"], batch["height"])]
    return batch


def test_demo_parquet_streams_through_ray_data(ray_session, demo_parquet, demo_rows):
    import ray

    ds = ray.data.read_parquet(str(demo_parquet)).map_batches(_decode_sizes, batch_size=8, batch_format="numpy")
    rows = ds.take_all()
    assert len(rows) == len(demo_rows)
    assert all(r["decoded"] for r in rows)
    assert sorted(r["sample_id"] for r in rows) == sorted(r["sample_id"] for r in demo_rows)
    assert ray.cluster_resources()["CPU"] == 2
