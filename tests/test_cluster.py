"""A multi-node Ray cluster on one machine (separate raylets: a head and one-CPU worker nodes,
`ray.cluster_utils.Cluster`): a node that holds a training worker vanishes mid-run, as a spot
node does, and a new node joins; the run resumes from its last checkpoint and ends with the
weights of an uninterrupted run."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.servers import ROOT, cli_env, free_ports


def _cluster(monkeypatch):
    """A head (1 CPU: the data tasks) with a free dashboard port — the session's own cluster holds
    Ray's default one — whose GCS declares a silent node dead after ~1.5 s (3 missed checks every
    0.5 s), not Ray's default ~15 s (5 × 3 s): the tests' nodes vanish on purpose."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_health_check_period_ms", "500")
    monkeypatch.setenv("RAY_health_check_failure_threshold", "3")
    dash_port, = free_ports(1)
    return Cluster(initialize_head=True, connect=False,
                   head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": dash_port})


def _add_worker_node(cluster, nodes: dict, name: str, core: int, trainer: bool = True):
    """A one-CPU node for one training worker (resource `trainer`, unless not `trainer`), its
    raylet — and so every worker it starts — pinned to one core, as a one-core machine: a node's
    workers size their torch threads by the cores they may run on (train/loop.node_cpus), and two
    nodes here share the machine's two."""
    node = cluster.add_node(num_cpus=1, resources={"trainer": 1} if trainer else {}, env_vars={"D2V_TEST_NODE": name})
    cores, pid = sorted(os.sched_getaffinity(0)), node.all_processes["raylet"][0].process.pid
    for tid in os.listdir(f"/proc/{pid}/task"):  # every thread: whichever starts the workers
        os.sched_setaffinity(int(tid), {cores[core % len(cores)]})
    nodes[name] = node
    return node


def _preempt(cluster, nodes: dict, node) -> None:
    """A spot node vanishes: its raylet is removed and every process it started (its training
    workers among them) is killed at once. Removing the raylet alone leaves its workers running
    until they notice, and a short run can finish in that time (seen on a loaded CI machine)."""
    name = next(k for k, v in nodes.items() if v is node)
    cluster.remove_node(node, allow_graceful=False)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"D2V_TEST_NODE={name}".encode() in env:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


def _elastic_cluster(monkeypatch, trainer: bool = True):
    """A head and two one-CPU worker nodes for elastic runs (with the `trainer` resource or not).
    After a node is lost Ray Train first retries the old size on the dead node's stale resources;
    the timeout set here bounds that wait (60 s by default) — the controller inherits it from the
    raylets."""
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    cluster, nodes = _cluster(monkeypatch), {}
    for i in range(2):
        _add_worker_node(cluster, nodes, f"n{i}", core=i, trainer=trainer)
    return cluster, nodes


@pytest.mark.slow
def test_a_lost_node_is_replaced_and_the_run_ends_as_an_uninterrupted_one(demo_shards, tmp_path, monkeypatch):
    cluster, nodes = _cluster(monkeypatch), {}
    for i in range(2):
        _add_worker_node(cluster, nodes, f"n{i}", core=i)
    try:
        cluster.wait_for_nodes()
        env = cli_env(RAY_ADDRESS=cluster.address)
        # Long enough that the node is lost mid-run: worker lines reach this process through Ray's
        # log monitor, seconds after the step they report.
        args = ["--modality", "text", "--data", demo_shards["text"], "--max-steps", "40", "--num-workers", "2",
                "--set", "train.worker_resources={trainer: 1}", "--set", "train.batch_size=8", "--set", "train.log_every=1",
                "--set", "train.checkpoint_every=3", "--set", "train.max_failures=3"]
        lost = str(tmp_path / "lost")
        proc = subprocess.Popen([sys.executable, "-m", "jobs.pretrain", *args, "--output", lost], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        printed, removed = [], None
        for line in proc.stdout:
            printed.append(line)
            if removed is None and "step 7/40 loss" in line:
                removed = nodes["n0"]  # it holds a training worker: a preempted spot node
                _preempt(cluster, nodes, removed)
                time.sleep(2)
                _add_worker_node(cluster, nodes, "n2", core=0)  # its replacement joins, on the lost node's core
        assert proc.wait(timeout=600) == 0, "".join(printed)[-4000:]
        text = "".join(printed)
        resumed = re.search(r"resumed from step (\d+)", text)
        story = "".join(x for x in printed if re.search(r"step \d+/40|resumed|Error|checkpoint", x))
        # From a checkpoint (every 3 steps) before the end; which one depends on how far the run
        # got before the loss took effect and on whether that step's checkpoint had been committed.
        assert removed is not None and resumed and int(resumed[1]) % 3 == 0 and 3 <= int(resumed[1]) < 40, story[-6000:]

        straight = str(tmp_path / "straight")
        r = subprocess.run([sys.executable, "-m", "jobs.pretrain", *args, "--output", straight], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        a, b = (load_file(os.path.join(d, "final", "model.safetensors")) for d in (lost, straight))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finally:
        cluster.shutdown()


def _committed_steps(log: str) -> dict[int, list[dict]]:
    """The sample log's lines per step, keeping only the attempt that counted: a step re-run after
    a restart appears again later in the file, with every rank of its world."""
    lines = [json.loads(x) for x in open(log)]
    steps: dict[int, list[dict]] = {}
    for i, x in enumerate(lines):
        steps.setdefault(x["step"], []).append(x)
    return {s: xs[-xs[-1]["world"]:] for s, xs in steps.items()}


@pytest.mark.slow
def test_an_elastic_run_shrinks_grows_back_and_reads_each_row_once(demo_shards, tmp_path, monkeypatch):
    """--num-workers 1-2 on a head (data tasks) and two one-CPU worker nodes: a worker's node is lost
    with no replacement → the run goes on with 1 worker (the same steps: 16 samples in 2 micro-batches);
    a node joins → back to 2. The effective batch never changes, no row of the epoch is read twice,
    MLflow holds one value per step, and the final weights are those of an uninterrupted 1-worker
    run to float rounding (the normalization's promise; the 2.0 decoder's per-process noise is off)."""
    import mlflow

    cluster, nodes = _elastic_cluster(monkeypatch)
    log, out = str(tmp_path / "rows.jsonl"), str(tmp_path / "elastic")
    try:
        cluster.wait_for_nodes()
        env = cli_env(RAY_ADDRESS=cluster.address, D2V_SAMPLE_LOG=log)
        args = ["--modality", "text", "--data", demo_shards["text"], "--output", out, "--max-steps", "80",
                "--num-workers", "1-2", "--set", "train.resize_interval_s=5", "--set", "train.worker_resources={trainer: 1}",
                "--set", "train.batch_size=8", "--set", "train.log_every=1", "--set", "train.checkpoint_every=2",
                "--set", "train.max_failures=6", "--set", "model.decoder.mask_noise_std=0"]
        proc = subprocess.Popen([sys.executable, "-m", "jobs.pretrain", *args], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        printed, removed, added, shrunk = [], None, False, False
        for line in proc.stdout:
            printed.append(line)
            if removed is None and re.search(r"step [6-9]/80 loss", line):
                removed = nodes["n0"]  # it holds a training worker
                _preempt(cluster, nodes, removed)  # a spot node, gone for good
            shrunk = shrunk or "elastic: 1 worker(s) of 1-2" in line
            if shrunk and not added and re.search(r"step \d+/80 loss", line):
                _add_worker_node(cluster, nodes, "n2", core=0)  # capacity is back
                added = True
        assert proc.wait(timeout=900) == 0, "".join(printed)[-5000:]
        text = "".join(printed)
        assert removed is not None and added, text[-5000:]
        assert re.search(r"resumed from step \d+ .* on 1 worker\(s\), 2 before", text), text[-5000:]
        assert re.search(r"resumed from step \d+ .* on 2 worker\(s\), 1 before", text), text[-5000:]

        client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
        run = client.search_runs([client.get_experiment_by_name("data2vec").experiment_id])[0]
        world = [int(m.value) for m in sorted(client.get_metric_history(run.info.run_id, "world_size"),
                                              key=lambda m: (m.step, m.timestamp))]
        assert [w for i, w in enumerate(world) if i == 0 or world[i - 1] != w][:3] == [2, 1, 2], world
        batch = {m.value for m in client.get_metric_history(run.info.run_id, "effective_batch")}
        assert batch == {16.0}, batch  # 2 workers × 8, then 1 worker × 16 in 2 micro-batches of 8
        assert sum(k.startswith("resize.") for k in run.data.tags) >= 2, run.data.tags

        steps = _committed_steps(log)
        assert sorted(steps) == list(range(80))
        rows = []
        for s, xs in sorted(steps.items()):
            assert sorted(x["rank"] for x in xs) == list(range(xs[0]["world"])), (s, xs)
            assert {x["epoch"] for x in xs} == {0}  # 80 × 16 rows: the demo text's first epoch
            rows += [r for x in xs for r in x["rows"]]
        assert len(rows) == 80 * 16 and len(set(rows)) == len(rows)  # each row read once
        assert {x["world"] for xs in steps.values() for x in xs} == {1, 2}
        logged = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(logged) == list(range(1, 81)), logged  # one value per step, restarts and all

        ref = str(tmp_path / "uninterrupted")  # the same run on one worker, never stopped
        one = [a if a != out else ref for a in args]
        one[one.index("1-2")] = "1"
        r = subprocess.run([sys.executable, "-m", "jobs.pretrain", *one, "--set", "train.reference_batch=16"],
                           cwd=ROOT, env=cli_env(RAY_ADDRESS=cluster.address), capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        a, b = (load_file(os.path.join(d, "final", "model.safetensors")) for d in (out, ref))
        diff = sum(float((a[k].double() - v.double()).norm()) ** 2 for k, v in b.items()) ** 0.5
        norm = sum(float(v.double().norm()) ** 2 for v in b.values()) ** 0.5
        assert diff <= 1e-6 * norm, diff / norm
    finally:
        cluster.shutdown()


def _training_node(nodes: dict) -> str:
    """The name of a test node (not the head) that runs a Ray Train worker process now."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"RayTrainWorker" in cmd:
            for name in nodes:
                if f"D2V_TEST_NODE={name}".encode() in env:
                    return name
    raise AssertionError("no training worker on a worker node")


@pytest.mark.slow
def test_an_elastic_run_without_custom_resources_keeps_its_readers_fed_after_a_node_loss(demo_shards, tmp_path,
                                                                                       monkeypatch):
    """--num-workers 1-2 on a head and two one-CPU nodes, no `trainer` resource: after a worker's
    node is lost, Ray Train restarts the group on 2 workers, one on the head, and every CPU is held
    by a training worker. Each worker's Ray Data readers run beside it with no CPU of their own
    (pipeline/train/elastic.py), so the run reads on; the node loss does not count as a failure (max_failures 0);
    a node joins later; the run ends, each row read once."""
    cluster, nodes = _elastic_cluster(monkeypatch, trainer=False)
    log, out = str(tmp_path / "rows.jsonl"), str(tmp_path / "elastic")
    try:
        cluster.wait_for_nodes()
        env = cli_env(RAY_ADDRESS=cluster.address, D2V_SAMPLE_LOG=log)
        args = ["--modality", "text", "--data", demo_shards["text"], "--output", out, "--max-steps", "60",
                "--num-workers", "1-2", "--set", "train.resize_interval_s=5", "--set", "train.batch_size=8",
                "--set", "train.log_every=1", "--set", "train.checkpoint_every=2", "--set", "train.max_failures=0"]
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "jobs.pretrain", *args], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        printed, lost, resumed, added = [], None, False, False
        for line in proc.stdout:
            printed.append(line)
            if lost is None and re.search(r"step [6-9]/60 loss", line):
                lost = _training_node(nodes)
                _preempt(cluster, nodes, nodes[lost])
            resumed = resumed or (lost is not None and "resumed from step" in line)
            if resumed and not added and re.search(r"step \d+/60 loss", line):
                # steps were read and trained with every CPU held by a worker; capacity comes back
                _add_worker_node(cluster, nodes, "n2", core=0, trainer=False)
                added = True
        rc = proc.wait(timeout=600)
        took = time.monotonic() - start
        text = "".join(printed)
        assert rc == 0, text[-5000:]
        assert lost is not None and added and took < 400, (took, text[-5000:])
        # the restart put a worker on every CPU (the head's too), and its reads went on
        assert re.search(r"resumed from step \d+.* on 2 worker", text), text[-5000:]
        assert "Cluster resources are not enough" not in text, text[-5000:]

        steps = _committed_steps(log)
        assert sorted(steps) == list(range(60))
        rows = []
        for s, xs in sorted(steps.items()):
            assert sorted(x["rank"] for x in xs) == list(range(xs[0]["world"])), (s, xs)
            rows += [r for x in xs for r in x["rows"]]
        assert len(rows) == 60 * 16 and len(set(rows)) == len(rows)  # each row read once
    finally:
        cluster.shutdown()


def test_readers_that_get_no_cpu_fail_with_the_fix_instead_of_hanging(ray_local, tmp_path):
    """Ray Data reads that need a free CPU (here: from this process, while a placement group holds
    every CPU of the cluster; inside a training worker they need none) fail within the watchdog's
    time, naming the settings that free CPUs, instead of hanging."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipeline.train.elastic import READ_STARVED_S, ReadersStarved, watch_first_block
    from pipeline.train.stream import Chunk, tasks_dataset

    assert READ_STARVED_S <= 60  # with a run's start: failed within 2 minutes
    pq.write_table(pa.table({"x": list(range(10))}), tmp_path / "a.parquet")
    pg = ray.util.placement_group([{"CPU": 1}] * int(ray.available_resources().get("CPU", 0)))
    ray.get(pg.ready(), timeout=60)
    try:
        t0 = time.monotonic()
        batches = tasks_dataset([[Chunk(str(tmp_path / "a.parquet"), 0, 0, 10)]], ["x"]).iter_batches(batch_size=None)
        with pytest.raises(ReadersStarved, match=r"train\.cpus_per_worker.*train\.worker_resources.*add CPUs"):
            list(watch_first_block(batches, starved_s=3))
        assert time.monotonic() - t0 < 30
    finally:
        ray.util.remove_placement_group(pg)
    for thread in threading.enumerate():  # the abandoned read gets its CPU now, and ends
        if thread.name == "first-block":
            thread.join(timeout=60)


def test_a_lost_node_is_retried_without_counting_as_a_failure(ray_local, monkeypatch):
    """The failure policy launch.fit hands Ray Train: a worker that died with its node → retried,
    not counted against max_failures (0 here); a survivor's collective error alone → a node loss
    only if a node is declared dead within the wait; the training code's errors → counted; starved
    readers → raised at once."""
    from ray.exceptions import RayActorError
    from ray.train import FailureConfig
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback, WorkerHealthCheckFailedError
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from pipeline.train import elastic

    retry, raise_ = FailureDecision.RETRY, FailureDecision.RAISE
    policy = elastic.NodeLossPolicy(FailureConfig(max_failures=0))
    died = RayActorError(error_msg="The actor died because its node has died. Node Id: 1234")
    lost = WorkerGroupError("…", {0: WorkerHealthCheckFailedError("A worker health check failed.", died),
                                  1: UserExceptionWithTraceback(RuntimeError("Connection closed by peer"), "…")})
    assert [policy.make_decision(lost) for _ in range(3)] == [retry] * 3
    bug = WorkerGroupError("…", {0: UserExceptionWithTraceback(ValueError("a bug"), "ValueError: a bug")})
    assert policy.make_decision(bug) == raise_
    no_cpu = UserExceptionWithTraceback(elastic.ReadersStarved("no CPU"), "…ReadersStarved: no CPU")
    starved = WorkerGroupError("…", {0: no_cpu})
    assert elastic.NodeLossPolicy(FailureConfig(max_failures=5)).make_decision(starved) == raise_

    peer = WorkerGroupError("…", {1: RuntimeError("[gloo/transport/tcp/pair.cc:547] Connection closed by peer")})
    policy = elastic.NodeLossPolicy(FailureConfig(max_failures=0))
    policy._wait_s, dead = 1.0, iter([set(), {"gone"}])
    monkeypatch.setattr(elastic, "dead_nodes", lambda: next(dead, {"gone"}))
    assert policy.make_decision(peer) == retry  # the node is declared dead during the wait
    assert policy.make_decision(peer) == raise_  # no node died since: counted (max_failures 0)
