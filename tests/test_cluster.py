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


def _add_worker_node(cluster, nodes: dict, name: str, core: int):
    """A one-CPU node for one training worker (resource `trainer`), its raylet — and so every
    worker it starts — pinned to one core, as a one-core machine: a node's workers size their torch
    threads by the cores they may run on (train/loop.node_cpus), and two nodes here share the
    machine's two."""
    node = cluster.add_node(num_cpus=1, resources={"trainer": 1}, env_vars={"D2V_TEST_NODE": name})
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
    with no replacement → the run goes on with 1 worker and grad_accum doubled; a node joins → back
    to 2. The effective batch never changes and no row of the epoch is read twice."""
    import mlflow

    # After a node is lost Ray Train first retries the old size on the dead node's stale resources;
    # this bounds that wait (60 s by default) — the controller inherits it from the raylets.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    cluster, nodes = _cluster(monkeypatch), {}
    for i in range(2):
        _add_worker_node(cluster, nodes, f"n{i}", core=i)
    log, out = str(tmp_path / "rows.jsonl"), str(tmp_path / "elastic")
    try:
        cluster.wait_for_nodes()
        env = cli_env(RAY_ADDRESS=cluster.address, D2V_SAMPLE_LOG=log)
        args = ["--modality", "text", "--data", demo_shards["text"], "--output", out, "--max-steps", "80",
                "--num-workers", "1-2", "--set", "train.resize_interval_s=5", "--set", "train.worker_resources={trainer: 1}",
                "--set", "train.batch_size=8", "--set", "train.log_every=1", "--set", "train.checkpoint_every=2",
                "--set", "train.max_failures=6"]
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
        assert batch == {16.0}, batch  # 2 × 8 × grad_accum 1, then 1 × 8 × grad_accum 2
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
    finally:
        cluster.shutdown()
