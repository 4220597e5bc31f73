"""Scale of the training data stream: what listing, planning and reading cost as a text data set
grows from thousands to tens of millions of rows (pipeline/train/stream.py), and listing 1 000+
shards on an S3 API server.

    .venv/bin/python -m benchmarks.scale [--rows 10000,1000000,10000000] [--s3-shards 1000]
        [--work /tmp/d2v-scale] [--repeats 3]

Data: for each size N, a folder in the product's text format (pipeline/ingest.py SCHEMAS: columns
input_ids list<int32>, length int32, label string (null), path string) written directly with
pyarrow (no tokenizer): random rows of 8–40 token ids in [5, 8000) framed <s>=0 … </s>=2, row groups
of ROW_GROUP_ROWS["text"] rows, 250 000 rows per shard file, plus a manifest.json as the ingest
writes it. A folder under --work with the right row count is reused (10M rows: ~1 GB).

Settings as the text demo preset trains (pipeline/recipes.py DEMO_TRAIN, TrainConfig): batch 32,
grad_accum 1, window (train.shuffle_buffer) 1024, seed 0, world 1; 4 → 3 workers for the elastic
re-plan. A step is the effective batch E = batch × grad_accum × workers, cut into the workers'
shares as config.step_layout cuts it (`split_evenly(E, world)`; each share in grad_accum
micro-batches of `split_evenly(share, grad_accum)`): E = 32 on 1 worker; in the elastic case the run's
E = 128 (4 × 32), which stays 128 on 3 workers (shares 43, 43, 42). Per size, in seconds:
- list: `list_chunks` (shard listing + every Parquet footer; warm page cache).
- plan epoch: RankStream construction from the packed chunk list the driver hands a worker +
  `order(0)` + the plan + its read units (`RankStream.units`, what `RankStream.dataset` computes
  before Ray Data starts) + rank 0's share of the first unit's steps (`EpochOrder.share`, what the
  first read task computes before it reads a row). No Ray.
- first batch: from starting `RankStream.groups(0, None, micro)` until the first step's share
  arrives on a local Ray (`ray.init(num_cpus=2)`), warm: a training worker overlaps Ray Data's cold
  start with the model build (stream.warm_up). The very first read of the run, at the largest size
  on the fresh cluster, is reported apart (`first_batch_cold_s`); the 30-s target is checked on the
  larger of the two.
- epoch boundary: `groups(0, rest, micro)` from the last 4 steps of epoch 0 (`Plan.left_after`);
  those steps are drained, then the next step (epoch 1's first) is timed. Its parts are timed apart
  too (rows "· …"): order(1); "units": the plan, its read units and rank 0's share of the first
  unit's steps (that share is computed again by the first read task, inside "first block");
  `RankStream.dataset` (the plan put in the object store once, `ray.data.from_items` over the
  units + `map_batches(read_planned)`); and from `iter_batches` to the first read task's block
  (Ray Data's executor start + one read task).
- resume plan: `Plan.left_after(k)` for k = half the epoch's steps, the new plan, its read units
  and rank 0's share of the first unit's steps (the epoch's chunk order already built, its window
  shuffles drawn anew).
- elastic re-plan: the rest of epoch 0 after 4 workers made half their steps, re-cut for 3: a
  RankStream for world 3 + order(0) (what each restarted rank computes, counted once) + the plan,
  its read units and every rank's share of the first unit's steps.
Listing and planning rows are the best of --repeats runs (CPU work on a shared machine); the Ray
rows (first batch, epoch boundary and its parts) the median of --repeats runs.
Memory, per size: the driver's peak RSS and the largest peak RSS of Ray's worker processes (they
run the read tasks, the only tasks here), from Linux's high-water marks (VmHWM) reset when the size
starts (/proc/PID/clear_refs); a worker's RSS counts the object-store pages it touched.
`driver_maxrss_mb` is getrusage's peak over the whole process (data writing and S3 included).

S3: --s3-shards small shards (--s3-shard-rows rows each, one file's bytes under many names) are
uploaded through pyarrow's S3FileSystem to moto's S3 server on loopback (the tests' server), and
`list_chunks` over `s3://…?endpoint_override=…&scheme=http` is timed (best of --repeats).

Prints a table (one row per measurement, one column per size, the ratio of the two largest sizes
last), then one JSON line: per-size lists "rows", "list_s", "plan_epoch_s", "first_batch_s",
"epoch_boundary_s", "resume_plan_s", "elastic_replan_s", "driver_peak_rss_mb",
"read_task_peak_rss_mb", "boundary_parts_s" (order, units, dataset, first block);
"first_batch_cold_s", "s3_list_s", "s3_shards",
"s3_rows", "max_growth_10x" (the largest ratio of a timing between the two largest sizes) and
"targets" (at the largest size: epoch boundary ≤ 1 s, first batch ≤ 30 s, growth ≤ 12×).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.config import ROW_GROUP_ROWS, PreprocessConfig, TextSettings  # noqa: E402
from pipeline.train.config import split_evenly  # noqa: E402
from pipeline.train.stream import COLUMNS, EpochOrder, Plan, RankStream, list_chunks, pack_chunks  # noqa: E402

SHARD_ROWS = 250_000
VOCAB = 8000
SPECIALS = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}
BATCH, GRAD_ACCUM, WINDOW, SEED = 32, 1, 1024, 0  # the text demo preset (DEMO_TRAIN, TrainConfig)
ELASTIC = (4, 3)  # workers before and after the elastic re-plan
TAIL_STEPS = 4  # steps of epoch 0 drained before the boundary is timed
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",  # moto takes any
                  "AWS_DEFAULT_REGION": "us-east-1"}
TIMINGS = ("list_s", "plan_epoch_s", "first_batch_s", "epoch_boundary_s", "resume_plan_s", "elastic_replan_s")
LABELS = {"list_s": "list (list_chunks)", "plan_epoch_s": "plan epoch", "first_batch_s": "first batch",
          "epoch_boundary_s": "epoch boundary", "resume_plan_s": "resume plan", "elastic_replan_s": "elastic re-plan 4→3",
          "driver_peak_rss_mb": "driver peak RSS, MB", "read_task_peak_rss_mb": "read task peak RSS, MB"}
PARTS = ("order", "units", "dataset", "first block")


# ----------------------------------------------------------------------------- data
def text_table(n: int, seed: int, path_name: str) -> pa.Table:
    """n synthetic rows in the ingest's text schema, built from flat values and offsets."""
    rng = np.random.default_rng([seed, n])
    lengths = rng.integers(8, 41, n, dtype=np.int32)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = rng.integers(5, VOCAB, int(offsets[-1]), dtype=np.int32)
    values[offsets[:-1]] = SPECIALS["bos"]
    values[offsets[1:] - 1] = SPECIALS["eos"]
    name = path_name.encode()
    path = pa.StringArray.from_buffers(n, pa.py_buffer((np.arange(n + 1, dtype=np.int32) * len(name)).tobytes()),
                                       pa.py_buffer(name * n))
    return pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                     "length": pa.array(lengths), "label": pa.nulls(n, pa.string()), "path": path})


