"""README's command blocks as a new user types them (issue 39).

Every indented command block of README.md carries a marker on the line before it,
`<!-- check: NAME -->` (an HTML comment: not rendered), naming how this file checks it. A block
runs here when it can: from the repository's root, through bash, with a fresh shell's PATH (no
venv on it, no `python` at all) — only its placeholders (OUT, RUN_DIR …), absolute paths and ports
are replaced, and a long run gets a step budget appended. Blocks that need a cloud or a
Kubernetes cluster are checked offline: the YAML they produce against Ray's own validator, the
manifests against each other, the servers they start run locally. A new block without a marker,
or a block that stops working, fails here.
"""
import base64
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
README = os.path.join(ROOT, "README.md")
# A fresh Debian shell's PATH: no venv, and no `python` (Debian has python3 only).
FRESH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Sections whose commands other tests run; none now: "Object storage" is checked for flags here
# and run against loopback S3/GCS servers by tests/test_object_storage.py.
NOT_CHECKED_HERE: tuple[str, ...] = ()
CHECKS = {"demo", "tests", "flags", "print-config", "prepare-demo", "ctc-demo", "local-submit", "cluster",
          "k8s", "mlflow-server", "export", "output", "layout"}


def readme_blocks() -> list[dict]:
    """README's indented code blocks: {"check": marker name or None, "section": the heading above,
    "line": first line number, "text": the block without its indentation}."""
    lines = open(README).read().split("\n")
    blocks, section, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line
        if line.startswith("    ") and i > 0 and not lines[i - 1].strip():
            start, body = i, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            marker = re.fullmatch(r"<!-- check: ([\w-]+) -->", prev.strip())
            blocks.append({"check": marker and marker[1], "section": section, "line": start + 1,
                           "text": "\n".join(body).strip("\n")})
            continue
        i += 1
    return blocks


def block(name: str) -> str:
    found = [b["text"] for b in readme_blocks() if b["check"] == name]
    assert len(found) == 1, f"README has {len(found)} blocks marked `check: {name}`"
    return found[0]


def commands(text: str) -> list[str]:
    """A block's commands: continuation lines joined, comments dropped."""
    out = []
    for line in re.sub(r"\s*\\\n\s*", " ", text).split("\n"):
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def substitute(text: str, subs: dict) -> str:
    """Placeholders and paths replaced as whole words (RUN_DIR, not RUN_DIRS)."""
    for k, v in subs.items():
        before = r"(?<![\w/])" if re.match(r"\w", k) else ""
        text = re.sub(rf"{before}{re.escape(k)}(?![\w])", lambda _: v, text)
    return text


