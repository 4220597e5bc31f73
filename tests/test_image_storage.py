"""Images as shards store them (JPEG/PNG, shorter side size / 0.875) from real photos through the real
preprocessing, and the per-epoch training views drawn from them (pipeline/augment.py)."""
import io
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from benchmarks.photos import write_photos
from pipeline import augment
from pipeline.config import ImageSettings
from pipeline.decoders import encode_stored_image
from pipeline.recipes import D2V1_VIEWS, D2V2_VIEWS, FINETUNE_VIEWS


@pytest.fixture(scope="module")
def stored_photos(tmp_path_factory) -> list[bytes]:
    """6 photos (300–600 px shorter side, JPEG and PNG) as a 224-px shard stores them."""
    d = tmp_path_factory.mktemp("photos")
    cfg = ImageSettings(size=224)
    return [encode_stored_image(open(p, "rb").read(), cfg)[0] for p in write_photos(str(d), 6, 0, 300, 600)]


def test_preprocessing_stores_photos_compact_at_256(ray_local, tmp_path):
    """`jobs.preprocess --image-size 224` on natural photos: ≤ 40 kB per image on disk (shards, paths
    and all), every stored shorter side 256 (the source's when smaller), small JPEGs kept byte for byte."""
    from jobs.preprocess import parse_args
    from pipeline.ingest import run

    raw = tmp_path / "raw"
    big = write_photos(str(raw), 12, seed=0)  # shorter sides 300–1200: all resized to 256
    small = []  # shorter sides 120–256: stored as they are (JPEG: the source's bytes)
    for p in write_photos(str(tmp_path / "small"), 6, seed=1, min_side=120, max_side=256):
        dst = os.path.join(raw, os.path.basename(os.path.dirname(p)), "small_" + os.path.basename(p))
        shutil.move(p, dst)
        small.append(dst)
    cfg, _ = parse_args(["--modality", "image", "--input", str(raw), "--output", str(tmp_path / "out"),
                         "--image-size", "224"])
    manifest = run(cfg)
    assert manifest["counts"]["written"] == len(big) + len(small) and manifest["counts"]["rejected"] == 0
    assert manifest["settings"]["stored_short_side"] == 256
    assert manifest["stored"]["bytes_per_image"] <= 40_000, manifest["stored"]
    assert json.load(open(tmp_path / "out" / "manifest.json"))["stored"] == manifest["stored"]

    table = pq.read_table(str(tmp_path / "out" / "shards")).to_pydict()
    assert sorted(table["path"]) == sorted(big + small)
    kept = 0
    for data, fmt, path, label in zip(table["image"], table["format"], table["path"], table["label"]):
        source = open(path, "rb").read()
        src = Image.open(io.BytesIO(source))
        img = Image.open(io.BytesIO(data))
        assert img.format.lower() == fmt and label == os.path.basename(os.path.dirname(path))
        w, h = src.size
        assert min(img.size) == min(256, w, h), (path, src.size, img.size)
        if min(w, h) > 256:  # aspect kept to the pixel
            assert abs(max(img.size) - round(max(w, h) * 256 / min(w, h))) <= 1, (path, src.size, img.size)
        else:
            assert img.size == src.size
        if src.format == "JPEG" and min(w, h) <= 256:
            assert data == source, path  # no second lossy encode
            kept += 1
    assert kept == 3  # small JPEGs: even indices of 6


@pytest.mark.parametrize("views", [D2V2_VIEWS, D2V1_VIEWS, FINETUNE_VIEWS], ids=["d2v2", "d2v1", "finetune"])
def test_train_views_are_a_function_of_seed_epoch_and_row(stored_photos, views):
    spec = {"size": 224, **views}
    rows = np.arange(len(stored_photos)) + 1000
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    a = augment.train_views(stored_photos, rows, spec, seed=3, epoch=0)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is left as it was
    assert a.shape == (len(stored_photos), 224, 224, 3) and a.dtype == np.uint8
    assert np.array_equal(a, augment.train_views(stored_photos, rows, spec, seed=3, epoch=0))
    # a row's view does not depend on the other rows of its batch (restarts, resized worker groups)
    assert np.array_equal(a[2:3], augment.train_views(stored_photos[2:3], rows[2:3], spec, seed=3, epoch=0))
    other_epoch = augment.train_views(stored_photos, rows, spec, seed=3, epoch=1)
    other_seed = augment.train_views(stored_photos, rows, spec, seed=4, epoch=0)
    for i in range(len(stored_photos)):
        assert not np.array_equal(a[i], other_epoch[i]), i
        assert not np.array_equal(a[i], other_seed[i]), i
    # the same image under two row ids: two different views
    same = augment.train_views([stored_photos[0]] * 2, np.array([5, 6]), spec, seed=3, epoch=0)
    assert not np.array_equal(same[0], same[1])


def test_d2v2_crop_of_one_image_moves_between_epochs(stored_photos):
    """Not only the flip: with the flip off (D2V2_VIEWS has no color jitter) the only random step
    left is the RandomResizedCrop, and the view of one image differs between epoch 0 and epoch 1."""
    assert D2V2_VIEWS["color_jitter"] == 0
    spec = {"size": 224, **D2V2_VIEWS, "hflip": 0.0}  # no flip: any difference is the crop's
    v0, v1 = (augment.train_views(stored_photos[:1], [17], spec, seed=0, epoch=e)[0] for e in (0, 1))
    assert np.abs(v0.astype(int) - v1.astype(int)).mean() > 5
    # and the view is a real crop of the photo, not padding or a constant
    assert v0.std() > 20 and v1.std() > 20


def test_eval_view_is_the_center_crop_of_the_stored_image(stored_photos):
    data = stored_photos[1]
    img = np.asarray(augment.decode(data))
    h, w = img.shape[:2]
    assert min(h, w) == 256
    top, left = (h - 224) // 2, (w - 224) // 2
    assert np.array_equal(augment.eval_view(data, 224), img[top:top + 224, left:left + 224])
    none = augment.train_views([data], [0], {"size": 224, "augment": "none"}, seed=0, epoch=5)
    assert np.array_equal(none[0], augment.eval_view(data, 224))
