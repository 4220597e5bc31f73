"""What each rank reads, in which order: a pure function of (seed, epoch), streamed with Ray Data.

    shard files ─(driver, once per run: Parquet footers read in parallel)─► chunks (≤ CHUNK_ROWS
      rows of one row group: the shuffle unit; row groups themselves are sized by bytes)
      epoch e's global order: the chunks in a seeded random order, then a seeded shuffle inside
      consecutive windows of `window` rows ─► rows 0 … N−1 of the epoch
      ─► the rows still to read (`rest`, intervals of that order), E at a time (E = the effective
         batch): optimizer step s trains on rows [s·E, (s+1)·E) of `rest`, whatever the world size
      ─► each step's E rows sorted by where they lie in the chunks (before the window shuffle) and
         cut into `world` shares that differ by at most one row (config.step_layout): rank r's
         share is its slice of that sorted list, so a rank reads about 1/world of a window's chunks
      ─► rank r's shares read by Ray Data: at most READ_BLOCKS tasks, each reading a run of steps'
         shares one after the other (a row group once per unit, each file's footer once per
         process), decoding + augmenting images (augment.py), handing on ~1 MB blocks as it goes
      ─► the share cut into micro-batches (train/loop.py)

A class-sorted folder (all cats, then all dogs) thus arrives mixed, differently every epoch.
Because neither the order nor a step's rows depend on the number of workers, the run position is
global (the epoch and the intervals of its order not yet read) and a step's global batch is the
same on any number of workers: a restart with another world size (an elastic run that lost or
gained a node) cuts the same steps into new shares; no row of the epoch is skipped or read twice,
counting from the checkpoint. Planning is a prefix sum over the epoch's chunk order and binary
searches per step: O(N log N) in the chunks, never a walk over the epoch.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.train.background import Background
from pipeline.train.elastic import reader_options, watch_first_block

CHUNK_ROWS = 64  # the shuffle unit: a chunk is at most this many consecutive rows of one row group
READ_BLOCKS = 32  # Ray tasks per epoch read of one rank (each covers consecutive read units)
READ_BLOCK_BYTES = 1 << 20  # the blocks those tasks hand on, as they go
COLUMNS = {"image": ["image"], "audio": ["audio"], "text": ["input_ids"]}  # the model inputs per modality
ROW_ID = "__row__"  # each batch's stable row ids (index in the run's chunk list), for tests and logs


@dataclass(frozen=True, slots=True)
class Chunk:
    """Rows [start, stop) of row group `group` of one Parquet file; `id0` is the stable id of row
    `start` (its index in the run's whole chunk list, set by RankStream)."""
    path: str
    group: int
    start: int
    stop: int
    id0: int = 0

    @property
    def rows(self) -> int:
        return self.stop - self.start


def list_chunks(data: str, columns: list[str]) -> list[Chunk]:
    """Every shard of a preprocessed folder (path or URI) cut into chunks, from Parquet metadata
    only (no rows are read); the footers are read in parallel threads."""
    import pyarrow.parquet as pq

    from pipeline import storage

    fs, root = storage.resolve(data)
    files = storage.shard_files(fs, root)

    def groups(f: str) -> list[int]:
        with fs.open_input_file(f) as fh:
            meta = pq.ParquetFile(fh).metadata
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]

    with ThreadPoolExecutor(max_workers=16) as pool:
        sizes = list(pool.map(groups, files))
    chunks = []
    gc.disable()  # 156 k new objects at 10 M rows: the collector's passes over them cost more than making them
    try:
        for f, ns in zip(files, sizes):
            uri = _uri(data, root, f)
            for g, n in enumerate(ns):
                chunks += [Chunk(uri, g, a, min(a + CHUNK_ROWS, n)) for a in range(0, n, CHUNK_ROWS)]
    finally:
        gc.enable()
    return chunks


def split_chunks(chunks: list[Chunk], fraction: float, seed: int) -> tuple[list[Chunk], list[Chunk]]:
    """(kept, held out): a seeded `fraction` of the chunks (at least one, never all) held out."""
    order = np.random.default_rng([seed, 4409]).permutation(len(chunks))
    n = min(len(chunks) - 1, max(1, round(fraction * len(chunks))))
    held = set(order[:n].tolist())
    return [c for i, c in enumerate(chunks) if i not in held], [c for i, c in enumerate(chunks) if i in held]


