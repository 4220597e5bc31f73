"""Metrics sinks: MLflow on rank 0, a no-op everywhere else. No Ray imports."""
from __future__ import annotations

import os
import shlex
import subprocess

import numpy as np


class NullSink:
    run_id = None

    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_event(self, metrics: dict, step: int) -> None: ...
    def commit(self, step: int) -> None: ...
    def discard_after(self, step: int) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def tag(self, name: str) -> str | None: ...
    def close(self, status: str = "FINISHED") -> None: ...


COMMITTED = "progress.committed_step"  # MLflowSink: the history holds every logged step up to it


class MLflowSink(NullSink):
    """One MLflow run per RUN_DIR: its id is stored in RUN_DIR/mlflow_run_id so a resumed run keeps
    logging into the same MLflow run.

    The metric history is the committed one: `log_metrics` holds a step's values until a checkpoint
    at or after that step is written (`commit`, called by the loop at every checkpoint) or the run
    ends; a restart (crash, lost node, resize) or a rollback re-runs only uncommitted steps, whose
    held values die with the process or are dropped (`discard_after`), so every step has one value.
    MLflow trails the run by at most one checkpoint interval (train.checkpoint_every_s); the run's
    `progress` tag and the console show the live step. `log_event` (rollbacks, restarts,
    a fine-tune's final test metrics) goes out at once."""

    def __init__(self, tracking_uri: str, experiment: str, run_dir: str, run_name: str, params: dict,
                 parent_run_id: str | None = None):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)  # created by the driver (prepare_experiment)
        from pipeline import storage

        fs, root = storage.resolve(run_dir)
        id_file = f"{root}/mlflow_run_id"
        run_id = storage.read_text(fs, id_file).strip() if storage.exists(fs, id_file) else None
        tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id and not run_id else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else storage.shown(run_name), tags=tags)
        self.run_id = self.run.info.run_id
        if run_id is None:
            storage.write_text(fs, id_file, self.run_id)
            flat = storage.redact(flatten(params))  # no URI credentials in MLflow
            items = list(flat.items())
            for i in range(0, len(items), 100):  # MLflow caps params per call
                mlflow.log_params(dict(items[i: i + 100]))

        self.pending: list[tuple[int, dict]] = []
        # The last step whose values are in the history. A restart can resume from a checkpoint
        # older than the last one committed here (a node lost right after its report, before Ray
        # Train registered that checkpoint): the steps it re-runs — the same rows, the same values
        # (exact resume) — are not logged a second time.
        self.committed = int(self.tag(COMMITTED) or -1) if run_id else -1

    def log_metrics(self, metrics, step):
        if step > self.committed:
            self.pending.append((step, {k: float(v) for k, v in metrics.items()}))

    def log_event(self, metrics, step):
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def commit(self, step):
        now, self.pending = [x for x in self.pending if x[0] <= step], [x for x in self.pending if x[0] > step]
        for s, m in now:
            self.mlflow.log_metrics(m, step=s)
        if now:
            self.committed = max(self.committed, now[-1][0])
            self.mlflow.set_tag(COMMITTED, self.committed)

    def discard_after(self, step):
        self.pending = [x for x in self.pending if x[0] <= step]

    def tag(self, name):
        return self.mlflow.get_run(self.run_id).data.tags.get(name)

    def log_artifact(self, path, artifact_path=None):
        self.mlflow.log_artifact(path, artifact_path)

    def set_tags(self, tags):
        from pipeline import storage

        self.mlflow.set_tags(storage.redact(tags))

    def close(self, status="FINISHED"):
        if status == "FINISHED":  # the run ended where it meant to: everything it logged stands
            self.commit(1 << 62)
        self.mlflow.end_run(status=status)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def default_tracking_uri(run_dir: str) -> str | None:
    """sqlite:///RUN_DIR/mlflow.db for a local (or file://) run folder; None for object stores,
    where the user passes --tracking-uri (an MLflow server)."""
    from pipeline.storage import local_path

    local = local_path(run_dir)
    return None if local is None else "sqlite:///" + os.path.abspath(os.path.join(local, "mlflow.db"))


def absolute_tracking_uri(uri: str) -> str:
    """A tracking URI every process reads alike: a relative sqlite path (sqlite:///runs/x.db) is
    made absolute here, on the driver — a Ray worker would resolve it in its own working folder."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return uri


# The UI opens an experiment with this tag on its training-runs view (MLflow 3 otherwise guesses
# a GenAI experiment and shows traces).
# MLflow 3.17's UI ignores this tag (it opens an experiment by the browser's "GenAI / model
# training" toggle, GenAI by default); ui_url's `workflowType` parameter is what picks the runs view.
# Kept for MLflow versions that read it.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
UI_PORT = 5000  # the port the printed `mlflow ui` command serves on


def ui_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment's training runs (or of one run): for a tracking server
    its own address, for a local store the `mlflow ui` that ui_hint prints.
    `workflowType=machine_learning` makes MLflow 3.17's UI show the model-training view (runs,
    charts) rather than its GenAI pages (traces)."""
    server = tracking_uri.startswith(("http://", "https://"))
    base = tracking_uri.rstrip("/") if server else f"http://127.0.0.1:{UI_PORT}"
    page = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{base}/{page}?workflowType=machine_learning"


