"""Paths that may be local folders, shared file systems or object-store URIs (via pyarrow.fs)."""
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


def local_path(uri: str) -> str | None:
    """The local path of a plain path or a file:// URI; None for object stores (s3://, gs://, …)."""
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    return uri[len("file://"):] if uri.startswith("file://") else None


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a path or URI with '/'."""
    return "/".join([uri.rstrip("/"), *parts])


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