def _uri(data: str, root: str, path: str) -> str:
    """`path` (inside `data`'s file system, whose root is `root`) written as `data` is written:
    same scheme, host and query (e.g. s3://b/prep?endpoint_override=…), so map tasks open it alike."""
    if "://" not in data:
        return path
    base, _, query = data.partition("?")
    return base.rstrip("/") + path[len(root):] + (f"?{query}" if query else "")


def _cut(items: list, lo: int, hi: int, size, trim) -> list:
    """Rows [lo, hi) of the concatenation of `items` (each `size(item)` rows long), as items
    trimmed by `trim(item, first, stop)` (row offsets inside the item). For short lists (a run
    position's intervals); long ones (an epoch's chunks) go through `_Table.slice`."""
    out, pos = [], 0
    for it in items:
        n = size(it)
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append(trim(it, a - pos, b - pos))
        pos += n
        if pos >= hi:
            break
    return out


def pack_chunks(chunks: list[Chunk]) -> dict:
    """The run's chunk list as columns (what the driver hands the workers: one small object, not a
    dict per chunk): {"paths": distinct files, "file", "group", "start", "stop": one entry per chunk}."""
    paths = list(dict.fromkeys(c.path for c in chunks))
    index = {p: i for i, p in enumerate(paths)}
    return {"paths": paths, "file": np.fromiter((index[c.path] for c in chunks), np.int64, len(chunks)),
            **{k: np.fromiter((getattr(c, k) for c in chunks), np.int64, len(chunks)) for k in ("group", "start", "stop")}}


class _Table:
    """Chunks as numpy columns (file index, row group, start, stop, stable id of the first row),
    seen in an order `perm` (an epoch's; identity by default) with the prefix sum of their rows in
    that order."""

    def __init__(self, paths: list[str], file, group, start, stop):
        self.paths = paths
        self.file, self.group = np.asarray(file, np.int64), np.asarray(group, np.int64)
        self.start, self.stop = np.asarray(start, np.int64), np.asarray(stop, np.int64)
        rows = self.stop - self.start
        self.id0 = np.zeros(len(rows), np.int64)  # stable ids: each row's index in the whole list
        np.cumsum(rows[:-1], out=self.id0[1:])
        self._set_order(rows, None)

    def _set_order(self, rows, perm) -> None:
        self.perm = np.arange(len(rows)) if perm is None else perm
        self.starts = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(rows[self.perm], out=self.starts[1:])

    @classmethod
    def of(cls, chunks) -> "_Table":
        packed = chunks if isinstance(chunks, dict) else pack_chunks(chunks)
        return cls(packed["paths"], packed["file"], packed["group"], packed["start"], packed["stop"])

    def __len__(self) -> int:
        return len(self.file)

    def permuted(self, perm: np.ndarray) -> "_Table":
        """The same chunks in order `perm` (only the prefix sum is computed; columns are shared)."""
        out = object.__new__(_Table)
        out.paths, out.file, out.group, out.start, out.stop, out.id0 = (
            self.paths, self.file, self.group, self.start, self.stop, self.id0)
        out._set_order(self.stop - self.start, perm)
        return out

    def slice(self, lo: int, hi: int) -> list[Chunk]:
        """Rows [lo, hi) of this order, as (possibly trimmed) chunks: a binary search, then only the
        chunks returned are touched (O(log N + k))."""
        i0 = int(np.searchsorted(self.starts, lo, side="right")) - 1
        i1 = int(np.searchsorted(self.starts, hi, side="left"))
        out = []
        for i in range(max(i0, 0), min(i1, len(self))):
            s, k = int(self.starts[i]), int(self.perm[i])
            a, b = max(lo, s) - s, min(hi, int(self.starts[i + 1])) - s
            out.append(Chunk(self.paths[self.file[k]], int(self.group[k]), int(self.start[k]) + a,
                             int(self.start[k]) + b, int(self.id0[k]) + a))
        return out


# ----------------------------------------------------------------------------- intervals
# A set of rows of an epoch's order is a sorted list of disjoint [lo, hi) intervals (JSON-able:
# it is saved with every checkpoint as the run position's `rest`).
def interval_rows(iv: list) -> int:
    return sum(hi - lo for lo, hi in iv)


def take(iv: list, a: int, b: int) -> list[list[int]]:
    """Rows [a, b) of the concatenation of the intervals `iv`, as intervals."""
    return _cut(iv, a, b, lambda x: x[1] - x[0], lambda x, p, q: [x[0] + p, x[0] + q])


