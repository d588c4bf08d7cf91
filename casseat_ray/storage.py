"""Where outputs live: a local folder, or a URI (``s3://``, ``gs://``, ``abfs://``...) opened
through pyarrow's filesystems, as Ray Train opens its ``storage_path``.

A step whose ``output_dir`` is a URI works in a local staging folder and mirrors it to the URI:
what is already there is pulled first (a resumed run continues from it, on any machine), and
the folder is pushed back when the step ends, also when it fails, so finished blocks are never
lost. Settings of an S3-compatible store go in the URI's query, as pyarrow reads them:
``s3://bucket/runs?endpoint_override=host:9000&scheme=http``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from pathlib import Path


_NO_SPACE = ("No space left on device", "Disk quota exceeded")


def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` or what raised it is a full disk or an exhausted quota: Python's own
    OSError, pyarrow's (whose errno may be unset; its message names the cause) or a Ray task
    error wrapping either."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(m in str(exc) for m in _NO_SPACE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI; a URI's query stays at the end."""
    base = str(base)
    head, sep, query = base.partition("?")
    joined = "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)])
    return joined + sep + query


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI or a local path."""
    from pyarrow import fs

    if not is_uri(uri):
        return fs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    return fs.FileSystem.from_uri(uri)


def staging_dir(output_dir: str) -> Path:
    """The local folder that mirrors a URI ``output_dir`` (one per URI, reused by reruns)."""
    root = Path(os.environ.get("CASSEAT_STAGING_DIR", Path.home() / ".cache" / "casseat" / "staging")).expanduser()
    return root / hashlib.sha256(output_dir.encode()).hexdigest()[:16]


def exists(uri: str) -> bool:
    from pyarrow import fs

    filesys, path = filesystem(uri)
    return filesys.get_file_info(path).type != fs.FileType.NotFound


def list_names(uri: str) -> list[str]:
    """Base names of everything below ``uri`` (recursive); empty when it does not exist."""
    from pyarrow import fs

    filesys, path = filesystem(uri)
    if filesys.get_file_info(path).type != fs.FileType.Directory:
        return []
    return [info.base_name for info in filesys.get_file_info(fs.FileSelector(path, recursive=True))]


def delete(uri: str) -> None:
    from pyarrow import fs

    filesys, path = filesystem(uri)
    kind = filesys.get_file_info(path).type
    if kind == fs.FileType.Directory:
        filesys.delete_dir(path)
    elif kind == fs.FileType.File:
        filesys.delete_file(path)


def copy_tree(src: str | Path, dst: str | Path) -> bool:
    """Copy a folder between any two of local disk and URIs; False when ``src`` is missing."""
    from pyarrow import fs

    src_fs, src_path = filesystem(str(src))
    if src_fs.get_file_info(src_path).type != fs.FileType.Directory:
        return False
    dst_fs, dst_path = filesystem(str(dst))
    if not is_uri(dst):
        Path(dst_path).mkdir(parents=True, exist_ok=True)
    fs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs, use_threads=True)
    return True


def sync_tree(local: Path, remote: str) -> None:
    """Make ``remote`` hold exactly the files of ``local``: copy them, then delete what the
    step removed (a --fresh rerun's old parts must not come back on the next pull)."""
    from pyarrow import fs

    local = Path(local)
    if not local.is_dir():
        return
    copy_tree(local, remote)
    keep = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    remote_fs, root = filesystem(remote)
    for info in remote_fs.get_file_info(fs.FileSelector(root, recursive=True)):
        if info.type == fs.FileType.File and info.path[len(root):].lstrip("/") not in keep:
            remote_fs.delete_file(info.path)


class Mirror:
    """A local folder mirrored to a URI; ``push`` sends what is there now."""

    def __init__(self, local: Path, remote: str | None):
        self.local, self.remote = Path(local), remote

    def push(self) -> None:
        if self.remote is not None:
            sync_tree(self.local, self.remote)


_active: set[str] = set()  # local folders mirrored by an enclosing step (casseat run around its steps)


@contextlib.contextmanager
def mirrored(local: Path, remote: str | None):
    """Pull ``remote`` into ``local``, run the body, push ``local`` back (also on failure).
    Nothing to do when the outputs are local (``remote`` is None) or when an enclosing
    ``mirrored`` already holds this folder (it pulled first and pushes last)."""
    mirror = Mirror(local, remote)
    key = str(Path(local).resolve())
    if remote is None or key in _active:
        yield mirror
        return
    copy_tree(remote, local)
    _active.add(key)
    try:
        yield mirror
    finally:
        _active.discard(key)
        mirror.push()


def mirrors_run_dir(fn):
    """Decorate a step ``fn(cfg, ...)``: it runs inside ``mirrored(cfg.run_dir, cfg.run_uri)``."""
    import functools

    @functools.wraps(fn)
    def wrapper(cfg, *args, **kwargs):
        with mirrored(cfg.run_dir, cfg.run_uri):
            return fn(cfg, *args, **kwargs)

    return wrapper
