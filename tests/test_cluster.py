"""A multi-node Ray cluster on one machine (separate raylets: a head and one-CPU worker nodes,
`ray.cluster_utils.Cluster`): a node that holds a training worker vanishes mid-run, as a spot
node does, and a new node joins; the run resumes from its last checkpoint and ends with the
weights of an uninterrupted run."""
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.servers import ROOT, cli_env, free_ports


def _node_of(worker_pid: int, nodes: dict) -> object | None:
    """The cluster node a worker process runs on: each node's raylet (and so every worker it
    starts) carries its own D2V_TEST_NODE in its environment."""
    try:
        env = open(f"/proc/{worker_pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return None
    name = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"D2V_TEST_NODE=")), None)
    return nodes.get(name)


@pytest.mark.slow
def test_a_lost_node_is_replaced_and_the_run_ends_as_an_uninterrupted_one(demo_shards, tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    dash_port, = free_ports(1)  # the session's own cluster holds Ray's default dashboard port
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": dash_port})
    nodes = {f"n{i}": cluster.add_node(num_cpus=1, env_vars={"D2V_TEST_NODE": f"n{i}"}) for i in range(2)}
    try:
        cluster.wait_for_nodes()
        env = cli_env(RAY_ADDRESS=cluster.address)
        args = ["--modality", "text", "--data", demo_shards["text"], "--max-steps", "12", "--num-workers", "2",
                "--set", "train.cpus_per_worker=1", "--set", "train.batch_size=8", "--set", "train.log_every=1",
                "--set", "train.checkpoint_every=3", "--set", "train.max_failures=3"]
        lost = str(tmp_path / "lost")
        proc = subprocess.Popen([sys.executable, "-m", "jobs.pretrain", *args, "--output", lost], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        printed, removed, workers = [], None, set()
        for line in proc.stdout:
            printed.append(line)
            workers |= {int(p) for p in re.findall(r"\(RayTrainWorker pid=(\d+)", line)}
            if removed is None and "step 7/12 loss" in line:
                # The node of a training worker (not the head's) dies, as a preempted spot node.
                removed = next(n for n in (_node_of(p, nodes) for p in workers) if n is not None)
                cluster.remove_node(removed, allow_graceful=False)
                time.sleep(2)
                nodes["n2"] = cluster.add_node(num_cpus=1, env_vars={"D2V_TEST_NODE": "n2"})  # its replacement joins
        assert proc.wait(timeout=600) == 0, "".join(printed)[-4000:]
        text = "".join(printed)
        assert removed is not None and "resumed from step 6" in text, text[-4000:]

        straight = str(tmp_path / "straight")
        r = subprocess.run([sys.executable, "-m", "jobs.pretrain", *args, "--output", straight], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        a, b = (load_file(os.path.join(d, "final", "model.safetensors")) for d in (lost, straight))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finally:
        cluster.shutdown()
