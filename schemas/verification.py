"""Checking a published release against its manifest, without Beam.

One rule, two storages: the publisher and ``catalog-index verify`` check through
Beam's FileSystems (pipelines/publication.py), the search library checks its
local copy with plain file I/O (``LocalStorage``). A release passes when the
pointer's recorded manifest sha256 matches, the manifest passes its schema and
accounting, every listed file has its size and sha256, the id maps and tables
hold the rows the manifest counts, and no unlisted file sits in the folder.
"""

import dataclasses
import hashlib
import json
import os
from typing import Optional

import pyarrow.parquet as pq

from schemas import layout
from schemas import manifest as mf
from schemas.errors import PublicationError, VerificationError

_CHUNK = 8 << 20


class LocalStorage:
    """Storage for local folders: the interface verify_release reads through."""

    join = staticmethod(os.path.join)

    @staticmethod
    def relative(path, base):
        return os.path.relpath(path, base).replace(os.sep, "/")

    @staticmethod
    def read_bytes(path):
        with open(path, "rb") as f:
            return f.read()

    @staticmethod
    def list_files(directory):
        out = []
        for root, _, names in os.walk(directory):
            out.extend(os.path.join(root, n) for n in names)
        return sorted(out)

    @staticmethod
    def checksum(path):
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

    size = staticmethod(os.path.getsize)

    @staticmethod
    def parquet_rows(path):
        return pq.ParquetFile(path).metadata.num_rows


@dataclasses.dataclass
class Verified:
    pointer: Optional[layout.Pointer]
    release_dir: str
    manifest: dict
    files: int
    bytes: int


def data_files(manifest: dict) -> set:
    """Every data file a manifest's shards and tables name, relative to the release folder."""
    out = set()
    for shard in manifest["shards"]:
        out.update((shard["path"], shard["id_map"], shard["embeddings"]))
    for paths in manifest["tables"].values():
        out.update(paths)
    return out


def verify_release(release_dir: str, pointer: Optional[layout.Pointer] = None, checksums: bool = True,
                   storage=None) -> Verified:
    """Checks a release against its manifest; raises VerificationError naming the first bad file.

    ``checksums=False`` compares sizes only (cheap, for a release this process just checked).
    """
    storage = storage or LocalStorage
    manifest_path = storage.join(release_dir, layout.MANIFEST_FILE)
    try:
        raw = storage.read_bytes(manifest_path)
    except Exception as e:
        raise VerificationError(f"{manifest_path}: missing or unreadable ({type(e).__name__})") from None
    if pointer is not None and hashlib.sha256(raw).hexdigest() != pointer.manifest_sha256:
        raise VerificationError(f"{manifest_path}: sha256 differs from the one its pointer recorded")
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise VerificationError(f"{manifest_path}: not JSON ({e})") from None
    try:
        mf.validate_manifest(manifest)
    except PublicationError as e:
        raise VerificationError(f"{manifest_path}: {e}") from None
    if pointer is not None and (manifest["version"], manifest["release"]) != (pointer.version, pointer.release):
        raise VerificationError(f"{manifest_path}: describes {manifest['version']}/{manifest['release']}, "
                                f"its pointer names {pointer.path}")
    listed = manifest["files"]
    missing = sorted(data_files(manifest) - set(listed))
    if missing:
        raise VerificationError(f"{manifest_path}: {missing[0]} is used but has no checksum in 'files'")
    present = {storage.relative(p, release_dir) for p in storage.list_files(release_dir)}
    total = 0
    for rel in sorted(listed):
        path = storage.join(release_dir, rel)
        want = listed[rel]
        if rel not in present:
            raise VerificationError(f"{path}: missing")
        if checksums:
            size, sha = storage.checksum(path)
            if (size, sha) != (want["size"], want["sha256"]):
                raise VerificationError(f"{path}: content differs from the manifest "
                                        f"({size} bytes, sha256 {sha[:12]}...; expected {want['size']} bytes, "
                                        f"sha256 {want['sha256'][:12]}...)")
        elif storage.size(path) != want["size"]:
            raise VerificationError(f"{path}: size differs from the manifest")
        total += want["size"]
    extra = sorted(present - set(listed) - {layout.MANIFEST_FILE})
    if extra:
        raise VerificationError(f"{storage.join(release_dir, extra[0])}: not listed in the manifest")
    for shard in manifest["shards"]:
        for key in ("id_map", "embeddings"):
            rows = storage.parquet_rows(storage.join(release_dir, shard[key]))
            if rows != shard["count"]:
                raise VerificationError(f"{storage.join(release_dir, shard[key])}: {rows} rows, "
                                        f"shard {shard['index']} holds {shard['count']}")
    for table in ("rejected", "degraded"):
        rows = sum(storage.parquet_rows(storage.join(release_dir, p)) for p in manifest["tables"][table])
        if rows != manifest["counts"][table]:
            raise VerificationError(f"{release_dir}: {table} table holds {rows} rows, "
                                    f"the manifest counts {manifest['counts'][table]}")
    return Verified(pointer, release_dir, manifest, len(listed) + 1, total + len(raw))


