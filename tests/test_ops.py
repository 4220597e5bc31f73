"""Leaving the laptop: cluster.yaml (Ray's own validator), KubeRay manifest, and a real
`ray job submit` to a real local head that logs to a real `mlflow server`."""
import os
import re
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _ray_pin():
    req = open(os.path.join(ROOT, "requirements.txt")).read()
    return re.search(r"^ray\[.*\]==([\d.]+)", req, re.M).group(1)


def test_cluster_yaml_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(open(os.path.join(ROOT, "cluster.yaml")))
    cfg = prepare_config(raw)
    validate_config(cfg)  # raises jsonschema.ValidationError / ValueError on a bad config
    nodes = cfg["available_node_types"]
    assert {"head", "gpu_worker", "cpu_worker"} <= set(nodes) and cfg["head_node_type"] == "head"
    assert nodes["gpu_worker"]["resources"]["GPU"] >= 1 and nodes["gpu_worker"]["max_workers"] >= 1
    assert "GPU" not in nodes["cpu_worker"]["resources"]
    assert any("requirements.txt" in c for c in cfg["setup_commands"])
    assert any("/mnt/shared" in c for c in cfg["initialization_commands"])  # shared checkpoint storage
    assert any("mlflow server" in c for c in cfg["head_start_ray_commands"])
    assert _ray_pin() in cfg["docker"]["image"]
    # A typo is caught by the same validator.
    bad = prepare_config({**raw, "max_wrkers": 3})
    with pytest.raises(Exception, match="max_wrkers"):
        validate_config(bad)


