"""What each rank reads, in which order: a pure function of (seed, epoch, rank), streamed with
Ray Data.

    shard files ─(driver: Parquet metadata)─► chunks (row groups, ≤ CHUNK_ROWS rows)
      epoch e: chunks in a seeded random order ─► rank r takes rows [r·n, (r+1)·n) of that order
      (n = total // world: every rank gets the same number of batches)
      ─► Ray Data reads the rank's chunks, in order, in parallel tasks
      ─► seeded shuffle inside windows of `window` rows ─► batches of `batch_size` rows

A class-sorted folder (all cats, then all dogs) thus arrives mixed, differently every epoch.
Because the order is a function, a resumed run starts reading at the window that holds its next
row and skips nothing by reading it again (at most one window is re-read and shuffled).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.config import ROW_GROUP_ROWS

CHUNK_ROWS = ROW_GROUP_ROWS  # preprocessing writes row groups of this size: a chunk reads one


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of row group `group` of one Parquet file."""
    path: str
    group: int
    start: int
    stop: int

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


def rank_share(chunks: list[Chunk], seed: int, epoch: int, rank: int, world: int) -> list[Chunk]:
    """This rank's rows for `epoch`: the chunks in a seeded random order, cut into `world` equal
    contiguous shares (the remainder of total // world is left out this epoch)."""
    order = np.random.default_rng([seed, epoch, 7919]).permutation(len(chunks))
    per_rank = sum(c.rows for c in chunks) // world
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    return _slice([chunks[i] for i in order], lo, hi)


def _slice(chunks: list[Chunk], lo: int, hi: int) -> list[Chunk]:
    """Rows [lo, hi) of the concatenation of `chunks`, as (possibly trimmed) chunks."""
    out, pos = [], 0
    for c in chunks:
        a, b = max(lo, pos), min(hi, pos + c.rows)
        if a < b:
            out.append(Chunk(c.path, c.group, c.start + a - pos, c.start + b - pos))
        pos += c.rows
        if pos >= hi:
            break
    return out


def read_chunks(batch: dict, columns: list[str]) -> pa.Table:
    """Ray Data map task: chunk descriptions → their rows (only the needed row group is read)."""
    import pyarrow.parquet as pq

    from pipeline import storage

    tables = []
    for path, group, start, stop in zip(batch["path"], batch["group"], batch["start"], batch["stop"]):
        fs, p = storage.resolve(str(path))
        with fs.open_input_file(p) as fh:
            t = pq.ParquetFile(fh).read_row_group(int(group), columns=columns)
        tables.append(t.slice(int(start), int(stop) - int(start)))
    return pa.concat_tables(tables)


class RankStream:
    """Batches (numpy dicts) of one rank, epoch after epoch, resumable at any batch."""

    def __init__(self, chunks: list[Chunk], columns: list[str], batch_size: int, window: int, seed: int,
                 rank: int, world: int):
        self.chunks, self.columns, self.batch_size = chunks, columns, batch_size
        # Windows are whole batches, so a resume point (a batch) never splits one unevenly.
        self.window = max(batch_size, window // batch_size * batch_size) if window else batch_size
        self.shuffle = window > 0
        self.seed, self.rank, self.world = seed, rank, world

    def batches_per_epoch(self) -> int:
        return sum(c.rows for c in self.chunks) // self.world // self.batch_size

    def _todo(self, epoch: int, skip_batches: int) -> tuple[list[Chunk], int]:
        """(chunks still to read, index of the first window) for a start after `skip_batches`."""
        share = rank_share(self.chunks, self.seed, epoch, self.rank, self.world)
        first_window = skip_batches * self.batch_size // self.window
        return _slice(share, first_window * self.window, self.batches_per_epoch() * self.batch_size), first_window

    def rows_to_read(self, epoch: int, skip_batches: int = 0) -> int:
        return sum(c.rows for c in self._todo(epoch, skip_batches)[0])

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        """The rank's batches of `epoch`, starting after `skip_batches` (drop_last)."""
        import ray

        todo, first_window = self._todo(epoch, skip_batches)
        if not todo:
            return
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        # One reader per worker and epoch (every few seconds on a small data set): its progress bars
        # and "Starting execution of Dataset …" lines would flood the log.
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        items = [{"path": c.path, "group": c.group, "start": c.start, "stop": c.stop} for c in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_chunks, fn_kwargs={"columns": self.columns}, batch_size=1, batch_format="numpy")
        skip_rows = skip_batches * self.batch_size - first_window * self.window
        w, pending = first_window, []
        for t in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4):
            pending.append(t)
            while sum(p.num_rows for p in pending) >= self.window:
                window, pending = _split(pa.concat_tables(pending), self.window)
                yield from self._window_batches(window, epoch, w, skip_rows)
                w, skip_rows = w + 1, 0
        if pending:
            yield from self._window_batches(pa.concat_tables(pending), epoch, w, skip_rows)

    def groups(self, epoch: int, step_in_epoch: int, grad_accum: int) -> Iterator[list[dict]]:
        """Optimizer steps' micro-batch groups (grad_accum batches each) from (epoch, step) on,
        across epoch boundaries: the next epoch's reader starts as soon as the previous one is
        drained, not when the training loop gets there. An epoch ends at its last full group."""
        steps = self.batches_per_epoch() // grad_accum
        while steps:
            batches = self.epoch(epoch, step_in_epoch * grad_accum)
            for _ in range(step_in_epoch, steps):
                yield [next(batches) for _ in range(grad_accum)]
            epoch, step_in_epoch = epoch + 1, 0

    def _window_batches(self, window: pa.Table, epoch: int, w: int, skip_rows: int) -> Iterator[dict]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, w, self.rank, 104729]).permutation(window.num_rows)
            window = window.take(pa.array(order))
        for a in range(skip_rows, window.num_rows - self.batch_size + 1, self.batch_size):
            b = window.slice(a, self.batch_size)
            yield {c: b.column(c).to_numpy(zero_copy_only=False) for c in self.columns}


def _split(t: pa.Table, n: int) -> tuple[pa.Table, list[pa.Table]]:
    rest = t.slice(n)
    return t.slice(0, n), ([rest] if rest.num_rows else [])
