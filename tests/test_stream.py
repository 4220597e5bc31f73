"""Per-rank seeded streams (pipeline/train/stream.py): mixed classes, equal shares, exact resume."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.train.stream import RankStream, _uri, list_chunks, rank_share


def _class_sorted_folder(root, n_per_class=300, classes=("a", "b", "c", "d")):
    """Shards as preprocessing writes a class-per-folder set: rows sorted by class."""
    os.makedirs(root / "shards")
    labels = [c for c in classes for _ in range(n_per_class)]
    ids = np.arange(len(labels))
    half = len(labels) // 2
    for i, (a, b) in enumerate(((0, half), (half, len(labels)))):
        pq.write_table(pa.table({"label": labels[a:b], "row": ids[a:b]}), root / "shards" / f"part-{i}.parquet",
                       row_group_size=300)
    return str(root)


def test_class_sorted_folder_streams_mixed_batches_differently_each_epoch(ray_local, tmp_path):
    data = _class_sorted_folder(tmp_path)
    chunks = list_chunks(data, ["label", "row"])
    assert sum(c.rows for c in chunks) == 1200 and max(c.rows for c in chunks) <= 64
    streams = [RankStream(chunks, ["label", "row"], 32, 1024, seed=0, rank=r, world=2) for r in (0, 1)]
    e0 = [list(s.epoch(0)) for s in streams]
    assert [len(b) for b in e0] == [18, 18]  # 600 rows per rank → 18 full batches each
    rows = [np.concatenate([b["row"] for b in bs]) for bs in e0]
    assert not set(rows[0]) & set(rows[1])  # the ranks' shares are disjoint
    mixed = [len(set(b["label"])) > 1 for bs in e0 for b in bs]
    assert np.mean(mixed) > 0.9, np.mean(mixed)  # sorted folders arrive mixed, not class by class
    e1 = np.concatenate([b["row"] for b in streams[0].epoch(1)])
    assert not np.array_equal(e1, rows[0])  # another order each epoch …
    again = np.concatenate([b["row"] for b in RankStream(chunks, ["label", "row"], 32, 1024, 0, 0, 2).epoch(0)])
    np.testing.assert_array_equal(again, rows[0])  # … and the same order for the same seed


def test_resume_reads_from_the_next_batch_without_rereading_the_epoch(ray_local, tmp_path):
    data = _class_sorted_folder(tmp_path)
    chunks = list_chunks(data, ["label", "row"])
    s = RankStream(chunks, ["label", "row"], 16, 64, seed=3, rank=1, world=2)
    full = [b["row"] for b in s.epoch(2)]
    for skip in (1, 4, 9, 30):
        resumed = [b["row"] for b in s.epoch(2, skip_batches=skip)]
        assert len(resumed) == len(full) - skip
        for a, b in zip(resumed, full[skip:]):
            np.testing.assert_array_equal(a, b)
    # Only the window holding the next batch is read again, not the epoch's start.
    share_rows = sum(c.rows for c in rank_share(chunks, 3, 2, 1, 2))
    assert s.rows_to_read(2, 30) <= share_rows - 30 * 16 + 64 < share_rows
    # Step groups run on across the epoch boundary: epoch 2 from step 5 (grad_accum 4: 10 of 40
    # batches), then epoch 3 from its start; each epoch ends at its last full group.
    per_epoch = len(full) // 4
    g = s.groups(2, 5, 4)
    groups = [next(g) for _ in range(per_epoch - 5 + 2)]
    assert all(len(x) == 4 for x in groups)
    flat = [b["row"] for x in groups for b in x]
    want = full[20: per_epoch * 4] + [b["row"] for b in s.epoch(3)][:8]
    assert len(flat) == len(want)
    for a, b in zip(flat, want):
        np.testing.assert_array_equal(a, b)


def test_chunk_paths_keep_the_uri_scheme_host_and_query():
    assert _uri("/data/prep", "/data/prep", "/data/prep/shards/a.parquet") == "/data/prep/shards/a.parquet"
    assert _uri("file:///data/prep", "/data/prep", "/data/prep/shards/a.parquet") == "file:///data/prep/shards/a.parquet"
    assert (_uri("s3://b/prep/?endpoint_override=minio:9000", "b/prep", "b/prep/shards/a.parquet")
            == "s3://b/prep/shards/a.parquet?endpoint_override=minio:9000")
    assert _uri("hdfs://nn:8020/prep", "/prep", "/prep/shards/a.parquet") == "hdfs://nn:8020/prep/shards/a.parquet"


def test_ahead_prepares_steps_in_order_off_the_training_thread():
    """Ahead yields exactly what a synchronous loop builds, step by step, from another thread; an
    error in preparation surfaces at the step it belongs to; close() leaves nothing running."""
    import threading

    from pipeline.train.batches import Ahead, step_rng

    source = iter(range(100))
    made_in = set()

    def make(step):
        made_in.add(threading.current_thread().name)
        if step == 7:
            raise ValueError("corrupt batch at step 7")
        return next(source), step_rng(0, 0, step).integers(1 << 30)

    ahead = Ahead(make, 3, 9)
    got = [ahead.get() for _ in range(4)]
    assert got == [(s, (s - 3, step_rng(0, 0, s).integers(1 << 30))) for s in range(3, 7)]
    assert made_in == {"prepare-next-steps"}
    with pytest.raises(ValueError, match="step 7"):
        ahead.get()
    ahead.close()
    slow = Ahead(lambda s: s, 0, 10 ** 6, depth=2)  # abandoned early: the thread stops
    assert slow.get() == (0, 0)
    slow.close()
    assert not slow._thread.is_alive()
