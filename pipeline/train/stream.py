"""What each rank reads, in which order: a pure function of (seed, epoch), streamed with Ray Data.

    shard files ─(driver: Parquet metadata)─► chunks (row groups, ≤ CHUNK_ROWS rows)
      epoch e's global order: the chunks in a seeded random order, then a seeded shuffle inside
      consecutive windows of `window` rows ─► rows 0 … N−1 of the epoch
      ─► the rows still to read (`rest`, intervals of that order) cut into `world` equal shares
      ─► rank r's share read by Ray Data (the windows it touches, in parallel tasks), in order
      ─► batches of `batch_size` rows, grad_accum of them per optimizer step

A class-sorted folder (all cats, then all dogs) thus arrives mixed, differently every epoch.
Because the order does not depend on the number of workers, the run position is global: the
epoch and the intervals of its order not yet read. A restart with another world size (an
elastic run that lost or gained a node) cuts what is left into new shares: no row of the epoch is
skipped or read twice, counting from the checkpoint. Only the windows a share touches are read
(a resume re-reads at most one window per share edge).
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.config import ROW_GROUP_ROWS

CHUNK_ROWS = ROW_GROUP_ROWS  # preprocessing writes row groups of this size: a chunk reads one
COLUMNS = {"image": ["image"], "audio": ["audio"], "text": ["input_ids"]}  # the model inputs per modality
ROW_ID = "__row__"  # each batch's stable row ids (index in the run's chunk list), for tests and logs


@dataclass(frozen=True)
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
    only (no rows are read)."""
    import pyarrow.parquet as pq

    from pipeline import storage

    fs, root = storage.resolve(data)
    files = storage.shard_files(fs, root)
    chunks = []
    for f in files:
        with fs.open_input_file(f) as fh:
            meta = pq.ParquetFile(fh).metadata
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            chunks += [Chunk(_uri(data, root, f), g, a, min(a + CHUNK_ROWS, n)) for a in range(0, n, CHUNK_ROWS)]
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
    trimmed by `trim(item, first, stop)` (row offsets inside the item)."""
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


def _slice(chunks: list[Chunk], lo: int, hi: int) -> list[Chunk]:
    """Rows [lo, hi) of the concatenation of `chunks`, as (possibly trimmed) chunks."""
    return _cut(chunks, lo, hi, lambda c: c.rows,
                lambda c, a, b: Chunk(c.path, c.group, c.start + a, c.start + b, c.id0 + a))


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
    """How `world` ranks read the rows `rest` of an epoch, `step_rows` (batch_size × grad_accum)
    each per optimizer step: rank r's share is rows [r·n, (r+1)·n) of `rest`, n = steps ×
    step_rows; the remainder (fewer rows than one step of all ranks) is left for the epoch's end."""
    rest: list
    world: int
    step_rows: int

    @property
    def steps(self) -> int:
        return interval_rows(self.rest) // (self.world * self.step_rows)

    def share(self, rank: int) -> list:
        n = self.steps * self.step_rows
        return take(self.rest, rank * n, (rank + 1) * n)

    def left_after(self, steps: int) -> list:
        """The rows not yet read after every rank made `steps` steps of this plan."""
        n, done = self.steps * self.step_rows, steps * self.step_rows
        parts = [take(self.rest, r * n + done, (r + 1) * n) for r in range(self.world)]
        return merge([x for p in parts for x in p] + take(self.rest, self.world * n, interval_rows(self.rest)))


# ----------------------------------------------------------------------------- reading
def read_chunks(batch: dict, columns: list[str]) -> pa.Table:
    """Ray Data map task: chunk descriptions → their rows (only the needed row group is read),
    with each row's stable id."""
    import pyarrow.parquet as pq

    from pipeline import storage

    tables = []
    for path, group, start, stop, id0 in zip(batch["path"], batch["group"], batch["start"], batch["stop"],
                                             batch["id0"]):
        fs, p = storage.resolve(str(path))
        with fs.open_input_file(p) as fh:
            t = pq.ParquetFile(fh).read_row_group(int(group), columns=columns)
        t = t.slice(int(start), int(stop) - int(start))
        tables.append(t.append_column(ROW_ID, pa.array(np.arange(int(id0), int(id0) + t.num_rows))))
    return pa.concat_tables(tables)


def chunks_dataset(chunks: list[Chunk], columns: list[str]):
    """A Ray dataset of the rows of `chunks` (with ROW_ID), one block and one read task per chunk,
    in order."""
    import ray

    items = [dataclasses.asdict(c) for c in chunks]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_chunks, fn_kwargs={"columns": columns}, batch_size=1, batch_format="numpy")


def read_rows(chunks: list[Chunk], columns: list[str], limit: int) -> dict[str, np.ndarray]:
    """The first `limit` rows of `chunks`, in order, as numpy columns."""
    tables, n = [], 0
    for c in chunks:
        if n >= limit:
            break
        t = read_chunks({k: [v] for k, v in dataclasses.asdict(c).items()}, columns)
        tables.append(t)
        n += t.num_rows
    t = pa.concat_tables(tables).slice(0, limit) if tables else pa.table({c: [] for c in columns})
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in columns}


