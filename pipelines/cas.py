"""Compare-and-swap on small files (pointers, the lease), for local disks and object stores.

``FileSystems`` can write a file but cannot say "only if it is still what I
read": two publishers would silently overwrite each other's pointer. A
``CasStore`` can:

- local paths: an exclusive ``flock`` on a lock file beside the target
  serialises writers; the write itself is a temp file renamed over the target,
  so readers (who take no lock) see the old content or the new. Tokens are the
  content's sha256. (flock is per host: not for NFS shared between machines.)
- ``gs://``: generation preconditions (``if_generation_match``); token is the
  object's generation, 0 meaning "must not exist yet".

Other schemes can register a store (tests register one for their fake object store).
"""

import fcntl
import hashlib
import os
import threading
import uuid
from typing import Callable, Dict, Optional, Tuple

from schemas import layout
from schemas.errors import ConfigError

ABSENT = None  # the token of a file that does not exist


class CasStore:
    """read() -> (bytes or None, token); write_if / delete_if succeed only if the token still holds."""

    def read(self, path: str) -> Tuple[Optional[bytes], object]:
        raise NotImplementedError

    def write_if(self, path: str, data: bytes, token) -> bool:
        raise NotImplementedError

    def delete_if(self, path: str, token) -> bool:
        raise NotImplementedError


class LocalCasStore(CasStore):
    @staticmethod
    def _local(path: str) -> str:
        return layout.local_path(path)

    def _lock(self, path: str):
        local = self._local(path)
        directory, name = os.path.split(local)
        os.makedirs(directory or ".", exist_ok=True)
        # Opened without following a planted symlink and without truncating anything.
        fd = os.open(os.path.join(directory, f".{name}.lock"),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    @staticmethod
    def _unlock(fd):
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _read_unlocked(self, path):
        try:
            with open(self._local(path), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, ABSENT
        return data, hashlib.sha256(data).hexdigest()

    def read(self, path):
        return self._read_unlocked(path)

    def write_if(self, path, data, token):
        fd = self._lock(path)
        try:
            if self._read_unlocked(path)[1] != token:
                return False
            local = self._local(path)
            tmp = f"{local}.tmp-{uuid.uuid4().hex}"  # unique per writer: nobody deletes another's temp file
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, local)
            return True
        finally:
            self._unlock(fd)

    def delete_if(self, path, token):
        fd = self._lock(path)
        try:
            if token is ABSENT or self._read_unlocked(path)[1] != token:
                return False
            os.remove(self._local(path))
            return True
        finally:
            self._unlock(fd)


class GcsCasStore(CasStore):
    """Generation preconditions through google-cloud-storage (honours STORAGE_EMULATOR_HOST)."""

    def __init__(self, client=None, scheme: str = "gs"):
        self._client = client
        self._prefix = scheme + "://"
        self._lock = threading.Lock()

    def _blob(self, path: str):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from google.cloud import storage

                    self._client = storage.Client()
        bucket, _, name = path[len(self._prefix):].partition("/")
        if not bucket or not name:
            raise ConfigError(f"{path!r} is not an object path like {self._prefix}BUCKET/NAME")
        return self._client.bucket(bucket).blob(name)

    def read(self, path):
        from google.api_core import exceptions

        blob = self._blob(path)
        try:
            blob.reload()
            generation = blob.generation
            return blob.download_as_bytes(if_generation_match=generation), generation
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            # Gone, or replaced between the two calls: read again (the caller's CAS decides anyway).
            try:
                blob.reload()
            except exceptions.NotFound:
                return None, ABSENT
            return self.read(path)

    def write_if(self, path, data, token):
        from google.api_core import exceptions

        try:
            self._blob(path).upload_from_string(data, content_type="application/json",
                                                if_generation_match=0 if token is ABSENT else token)
            return True
        except exceptions.PreconditionFailed:
            return False

    def delete_if(self, path, token):
        from google.api_core import exceptions

        if token is ABSENT:
            return False
        try:
            self._blob(path).delete(if_generation_match=token)
            return True
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            return False


_FACTORIES: Dict[str, Callable[[], CasStore]] = {"gs": GcsCasStore}
_STORES: Dict[str, CasStore] = {}


def register(scheme: str, factory: Callable[[], CasStore]) -> None:
    """Makes ``scheme://`` paths use ``factory()``'s store (e.g. a fake object store in tests)."""
    _FACTORIES[scheme] = factory
    _STORES.pop(scheme, None)


def store_for(path: str) -> CasStore:
    scheme = path.split("://", 1)[0] if "://" in path else ""
    if scheme in ("", "file"):
        scheme = ""
        factory = LocalCasStore
    elif scheme in _FACTORIES:
        factory = _FACTORIES[scheme]
    else:
        raise ConfigError(f"{path!r}: publishing to {scheme}:// is not supported (no compare-and-swap for it); "
                          f"use a local path or gs://")
    if scheme not in _STORES:
        _STORES[scheme] = factory()
    return _STORES[scheme]
