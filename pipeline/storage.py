"""Every path the product reads or writes, in one place: what a user typed → (file system, path
inside it) by `resolve`, and the form shown to people by `shown`.

    /data/run, runs/x, ~/x, file:///data/a%20b, s3://bucket/run, gs://bucket/run,
    s3://bucket/run?endpoint_override=HOST:PORT&scheme=http   (pyarrow's own query options)
    s3://KEY:SECRET@bucket/run                                (pyarrow's S3 credentials in the URI)

`canonical` is applied to every path flag of every job (argparse `type=`) and to every path read
from a file: local paths and `file://` URIs (percent-decoded) become one absolute local path, so a
run's folders, its `final/` and its MLflow store are where every later job looks. Object-store URIs
are kept as typed; `join` keeps a URI's query on every path built from it.

S3: the endpoint comes from the URI's query or from AWS_ENDPOINT_URL (pyarrow's S3 client reads
it, as MinIO/Ceph users set it); credentials from the URI, the usual AWS variables or files.
GCS: the nodes' application default credentials (GOOGLE_APPLICATION_CREDENTIALS names a
service-account file); an emulator from STORAGE_EMULATOR_HOST=http://HOST:PORT (the Google client
libraries' convention) or the URI's `?endpoint_override=HOST:PORT&scheme=http`. A plain-http
endpoint is an emulator and is reached without credentials (Google's own endpoint is https only).

Secrets: credentials in a URI's user-info connect, and are `***` in every other place — `shown`
for one URI, `redact` for whatever is written (config.json, manifests, MLflow params and tags,
checkpoints) and `guard_console` for what is printed. `reattach` gives a URI read back from a
written file the credentials of a URI the user typed now.
"""
from __future__ import annotations

import os
import re
import sys
import urllib.parse

import pyarrow.fs as pafs

OBJECT_STORES = ("s3", "gs", "gcs")
# scheme://USERINFO@ — the user-info of any URI (S3 keys, an MLflow server's basic auth, …).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/@\s'\"?#]+)@")
HIDDEN = "***"


def is_uri(path: str) -> bool:
    return "://" in path


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower()


def canonical(text: str) -> str:
    """What a user typed → the one form every job passes on and every file records: a local path or
    `file://` URI → an absolute local path (percent-decoded: file:///data/a%20b → '/data/a b');
    an object-store URI unchanged. Unknown schemes and a `file://` URI with a host or a query
    raise ValueError (argparse reports it, naming the flag)."""
    if not is_uri(text):
        return os.path.abspath(os.path.expanduser(text))
    scheme = _scheme(text)
    if scheme == "file":
        u = urllib.parse.urlsplit(text)
        if u.netloc not in ("", "localhost") or u.query or u.fragment:
            raise ValueError(f"{shown(text)}: a file:// URI names a local path (file:///abs/path), "
                             "with no host or query")
        return os.path.abspath(urllib.parse.unquote(u.path) or "/")
    if scheme not in OBJECT_STORES:
        raise ValueError(f"{shown(text)}: unsupported scheme {scheme}:// (a local path, file://, s3:// or gs://)")
    return text