def manifest(rows: int, files: int, schema: pa.Schema, seconds: float) -> dict:
    from pipeline.ingest import SCHEMAS

    cfg = PreprocessConfig(modality="text", input="synthetic", output="-", rows_per_file=SHARD_ROWS,
                           text=TextSettings(vocab_size=VOCAB))
    return {"modality": "text", "input": "synthetic (benchmarks/scale.py)",
            "counts": {"read": files, "files_used": files, "written": rows, "rejected": 0, "rejected_files": 0},
            "settings": {**cfg.settings(), "vocab_size": VOCAB, "special_ids": SPECIALS},
            "columns": SCHEMAS["text"], "arrow_schema": {f.name: str(f.type) for f in schema},
            "labels": [], "seconds": round(seconds, 2)}


def write_folder(out: str, rows: int, shard_rows: int = SHARD_ROWS) -> str:
    """`out` holding `rows` text rows (reused when its manifest says so) → `out`."""
    mpath = os.path.join(out, "manifest.json")
    if os.path.exists(mpath):
        with open(mpath) as f:
            if json.load(f)["counts"]["written"] == rows:
                return out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "shards"))
    t0, schema = time.perf_counter(), None
    starts = range(0, rows, shard_rows)
    for i, a in enumerate(starts):
        name = f"part-{i:05d}"
        t = text_table(min(shard_rows, rows - a), i, f"synthetic/{name}.txt")
        pq.write_table(t, os.path.join(out, "shards", f"{name}.parquet"), row_group_size=ROW_GROUP_ROWS["text"])
        schema = t.schema
    with open(mpath + ".tmp", "w") as f:  # last: a folder cut short is written again
        f.write(json.dumps(manifest(rows, len(starts), schema, time.perf_counter() - t0), indent=2) + "\n")
    os.replace(mpath + ".tmp", mpath)
    return out


# ----------------------------------------------------------------------------- measurements
def best(fn, repeats: int) -> float:
    out = float("inf")
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def shares(world: int, workers: int | None = None) -> list[int]:
    """Samples per rank per step on `world` ranks of a run whose effective batch is batch ×
    grad_accum × `workers` (default `world`), cut as config.step_layout cuts it."""
    return split_evenly(BATCH * GRAD_ACCUM * (workers or world), world)


