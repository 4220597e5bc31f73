"""Seeded streams (pipeline/train/stream.py): mixed classes, equal shares, a global position that
survives a resize."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.train.stream import ROW_ID, Plan, RankStream, _fs_path, _uri, interval_rows, list_chunks, take


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


def _rows_of(batches) -> np.ndarray:
    return np.concatenate([b["row"] for b in batches]) if batches else np.array([], int)


def test_class_sorted_folder_streams_mixed_batches_differently_each_epoch(ray_local, tmp_path):
    data = _class_sorted_folder(tmp_path)
    chunks = list_chunks(data, ["label", "row"])
    assert sum(c.rows for c in chunks) == 1200 and max(c.rows for c in chunks) <= 64
    streams = [RankStream(chunks, ["label", "row"], 32, 1024, seed=0, rank=r, world=2) for r in (0, 1)]
    e0 = [list(s.read(0, s.plan(None, 1).share(s.rank))) for s in streams]
    assert [len(b) for b in e0] == [18, 18]  # 1200 rows // (2 ranks × 32) = 18 full steps each
    rows = [_rows_of(bs) for bs in e0]
    assert not set(rows[0]) & set(rows[1])  # the ranks' shares are disjoint
    for b in e0[0]:  # the stable row ids are the rows' own (index in the chunk list = the "row" column)
        np.testing.assert_array_equal(b[ROW_ID], b["row"])
    mixed = [len(set(b["label"])) > 1 for bs in e0 for b in bs]
    assert np.mean(mixed) > 0.9, np.mean(mixed)  # sorted folders arrive mixed, not class by class
    s = streams[0]
    e1 = _rows_of(list(s.read(1, s.plan(None, 1).share(0))))
    assert not np.array_equal(e1, rows[0])  # another order each epoch …
    again = RankStream(chunks, ["label", "row"], 32, 1024, 0, 0, 2)
    np.testing.assert_array_equal(_rows_of(list(again.read(0, again.plan(None, 1).share(0)))), rows[0])  # … same seed, same order


def test_plan_shares_are_equal_disjoint_and_a_resize_reads_each_row_once():
    """Pure position arithmetic (no Ray): whatever the world sizes a run goes through, the rows
    read in an epoch are each read once, and fewer than one step's rows are left at its end."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        total, step_rows = int(rng.integers(50, 2000)), int(rng.integers(1, 20))
        rest, read = [[0, total]], []
        while True:
            world = int(rng.integers(1, 5))
            plan = Plan(rest, world, step_rows)
            shares = [plan.share(r) for r in range(world)]
            assert len({interval_rows(x) for x in shares}) == 1  # equal shares: every rank makes the same steps
            k = int(rng.integers(0, plan.steps + 1))  # the run stops (or loses a node) after k steps
            for x in shares:
                read += [i for lo, hi in take(x, 0, k * step_rows) for i in range(lo, hi)]
            left = plan.left_after(k)
            assert interval_rows(left) == interval_rows(rest) - world * k * step_rows
            rest = left
            if plan.steps == k and (k or rng.random() < 0.5):
                break
        assert len(read) == len(set(read))  # no row twice …
        assert total - len(read) == interval_rows(rest) < total  # … and the rest is what is left
    assert Plan([[0, 10]], 3, 4).steps == 0  # fewer rows than one step of all ranks


def test_any_rows_of_the_order_read_as_the_whole_epoch_reads_them(ray_local, tmp_path):
    data = _class_sorted_folder(tmp_path)
    chunks = list_chunks(data, ["label", "row"])
    s = RankStream(chunks, ["label", "row"], 8, 64, seed=3, rank=0, world=1)
    whole = _rows_of(list(s.read(2, [[0, 1200]])))
    assert sorted(whole.tolist()) == list(range(1200))
    parts = [[5, 21], [130, 202], [600, 608], [1191, 1199]]  # 104 rows (13 batches), one across a window edge
    got = _rows_of(list(s.read(2, parts)))
    np.testing.assert_array_equal(got, np.concatenate([whole[lo:hi] for lo, hi in parts]))
    # Only the windows those rows touch are read: windows 0, 2, 3, 9 of 64 rows and 18 (its last, 48).
    assert s.rows_to_read(2, parts) == 64 * 4 + 48


def test_step_groups_run_on_across_the_epoch_boundary(ray_local, tmp_path):
    data = _class_sorted_folder(tmp_path)
    chunks = list_chunks(data, ["label", "row"])
    s = RankStream(chunks, ["label", "row"], 16, 64, seed=3, rank=1, world=2)
    plan = s.plan(None, 4)  # 1200 // (2 × 64) = 9 steps per epoch, 48 rows left at its end
    assert plan.steps == 9
    rest = plan.left_after(5)
    g = s.groups(2, rest, 4)
    groups = [next(g) for _ in range(4 + 2)]  # epoch 2's last 4 steps, then epoch 3's first 2
    assert all(len(x) == 4 for x in groups)
    want = np.concatenate([_rows_of(list(s.read(2, s.plan(None, 4).share(1))))[5 * 64:],
                           _rows_of(list(s.read(3, s.plan(None, 4).share(1))))[:2 * 64]])
    np.testing.assert_array_equal(_rows_of([b for x in groups for b in x]), want)


def test_chunk_paths_keep_the_uri_scheme_host_and_query():
    assert _uri("/data/prep", "/data/prep", "/data/prep/shards/a.parquet") == "/data/prep/shards/a.parquet"
    assert _uri("file:///data/prep", "/data/prep", "/data/prep/shards/a.parquet") == "file:///data/prep/shards/a.parquet"
    assert (_uri("s3://b/prep/?endpoint_override=minio:9000", "b/prep", "b/prep/shards/a.parquet")
            == "s3://b/prep/shards/a.parquet?endpoint_override=minio:9000")
    assert _uri("hdfs://nn:8020/prep", "/prep", "/prep/shards/a.parquet") == "hdfs://nn:8020/prep/shards/a.parquet"
    import pyarrow.fs as pafs
    for uri in ("file:///data/a%20b/shards/p.parquet", "s3://b/a%20b/p.parquet?endpoint_override=h:1&scheme=http"):
        assert _fs_path(uri) == pafs.FileSystem.from_uri(uri)[1]  # the read tasks open what pyarrow would


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