def path_arg(text: str) -> str:
    """argparse `type=` of every path flag: `canonical`, its error reported as the flag's."""
    import argparse

    try:
        return canonical(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _gcs(uri: str) -> tuple[pafs.FileSystem, str]:
    """gs://bucket/prefix[?endpoint_override=H:P&scheme=http&project_id=P] → GcsFileSystem. Built
    here, not by pyarrow's from_uri: that one always looks for Google credentials (a metadata-server
    wait of minutes off Google Cloud), which an emulator neither has nor needs."""
    u = urllib.parse.urlsplit(uri)
    query = dict(urllib.parse.parse_qsl(u.query))
    unknown = set(query) - {"endpoint_override", "scheme", "project_id"}
    if unknown:
        raise ValueError(f"{shown(uri)}: unknown GCS option(s) {sorted(unknown)} "
                         "(endpoint_override, scheme, project_id)")
    opts = {k: query[k] for k in ("endpoint_override", "scheme", "project_id") if k in query}
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator and "endpoint_override" not in opts:
        e = urllib.parse.urlsplit(emulator if "://" in emulator else "http://" + emulator)
        opts.update(endpoint_override=e.netloc, scheme=e.scheme or "http")
    if opts.get("scheme") == "http":
        opts["anonymous"] = True
    return pafs.GcsFileSystem(**opts), u.netloc + u.path


def place(text: str) -> str:
    """Where a path or URI points, without its options or credentials: '/data/run', 's3://b/run'.
    Two spellings of the same place (an endpoint in the query or not, credentials or ***) agree."""
    c = canonical(text)
    if not is_uri(c):
        return c.rstrip("/") or "/"
    u = urllib.parse.urlsplit(c)
    return f"{u.scheme.lower()}://{u.hostname or ''}{u.path.rstrip('/')}"


def split(uri: str) -> tuple[str, str]:
    """A path or URI → (what picks its file system: scheme, credentials, bucket and query — "" for
    local files; the path inside it, as `resolve` gives it). Cheap: for callers that keep one file
    system per key, e.g. read tasks opening thousands of chunk files."""
    c = canonical(uri)
    if not is_uri(c):
        return "", c.rstrip("/") or "/"
    u = urllib.parse.urlsplit(c)
    return f"{u.scheme}://{u.netloc}?{u.query}", urllib.parse.unquote(u.hostname or "") + \
        urllib.parse.unquote(u.path).rstrip("/")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """What a user typed (or a file recorded) → (file system, path inside it, no trailing '/'); the
    only place a file system is made. 's3://b/k', 'gs://b/k', 'file:///x' or a plain path."""
    uri = canonical(uri)
    if not is_uri(uri):
        return pafs.LocalFileSystem(), uri.rstrip("/") or "/"
    fs, path = _gcs(uri) if _scheme(uri) in ("gs", "gcs") else pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


# ----------------------------------------------------------------------------- secrets
def shown(text: str) -> str:
    """The form for people: every URI's user-info (credentials) as ***."""
    return _USERINFO.sub(lambda m: m["scheme"] + HIDDEN + "@", text)


def redact(value):
    """A str, or a dict/list/tuple of them, with every URI's credentials as *** — what is written."""
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def reattach(stored: str, *given: str | None) -> str:
    """A URI read back from a written file (credentials ***) with the credentials of the first
    URI the user typed now on the same scheme and bucket; without one, the user-info is dropped
    and the environment's credentials apply."""
    m = _USERINFO.match(stored)
    if not m or m["info"] != HIDDEN:
        return stored
    rest = stored[m.end():]
    for g in given:
        gm = _USERINFO.match(g or "")
        if gm and gm["info"] != HIDDEN and gm["scheme"].lower() == m["scheme"].lower() \
                and g[gm.end():].split("/", 1)[0].split("?")[0] == rest.split("/", 1)[0].split("?")[0]:
            return m["scheme"] + gm["info"] + "@" + rest
    return m["scheme"] + rest


class _Guarded:
    """A text stream that writes what it is given with URI credentials as ***."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, s):
        return self._stream.write(shown(s) if "@" in s else s)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard_console() -> None:
    """Every later line this process prints (its own, its loggers', Ray's forwarding of worker
    lines) shows URI credentials as ***. Idempotent; jobs/__init__.py calls it first thing."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, _Guarded):
            setattr(sys, name, _Guarded(stream))


def _split_query(uri: str) -> tuple[str, str]:
    base, sep, query = uri.partition("?") if is_uri(uri) else (uri, "", "")
    return base, sep + query


def local_path(uri: str) -> str | None:
    """The local path of a plain path or a file:// URI (percent-decoded); None for object stores."""
    c = canonical(uri)
    return None if is_uri(c) else c


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a path or URI with '/', keeping a URI's query at the end:
    join("s3://b/run?scheme=http", "final") == "s3://b/run/final?scheme=http"."""
    base, query = _split_query(uri if not uri.startswith("file://") else canonical(uri))
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + query


def parent(uri: str) -> str:
    """The folder holding a path or URI (its query kept): parent("s3://b/run/final") == "s3://b/run"."""
    base, query = _split_query(canonical(uri))
    base = base.rstrip("/")
    if not is_uri(base):
        return os.path.dirname(base)
    return base.rsplit("/", 1)[0] + query


def is_dir(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.Directory


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """Every regular file under root, recursively, sorted (deterministic order)."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def shard_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """The Parquet shards of the preprocessed folder at `root` (pipeline/ingest.py writes them to
    ROOT/shards/), sorted."""
    return [f for f in list_files(fs, f"{root}/shards") if f.endswith(".parquet")]


def label_of(root: str, path: str) -> str | None:
    """ROOT/<class>/.../file → '<class>'; a file directly under ROOT has no label."""
    rel = path[len(root):].lstrip("/") if path.startswith(root) else os.path.basename(path)
    parts = rel.split("/")
    return parts[0] if len(parts) >= 2 else None


def write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    """Write atomically where the file system allows it (temp file + rename on local disks)."""
    tmp = path + ".tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode("utf-8"))
    fs.move(tmp, path)


def write_json(fs: pafs.FileSystem, path: str, obj, **dump) -> None:
    """`obj` as JSON (`dump`: json.dumps options), URI credentials as *** (`redact`)."""
    import json

    write_text(fs, path, json.dumps(redact(obj), **{"indent": 2, **dump}) + "\n")


def read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


# ----------------------------------------------------------------------------- by path or URI
def is_file(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_json(uri: str) -> dict:
    import json

    fs, path = resolve(uri)
    return json.loads(read_text(fs, path))


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()