def micro(stream: RankStream) -> list[int]:
    """The rank's share in grad_accum micro-batches (config.step_layout with micro = batch)."""
    return split_evenly(stream.n, GRAD_ACCUM)


def new_stream(packed: dict, world: int = 1, rank: int = 0, workers: int | None = None) -> RankStream:
    """A worker's stream from the packed chunk list the driver hands it (stream.pack_chunks)."""
    return RankStream(packed, COLUMNS["text"], shares(world, workers), WINDOW, SEED, rank)


def first_shares(stream: RankStream, order: EpochOrder, plan: Plan, ranks=(0,)) -> list:
    """The plan's read units (what RankStream.dataset computes before Ray Data starts) and the
    shares of `ranks` of the first unit's steps (what each rank's first read task computes before
    it reads a row)."""
    units = stream.units(plan)
    if not len(units):
        return [units]
    cut = split_evenly(stream.step_rows, stream.world)  # every rank's share, as `shares` cut them
    s0, s1 = (int(x) for x in units[0])
    return [units] + [[order.share(plan, s, sum(cut[:r]), cut[r]) for s in range(s0, s1)] for r in ranks]


def plan_epoch(chunks) -> list:
    stream = new_stream(chunks)
    return first_shares(stream, stream.order(0), stream.plan(None))


def fresh(order: EpochOrder) -> EpochOrder:
    """`order` without the window shuffles it has drawn (its chunk order shared)."""
    return EpochOrder(order.table, order.seed, order.epoch, order.window, order.shuffle)


def resume_plan(stream: RankStream, plan: Plan, k: int) -> list:
    order = fresh(stream.order(0))  # the epoch's chunk order, as the worker has it; window shuffles drawn anew
    return first_shares(stream, order, Plan(plan.left_after(k), plan.step_rows))


def elastic_replan(chunks, rest: list) -> list:
    before, after = ELASTIC
    stream = new_stream(chunks, world=after, workers=before)
    return first_shares(stream, stream.order(0), stream.plan(rest), range(after))


def settle(chunks, timeout: float = 120.0) -> None:
    """A cluster as a training run has it between two reads: every CPU free and a warm worker. A
    reader closed after its first steps (as here, never in training, whose readers are drained)
    leaves read tasks in flight and its workers are sometimes replaced: the next reader's first
    block waited for them (1-3 s at 1M rows here). So: wait for free CPUs, then read one chunk
    through Ray Data to the end, as stream.warm_up does."""
    import ray

    from pipeline.train.stream import warm_up

    total = ray.cluster_resources().get("CPU", 0)
    t = time.perf_counter()
    time.sleep(0.2)
    while ray.available_resources().get("CPU", 0) < total and time.perf_counter() - t < timeout:
        time.sleep(0.1)
    warm_up(chunks, COLUMNS["text"]).join()


def first_batch(chunks) -> float:
    settle(chunks)
    stream = new_stream(chunks)
    t = time.perf_counter()
    groups = stream.groups(0, None, micro(stream))
    step = next(groups)
    dt = time.perf_counter() - t
    assert len(step) == GRAD_ACCUM and len(step[0]["input_ids"]) == BATCH
    groups.close()
    return dt


def epoch_boundary(chunks) -> float:
    settle(chunks)
    stream = new_stream(chunks)
    plan = stream.plan(None)
    tail = min(TAIL_STEPS, plan.steps)
    groups = stream.groups(0, plan.left_after(plan.steps - tail), micro(stream))
    for _ in range(tail):
        next(groups)
    t = time.perf_counter()
    step = next(groups)  # epoch 1's first step
    dt = time.perf_counter() - t
    assert len(step[0]["input_ids"]) == BATCH
    groups.close()
    return dt


def boundary_parts(chunks) -> dict:
    """The epoch boundary's driver-side work, one part at a time (epoch 1, rank 0 of 1)."""
    settle(chunks)
    stream = new_stream(chunks)
    stream.order(0)
    out = {}
    t = time.perf_counter()
    stream.order(1)
    out["order"] = time.perf_counter() - t
    t = time.perf_counter()
    plan = stream.plan(None)
    first_shares(stream, fresh(stream.order(1)), plan)  # the order dataset() ships keeps no drawn shuffles
    out["units"] = time.perf_counter() - t
    t = time.perf_counter()
    ds = stream.dataset(1, plan)  # the plan put in the object store once + the read's dataset
    out["dataset"] = time.perf_counter() - t
    t = time.perf_counter()
    blocks = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4))
    first = next(blocks)
    out["first block"] = time.perf_counter() - t
    assert first.num_rows > 0
    getattr(blocks, "close", lambda: None)()  # stops the executor
    return out