def merge(iv: list) -> list[list[int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(iv):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


@dataclass(frozen=True)
class Plan:
    """How the rows `rest` of an epoch are trained on: `step_rows` (the effective batch) per
    optimizer step, in order — step s is rows [s·E, (s+1)·E) of `rest`, on every world size; the
    remainder (fewer rows than one step) is left for the epoch's end."""
    rest: list
    step_rows: int

    @property
    def steps(self) -> int:
        return interval_rows(self.rest) // self.step_rows

    def step(self, s: int) -> list:
        """The rows of step s (intervals of the epoch's order)."""
        return take(self.rest, s * self.step_rows, (s + 1) * self.step_rows)

    def left_after(self, steps: int) -> list:
        """The rows not yet read after `steps` steps of this plan."""
        return take(self.rest, steps * self.step_rows, interval_rows(self.rest))


def expand(iv: list) -> np.ndarray:
    """Intervals → the row numbers they hold, in order."""
    return np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi in iv]) if iv else np.zeros(0, np.int64)


class EpochOrder:
    """Epoch `epoch`'s order as a function: the row at position p is row q(p) of the chunks in the
    epoch's chunk order (`table`, a permuted _Table), q = the window shuffle undone. Built where
    needed (on a worker, in a read task) from (seed, epoch, window); window permutations are
    computed once each."""

    def __init__(self, table: "_Table", seed: int, epoch: int, window: int, shuffle: bool):
        self.table, self.seed, self.epoch, self.window, self.shuffle = table, seed, epoch, window, shuffle
        self.total = int(table.starts[-1])
        self._perms: dict[int, np.ndarray] = {}

    def window_order(self, j: int) -> np.ndarray:
        """Window j's shuffle: position i of the window holds its row perm[i] as read."""
        if j not in self._perms:
            n = min(self.window, self.total - j * self.window)
            if len(self._perms) > 256:
                self._perms.clear()
            self._perms[j] = (np.random.default_rng([self.seed, self.epoch, j, 104729]).permutation(n)
                              if self.shuffle else np.arange(n))
        return self._perms[j]

    def unshuffled(self, p: np.ndarray) -> np.ndarray:
        """Positions p of the epoch's order → their places q in the chunk order."""
        w = self.window
        j = p // w
        q = np.empty_like(p)
        for jj in np.unique(j):
            at = j == jj
            q[at] = jj * w + self.window_order(int(jj))[p[at] - jj * w]
        return q

    def share(self, plan: Plan, s: int, lo: int, n: int) -> np.ndarray:
        """Step s's share [lo, lo + n) of its rows sorted by chunk place: the places q, ascending."""
        q = np.sort(self.unshuffled(expand(plan.step(s))))
        return q[lo: lo + n]


# ----------------------------------------------------------------------------- reading
_FILESYSTEMS: dict = {}  # one file-system client per (scheme, host, query) and process


def _open(uri: str):
    """(file system, path inside it) of a chunk's file; the client is made once per process."""
    from pipeline import storage

    key, path = storage.split(uri)
    if key not in _FILESYSTEMS:
        _FILESYSTEMS[key] = storage.resolve(uri)[0]
    return _FILESYSTEMS[key], path


_PARQUET: dict = {}  # open Parquet files of this process (footer read once), by chunk path
_PARQUET_OPEN = 256


def _parquet(path: str):
    import pyarrow.parquet as pq

    if path not in _PARQUET:
        if len(_PARQUET) >= _PARQUET_OPEN:
            _PARQUET.pop(next(iter(_PARQUET))).close()  # the oldest
        fs, p = _open(path)
        _PARQUET[path] = pq.ParquetFile(fs.open_input_file(p))
    return _PARQUET[path]


def read_chunk_table(chunks: list[Chunk], columns: list[str]) -> pa.Table:
    """The rows of `chunks`, in order, with each row's stable id (ROW_ID): every row group is read
    once however many of its chunks are asked for, and each file's footer once per process."""
    groups: dict[tuple[str, int], pa.Table] = {}
    tables = []
    for c in chunks:
        if (c.path, c.group) not in groups:
            groups[(c.path, c.group)] = _parquet(c.path).read_row_group(c.group, columns=columns)
        t = groups[(c.path, c.group)].slice(c.start, c.rows)
        tables.append(t.append_column(ROW_ID, pa.array(np.arange(c.id0, c.id0 + c.rows, dtype=np.int64))))
    if not tables:
        return pa.table({**{c: [] for c in columns}, ROW_ID: pa.array([], pa.int64())})
    return pa.concat_tables(tables)


