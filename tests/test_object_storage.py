"""Every job on object storage, through the CLI, against a real S3 API server on loopback (moto's
standalone server; pyarrow's own S3 client): preprocess → pretrain, stopped and resumed → evaluate
→ fine-tune → export, once with the endpoint in AWS_ENDPOINT_URL (as MinIO/Ceph users set it on
their nodes) and once in the URIs' query (pyarrow's `?endpoint_override=…&scheme=http`), on a Ray
head whose processes have only what that style gives them."""
import json
import os
import subprocess
import sys

import pytest

from pipeline import storage
from tests.servers import ROOT, S3_CREDENTIALS, cli_env, ray_head, s3_fs, s3_server, upload


@pytest.fixture(scope="module")
def s3():
    with s3_server("d2v") as endpoint:
        yield endpoint


def run(args: list[str], env: dict, timeout: int = 600) -> tuple[dict, str]:
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, (args, r.stdout[-3000:], r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("style", ["env", "query"])
def test_every_job_reads_and_writes_s3(s3, demo_raw, tmp_path, style):
    node_env = {**S3_CREDENTIALS, **({"AWS_ENDPOINT_URL": f"http://{s3}"} if style == "env" else {})}
    base = f"s3://d2v/{style}" + ("" if style == "env" else f"?endpoint_override={s3}&scheme=http")
    at = lambda *parts: storage.join(base, *parts)  # noqa: E731 - every path keeps the query
    fs = s3_fs(s3)
    for split in ("train", "test"):
        upload(os.path.join(demo_raw, "image", split), s3, f"d2v/{style}/raw/{split}")
    with ray_head(cli_env(**node_env), str(tmp_path / "head.log")) as (gcs, _):
        env = cli_env(**node_env, RAY_ADDRESS=gcs)
        mlflow_db = f"sqlite:///{tmp_path}/mlflow.db"
        for split in ("train", "test"):
            m, _ = run(["jobs.preprocess", "--modality", "image", "--input", at("raw", split),
                        "--output", at("data", split), "--image-size", "28"], env)
            files = sum(len(fs_) for _, _, fs_ in os.walk(os.path.join(demo_raw, "image", split)))
            assert m["written"] == files and m["manifest"] == at("data", split, "manifest.json")
        assert fs.get_file_info(f"d2v/{style}/data/train/manifest.json").size > 0

        pre = ["jobs.pretrain", "--modality", "image", "--data", at("data", "train"), "--output", at("run"),
               "--max-steps", "4", "--set", "model.mode=d2v1", "--set", "train.batch_size=16",
               "--set", "train.log_every=2", "--set", "train.checkpoint_every=2", "--tracking-uri", mlflow_db]
        s, _ = run([*pre, "--stop-at-step", "2"], env)
        assert s["step"] == 2 and s["final"] is None
        s, printed = run(pre, env)
        assert s["step"] == 4 and s["final"] == at("run", "final")
        assert "resumed from step 2" in printed
        assert fs.get_file_info(f"d2v/{style}/run/final/model.safetensors").size > 0

        e, _ = run(["jobs.evaluate", "--checkpoint", at("run", "final"), "--train-data", at("data", "train"),
                    "--test-data", at("data", "test"), "--tracking-uri", mlflow_db], env)
        assert 0 <= e["probe_accuracy"] <= 1 and e["n_test"] == files  # the test split's, counted above
        from mlflow.tracking import MlflowClient
        client = MlflowClient(mlflow_db)
        run_id = fs.open_input_stream(f"d2v/{style}/run/mlflow_run_id").read().decode().strip()
        assert client.get_run(run_id).data.metrics["probe.pretrained.probe_accuracy"] == pytest.approx(e["probe_accuracy"])

        f, _ = run(["jobs.finetune", "--task", "classify", "--modality", "image", "--init", at("run", "final"),
                    "--train-data", at("data", "train"), "--val-data", at("data", "test"),
                    "--test-data", at("data", "test"), "--output", at("ft"), "--max-steps", "3",
                    "--label-fraction", "0.5", "--set", "train.batch_size=16", "--set", "train.eval_every=3",
                    "--tracking-uri", mlflow_db], env)
        assert f["steps"] == 3 and f["final"] == at("ft", "final") and 0 <= f["test_accuracy"] <= 1
        assert fs.get_file_info(f"d2v/{style}/ft/final/metrics.json").size > 0
        assert fs.get_file_info(f"d2v/{style}/ft/subsets").type.name == "Directory"  # the label fraction, on S3

    x, _ = run(["jobs.export_hf", "--checkpoint", at("ft", "final"), "--output", str(tmp_path / "hf")],
               cli_env(**node_env))
    assert x["class"] == "Data2VecVisionForImageClassification"
    import torch
    from transformers import AutoModelForImageClassification
    hf = AutoModelForImageClassification.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert hf(torch.randn(2, 3, 28, 28)).logits.shape == (2, 10)
