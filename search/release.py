"""Reading a published release from a root: pointers, copies of remote releases, verification, shards.

A local root is read in place. A ``gs://`` root (any TensorFlow filesystem) is
first copied to a local cache (``cache_dir/<version>/<release>/``), which is
what gets verified and memory-mapped: the library never trusts bytes it has
not checked against the manifest, and never maps a file on a network mount.
"""

import json
import logging
import os
import shutil
import uuid
from typing import NamedTuple, Optional

import pyarrow.parquet as pq

from schemas import embeddings as emb
from schemas import layout
from schemas.errors import VerificationError, brief
from schemas.verification import LocalStorage, verify_release
from search.ann import ShardSet

_log = logging.getLogger(__name__)


class Release(NamedTuple):
    """A verified release on local disk, its shards loaded."""

    pointer: layout.Pointer
    release_dir: str
    manifest: dict
    shards: ShardSet


def _is_remote(root: str) -> bool:
    return "://" in layout.local_path(root)


def _local(root: str) -> str:
    return layout.local_path(root)


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if _is_remote(root) else os.path.join(_local(root), *parts)


def _remote_fs():
    """The object-store reader: tensorflow.io.gfile (gs:// and every other TF filesystem)."""
    import tensorflow as tf

    return tf.io.gfile


def _read(path: str) -> Optional[bytes]:
    """The bytes of a small file (a pointer, a manifest), or None when it does not exist."""
    if _is_remote(path):
        fs = _remote_fs()
        if not fs.exists(path):
            return None
        with fs.GFile(path, "rb") as f:
            return f.read()
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_pointer(root: str, version: Optional[str] = None) -> layout.Pointer:
    """The pointer LATEST (or ``<version>/CURRENT``) holds; VerificationError when absent or malformed."""
    path = _join(root, *layout.pointer_file(version).split("/"))
    data = _read(path)
    if data is None:
        what = f"version {version!r} is not published" if version else "nothing is published there"
        raise VerificationError(f"{path}: missing ({what})")
    return layout.Pointer.loads(data, where=path)


def _safe_relpath(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and ".." not in parts and "" not in parts and "\\" not in rel


def _copy_release(remote_dir: str, dest: str) -> None:
    """Copies the manifest and every file it lists to ``dest`` (a temp folder renamed into place)."""
    fs = _remote_fs()
    raw = _read(_join(remote_dir, layout.MANIFEST_FILE))
    if raw is None:
        raise VerificationError(f"{_join(remote_dir, layout.MANIFEST_FILE)}: missing or unreadable")
    try:
        listed = json.loads(raw)["files"]
        names = sorted(listed)
    except (ValueError, KeyError, TypeError) as e:
        raise VerificationError(f"{_join(remote_dir, layout.MANIFEST_FILE)}: not a manifest ({brief(e)})") from None
    bad = [n for n in names if not isinstance(n, str) or not _safe_relpath(n)]
    if bad:
        raise VerificationError(f"{_join(remote_dir, layout.MANIFEST_FILE)}: lists an unsafe path {bad[0]!r}")
    tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        with open(os.path.join(tmp, layout.MANIFEST_FILE), "wb") as f:
            f.write(raw)
        for rel in names:
            target = os.path.join(tmp, *rel.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                fs.copy(_join(remote_dir, rel), target, overwrite=True)
            except Exception as e:
                raise VerificationError(f"{_join(remote_dir, rel)}: cannot be copied ({brief(e)})") from None
        try:
            os.rename(tmp, dest)
        except OSError:
            if not os.path.isdir(dest):  # another process put the same release there first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verified_release(root: str, pointer: layout.Pointer, cache_dir: Optional[str]):
    """(release folder on local disk, verified manifest); raises VerificationError naming the bad file."""
    if not _is_remote(root):
        release_dir = os.path.join(_local(root), pointer.version, pointer.release)
        return release_dir, verify_release(release_dir, pointer, storage=LocalStorage).manifest
    dest = os.path.join(cache_dir or layout.user_cache_dir("releases"), pointer.version, pointer.release)
    remote_dir = _join(root, pointer.version, pointer.release)
    if os.path.isdir(dest):
        try:
            return dest, verify_release(dest, pointer, storage=LocalStorage).manifest
        except VerificationError as e:  # a damaged cached copy: fetch it again
            _log.warning("cached copy of %s fails verification (%s); copying it again", pointer.path, e)
            shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    _copy_release(remote_dir, dest)
    try:
        return dest, verify_release(dest, pointer, storage=LocalStorage).manifest
    except VerificationError as e:
        shutil.rmtree(dest, ignore_errors=True)  # never leave an unverified copy to be trusted later
        # Name the object in the store, not only the cached copy.
        raise VerificationError(str(e).replace(dest, remote_dir)) from None


def _load_shards(release_dir: str, manifest: dict) -> ShardSet:
    shards = sorted(manifest["shards"], key=lambda s: s["index"])
    paths, id_maps, titles = [], [], []
    for shard in shards:
        id_path = os.path.join(release_dir, shard["id_map"])
        table = pq.read_table(id_path, columns=[emb.ANNOY_ID, emb.ITEM_ID])
        if table.column(emb.ANNOY_ID).to_pylist() != list(range(table.num_rows)):
            raise VerificationError(f"{id_path}: annoy ids are not 0..{table.num_rows - 1} in order")
        ids = table.column(emb.ITEM_ID).to_pylist()
        emb_path = os.path.join(release_dir, shard["embeddings"])
        part = pq.read_table(emb_path, columns=[emb.ITEM_ID, emb.TITLE, emb.ANNOY_ID])
        by_annoy = [None] * len(ids)
        for item_id, title, annoy_id in zip(part.column(emb.ITEM_ID).to_pylist(), part.column(emb.TITLE).to_pylist(),
                                            part.column(emb.ANNOY_ID).to_pylist()):
            if not 0 <= annoy_id < len(ids) or ids[annoy_id] != item_id:
                raise VerificationError(f"{emb_path}: item {item_id!r} at annoy id {annoy_id} disagrees with the id map")
            by_annoy[annoy_id] = title
        paths.append(os.path.join(release_dir, shard["path"]))
        id_maps.append(ids)
        titles.append(by_annoy)
    try:
        return ShardSet(paths, int(manifest["dimension"]), id_maps, titles)
    except (OSError, ValueError) as e:
        raise VerificationError(f"{release_dir}: shards cannot be loaded ({brief(e)})") from None


def open_release(root: str, pointer: layout.Pointer, cache_dir: Optional[str] = None) -> Release:
    """The release ``pointer`` names under ``root``, verified and with its shards loaded."""
    release_dir, manifest = verified_release(root, pointer, cache_dir)
    return Release(pointer, release_dir, manifest, _load_shards(release_dir, manifest))