def labeled_rows(data: str, modality: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every labeled row of a preprocessed folder: (model input columns, labels)."""
    cols = COLUMNS[modality] + ["label"]
    chunks = list_chunks(data, cols)
    rows = read_rows(chunks, cols, sum(c.rows for c in chunks))
    keep = np.flatnonzero([lab is not None for lab in rows["label"]])
    return {c: rows[c][keep] for c in COLUMNS[modality]}, np.asarray(rows["label"][keep])



def warm_up(chunks: list[dict], columns: list[str]) -> threading.Thread:
    """Read one chunk through Ray Data in a background thread: a worker's first read pays for Ray
    Data's start and the read tasks' processes (3 s of the first window's 3.7 s here, 0.7 s warm);
    started before the model is built, that cost overlaps the build."""
    def read() -> None:
        from pipeline.raycluster import quiet_ray_data

        quiet_ray_data(worker=True)  # as the stream's own reads (RankStream.read)
        try:
            for _ in chunks_dataset([Chunk(**chunks[0])], columns).iter_batches(batch_size=None):
                pass
        except Exception:  # only a warm-up: the real read reports any error
            pass

    thread = threading.Thread(target=read, daemon=True, name="warm-up-reader")
    thread.start()
    return thread


class RankStream:
    """Batches (numpy dicts, plus ROW_ID) of one rank of `world`, epoch after epoch, from any
    global position."""

    def __init__(self, chunks: list[Chunk], columns: list[str], batch_size: int, window: int, seed: int,
                 rank: int, world: int):
        offsets = np.cumsum([0] + [c.rows for c in chunks])
        self.chunks = [dataclasses.replace(c, id0=int(o)) for c, o in zip(chunks, offsets)]
        self.total = int(offsets[-1])
        self.columns, self.batch_size = columns, batch_size
        self.shuffle = window > 0
        self.window = window if window > 0 else batch_size  # without shuffling: windows are just read units
        self.seed, self.rank, self.world = seed, rank, world

    def plan(self, rest: list | None, grad_accum: int) -> Plan:
        """The plan for the rows `rest` of an epoch (None: the whole epoch)."""
        return Plan([[0, self.total]] if rest is None else rest, self.world, self.batch_size * grad_accum)

    def order(self, epoch: int) -> list[Chunk]:
        """The epoch's chunks in their seeded order (the global order before the window shuffle)."""
        perm = np.random.default_rng([self.seed, epoch, 7919]).permutation(len(self.chunks))
        return [self.chunks[i] for i in perm]

    def _window_order(self, epoch: int, j: int) -> np.ndarray:
        n = min(self.window, self.total - j * self.window)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, j, 104729]).permutation(n)

    def _needs(self, epoch: int, rows: list) -> list[tuple[int, np.ndarray]]:
        """(window, positions in that window) for the rows `rows` of the epoch's order, in order."""
        w, needs = self.window, []
        for lo, hi in rows:
            for j in range(lo // w, (hi - 1) // w + 1):
                picks = self._window_order(epoch, j)[max(lo, j * w) - j * w: min(hi, (j + 1) * w) - j * w]
                if needs and needs[-1][0] == j:
                    needs[-1] = (j, np.concatenate([needs[-1][1], picks]))
                else:
                    needs.append((j, picks))
        return needs

    def rows_to_read(self, epoch: int, rows: list) -> int:
        """Rows Ray Data reads to produce `rows` (whole windows)."""
        return sum(min(self.window, self.total - j * self.window) for j, _ in self._needs(epoch, rows))

    def read(self, epoch: int, rows: list) -> Iterator[dict]:
        """The rows `rows` (intervals) of the epoch's order, in order, as batches of batch_size."""
        import ray

        needs = self._needs(epoch, rows)
        if not needs:
            return
        order, w = self.order(epoch), self.window
        from pipeline.raycluster import quiet_ray_data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        # One reader per worker and epoch (every few seconds on a small data set): its progress
        # (logged: a worker has no terminal) and execution lines would flood the driver's console.
        quiet_ray_data(worker=True)
        ds = chunks_dataset([c for j, _ in needs for c in _slice(order, j * w, (j + 1) * w)], self.columns)
        cols = self.columns + [ROW_ID]
        pending, have, out, k = [], 0, [], 0
        for t in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4):
            pending.append(t)
            have += t.num_rows
            while k < len(needs) and have >= (n := min(w, self.total - needs[k][0] * w)):
                window, pending = _split(pa.concat_tables(pending), n)
                have -= n
                out.append(window.take(pa.array(needs[k][1])))
                k += 1
                ready = pa.concat_tables(out)
                for a in range(0, ready.num_rows - self.batch_size + 1, self.batch_size):
                    b = ready.slice(a, self.batch_size)
                    yield {c: b.column(c).to_numpy(zero_copy_only=False) for c in cols}
                rest = ready.num_rows % self.batch_size
                out = [ready.slice(ready.num_rows - rest)] if rest else []

    def groups(self, epoch: int, rest: list | None, grad_accum: int) -> Iterator[list[dict]]:
        """Optimizer steps' micro-batch groups (grad_accum batches each) of this rank from (epoch,
        rest) on, across epoch boundaries: the next epoch's reader starts as soon as the previous
        one is drained, not when the training loop gets there. An epoch ends at its last full step."""
        while True:
            plan = self.plan(rest, grad_accum)
            if plan.steps == 0 and rest is None:
                return
            batches = self.read(epoch, plan.share(self.rank))
            for _ in range(plan.steps):
                yield [next(batches) for _ in range(grad_accum)]
            epoch, rest = epoch + 1, None


def _split(t: pa.Table, n: int) -> tuple[pa.Table, list[pa.Table]]:
    rest = t.slice(n)
    return t.slice(0, n), ([rest] if rest.num_rows else [])