class Peaks:
    """Peak RSS (MB) of this process and of the largest Ray worker process over a `with` block:
    Linux's high-water marks (VmHWM), reset on entry through /proc/PID/clear_refs. Where they cannot
    be reset: this process's lifetime peak (getrusage) and the workers' RSS on exit."""

    def __init__(self):
        import psutil

        self.me = psutil.Process()
        self.driver = self.worker = 0.0

    def _workers(self) -> list:
        import psutil

        out = []
        for p in self.me.children(recursive=True):  # the cluster ray.init started here
            with contextlib.suppress(psutil.Error, IndexError):
                if p.cmdline()[0].startswith("ray::"):
                    out.append(p)
        return out

    @staticmethod
    def _reset(pid) -> bool:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _hwm_mb(p) -> float:
        with contextlib.suppress(OSError):
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        with contextlib.suppress(Exception):
            return p.memory_info().rss / 2**20
        return 0.0

    def __enter__(self):
        self.exact = self._reset("self")
        for p in self._workers():
            self._reset(p.pid)
        return self

    def __exit__(self, *exc):
        self.driver = (self._hwm_mb(self.me) if self.exact
                       else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        self.worker = max((self._hwm_mb(p) for p in self._workers()), default=0.0)


def measure(data: str, repeats: int) -> dict:
    with Peaks() as peaks:
        out = {"list_s": best(lambda: list_chunks(data, COLUMNS["text"]), repeats)}
        chunks = pack_chunks(list_chunks(data, COLUMNS["text"]))  # what the driver hands the workers
        out["plan_epoch_s"] = best(lambda: plan_epoch(chunks), repeats)
        stream = new_stream(chunks)
        plan = stream.plan(None)
        out["resume_plan_s"] = best(lambda: resume_plan(stream, plan, plan.steps // 2), repeats)
        before = new_stream(chunks, world=ELASTIC[0]).plan(None)
        rest = before.left_after(before.steps // 2)
        out["elastic_replan_s"] = best(lambda: elastic_replan(chunks, rest), repeats)
        out["first_batch_s"] = statistics.median(first_batch(chunks) for _ in range(max(1, repeats)))
        out["epoch_boundary_s"] = statistics.median(epoch_boundary(chunks) for _ in range(max(1, repeats)))
        parts = [boundary_parts(chunks) for _ in range(max(1, repeats))]
        out["boundary_parts_s"] = {k: statistics.median(p[k] for p in parts) for k in PARTS}
    out["driver_peak_rss_mb"], out["read_task_peak_rss_mb"] = peaks.driver, peaks.worker
    return out


# ----------------------------------------------------------------------------- S3
@contextlib.contextmanager
def s3_server(bucket: str):
    """moto's S3 server on a free loopback port with `bucket` → (its endpoint, a pyarrow client)."""
    import urllib.request

    import pyarrow.fs as pafs

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.25)
        endpoint = f"127.0.0.1:{port}"
        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                               secret_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
                               allow_bucket_creation=True)
        fs.create_dir(bucket)
        yield endpoint, fs
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s3_list(work: str, shards: int, shard_rows: int, repeats: int) -> float:
    """Seconds of list_chunks over `shards` shards on moto's S3 server."""
    local = write_folder(os.path.join(work, f"s3-shard-{shard_rows}"), shard_rows, shard_rows)
    with open(os.path.join(local, "shards", "part-00000.parquet"), "rb") as f:
        body = f.read()
    for k, v in S3_CREDENTIALS.items():
        os.environ.setdefault(k, v)
    with s3_server("d2v") as (endpoint, fs):
        def put(i: int) -> None:
            with fs.open_output_stream(f"d2v/scale/shards/part-{i:05d}.parquet") as out:
                out.write(body)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(shards)))
        uri = f"s3://d2v/scale?endpoint_override={endpoint}&scheme=http"
        chunks = list_chunks(uri, COLUMNS["text"])
        assert sum(c.rows for c in chunks) == shards * shard_rows, len(chunks)
        return best(lambda: list_chunks(uri, COLUMNS["text"]), repeats)