def test_kuberay_rayjob_is_consistent():
    job = yaml.safe_load(open(os.path.join(ROOT, "k8s", "rayjob.yaml")))
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    module = re.search(r"python -m (jobs\.\w+)", spec["entrypoint"]).group(1)
    assert os.path.isfile(os.path.join(ROOT, *module.split(".")) + ".py")
    from jobs.pretrain import build_config  # the entrypoint's flags parse (fails on an unknown flag)
    args = spec["entrypoint"].split("jobs.pretrain", 1)[1].split()
    with pytest.raises(Exception) as e:
        build_config(args)  # data dir does not exist here: fails on the manifest, not on argparse
    assert "manifest.json" in str(e.value)
    rc = spec["rayClusterSpec"]
    assert rc["rayVersion"] == _ray_pin()
    images = {c["image"] for g in [rc["headGroupSpec"], *rc["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1
    gpu = [g for g in rc["workerGroupSpecs"] if g["groupName"] == "gpu"][0]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    docker_from = next(l for l in open(os.path.join(ROOT, "Dockerfile")) if l.startswith("FROM")).split()[1]
    assert _ray_pin() in docker_from


PUBLIC_HOSTS = {"0.0.0.0", "::", "[::]"}


def _strings(node):
    """Every string of a YAML tree; an argv-style list (k8s `command:`) also as one line."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        if node and all(isinstance(x, str) and " " not in x for x in node):
            yield " ".join(node)
        for v in node:
            yield from _strings(v)


def unauthenticated_binds(path: str) -> list[str]:
    """Servers a cluster file makes reachable from other machines with no authentication: a Ray
    head whose dashboard / job API listens on all interfaces without token auth, an MLflow server
    on all interfaces without its basic-auth app."""
    doc = yaml.safe_load(open(path))
    found = []
    for line in (ln for s in _strings(doc) for ln in s.splitlines()):
        if re.search(r"\bray start\b.*--head", line):
            m = re.search(r"--dashboard-host[= ](\S+)", line)
            if m and m.group(1) in PUBLIC_HOSTS and "RAY_AUTH_MODE=token" not in line:
                found.append(f"ray dashboard on {m.group(1)} without token auth: {line.strip()[:80]}")
        if re.search(r"\bmlflow (server|ui)\b", line):
            m = re.search(r"(?:--host|-h)[= ](\S+)", line)
            if m and m.group(1) in PUBLIC_HOSTS and "--app-name basic-auth" not in line:
                found.append(f"mlflow on {m.group(1)} without basic-auth: {line.strip()[:80]}")
    spec = doc.get("spec", {}) if isinstance(doc, dict) else {}
    for rc in (spec.get("rayClusterSpec"), spec if "headGroupSpec" in spec else None):
        if not rc:
            continue
        host = str(rc["headGroupSpec"].get("rayStartParams", {}).get("dashboard-host", "127.0.0.1"))
        containers = rc["headGroupSpec"]["template"]["spec"]["containers"]
        env_token = all(any(e.get("name") == "RAY_AUTH_MODE" and e.get("value") == "token" for e in c.get("env", []))
                        for c in containers)
        if host in PUBLIC_HOSTS and (rc.get("authOptions") or {}).get("mode") != "token" and not env_token:
            found.append(f"KubeRay head dashboard-host {host} without authOptions.mode: token")
    return sorted(set(found))


def test_cluster_files_expose_nothing_without_authentication(tmp_path):
    files = [os.path.join(ROOT, "cluster.yaml"), os.path.join(ROOT, "k8s", "rayjob.yaml")]
    for f in files:
        assert unauthenticated_binds(f) == [], f
    # The check fails on the insecure forms (the defaults these files had before).
    bad_up = open(files[0]).read().replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0") \
        .replace("--app-name basic-auth ", "")
    bad_k8s = yaml.safe_load(open(files[1]))
    del bad_k8s["spec"]["rayClusterSpec"]["authOptions"]
    (tmp_path / "up.yaml").write_text(bad_up)
    (tmp_path / "k8s.yaml").write_text(yaml.safe_dump(bad_k8s))
    assert len(unauthenticated_binds(str(tmp_path / "up.yaml"))) == 2
    assert len(unauthenticated_binds(str(tmp_path / "k8s.yaml"))) == 1
    # The MLflow server's password is made on the cluster, never written in the repository.
    up = open(files[0]).read()
    assert "MLFLOW_AUTH_ADMIN_PASSWORD=$(cat " in up and "openssl rand" in up


@pytest.mark.slow
def test_ray_job_submit_on_s3_logs_to_mlflow_server(demo_shards, tmp_path):
    """`ray job submit` to a real local head whose nodes set an S3 endpoint (a real S3 API server
    on loopback): the job's data and output are s3:// URIs; it logs to a real `mlflow server`."""
    from tests.servers import S3_CREDENTIALS, cli_env, free_ports, ray_head, s3_fs, s3_server, stop, upload, wait_http

    mlf, = free_ports(1)
    with s3_server("d2v") as endpoint:
        env = cli_env(**S3_CREDENTIALS, AWS_ENDPOINT_URL=f"http://{endpoint}")
        upload(demo_shards["text"], endpoint, "d2v/jobs/data")
        mlflow_srv = subprocess.Popen(
            [os.path.join(BIN, "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/srv.db",
             "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(mlf),
             "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            with ray_head(env, str(tmp_path / "head.log")) as (_, dash):
                wait_http(f"http://127.0.0.1:{mlf}/health")
                r = subprocess.run(
                    [os.path.join(BIN, "ray"), "job", "submit", "--address", dash, "--working-dir", ROOT,
                     "--submission-id", "d2v-test", "--", sys.executable, "-m", "jobs.pretrain", "--modality", "text",
                     "--data", "s3://d2v/jobs/data", "--output", "s3://d2v/jobs/run", "--max-steps", "4",
                     "--num-workers", "1", "--set", "train.batch_size=8", "--set", "train.log_every=2",
                     "--tracking-uri", f"http://127.0.0.1:{mlf}", "--experiment", "jobs"],
                    env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
                assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
                from ray.job_submission import JobStatus, JobSubmissionClient
                assert JobSubmissionClient(dash).get_job_status("d2v-test") == JobStatus.SUCCEEDED
                logs = subprocess.run([os.path.join(BIN, "ray"), "job", "logs", "--address", dash, "d2v-test"],
                                      env=env, capture_output=True, text=True).stdout
            assert "done: text step 4/4" in logs
            assert logs.count("step 2/4 loss") == 1, logs  # one progress line per logging step
            assert s3_fs(endpoint).get_file_info("d2v/jobs/run/final/model.safetensors").size > 0
            from mlflow.tracking import MlflowClient
            client = MlflowClient(f"http://127.0.0.1:{mlf}")
            exp = client.get_experiment_by_name("jobs")
            runs = client.search_runs([exp.experiment_id])
            assert len(runs) == 1 and runs[0].info.status == "FINISHED"
            assert runs[0].data.params["data"] == "s3://d2v/jobs/data"
            assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [2, 4]
            assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {"final", "masks"}
            assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
            # The artifacts went to the server's own store (proxied), not to a path on a Ray process.
            stored = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "artifacts") for f in fs]
            assert any(f.endswith("final/model.safetensors") for f in stored), stored
        finally:
            stop(mlflow_srv)