def fresh_env(**extra) -> dict:
    """A user's fresh shell: no venv on PATH, no Ray address of this test session."""
    from tests.servers import cli_env

    env = cli_env(**extra)
    env["PATH"] = FRESH_PATH
    for k in ("VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(k, None)
    return env


def sh(script: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """A README command (or several) run by bash from the repository's root, as a user would."""
    kw.setdefault("env", fresh_env())
    return subprocess.run(["bash", "-e", "-c", script], cwd=kw.pop("cwd", ROOT), capture_output=True, text=True,
                          timeout=timeout, **kw)


def job_flags(module: str) -> set[str]:
    """The options `python -m jobs.X` accepts, from its own --help."""
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", r.stdout))


def jobs_flags_used(text: str) -> dict[str, set[str]]:
    """{"jobs.X": the --flags a block's `-m jobs.X` commands pass}."""
    used: dict[str, set[str]] = {}
    for cmd in commands(text):
        for m in re.finditer(r"-m (jobs\.\w+)(.*?)(?=$|&&|;|')", cmd):
            used.setdefault(m[1], set()).update(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m[2]))
    return used


# --- every block, statically -------------------------------------------------------------------

def test_every_command_block_is_checked():
    blocks = readme_blocks()
    unmarked = [f"line {b['line']}: {b['text'][:60]}" for b in blocks
                if b["check"] is None and b["section"] not in NOT_CHECKED_HERE]
    assert not unmarked, "README blocks without a `<!-- check: NAME -->` marker:\n" + "\n".join(unmarked)
    unknown = {b["check"] for b in blocks} - CHECKS - {None}
    assert not unknown, f"markers this file does not know: {unknown}"
    assert {b["check"] for b in blocks} >= CHECKS, f"checks with no block: {CHECKS - {b['check'] for b in blocks}}"


def test_commands_call_the_venvs_programs_by_path():
    """`python`, `ray`, `mlflow`, `pip`, `pytest` alone are not on a fresh shell's PATH (and a Ray
    job's entrypoint runs with the raylet's PATH): README names `.venv/bin/…`, except inside the
    quoted entrypoint of a cluster whose image has them."""
    bare = re.compile(r"(?:^|&&|;|\||\s--\s)\s*(python3?|ray|mlflow|pip|pytest)\b")
    bad = [f"line {b['line']}: {c}" for b in readme_blocks() if b["section"] not in NOT_CHECKED_HERE
           and b["check"] not in ("output", "layout") for c in commands(b["text"]) if bare.search(c)]
    text = open(README).read()
    for section in NOT_CHECKED_HERE:  # prose of other sections: everything but those
        start = text.index(section)
        text = text[:start] + text[text.index("\n### ", start + 1):]
    bad += [f"inline: {s}" for s in re.findall(r"`([^`\n]*)`", text) if re.match(r"(python|ray|mlflow) -m ", s)]
    assert not bad, "commands that need an activated venv:\n" + "\n".join(bad)


def test_job_flags_in_readme_exist():
    """Every --flag README passes to a `jobs.*` module is one that module takes (synopses included)."""
    used: dict[str, set[str]] = {}
    for b in readme_blocks():
        if b["section"] not in NOT_CHECKED_HERE:
            for mod, flags in jobs_flags_used(b["text"]).items():
                used.setdefault(mod, set()).update(flags)
    assert {"jobs.preprocess", "jobs.pretrain", "jobs.evaluate", "jobs.sweep", "jobs.finetune", "jobs.export_hf",
            "jobs.prepare_demo", "jobs.demo"} <= set(used)
    unknown = {mod: sorted(flags - job_flags(mod)) for mod, flags in used.items()}
    assert not any(unknown.values()), unknown


def test_layout_names_files_that_exist():
    names = [line.split()[0] for line in block("layout").split("\n") if line and not line.startswith(" ")]
    missing = [n for n in names if not os.path.exists(os.path.join(ROOT, n))]
    assert len(names) > 20 and not missing, missing


def test_setup_and_test_blocks():
    """Set-up: the two commands exist as README gives them (setup.sh itself runs apt and pip, which
    a test does not repeat; the demo runs in tests/test_demo.py)."""
    setup = open(os.path.join(ROOT, "setup.sh")).read()
    assert commands(block("demo")) == ["bash setup.sh && .venv/bin/python -m jobs.demo"]
    assert "python3-venv" in setup and "python3 -m venv .venv" in setup and "requirements.txt" in setup
    tests = [b["text"] for b in readme_blocks() if b["check"] == "tests"]
    assert tests == ["bash setup.sh && .venv/bin/python -m pytest -q tests",
                     '.venv/bin/python -m pytest -q -m "not slow" tests']
    assert re.search(r"^\s+slow:", open(os.path.join(ROOT, "pytest.ini")).read(), re.M)


# --- blocks that run here ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ctc_raw(tmp_path_factory) -> str:
    """README's prepare-demo block run as written (RAW a new folder) → RAW."""
    raw = str(tmp_path_factory.mktemp("readme") / "raw")
    r = sh(substitute(block("prepare-demo"), {"RAW": raw}))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return raw


def test_prepare_demo_block_writes_transcribed_speech(ctc_raw):
    raw = ctc_raw
    for split in ("train", "val", "test"):  # each clip with its transcript beside it, as README says
        names = os.listdir(os.path.join(raw, "ctc", split))
        wavs = {n[:-4] for n in names if n.endswith(".wav")}
        assert wavs and wavs == {n[:-4] for n in names if n.endswith(".txt")}, (split, sorted(names)[:6])


def test_print_config_output_is_a_config_for_the_same_data(demo_shards, tmp_path):
    """The round trip as written (the second command checked with --print-config, which exits
    before training), and README's caveat: printed without --data, a preset's image size is baked
    in and 28-px data is refused."""
    my, out = str(tmp_path / "my.yaml"), demo_shards["image"]
    first, second = commands(substitute(block("print-config"), {"OUT": out, "RUN_DIR": str(tmp_path / "run"),
                                                                  "my.yaml": my}))
    r = sh(first)
    assert r.returncode == 0 and "image_size: 28" in open(my).read(), r.stderr[-2000:]
    r = sh(second + " --print-config")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == open(my).read()
    base = str(tmp_path / "base.yaml")
    assert sh(f".venv/bin/python -m jobs.pretrain --modality image --preset base --print-config > {base}").returncode == 0
    r = sh(f".venv/bin/python -m jobs.pretrain --modality image --preset base --data {out} --config {base} --print-config")
    assert r.returncode == 2 and "image_size=28" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_local_ray_job_submit_block_then_export_block(demo_shards, tmp_path):
    """README's `ray job submit` entrypoint as written, on a local head started from the venv's
    `ray` in a shell whose PATH has no venv (what the raylet, and so the entrypoint's shell, sees);
    then README's export block on the job's output. Not run: the block's `ray start`/`ray stop`
    (a head on fixed ports, and `ray stop` ends every Ray process of this user) — tests.servers'
    head is the same `.venv/bin/ray start --head` on free ports."""
    from tests.servers import ray_head

    text = block("local-submit")
    cmds = commands(text)
    assert cmds[1].startswith(".venv/bin/ray start --head") and cmds[-1] == ".venv/bin/ray stop"
    submit = next(c for c in cmds if " job submit " in c)
    assert "-- $PWD/.venv/bin/python -m jobs.pretrain" in submit
    system_python = shutil.which("python", path=FRESH_PATH)  # none on Debian; if any, not the venv's
    assert system_python is None or os.path.realpath(system_python) != os.path.realpath(sys.executable)
    run_dir = str(tmp_path / "job1")
    env = fresh_env()
    env.pop("RAY_AUTH_MODE")  # the block's own `export` sets it
    with ray_head(fresh_env(), str(tmp_path / "head.log")) as (_, dash):
        script = substitute("\n".join([cmds[0], submit]), {
            "http://127.0.0.1:8265": dash, "$PWD/runs/demo/data/text_pretrain": demo_shards["text"],
            "$PWD/runs/job1": run_dir}) + " --max-steps 4 --num-workers 1 --set train.log_every=2"
        r = sh(script, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "done: text step 4/4" in r.stdout + r.stderr
    assert os.path.isfile(os.path.join(run_dir, "final", "model.safetensors"))

    hf = str(tmp_path / "hf_model")
    r = sh(substitute(block("export"), {"RUN_DIR": run_dir, "hf_model": hf}))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert os.path.isfile(os.path.join(hf, "config.json")) and json.load(open(os.path.join(hf, "config.json")))[
        "architectures"] == ["Data2VecTextModel"]


@pytest.mark.slow
def test_ctc_demo_block_on_a_short_budget(ray_local, demo_raw, tmp_path):
    """`.venv/bin/python -m jobs.demo --ctc` as written, on the test session's demo files (audio
    only) and a small set of spoken digit strings (160 / 32 / 32 clips), with a short budget
    appended: one pretraining step and 31 CTC steps (30 train the head alone; the full run's time is
    in README). It joins the session's cluster (RAY_ADDRESS), as a job joins the cluster it is
    submitted to."""
    from jobs.prepare_demo import main as prepare
    from tests.servers import session_ray_address

    raw = tmp_path / "raw"
    raw.mkdir()
    os.symlink(os.path.join(demo_raw, "audio"), raw / "audio")
    assert prepare(["--output", str(raw), "--modalities", "ctc", "--ctc-sizes", "160,32,32"]) == 0
    (cmd,) = commands(block("ctc-demo"))
    env = fresh_env(RAY_ADDRESS=session_ray_address())
    env.pop("RAY_AUTH_MODE")  # the session cluster's authentication, not the tests' own heads'
    env.update({k: os.environ[k] for k in ("RAY_AUTH_MODE",) if k in os.environ})
    r = sh(f"{cmd} --data {raw} --output {tmp_path / 'out'} --modalities audio --steps-scale 0.03 --ctc-steps 31",
           timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    result = json.loads(r.stdout.strip().split("\n")[-1])
    assert result["ctc"]["steps"] == 31 and 0 <= result["ctc"]["test_cer"] <= 1.5, result
    assert "speech recognition (CTC)" in r.stdout


@contextlib.contextmanager
def _server(cmd: list[str], env: dict, log: str):
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _status(url: str, auth: str | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        return urllib.request.urlopen(req, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code


# --- the cluster blocks, offline -----------------------------------------------------------------

def _cluster_copy(tmp_path) -> tuple[str, dict]:
    """The `sed` line of README's `ray up` block run as written in a folder holding cluster.yaml →
    (the file it wrote, that file's YAML)."""
    cmds = commands(block("cluster"))
    assert cmds[0].startswith("sed ") and cmds[0].endswith("> my-cluster.yaml"), cmds[0]
    shutil.copy(os.path.join(ROOT, "cluster.yaml"), tmp_path / "cluster.yaml")
    r = sh(cmds[0], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    path = str(tmp_path / "my-cluster.yaml")
    return path, yaml.safe_load(open(path))


def test_ray_up_block_makes_a_valid_cluster_file_with_no_placeholder(tmp_path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    path, raw = _cluster_copy(tmp_path)
    text = open(path).read()
    assert "REPLACE_ME" not in text and "fs-0123abcd.efs." in text
    original = open(os.path.join(ROOT, "cluster.yaml")).read().split("\n")
    assert [a.replace("fs-REPLACE_ME", "fs-0123abcd") for a in original] == text.split("\n")  # nothing else
    validate_config(prepare_config(raw))
    assert "fs-REPLACE_ME" in open(os.path.join(ROOT, "cluster.yaml")).read()  # what README's sed replaces
    cmds = commands(block("cluster"))
    # Every ray command names the copy; none needs a variable the caller's shell would have to set.
    rays = [c for c in cmds if c.startswith(".venv/bin/ray ")]
    assert len(rays) == 7 and all("my-cluster.yaml" in c for c in rays if " job submit " not in c)
    assert not re.search(r"\$(HEAD_IP|EFS_ID)\b", "\n".join(cmds))
    submit = next(c for c in cmds if " job submit " in c)
    entry = shlex.split(submit.split(" -- ", 1)[1])
    assert entry[:2] == ["bash", "-c"] and entry[2].startswith("python -m jobs.pretrain ")
    assert "--tracking-uri $MLFLOW_TRACKING_URI" in entry[2]  # expanded by the head's shell
    unknown = jobs_flags_used(entry[2])["jobs.pretrain"] - job_flags("jobs.pretrain")
    assert not unknown


def test_cluster_nodes_get_the_heads_tracking_uri(tmp_path):
    """cluster.yaml's set-up commands (run on every node) in a scratch home: a worker's (Ray
    exports RAY_HEAD_IP to them) and the head's (its own IP, as Ray finds it) ~/.bashrc give
    MLFLOW_TRACKING_URI = the head's MLflow server; running them again changes nothing."""
    cfg = yaml.safe_load(open(os.path.join(ROOT, "cluster.yaml")))
    rc = [c for c in cfg["setup_commands"] if "bashrc" in c]
    assert len(rc) >= 2
    import ray

    for head_ip, want in (("10.1.2.3", "10.1.2.3"), (None, ray.util.get_node_ip_address())):
        home = tmp_path / (head_ip or "head")
        home.mkdir()
        env = {**fresh_env(), "HOME": str(home), "PATH": BIN + os.pathsep + FRESH_PATH}  # the image's python
        if head_ip:
            env["RAY_HEAD_IP"] = head_ip
        for _ in range(2):
            for c in rc:
                r = subprocess.run(["bash", "-c", c], env=env, capture_output=True, text=True, timeout=120)
                assert r.returncode == 0, r.stderr
        env.pop("RAY_HEAD_IP", None)  # a later shell on that node: only what ~/.bashrc says
        r = subprocess.run(["bash", "-c", "source ~/.bashrc; echo $MLFLOW_TRACKING_URI $MLFLOW_TRACKING_USERNAME"],
                           env=env, capture_output=True, text=True)
        assert r.stdout.split() == [f"http://{want}:5000", "admin"], (r.stdout, open(home / ".bashrc").read())
        assert open(home / ".bashrc").read().count("MLFLOW_TRACKING_URI") == 1


def test_k8s_block_and_its_prerequisites(tmp_path):
    """README's Kubernetes commands against the manifests they apply: k8s/shared.yaml makes what
    k8s/rayjob.yaml uses (its claim, the MLflow Service of its --tracking-uri), the Secret README
    creates has every key both read, the data goes where the job reads it; `kubectl kustomize`
    (offline) parses both."""
    from tests.test_ops import unauthenticated_binds

    cmds = commands(block("k8s"))
    applied = [c.split()[-1] for c in cmds if c.startswith("kubectl apply -f ")]
    assert applied == ["k8s/shared.yaml", "k8s/rayjob.yaml"]
    secret = next(i for i, c in enumerate(cmds) if c.startswith("kubectl create secret generic mlflow-credentials"))
    cp = next(i for i, c in enumerate(cmds) if c.startswith("kubectl cp "))
    order = [secret, cmds.index("kubectl apply -f k8s/shared.yaml"), cp, cmds.index("kubectl apply -f k8s/rayjob.yaml")]
    assert order == sorted(order)
    secret_keys = set(re.findall(r"--from-literal=([\w-]+)=", cmds[secret]))

    shared = {d["kind"]: d for d in yaml.safe_load_all(open(os.path.join(ROOT, "k8s", "shared.yaml")))}
    job = yaml.safe_load(open(os.path.join(ROOT, "k8s", "rayjob.yaml")))
    assert set(shared) == {"PersistentVolumeClaim", "Deployment", "Service"}
    pvc, dep, svc = shared["PersistentVolumeClaim"], shared["Deployment"], shared["Service"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    rc = job["spec"]["rayClusterSpec"]
    pods = [rc["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in rc["workerGroupSpecs"]),
            dep["spec"]["template"]["spec"]]
    claims = {v["persistentVolumeClaim"]["claimName"] for p in pods for v in p["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {pvc["metadata"]["name"]} == {"data2vec-shared"}
    images = {c["image"] for p in pods for c in p["containers"]}
    assert len(images) == 1 and all(i in "\n".join(cmds) for i in images)  # README builds the image both run
    # The tracking URI of the job is the Service, in the namespace README applies to.
    host, port = re.search(r"--tracking-uri http://([\w.-]+):(\d+)", job["spec"]["entrypoint"]).groups()
    name, namespace = host.split(".")[:2]
    assert (name, namespace, int(port)) == (svc["metadata"]["name"], "default", svc["spec"]["ports"][0]["port"])
    assert "namespace" not in svc["metadata"] and "`default`" in open(README).read()
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items() and dep["spec"]["selector"]["matchLabels"] == labels
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert f"--port {svc['spec']['ports'][0]['targetPort']}" in container["args"][0]
    refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for p in pods for c in p["containers"] for e in c.get("env", []) if "valueFrom" in e}
    assert {n for n, _ in refs} == {"mlflow-credentials"} and {k for _, k in refs} <= secret_keys
    # The data: copied into the pod that mounts the claim, at the path the job's --data reads.
    data = re.search(r"--data (\S+)", job["spec"]["entrypoint"])[1]
    assert cmds[cp].endswith(f":{data}") and "-l app=mlflow" in cmds[cp]
    for i, doc in enumerate(shared.values()):  # the check reads one document per file
        (tmp_path / f"doc{i}.yaml").write_text(yaml.safe_dump(doc))
        assert unauthenticated_binds(str(tmp_path / f"doc{i}.yaml")) == []
    if shutil.which("kubectl"):
        (tmp_path / "kustomization.yaml").write_text("resources: [shared.yaml, rayjob.yaml]\n")
        for f in ("shared.yaml", "rayjob.yaml"):
            shutil.copy(os.path.join(ROOT, "k8s", f), tmp_path / f)
        r = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert sorted(d["kind"] for d in yaml.safe_load_all(r.stdout)) == [
            "Deployment", "PersistentVolumeClaim", "RayJob", "Service"]


@pytest.mark.slow
def test_the_mlflow_servers_start_and_the_clusters_ask_for_the_password(tmp_path):
    """Three MLflow servers at once, on loopback: README's "MLflow tracking server" block as written
    (port and $PWD aside), which answers; and those of cluster.yaml (head set-up + start commands)
    and k8s/shared.yaml (the container's command and environment), /mnt/shared a scratch folder,
    each of which starts (its basic-auth app needs Flask-WTF) and refuses a request without the
    admin password."""
    from tests.servers import free_ports, wait_http

    readme_port, up_port, k8s_port = free_ports(3)
    server, client = commands(block("mlflow-server"))
    server = substitute(server, {"$PWD/mlflow.db": str(tmp_path / "mlflow.db"),
                                 "$PWD/mlartifacts": str(tmp_path / "mlartifacts"), "5000": str(readme_port)})
    assert client.endswith("--tracking-uri http://127.0.0.1:5000") and ".venv/bin/mlflow server " in server
    shared_up, shared_k8s = tmp_path / "up", tmp_path / "k8s"
    env = {**fresh_env(), "PATH": BIN + os.pathsep + FRESH_PATH}  # the image's mlflow and python

    def local(cmd: str, shared, port: int) -> str:
        return cmd.replace("/mnt/shared", str(shared)).replace("--host 0.0.0.0", "--host 127.0.0.1") \
            .replace("--port 5000", f"--port {port} --workers 1")

    cfg = yaml.safe_load(open(os.path.join(ROOT, "cluster.yaml")))
    for c in cfg["head_setup_commands"]:
        r = subprocess.run(["bash", "-c", local(c, shared_up, up_port)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, (c, r.stderr)
    (start,) = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    start = re.sub(r"^(.*?)nohup (.*?) > \S+ 2>&1 &$", r"\1exec \2", local(start, shared_up, up_port))
    up_password = open(shared_up / ".mlflow" / "admin_password").read().strip()

    dep = next(d for d in yaml.safe_load_all(open(os.path.join(ROOT, "k8s", "shared.yaml"))) if d["kind"] == "Deployment")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    k8s_password = "0123456789abcdef0123456789abcdef"  # what README's `openssl rand -hex 24` makes: 48 hex digits
    secret = {"password": k8s_password, "flask-secret-key": "f" * 64, "username": "admin"}
    k8s_env = dict(env)
    for e in container["env"]:
        k8s_env[e["name"]] = local(e["value"], shared_k8s, k8s_port) if "value" in e else \
            secret[e["valueFrom"]["secretKeyRef"]["key"]]
    with _server(["bash", "-c", "exec " + server + " --workers 1"], fresh_env(), str(tmp_path / "readme.log")), \
            _server(["bash", "-c", start], env, str(tmp_path / "up.log")), \
            _server([*container["command"], local(container["args"][0], shared_k8s, k8s_port)], k8s_env,
                    str(tmp_path / "k8s.log")):
        wait_http(f"http://127.0.0.1:{readme_port}/health", timeout=240)
        assert _status(f"http://127.0.0.1:{readme_port}/api/2.0/mlflow/experiments/search?max_results=1") == 200
        for port, password, log in ((up_port, up_password, "up.log"), (k8s_port, k8s_password, "k8s.log")):
            try:
                wait_http(f"http://127.0.0.1:{port}/health", timeout=240)
            except TimeoutError:
                raise AssertionError(open(tmp_path / log).read()[-3000:]) from None
            url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
            assert _status(url) == 401 and _status(url, "admin:wrong-password") == 401
            assert _status(url, f"admin:{password}") == 200, open(tmp_path / log).read()[-3000:]