# ----------------------------------------------------------------------------- report
def size_name(n: int) -> str:
    for div, suffix in ((10**6, "M"), (10**3, "k")):
        if n >= div and n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="10000,1000000,10000000", help="data set sizes (text rows), comma-separated")
    p.add_argument("--s3-shards", type=int, default=1000, help="shard files listed on the S3 API server (0: skip)")
    p.add_argument("--s3-shard-rows", type=int, default=1000, help="rows per S3 shard")
    p.add_argument("--work", default="/tmp/d2v-scale", help="cache folder for the data sets (reused)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per timing: best of them (listing, planning), their median (Ray reads)")
    a = p.parse_args(argv)
    sizes = sorted(int(x) for x in a.rows.split(","))
    os.makedirs(a.work, exist_ok=True)
    folders = []
    for n in sizes:
        t = time.perf_counter()
        folders.append(write_folder(os.path.join(a.work, f"text-{n}"), n))
        print(f"# {size_name(n)} rows: {folders[-1]} ({time.perf_counter() - t:.1f} s to write or find)", flush=True)

    import ray

    from pipeline.raycluster import quiet_ray_data

    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    quiet_ray_data(worker=True)
    try:
        # The first batch of a fresh cluster at the largest size: Ray Data's cold start (worker
        # processes, the first read tasks) is paid once per process; the sizes below run warm.
        cold = first_batch(pack_chunks(list_chunks(folders[-1], COLUMNS["text"])))
        print(f"# cold first batch ({size_name(sizes[-1])} rows, fresh Ray): {cold:.2f} s", flush=True)
        results = []
        for n, data in zip(sizes, folders):
            results.append(measure(data, a.repeats))
            print(f"# {size_name(n)}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[-1].items()
                                                      if not isinstance(v, dict)), flush=True)
    finally:
        ray.shutdown()
    s3 = s3_list(a.work, a.s3_shards, a.s3_shard_rows, a.repeats) if a.s3_shards > 0 else None

    names = [size_name(n) for n in sizes]
    ratio_name = f"{names[-1]}/{names[-2]}" if len(sizes) > 1 else "ratio"

    def ratio(vals: list) -> float | None:
        return vals[-1] / vals[-2] if len(vals) > 1 and vals[-2] > 0 else None

    rows = [(LABELS[k], [r[k] for r in results]) for k in (*TIMINGS, "driver_peak_rss_mb", "read_task_peak_rss_mb")]
    rows[4:4] = [(f"  · boundary: {part}", [r["boundary_parts_s"][part] for r in results]) for part in PARTS]
    width = max(10, *(len(n) for n in names))
    print(f"\n{'measurement (s)':28} " + " ".join(f"{n:>{width}}" for n in names) + f" {ratio_name:>8}")
    for label, vals in rows:
        r = ratio(vals)
        print(f"{label:28} " + " ".join(f"{v:{width}.4g}" if v < 1000 else f"{v:{width}.0f}" for v in vals)
              + f" {'' if r is None else f'{r:8.2f}'}")
    if s3 is not None:
        print(f"{'S3 list (moto), s':28} {s3:{width}.4g}   ({a.s3_shards} shards × {a.s3_shard_rows} rows)")
    print(f"{'cold first batch, s':28} {cold:{width}.4g}   ({names[-1]} rows, fresh Ray cluster)")
    growth = [ratio([r[k] for r in results]) for k in TIMINGS]
    max_growth = max((g for g in growth if g is not None), default=None)
    last = results[-1]
    targets = {"epoch_boundary_le_1s": last["epoch_boundary_s"] <= 1.0,
               "first_batch_le_30s": max(cold, last["first_batch_s"]) <= 30.0,
               "growth_le_12x": None if max_growth is None else max_growth <= 12.0}
    print(f"# {os.cpu_count()} CPU cores; batch {BATCH}, grad_accum {GRAD_ACCUM}, window {WINDOW}; at {names[-1]} rows: "
          + ", ".join(f"{k} {'met' if v else 'NOT met' if v is not None else 'n/a'}" for k, v in targets.items()),
          flush=True)
    rnd = lambda v: float(f"{v:.4g}")  # noqa: E731
    print(json.dumps({"rows": sizes, **{k: [rnd(r[k]) for r in results] for k in TIMINGS},
                      "driver_peak_rss_mb": [round(r["driver_peak_rss_mb"], 1) for r in results],
                      "read_task_peak_rss_mb": [round(r["read_task_peak_rss_mb"], 1) for r in results],
                      "boundary_parts_s": {p: [rnd(r["boundary_parts_s"][p]) for r in results] for p in PARTS},
                      "driver_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "first_batch_cold_s": round(cold, 3), "s3_list_s": None if s3 is None else round(s3, 4),
                      "s3_shards": a.s3_shards, "s3_rows": a.s3_shards * a.s3_shard_rows,
                      "max_growth_10x": None if max_growth is None else round(max_growth, 2), "targets": targets}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
