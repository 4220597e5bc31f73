"""Paths that may be local folders, shared file systems or object-store URIs (via pyarrow.fs).

    /data/run, runs/x, file:///data/run, s3://bucket/run, gs://bucket/run,
    s3://bucket/run?endpoint_override=HOST:PORT&scheme=http   (pyarrow's own query options)

An S3 endpoint comes from the URI's query or, as MinIO/Ceph users set it, from AWS_ENDPOINT_URL
(pyarrow's S3 client reads it); credentials from the usual AWS variables or files. `join` keeps a
URI's query on every path built from it, so each file of a run is reached with the same options.
"""
from __future__ import annotations

import os

import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """'s3://b/k', 'file:///x' or a plain (relative) path → (filesystem, path inside it)."""
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
        return pafs.LocalFileSystem(), uri.rstrip("/") or "/"
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """A plain path made absolute (every process and node reads it alike); URIs unchanged."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def _split_query(uri: str) -> tuple[str, str]:
    base, sep, query = uri.partition("?") if is_uri(uri) else (uri, "", "")
    return base, sep + query


def local_path(uri: str) -> str | None:
    """The local path of a plain path or a file:// URI; None for object stores (s3://, gs://, …)."""
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    return uri[len("file://"):] if uri.startswith("file://") else None


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a path or URI with '/', keeping a URI's query at the end:
    join("s3://b/run?scheme=http", "final") == "s3://b/run/final?scheme=http"."""
    base, query = _split_query(uri)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + query


def parent(uri: str) -> str:
    """The folder holding a path or URI (its query kept): parent("s3://b/run/final") == "s3://b/run"."""
    base, query = _split_query(uri)
    base = base.rstrip("/")
    if not is_uri(base):
        return os.path.dirname(os.path.abspath(os.path.expanduser(base)))
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