def _with_views(t: pa.Table, view: dict | None, epoch: int) -> pa.Table:
    """Images: the stored bytes replaced by the view the model sees, (size, size, 3) uint8 per row
    as fixed-size binary (augment.py; `view` None leaves the stored bytes)."""
    if view is None or "image" not in t.column_names:
        return t
    from pipeline.augment import train_views

    px = train_views(t.column("image").to_pylist(), t.column(ROW_ID).to_numpy(), view, view.get("seed", 0), epoch)
    size = view["size"]
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(size * size * 3), len(px), [None, pa.py_buffer(px.tobytes())])
    return t.set_column(t.column_names.index("image"), "image", col)


def read_task(batch: dict, columns: list[str], view: dict | None = None) -> pa.Table:
    """Ray Data map task: one item = a run of chunks (JSON) of epoch `epoch` → their rows, images
    decoded and augmented when `view` is given."""
    tables = []
    for spec, epoch in zip(batch["chunks"], batch["epoch"]):
        chunks = [Chunk(*c) for c in json.loads(str(spec))]
        tables.append(_with_views(read_chunk_table(chunks, columns), view, int(epoch)))
    return pa.concat_tables(tables)


def tasks_dataset(tasks: list[list[Chunk]], columns: list[str], epoch: int = 0, view: dict | None = None):
    """A Ray dataset of the rows of `tasks` (lists of chunks; one read task each), in order."""
    import ray

    items = [{"chunks": json.dumps([dataclasses.astuple(c) for c in cs]), "epoch": epoch} for cs in tasks]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_task, fn_kwargs={"columns": columns, "view": view}, batch_size=1, batch_format="numpy",
        **reader_options(len(items)))


_PLANS: dict = {}  # the last plans a read-task process fetched, by object id
_GROUPS: "OrderedDict[tuple, pa.Table]" = OrderedDict()  # the row groups a read-task process read last
_GROUPS_KEPT = 16  # a read unit's step straddling two windows reads a group again at most this far back


def _row_group(path: str, group: int, columns: list[str]) -> pa.Table:
    key = (path, group, tuple(columns))
    if key in _GROUPS:
        _GROUPS.move_to_end(key)
        return _GROUPS[key]
    t = _parquet(path).read_row_group(group, columns=columns)
    _GROUPS[key] = t
    if len(_GROUPS) > _GROUPS_KEPT:
        _GROUPS.popitem(last=False)
    return t


def read_places(table: "_Table", q: np.ndarray, columns: list[str]) -> pa.Table:
    """The rows at places `q` of a chunk order (EpochOrder.unshuffled), in the order of `q`, with
    each row's stable id (ROW_ID): every row group they touch is read once."""
    i = np.searchsorted(table.starts, q, side="right") - 1
    k = table.perm[i]
    off = q - table.starts[i]
    files, groups, rows, ids = table.file[k], table.group[k], table.start[k] + off, table.id0[k] + off
    parts, where = [], []
    for f, g in dict.fromkeys(zip(files.tolist(), groups.tolist())):
        at = np.flatnonzero((files == f) & (groups == g))
        parts.append(_row_group(table.paths[f], g, columns).take(pa.array(rows[at])))
        where.append(at)
    if not parts:
        return pa.table({**{c: [] for c in columns}, ROW_ID: pa.array([], pa.int64())})
    t = pa.concat_tables(parts)
    t = t.take(pa.array(np.argsort(np.concatenate(where), kind="stable")))  # back into the order of q
    return t.append_column(ROW_ID, pa.array(ids, pa.int64()))


def read_planned(batch: dict, plan_ref) -> pa.Table:
    """Ray Data map task: read unit i of a RankStream.read plan (fetched once per process from the
    object store) → this rank's shares of the unit's steps, in order, images as views."""
    import ray

    key = plan_ref.hex()
    if key not in _PLANS:
        _PLANS.clear()
        _PLANS[key] = ray.get(plan_ref)
    plan = _PLANS[key]
    order, steps = plan["order"], plan["plan"]
    tables = []
    for i in batch["id"]:
        s0, s1 = (int(x) for x in plan["units"][int(i)])
        q = np.concatenate([order.share(steps, s, plan["lo"], plan["n"]) for s in range(s0, s1)])
        tables.append(_with_views(read_places(order.table, q, plan["columns"]), plan["view"], order.epoch))
    return pa.concat_tables(tables)


