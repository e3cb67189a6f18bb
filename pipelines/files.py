"""File helpers over Beam's FileSystems, so local paths and gs:// behave the same.

Everything the pipelines write or read goes through here (or through Beam IO),
never through ``open``/``os`` directly, so that any filesystem Beam knows works.

``file://`` URIs: Beam's local filesystem does not take them ("Unable to get
filesystem from specified path"). ``local_path`` is the one rule: ``file://X``
is the local path ``X`` (stripped as-is, no percent-decoding, as
embedding/images.py reads image URIs). Every function here applies it to the
paths it is given and returns plain local paths, and the commands' options
apply it to their path flags (pipelines/preflight.py), so a path that reaches
Beam IO, TensorFlow, a manifest or a worker is never a ``file://`` URI.
"""

import hashlib
import io
import logging
import os
import re
import uuid
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

import pipelines
from schemas import layout

_log = logging.getLogger(__name__)
_CHUNK = 8 << 20
_RAW = CompressionTypes.UNCOMPRESSED
_SCHEME = re.compile(r"([a-zA-Z][-a-zA-Z0-9+.]*)://")  # FileSystems.get_scheme's pattern


local_path = layout.local_path  # the file:// rule lives with the published layout (Beam-free)


def scheme(path: str) -> str:
    """The URI scheme of a path (``gs``, ``https``...), or "" for a local path (``file://`` included)."""
    found = _SCHEME.match(local_path(path) or "")
    return found.group(1).lower() if found else ""


def is_local(path: str) -> bool:
    """Whether a path names this machine's disk (a plain path or ``file://``), not a remote filesystem or URL."""
    return scheme(path) == ""


def join(base: str, *parts: str) -> str:
    return FileSystems.join(local_path(base).rstrip("/"), *parts)


def relative(path: str, base: str) -> str:
    path = local_path(path)
    base = local_path(base).rstrip("/") + "/"
    if not path.startswith(base):
        raise ValueError(f"{path} is not under {base}")
    return path[len(base):]


def exists(path: str) -> bool:
    return FileSystems.exists(local_path(path))


def size(path: str) -> int:
    return FileSystems.match([local_path(path)])[0].metadata_list[0].size_in_bytes


def read_bytes(path: str) -> bytes:
    with FileSystems.open(local_path(path), compression_type=_RAW) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    with FileSystems.create(local_path(path), compression_type=_RAW) as f:
        f.write(data)


def write_atomically(path: str, data: bytes) -> None:
    """Writes to a temporary name, then renames over ``path``.

    Readers see the old content or the new, never a partial file and never no
    file: a local rename replaces the target atomically, and an object store's
    rename (copy, then delete the source) overwrites it in one object write.
    """
    path = local_path(path)
    # Unique per writer: two runs never share (or delete) each other's temp file.
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    write_bytes(tmp, data)
    FileSystems.rename([tmp], [path])


def copy_local_file(source: str, dest: str) -> tuple:
    """Streams a local file to ``dest``; returns (size, sha256 hex) of what was written."""
    digest, size = hashlib.sha256(), 0
    with open(local_path(source), "rb") as src, FileSystems.create(local_path(dest), compression_type=_RAW) as out:
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return size, digest.hexdigest()


def checksum(path: str) -> tuple:
    """(size, sha256 hex) of a file as stored now."""
    digest, size = hashlib.sha256(), 0
    with FileSystems.open(local_path(path), compression_type=_RAW) as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what goes through it to ``out``."""

    def __init__(self, out):
        super().__init__()
        self._out, self.digest, self.size = out, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = memoryview(data)
        self.digest.update(data)
        self._out.write(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


def write_parquet(path: str, table: pa.Table, row_group_size: Optional[int] = None) -> tuple:
    """Writes a table as one Parquet file; returns (size, sha256 hex) of what was written.

    Streamed to the file system as the writer produces it (hashed on the way): buffering the file
    first held two more copies of a shard's vectors in memory (issue 9)."""
    with FileSystems.create(local_path(path), compression_type=_RAW) as out:
        sink = _HashingWriter(out)
        pq.write_table(table, pa.PythonFile(sink, mode="w"), compression="zstd", row_group_size=row_group_size)
    return sink.size, sink.digest.hexdigest()


