"""Every job on object storage, through the CLI, against real API servers on loopback — S3
(moto's standalone server; pyarrow's own S3 client) and GCS (fake-gcs-server; pyarrow's own GCS
client): preprocess → pretrain, stopped and resumed → evaluate → fine-tune → export. Two servers
per store, one per way a user names an endpoint, and every job crosses both: server A is the
endpoint in the environment (AWS_ENDPOINT_URL as MinIO/Ceph users set it; STORAGE_EMULATOR_HOST,
the Google client libraries' convention; the Ray head and the job commands have it), server B is
reached only through the URIs' query (`?endpoint_override=…&scheme=http`), which must win over the
environment's endpoint. On S3, B's URIs also carry credentials (`s3://KEY:SECRET@bucket/…`): they
connect, and are found in nothing the jobs write or print."""
import contextlib
import dataclasses
import json
import os
import stat
import subprocess
import sys
import tempfile
from typing import Callable

import pytest

from pipeline import storage
from tests.servers import ROOT, S3_CREDENTIALS, cli_env, gcs_fs, gcs_server, ray_head, s3_fs, s3_server, upload

KEY, SECRET = "AKIDWRITTENNOWHERE", "s3cretWrittenNowhere"


@dataclasses.dataclass
class Store:
    on_a: Callable[..., str]   # path parts → URI on server A (endpoint from the environment)
    on_b: Callable[..., str]   # path parts → URI on server B (endpoint in the URI's query)
    fs: dict                   # "a"/"b" → pyarrow file system of that server
    node_env: dict             # what every node and shell sets