def ui_hint(tracking_uri: str, experiment: str, run_id: str | None = None) -> tuple[str, str]:
    """(the lines a job prints last before its JSON line: how to open the MLflow UI on its runs,
    the URL)."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment)
    url = ui_url(tracking_uri, exp.experiment_id if exp else "0", run_id)
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow UI: {url}", url
    return (f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --port {UI_PORT}\n"
            f"  then open {url}", url)


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite store (DIR/mlflow.db →
    file:///DIR/mlartifacts, absolute); None for a tracking server, whose own artifact store
    (`mlflow server --artifacts-destination`) serves every client."""
    if tracking_uri.startswith("sqlite:///"):
        db = absolute_tracking_uri(tracking_uri)[len("sqlite:///"):]
        return "file://" + os.path.join(os.path.dirname(db), "mlartifacts")
    return None


def prepare_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    """Create (or find) the MLflow experiment on the driver, before any Ray process logs to it: its
    artifact location is absolute (MLflow's default for a sqlite store is ./mlruns relative to the
    process that creates it, i.e. a Ray worker's temporary session folder), and it is tagged as a
    model-training experiment. `artifact_location` overrides the default (artifact_root) for a new
    experiment. Returns the experiment id."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name, artifact_location=artifact_location or artifact_root(tracking_uri),
                                              tags=EXPERIMENT_TAGS)
        except MlflowException:  # created meanwhile by a concurrent driver (sweep trials)
            exp_id = client.get_experiment_by_name(name).experiment_id
        exp = client.get_experiment(exp_id)
    for k, v in EXPERIMENT_TAGS.items():
        if exp.tags.get(k) != v:
            client.set_experiment_tag(exp.experiment_id, k, v)
    loc = exp.artifact_location or ""
    if "://" not in loc and not os.path.isabs(loc):
        print(f"warning: MLflow experiment {name!r} keeps artifacts at the relative path {loc!r} (made by an older "
              f"version): they land in whichever folder a Ray worker runs in. Use a new --experiment.", flush=True)
    return exp.experiment_id


class LocalTrackingServer:
    """`mlflow server` on this machine's loopback over DIR/mlflow.db, artifacts in DIR/mlartifacts,
    for as long as the `with` block runs: concurrent writers (sweep trials) then go through one
    server process instead of all opening the same SQLite file."""

    def __init__(self, folder: str, timeout_s: float = 120):
        self.folder, self.timeout_s, self.proc = os.path.abspath(folder), timeout_s, None

    def __enter__(self) -> str:
        import socket
        import sys
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = open(os.path.join(self.folder, "mlflow_server.log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             "sqlite:///" + os.path.join(self.folder, "mlflow.db"), "--artifacts-destination",
             os.path.join(self.folder, "mlartifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.uri = f"http://127.0.0.1:{port}"
        t0 = time.time()
        while time.time() - t0 < self.timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2)
                return self.uri
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"mlflow server did not answer within {self.timeout_s:.0f}s; see {self.log.name}")

    def __exit__(self, *exc) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def mask_picture(path: str, inputs: dict, mask: np.ndarray, modality: str, grid=None) -> str:
    """A PNG showing the first samples' masks: images with masked patches greyed out; audio/text
    as a strip per sample (white = visible to the student, dark = masked)."""
    from PIL import Image

    mask = np.asarray(mask)
    if modality == "image" and grid is not None:
        imgs = inputs["image"][: min(4, len(mask))].numpy()  # (n, 3, H, W) normalized
        tiles = []
        for i, img in enumerate(imgs):
            x = img.transpose(1, 2, 0)
            x = (x - x.min()) / (x.max() - x.min() + 1e-6)
            h, w = grid
            ph, pw = x.shape[0] // h, x.shape[1] // w
            m = mask[i].reshape(h, w).repeat(ph, 0).repeat(pw, 1)[..., None]
            tiles.append(np.concatenate([x, np.where(m, 0.5 * x + 0.25, x)], axis=1))
        arr = np.concatenate(tiles, axis=0)
        Image.fromarray((arr * 255).astype(np.uint8)).resize(
            (arr.shape[1] * 4, arr.shape[0] * 4), Image.Resampling.NEAREST).save(path)
    else:
        strip = (~mask[:8]).astype(np.uint8) * 200 + 40
        Image.fromarray(strip).resize((strip.shape[1] * 8, strip.shape[0] * 16), Image.Resampling.NEAREST).save(path)
    return path