def read_parquet(path: str, columns: Optional[list] = None) -> pa.Table:
    with FileSystems.open(local_path(path), compression_type=_RAW) as f:
        return pq.read_table(f, columns=columns)


def match_paths(pattern: str, flag: str) -> list:
    """Sorted paths a user's glob matches; ConfigError naming ``flag`` when it cannot be listed or matches
    nothing (the one rule for --catalog and --clicks)."""
    from schemas.errors import ConfigError, brief

    try:
        matched = FileSystems.match([local_path(pattern)])[0].metadata_list
    except (BeamIOError, ValueError) as e:
        raise ConfigError(f"{flag} {pattern!r}: cannot list files: {brief(e)}") from e
    paths = sorted(m.path for m in matched)
    if not paths:
        raise ConfigError(f"{flag} {pattern!r} matches no file; check the path or glob")
    folders = [p for p in paths if is_local(p) and os.path.isdir(p)]
    if folders:
        raise ConfigError(f"{flag} {pattern!r}: {folders[0]} is a folder; pass its files, e.g. "
                          f"'{folders[0].rstrip('/')}/*.parquet'")
    return paths


def any_file_below(prefix_dir: str) -> bool:
    """Whether a folder or object-store prefix holds at least one file (lists at most one)."""
    result = FileSystems.match([join(prefix_dir, "**")], limits=[1])[0]
    return bool(result.metadata_list)


def delete_file(path: str) -> None:
    FileSystems.delete([local_path(path)])


def list_files(prefix_dir: str) -> list:
    """All files below a directory, recursively, as full paths (sorted)."""
    pattern = join(prefix_dir, "**")
    try:
        result = FileSystems.match([pattern])[0]
    except BeamIOError:
        return []
    return sorted(m.path for m in result.metadata_list)


def mkdirs(path: str) -> None:
    """Creates a directory where the filesystem has them; no-op if it exists."""
    try:
        FileSystems.mkdirs(local_path(path))
    except (IOError, OSError, BeamIOError):
        pass


def delete_tree(directory: str) -> None:
    directory = local_path(directory)
    files = list_files(directory)
    if files:
        FileSystems.delete(files)
    if FileSystems.exists(directory):
        try:
            FileSystems.delete([directory])
        except (IOError, OSError, BeamIOError):
            pass


ARROW_POOL_ENV = pipelines.ARROW_POOL_ENV


def use_system_memory_pool() -> str:
    """Arrow buffers from the C library's malloc, in this process and in the workers it starts.

    Arrow's default pool in the pyarrow wheels (mimalloc) keeps memory that Beam's bundle threads freed
    (issue 9; benchmarks/README.md "Arrow's memory pool"). Importing ``pipelines`` sets
    ``ARROW_DEFAULT_MEMORY_POOL`` before pyarrow loads, which is what Arrow's C++ readers follow, and
    worker processes inherit it; this call sets pyarrow's own default to match, and says so when pyarrow
    was loaded first (then Arrow's C++ code keeps the pool it chose: set the variable in the environment).
    A pool the user chose through the variable is left alone. Returns pyarrow's default backend.
    """
    if not pipelines.POOL_CHOSEN_HERE:
        return pa.default_memory_pool().backend_name
    if pa.default_memory_pool().backend_name != pipelines.ARROW_POOL:
        _log.warning("pyarrow was loaded before catalog-index set %s=%s, so Arrow's readers keep its default "
                     "pool (%s) and memory grows with the catalog; set %s=%s in the environment",
                     ARROW_POOL_ENV, pipelines.ARROW_POOL, pa.default_memory_pool().backend_name,
                     ARROW_POOL_ENV, pipelines.ARROW_POOL)
        pa.set_memory_pool(pa.system_memory_pool())
    return pa.default_memory_pool().backend_name
