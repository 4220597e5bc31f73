"""One path type (pipeline/storage.py): what a user types → (file system, path, shown form), URI
credentials shown as ***, and gs:// against a real GCS API server on loopback."""
import argparse
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from tests.servers import ROOT, gcs_fs, gcs_server


def test_local_paths_and_file_uris_are_one_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spaced = tmp_path / "a b"
    assert storage.canonical(f"file://{tmp_path}/a%20b") == str(spaced) == storage.canonical("a b")
    assert storage.canonical("file://localhost/x%23y") == "/x#y"
    assert storage.join(f"file://{tmp_path}/a%20b", "final") == f"{spaced}/final"
    assert storage.parent(f"file://{tmp_path}/a%20b/final") == str(spaced)
    assert storage.local_path(f"file://{tmp_path}/a%20b") == str(spaced) and storage.local_path("s3://b/x") is None
    fs, path = storage.resolve(f"file://{tmp_path}/a%20b")
    fs.create_dir(path)
    assert spaced.is_dir() and not (tmp_path / "a%20b").exists()
    for bad, why in (("ftp://h/x", "unsupported scheme ftp://"), ("file://host/x", "no host or query"),
                     ("file:///x?mmap=1", "no host or query")):
        with pytest.raises(ValueError, match=why):
            storage.canonical(bad)
    p = argparse.ArgumentParser()
    p.add_argument("--output", type=storage.path_arg)
    assert p.parse_args(["--output", f"file://{tmp_path}/a%20b"]).output == str(spaced)


def test_the_same_place_spelled_two_ways_is_one_place():
    assert storage.place("s3://K:S@b/run/?endpoint_override=h:1&scheme=http") == storage.place("s3://***@b/run") \
        == storage.place("s3://b/run") == "s3://b/run"
    assert storage.place("s3://b/run") != storage.place("s3://c/run") != storage.place("gs://c/run")


def test_credentials_are_shown_as_stars_and_reattached_from_what_the_user_typed():
    uri = "s3://AKID:se%2Fcret@bucket/run?endpoint_override=h:9000&scheme=http"
    assert storage.shown(uri) == "s3://***@bucket/run?endpoint_override=h:9000&scheme=http"
    written = storage.redact({"data": uri, "runs": [uri, ("x", 3)], "n": 3, "db": "sqlite:////tmp/m.db",
                              "mlflow": "http://admin:pw@head:5000"})
    text = json.dumps(written)
    assert "AKID" not in text and "cret" not in text and "pw@" not in text and "sqlite:////tmp/m.db" in text
    assert written["runs"][1] == ("x", 3) and written["n"] == 3
    stored = storage.join(storage.shown(uri), "final")  # read back from a config.json
    assert storage.reattach(stored, "gs://K2:S2@bucket/x", uri) == storage.join(uri, "final")
    assert storage.reattach(stored, "s3://K2:S2@other/x") == "s3://bucket/run/final?endpoint_override=h:9000&scheme=http"
    assert storage.reattach("s3://b/x", uri) == "s3://b/x"
    # A tracking server's URI read back by evaluate: MLFLOW_TRACKING_URI's password for that server.
    assert storage.reattach(written["mlflow"], "http://admin:pw@head:5000") == "http://admin:pw@head:5000"
    assert storage.reattach(written["mlflow"], "http://admin:pw@other:5000") == "http://head:5000"


def test_the_console_of_a_job_shows_no_credentials():
    import io
    import sys

    buf = io.StringIO()
    guarded = storage._Guarded(buf)
    print("wrote s3://AKID:SECRET@b/run/final and mail@example.org", file=guarded)
    assert buf.getvalue() == "wrote s3://***@b/run/final and mail@example.org\n"
    assert guarded.getvalue() == buf.getvalue()  # everything else passes through
    # A job's process: importing the jobs package guards its streams, its loggers' included.
    import subprocess
    code = ("import jobs, logging, sys; print('out s3://K:S@b/x'); logging.getLogger('x').warning('log s3://K:S@b/y');"
            " sys.stderr.write('err s3://K:S@b/z\\n')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert r.stdout == "out s3://***@b/x\n" and r.stderr == "log s3://***@b/y\nerr s3://***@b/z\n"


def test_gs_uris_reach_an_emulator_from_the_environment_or_the_query(monkeypatch):
    with gcs_server("bkt") as endpoint:
        table = pa.table({"x": [1, 2, 3]})
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://{endpoint}")
        fs, path = storage.resolve("gs://bkt/env/")
        assert path == "bkt/env"
        pq.write_table(table, f"{path}/t.parquet", filesystem=fs)
        monkeypatch.delenv("STORAGE_EMULATOR_HOST")
        uri = f"gs://bkt/query?endpoint_override={endpoint}&scheme=http"
        fs, path = storage.resolve(uri)
        pq.write_table(table, f"{path}/t.parquet", filesystem=fs)
        storage.write_json(*storage.resolve(storage.join(uri, "m.json")), {"a": 1})
        assert storage.read_json(storage.join(uri, "m.json")) == {"a": 1}
        assert storage.list_files(gcs_fs(endpoint), "bkt") == ["bkt/env/t.parquet", "bkt/query/m.json",
                                                               "bkt/query/t.parquet"]
        with pytest.raises(ValueError, match="unknown GCS option"):
            storage.resolve(f"gs://bkt/x?endpoint={endpoint}")