def chunks_dataset(chunks: list[Chunk], columns: list[str], task_rows: int = 1024):
    """A Ray dataset of the rows of `chunks` (with ROW_ID, stored bytes for images), in order, one
    read task per `task_rows` rows."""
    tasks, cur, n = [], [], 0
    for c in chunks:
        cur.append(c)
        n += c.rows
        if n >= task_rows:
            tasks, cur, n = tasks + [cur], [], 0
    return tasks_dataset(tasks + ([cur] if cur else []), columns)


def read_rows(chunks: list[Chunk], columns: list[str], limit: int) -> dict[str, np.ndarray]:
    """The first `limit` rows of `chunks`, in order, as numpy columns (images: stored bytes)."""
    take_, n = [], 0
    for c in chunks:
        if n >= limit:
            break
        take_.append(c)
        n += c.rows
    t = read_chunk_table(take_, columns).slice(0, limit)
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in columns}


def labeled_rows(data: str, modality: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every labeled row of a preprocessed folder: (model input columns, labels)."""
    cols = COLUMNS[modality] + ["label"]
    chunks = list_chunks(data, cols)
    rows = read_rows(chunks, cols, sum(c.rows for c in chunks))
    keep = np.flatnonzero([lab is not None for lab in rows["label"]])
    return {c: rows[c][keep] for c in COLUMNS[modality]}, np.asarray(rows["label"][keep])


def to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An Arrow column as numpy; fixed-size binary (augmented images) as (N, width) uint8 bytes."""
    if pa.types.is_fixed_size_binary(col.type):
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        w = col.type.byte_width
        buf = np.frombuffer(arr.buffers()[1], np.uint8)
        return buf[arr.offset * w: (arr.offset + len(arr)) * w].reshape(len(arr), w)
    return col.to_numpy(zero_copy_only=False)


def warm_up(chunks: dict, columns: list[str], view: dict | None = None) -> threading.Thread:
    """Read one chunk through Ray Data in a background thread: a worker's first read pays for Ray
    Data's start and the read tasks' processes (3 s of the first window's 3.7 s here, 0.7 s warm),
    and with a `view` their torch/torchvision imports; started before the model is built, that cost
    overlaps the build. `chunks`: pack_chunks' columns."""
    first = Chunk(chunks["paths"][chunks["file"][0]], chunks["group"][0], chunks["start"][0], chunks["stop"][0])

    def read() -> None:
        from pipeline.raycluster import quiet_ray_data

        quiet_ray_data(worker=True)  # as the stream's own reads (RankStream.read)
        try:
            for _ in tasks_dataset([[first]], columns, view=view).iter_batches(batch_size=None):
                pass
        except Exception:  # only a warm-up: the real read reports any error
            pass

    thread = threading.Thread(target=read, daemon=True, name="warm-up-reader")
    thread.start()
    return thread


class RankStream:
    """This rank's share of every optimizer step (numpy dicts, plus ROW_ID), epoch after epoch,
    from any global position. `shares`: samples per rank per step (config.step_layout; their sum
    is the effective batch). `view` (augment.view_spec plus "seed"): images arrive as (B, size,
    size, 3) uint8 training views drawn in the read tasks; None leaves the stored bytes."""

    def __init__(self, chunks: list[Chunk] | dict, columns: list[str], shares: list[int], window: int, seed: int,
                 rank: int, view: dict | None = None):
        self.table = _Table.of(chunks)  # list[Chunk] or pack_chunks' columns
        self.total = int(self.table.starts[-1])
        self.columns = columns
        self.step_rows, self.lo, self.n = sum(shares), sum(shares[:rank]), shares[rank]
        self.shuffle = window > 0
        self.window = window if window > 0 else self.step_rows  # without shuffling: windows are just read units
        self.seed, self.rank, self.world = seed, rank, len(shares)
        self.view = None if view is None else {**view, "seed": seed}
        self._order: EpochOrder | None = None

    def plan(self, rest: list | None) -> Plan:
        """The plan for the rows `rest` of an epoch (None: the whole epoch)."""
        return Plan([[0, self.total]] if rest is None else rest, self.step_rows)

    def order(self, epoch: int) -> EpochOrder:
        """The epoch's order (chunks in their seeded order, window shuffles on demand)."""
        if self._order is None or self._order.epoch != epoch:
            perm = np.random.default_rng([self.seed, epoch, 7919]).permutation(len(self.table))
            self._order = EpochOrder(self.table.permuted(perm), self.seed, epoch, self.window, self.shuffle)
        return self._order

    def units(self, plan: Plan) -> np.ndarray:
        """The plan's steps in read units of about a window of global rows: (first, end) pairs."""
        per = max(1, -(-self.window // self.step_rows))
        starts = np.arange(0, plan.steps, per, dtype=np.int64)
        return np.stack([starts, np.minimum(starts + per, plan.steps)], 1)

    def dataset(self, epoch: int, plan: Plan):
        """The Ray dataset of this rank's shares of the plan's steps, in order (images as this
        stream's views)."""
        import ray

        from pipeline.raycluster import quiet_ray_data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        # A map task's output is cut into blocks of this size as it is produced; Ray Data's default
        # (128 MiB) would hold back a task's whole output (≈ 40 MB of text over its read units)
        # until the task ends (20 s before the first batch at 10 M rows, measured).
        ctx.target_max_block_size = READ_BLOCK_BYTES
        # One reader per worker and epoch (every few seconds on a small data set): its progress
        # (logged: a worker has no terminal) and execution lines would flood the driver's console.
        quiet_ray_data(worker=True)
        # The read tasks compute each step's share from the plan (binary searches per step), so
        # nothing here grows with the data but the units' numbers.
        units = self.units(plan)
        ref = ray.put({"order": self.order(epoch), "plan": plan, "units": units, "lo": self.lo, "n": self.n,
                       "columns": self.columns, "view": self.view})
        n = len(units)
        # At most READ_BLOCKS Ray tasks, each reading its read units one after the other (streamed
        # out block by block): Ray Data spends ~25 ms per task, so 1 221 one-unit tasks (a 10 M-row
        # epoch) cost 30 s and 2 s before the first block; 32 tasks 1.2 s and 0.55 s (measured here).
        # from_items, not range: range's read tasks take a CPU of their own, from_items has none;
        # the map tasks run beside the worker with no CPU of their own (elastic.reader_options).
        ids = [{"id": i} for i in range(n)]
        return ray.data.from_items(ids, override_num_blocks=min(n, READ_BLOCKS)).map_batches(
            read_planned, fn_kwargs={"plan_ref": ref}, batch_size=1, batch_format="numpy",
            **reader_options(min(n, READ_BLOCKS)))

    def read(self, epoch: int, plan: Plan) -> Iterator[dict]:
        """This rank's share of each step of `plan`, in order: one numpy dict of `n` rows per step."""
        if plan.steps == 0:
            return
        cols = self.columns + [ROW_ID]
        pending, have = [], 0
        for t in watch_first_block(  # a read that gets no CPU fails instead of hanging (elastic.py)
                self.dataset(epoch, plan).iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4)):
            pending.append(t)
            have += t.num_rows
            if have < self.n:
                continue
            ready = pa.concat_tables(pending)
            for a in range(0, ready.num_rows - self.n + 1, self.n):
                b = ready.slice(a, self.n)
                yield {c: to_numpy(b.column(c)) for c in cols}
            used = (ready.num_rows // self.n) * self.n
            pending = [ready.slice(used)] if used < ready.num_rows else []
            have = ready.num_rows - used

    def groups(self, epoch: int, rest: list | None, micro: list[int]) -> Iterator[list[dict]]:
        """Optimizer steps' micro-batches (of sizes `micro`, summing to this rank's share) from
        (epoch, rest) on, across epoch boundaries. Each epoch is read in a background thread that
        runs up to a read unit of steps ahead; the next epoch's reader starts as soon as that thread
        has read the last unit, so its first unit is read while the last one is trained on. An
        epoch ends at its last full step."""
        assert sum(micro) == self.n, (micro, self.n)
        cuts = np.cumsum([0] + list(micro))
        ahead = max(2, -(-self.window // self.step_rows) + 1)
        reader = nxt = None
        try:
            while True:
                plan = self.plan(rest)
                if plan.steps == 0 and rest is None:
                    return
                reader, nxt = nxt or Background(self.read(epoch, plan), ahead, "epoch-reader"), None
                whole = self.plan(None)
                for _ in range(plan.steps):
                    if nxt is None and reader.done() and whole.steps:
                        nxt = Background(self.read(epoch + 1, whole), ahead, "epoch-reader")
                    share = reader.next()
                    yield [{c: v[a:b] for c, v in share.items()} for a, b in zip(cuts[:-1], cuts[1:])]
                reader.close()
                epoch, rest = epoch + 1, None
        finally:  # closed (end of run, rollback): stop the readers still running
            for r in (reader, nxt):
                if r is not None:
                    r.close()