@contextlib.contextmanager
def s3_store():
    with s3_server("d2v") as a, s3_server("d2v") as b:
        yield Store(on_a=lambda *p: storage.join("s3://d2v/a", *p),
                    on_b=lambda *p: storage.join(f"s3://{KEY}:{SECRET}@d2v/b?endpoint_override={b}&scheme=http", *p),
                    fs={"a": s3_fs(a), "b": s3_fs(b)},
                    node_env={**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{a}"})


@contextlib.contextmanager
def gcs_store():
    with gcs_server("d2v") as a, gcs_server("d2v") as b:
        yield Store(on_a=lambda *p: storage.join("gs://d2v/a", *p),
                    on_b=lambda *p: storage.join(f"gs://d2v/b?endpoint_override={b}&scheme=http", *p),
                    fs={"a": gcs_fs(a), "b": gcs_fs(b)},
                    node_env={"STORAGE_EMULATOR_HOST": f"http://{a}"})


def run(args: list[str], env: dict, timeout: int = 600) -> tuple[dict, str]:
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{args}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stdout + r.stderr


def every_job(st: Store, demo_raw: str, tmp_path, head_dir: str) -> str:
    """preprocess → pretrain (stopped, resumed) → evaluate → fine-tune → export across servers A
    and B of one store → everything the jobs printed."""
    on_a, on_b, fs = st.on_a, st.on_b, st.fs
    printed = []

    def job(args, env):
        result, out = run(args, env)
        printed.append(out)
        return result, out

    def exists(server: str, path: str) -> bool:
        """`path` ("d2v/…") is a non-empty file on that server, and only there."""
        other = fs["b" if server == "a" else "a"]
        return fs[server].get_file_info(path).size > 0 and other.get_file_info(path).type.name == "NotFound"

    upload(os.path.join(demo_raw, "image", "train"), "", "d2v/b/raw/train", fs=fs["b"])
    upload(os.path.join(demo_raw, "image", "test"), "", "d2v/a/raw/test", fs=fs["a"])
    with ray_head(cli_env(**st.node_env), str(tmp_path / "head.log"), temp_dir=head_dir) as (gcs, _):
        env = cli_env(**st.node_env, RAY_ADDRESS=gcs)
        mlflow_db = f"sqlite:///{tmp_path}/mlflow.db"
        # raw on B → shards on A; raw on A → shards on B
        for split, src, dst, server in (("train", on_b, on_a, "a"), ("test", on_a, on_b, "b")):
            m, _ = job(["jobs.preprocess", "--modality", "image", "--input", src("raw", split),
                        "--output", dst("data", split), "--image-size", "28"], env)
            files = sum(len(fs_) for _, _, fs_ in os.walk(os.path.join(demo_raw, "image", split)))
            assert m["written"] == files and m["manifest"] == storage.shown(dst("data", split, "manifest.json"))
            assert exists(server, f"d2v/{server}/data/{split}/manifest.json")

        # shards on A → run on B, stopped and resumed
        pre = ["jobs.pretrain", "--modality", "image", "--data", on_a("data", "train"), "--output", on_b("run"),
               "--max-steps", "4", "--set", "model.mode=d2v1", "--set", "train.batch_size=16",
               "--set", "train.log_every=2", "--set", "train.checkpoint_every=2", "--tracking-uri", mlflow_db]
        s, _ = job([*pre, "--stop-at-step", "2"], env)
        assert s["step"] == 2 and s["final"] is None
        s, out = job(pre, env)
        assert s["step"] == 4 and s["final"] == storage.shown(on_b("run", "final"))
        assert "resumed from step 2" in out
        assert exists("b", "d2v/b/run/final/model.safetensors")

        e, _ = job(["jobs.evaluate", "--checkpoint", on_b("run", "final"), "--train-data", on_a("data", "train"),
                    "--test-data", on_b("data", "test"), "--tracking-uri", mlflow_db], env)
        assert 0 <= e["probe_accuracy"] <= 1 and e["n_test"] == files  # the test split's, counted above
        from mlflow.tracking import MlflowClient
        client = MlflowClient(mlflow_db)
        run_id = fs["b"].open_input_stream("d2v/b/run/mlflow_run_id").read().decode().strip()
        assert client.get_run(run_id).data.metrics["probe.pretrained.probe_accuracy"] == pytest.approx(e["probe_accuracy"])

        # init on B, labels on A and B → fine-tuned model on A
        f, _ = job(["jobs.finetune", "--task", "classify", "--modality", "image", "--init", on_b("run", "final"),
                    "--train-data", on_a("data", "train"), "--val-data", on_b("data", "test"),
                    "--test-data", on_b("data", "test"), "--output", on_a("ft"), "--max-steps", "3",
                    "--label-fraction", "0.5", "--set", "train.batch_size=16", "--set", "train.eval_every=3",
                    "--tracking-uri", mlflow_db], env)
        assert f["steps"] == 3 and f["final"] == on_a("ft", "final") and 0 <= f["test_accuracy"] <= 1
        assert exists("a", "d2v/a/ft/final/metrics.json")
        assert storage.list_files(fs["a"], "d2v/a/ft/subsets")  # the label fraction, on the store

    import torch
    from transformers import AutoModel, AutoModelForImageClassification
    x, _ = job(["jobs.export_hf", "--checkpoint", on_a("ft", "final"), "--output", str(tmp_path / "hf")],
               cli_env(**st.node_env))
    assert x["class"] == "Data2VecVisionForImageClassification"
    hf = AutoModelForImageClassification.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert hf(torch.randn(2, 3, 28, 28)).logits.shape == (2, 10)
    no_endpoint = {k: v for k, v in st.node_env.items() if k not in ("AWS_ENDPOINT_URL", "STORAGE_EMULATOR_HOST")}
    x, _ = job(["jobs.export_hf", "--checkpoint", on_b("run", "final"), "--output", str(tmp_path / "hf_enc")],
               cli_env(**no_endpoint))  # a shell with no endpoint set: the query alone
    assert x["class"] == "Data2VecVisionModel"
    assert AutoModel.from_pretrained(str(tmp_path / "hf_enc")).config.image_size == 28
    return "\n".join(printed)


@pytest.mark.slow
def test_every_job_on_s3_with_either_endpoint_style_and_no_secret_written(demo_raw, tmp_path):
    with s3_store() as st, tempfile.TemporaryDirectory(prefix="rh", dir="/tmp") as head_dir:
        printed = every_job(st, demo_raw, tmp_path, head_dir)
        # Credentials in B's URIs connected (every job above read or wrote B) and are nowhere:
        # not in any object on either server, the local run files and MLflow store (tmp_path),
        # the Ray head's session (job and worker logs), or what the jobs printed.
        written = {f"{s}:{p}": st.fs[s].open_input_stream(p).read()
                   for s in "ab" for p in storage.list_files(st.fs[s], "d2v")}
        written.update({os.path.join(d, n): open(os.path.join(d, n), "rb").read()
                        for root in (str(tmp_path), head_dir) for d, _, names in os.walk(root) for n in names
                        if stat.S_ISREG(os.lstat(os.path.join(d, n)).st_mode)})  # no sockets, no links
        assert any(p.endswith("d2v/b/run/config.json") for p in written) and len(written) > 50
        for secret in (KEY, SECRET):
            leaks = sorted(p for p, data in written.items() if secret.encode() in data)
            assert not leaks and secret not in printed, (secret, leaks)
        assert "s3://***@d2v/b/run" in printed  # shown, as ***


@pytest.mark.slow
def test_every_job_on_gcs_with_either_endpoint_style(demo_raw, tmp_path):
    with gcs_store() as st, tempfile.TemporaryDirectory(prefix="rh", dir="/tmp") as head_dir:
        every_job(st, demo_raw, tmp_path, head_dir)
