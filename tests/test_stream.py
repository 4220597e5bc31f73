"""Seeded streams (pipeline/train/stream.py): mixed classes, a step's global batch that does not
depend on the world size, shares that differ by at most one row, a global position that survives
a resize."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.train.config import split_evenly
from pipeline.train.stream import (ROW_ID, EpochOrder, Plan, RankStream, _Table, _uri, expand,
                                   interval_rows, list_chunks)


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


def _steps(stream: RankStream, epoch: int, plan: Plan) -> list[np.ndarray]:
    return [b["row"] for b in stream.read(epoch, plan)]


def test_class_sorted_folder_streams_mixed_batches_differently_each_epoch(ray_local, tmp_path):
    data = _class_sorted_folder(tmp_path)
    chunks = list_chunks(data, ["label", "row"])
    assert sum(c.rows for c in chunks) == 1200 and max(c.rows for c in chunks) <= 64
    streams = [RankStream(chunks, ["label", "row"], [32, 32], 1024, seed=0, rank=r) for r in (0, 1)]
    e0 = [list(s.read(0, s.plan(None))) for s in streams]
    assert [len(b) for b in e0] == [18, 18]  # 1200 rows // 64 per step = 18 full steps
    rows = [_rows_of(bs) for bs in e0]
    assert not set(rows[0]) & set(rows[1])  # the ranks' shares are disjoint
    for b in e0[0]:  # the stable row ids are the rows' own (index in the chunk list = the "row" column)
        np.testing.assert_array_equal(b[ROW_ID], b["row"])
    mixed = [len(set(b["label"])) > 1 for bs in e0 for b in bs]
    assert np.mean(mixed) > 0.9, np.mean(mixed)  # sorted folders arrive mixed, not class by class
    s = streams[0]
    e1 = _rows_of(list(s.read(1, s.plan(None))))
    assert not np.array_equal(e1, rows[0])  # another order each epoch …
    again = RankStream(chunks, ["label", "row"], [32, 32], 1024, 0, 0)
    np.testing.assert_array_equal(_rows_of(list(again.read(0, again.plan(None)))), rows[0])  # … same seed, same order


def test_a_step_is_the_same_rows_on_any_world_size(ray_local, tmp_path):
    """Step s trains on rows [s·E, (s+1)·E) of the epoch's order whatever the world size: the
    ranks' shares (sizes differing by at most one) put together are that step's rows, each once."""
    data = _class_sorted_folder(tmp_path)
    chunks = list_chunks(data, ["label", "row"])
    E = 22
    per_world = {}
    for world in (1, 2, 3, 4):
        shares = split_evenly(E, world)
        streams = [RankStream(chunks, ["label", "row"], shares, 64, seed=5, rank=r) for r in range(world)]
        got = [_steps(st, 3, st.plan(None)) for st in streams]
        assert {len(g) for g in got} == {1200 // E}
        for r, g in enumerate(got):
            assert {len(x) for x in g} == {shares[r]}
        per_world[world] = [sorted(np.concatenate([g[s] for g in got]).tolist()) for s in range(1200 // E)]
    for world in (2, 3, 4):
        assert per_world[world] == per_world[1], world
    order = RankStream(chunks, ["label", "row"], [E], 64, seed=5, rank=0).order(3)
    plan = Plan([[0, 1200]], E)
    for s in (0, 7, 53):  # the step's rows are the order's positions [s·E, (s+1)·E), as placed by the order
        q = order.unshuffled(expand(plan.step(s)))
        k = order.table.perm[np.searchsorted(order.table.starts, q, side="right") - 1]
        ids = order.table.id0[k] + q - order.table.starts[np.searchsorted(order.table.starts, q, side="right") - 1]
        assert sorted(ids.tolist()) == per_world[1][s]


def test_plan_reads_each_row_once_through_any_resizes():
    """Pure position arithmetic (no Ray): whatever the world sizes a run goes through, the rows
    read in an epoch are each read once, and fewer than one step's rows are left at its end; the
    world size only changes how a step's rows are cut, never which rows it has."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        total, E = int(rng.integers(50, 2000)), int(rng.integers(4, 40))
        table = _Table(["x"], np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), np.array([total]))
        order = EpochOrder(table, 0, 0, int(rng.integers(8, 100)), True)
        rest, read = [[0, total]], []
        while True:
            world = int(rng.integers(1, 5))
            plan = Plan(rest, E)
            k = int(rng.integers(0, plan.steps + 1))  # the run stops (or loses a node) after k steps
            shares = split_evenly(E, world)
            for s in range(k):
                parts = [order.share(plan, s, sum(shares[:r]), shares[r]) for r in range(world)]
                assert sorted(np.concatenate(parts).tolist()) == sorted(order.unshuffled(expand(plan.step(s))).tolist())
                read += np.concatenate(parts).tolist()
            left = plan.left_after(k)
            assert interval_rows(left) == interval_rows(rest) - k * E
            rest = left
            if plan.steps == k and (k or rng.random() < 0.5):
                break
        assert len(read) == len(set(read))  # no row twice …
        assert total - len(read) == interval_rows(rest) < total  # … and the rest is what is left
        assert interval_rows(rest) < E or plan.steps > k
    assert Plan([[0, 10]], 12).steps == 0  # fewer rows than one step


def test_step_groups_run_on_across_the_epoch_boundary(ray_local, tmp_path):
    data = _class_sorted_folder(tmp_path)
    chunks = list_chunks(data, ["label", "row"])
    s = RankStream(chunks, ["label", "row"], [65, 64], 64, seed=3, rank=1)
    plan = s.plan(None)  # 1200 // 129 = 9 steps per epoch, 39 rows left at its end
    assert plan.steps == 9
    rest = plan.left_after(5)
    g = s.groups(2, rest, [16, 16, 16, 16])
    groups = [next(g) for _ in range(4 + 2)]  # epoch 2's last 4 steps, then epoch 3's first 2
    assert all([len(b["row"]) for b in x] == [16] * 4 for x in groups)
    want = np.concatenate(_steps(s, 2, s.plan(None))[5:] + _steps(s, 3, s.plan(None))[:2])
    np.testing.assert_array_equal(_rows_of([b for x in groups for b in x]), want)


def test_chunk_paths_keep_the_uri_scheme_host_and_query():
    assert _uri("/data/prep", "/data/prep", "/data/prep/shards/a.parquet") == "/data/prep/shards/a.parquet"
    assert _uri("file:///data/prep", "/data/prep", "/data/prep/shards/a.parquet") == "file:///data/prep/shards/a.parquet"
    assert (_uri("s3://b/prep/?endpoint_override=minio:9000", "b/prep", "b/prep/shards/a.parquet")
            == "s3://b/prep/shards/a.parquet?endpoint_override=minio:9000")
    assert _uri("hdfs://nn:8020/prep", "/prep", "/prep/shards/a.parquet") == "hdfs://nn:8020/prep/shards/a.parquet"
    import pyarrow.fs as pafs
    from pipeline import storage
    for uri in ("file:///data/a%20b/shards/p.parquet", "s3://b/a%20b/p.parquet?endpoint_override=h:1&scheme=http",
                "s3://KEY:SECRET@b/a%20b/p.parquet?region=us-east-1"):
        assert storage.split(uri)[1] == pafs.FileSystem.from_uri(uri)[1]  # the read tasks open what pyarrow would


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
