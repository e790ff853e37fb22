"""bench/bench_input.py's mechanics on a few images: the numbers need the machine they describe."""

from __future__ import annotations

import pytest
import torch
from vithybrid_fast.bench import bench_input


def test_each_mode_reads_every_image_in_one_process_and_in_workers(tmp_path):
    folder = bench_input.write_jpegs(tmp_path / "jpegs", 4, size=(120, 90))
    records = bench_input.run(workers=(0, 1), modes=("decode", "eval", "crop-flip"), reps=1, folder=folder)
    assert [(r["mode"], r["workers"]) for r in records] == [
        (m, w) for m in ("decode", "eval", "crop-flip") for w in (0, 1)
    ]
    assert all("error" not in r and r["images"] == 4 and r["images_per_s"] > 0 for r in records), records
    assert all(r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"] for r in records)
    assert "crop-flip" in bench_input.table(records)


@pytest.mark.parametrize("mode", ["eval", "crop-flip", "flip", "none"])
def test_the_timed_work_is_finetunes_own_preprocessing(tmp_path, mode):
    folder = bench_input.write_jpegs(tmp_path / "jpegs", 2, size=(120, 90))
    item = bench_input.make_dataset(folder, mode)[0]
    assert item["pixels"].shape == (3, 384, 384) and item["pixels"].dtype == torch.uint8


def test_synthetic_jpegs_compress_like_photographs(tmp_path):
    folder = bench_input.write_jpegs(tmp_path / "jpegs", 2)
    sizes = [p.stat().st_size for p in folder.rglob("*.jpg")]
    assert all(size > 30_000 for size in sizes), sizes  # flat colour would be a few kB: decode would be cheap


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown modes"):
        bench_input.run(modes=("blur",))
