"""Every job on object storage, through the CLI, against real S3 API servers on loopback (moto's
standalone server; pyarrow's own S3 client): preprocess → pretrain, stopped and resumed → evaluate
→ fine-tune → export. Two servers, one per way a user names an endpoint, and every job crosses
both: server A is the endpoint in AWS_ENDPOINT_URL (as MinIO/Ceph users set it on their nodes; the
Ray head and the job commands have it), server B is reached only through the URIs' query (pyarrow's
`?endpoint_override=…&scheme=http`), which must win over the environment's endpoint."""
import json
import os
import subprocess
import sys

import pytest

from pipeline import storage
from tests.servers import ROOT, S3_CREDENTIALS, cli_env, ray_head, s3_fs, s3_server, upload


@pytest.fixture(scope="module")
def s3():
    with s3_server("d2v") as a, s3_server("d2v") as b:
        yield a, b


def run(args: list[str], env: dict, timeout: int = 600) -> tuple[dict, str]:
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, (args, r.stdout[-3000:], r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stdout + r.stderr


@pytest.mark.slow
def test_every_job_reads_and_writes_s3_with_either_endpoint_style(s3, demo_raw, tmp_path):
    a, b = s3
    node_env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{a}"}
    on_a = lambda *parts: storage.join("s3://d2v/a", *parts)  # noqa: E731 - the environment's endpoint
    on_b = lambda *parts: storage.join(f"s3://d2v/b?endpoint_override={b}&scheme=http", *parts)  # noqa: E731
    fs = {"a": s3_fs(a), "b": s3_fs(b)}

    def exists(server: str, path: str) -> bool:
        """`path` ("d2v/…") is a non-empty file on that server, and only there."""
        other = fs["b" if server == "a" else "a"]
        return fs[server].get_file_info(path).size > 0 and other.get_file_info(path).type.name == "NotFound"

    upload(os.path.join(demo_raw, "image", "train"), b, "d2v/b/raw/train")
    upload(os.path.join(demo_raw, "image", "test"), a, "d2v/a/raw/test")
    with ray_head(cli_env(**node_env), str(tmp_path / "head.log")) as (gcs, _):
        env = cli_env(**node_env, RAY_ADDRESS=gcs)
        mlflow_db = f"sqlite:///{tmp_path}/mlflow.db"
        # raw on B → shards on A; raw on A → shards on B
        for split, src, dst, server in (("train", on_b, on_a, "a"), ("test", on_a, on_b, "b")):
            m, _ = run(["jobs.preprocess", "--modality", "image", "--input", src("raw", split),
                        "--output", dst("data", split), "--image-size", "28"], env)
            files = sum(len(fs_) for _, _, fs_ in os.walk(os.path.join(demo_raw, "image", split)))
            assert m["written"] == files and m["manifest"] == dst("data", split, "manifest.json")
            assert exists(server, f"d2v/{server}/data/{split}/manifest.json")

        # shards on A → run on B, stopped and resumed
        pre = ["jobs.pretrain", "--modality", "image", "--data", on_a("data", "train"), "--output", on_b("run"),
               "--max-steps", "4", "--set", "model.mode=d2v1", "--set", "train.batch_size=16",
               "--set", "train.log_every=2", "--set", "train.checkpoint_every=2", "--tracking-uri", mlflow_db]
        s, _ = run([*pre, "--stop-at-step", "2"], env)
        assert s["step"] == 2 and s["final"] is None
        s, printed = run(pre, env)
        assert s["step"] == 4 and s["final"] == on_b("run", "final")
        assert "resumed from step 2" in printed
        assert exists("b", "d2v/b/run/final/model.safetensors")

        e, _ = run(["jobs.evaluate", "--checkpoint", on_b("run", "final"), "--train-data", on_a("data", "train"),
                    "--test-data", on_b("data", "test"), "--tracking-uri", mlflow_db], env)
        assert 0 <= e["probe_accuracy"] <= 1 and e["n_test"] == files  # the test split's, counted above
        from mlflow.tracking import MlflowClient
        client = MlflowClient(mlflow_db)
        run_id = fs["b"].open_input_stream("d2v/b/run/mlflow_run_id").read().decode().strip()
        assert client.get_run(run_id).data.metrics["probe.pretrained.probe_accuracy"] == pytest.approx(e["probe_accuracy"])

        # init on B, labels on A and B → fine-tuned model on A
        f, _ = run(["jobs.finetune", "--task", "classify", "--modality", "image", "--init", on_b("run", "final"),
                    "--train-data", on_a("data", "train"), "--val-data", on_b("data", "test"),
                    "--test-data", on_b("data", "test"), "--output", on_a("ft"), "--max-steps", "3",
                    "--label-fraction", "0.5", "--set", "train.batch_size=16", "--set", "train.eval_every=3",
                    "--tracking-uri", mlflow_db], env)
        assert f["steps"] == 3 and f["final"] == on_a("ft", "final") and 0 <= f["test_accuracy"] <= 1
        assert exists("a", "d2v/a/ft/final/metrics.json")
        assert fs["a"].get_file_info("d2v/a/ft/subsets").type.name == "Directory"  # the label fraction, on S3

    import torch
    from transformers import AutoModel, AutoModelForImageClassification
    x, _ = run(["jobs.export_hf", "--checkpoint", on_a("ft", "final"), "--output", str(tmp_path / "hf")],
               cli_env(**node_env))
    assert x["class"] == "Data2VecVisionForImageClassification"
    hf = AutoModelForImageClassification.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert hf(torch.randn(2, 3, 28, 28)).logits.shape == (2, 10)
    x, _ = run(["jobs.export_hf", "--checkpoint", on_b("run", "final"), "--output", str(tmp_path / "hf_enc")],
               cli_env(**S3_CREDENTIALS))  # a shell with no endpoint set: the query alone
    assert x["class"] == "Data2VecVisionModel"
    assert AutoModel.from_pretrained(str(tmp_path / "hf_enc")).config.image_size == 28
