"""A stand-in for GCS behind Beam's FileSystem interface (scheme ``fakegs://``).

Objects live under a local root, but the pipeline only ever sees ``fakegs://``
paths, so any code that bypasses FileSystems (``open``, ``os.path``) fails.
Like GCS it has no directories: ``mkdirs`` does nothing and renames create
parents implicitly.
"""

import glob
import os
import posixpath
import shutil

from apache_beam.io.filesystem import FileMetadata, MatchResult
from apache_beam.io.localfilesystem import LocalFileSystem

SCHEME = "fakegs"
PREFIX = SCHEME + "://"


class FakeGcsFileSystem(LocalFileSystem):
    root = None  # set by the test fixture

    @classmethod
    def scheme(cls):
        return SCHEME

    def _local(self, path):
        assert path.startswith(PREFIX), path
        return os.path.join(self.root, path[len(PREFIX):])

    def _remote(self, local):
        return PREFIX + os.path.relpath(local, self.root)

    def has_dirs(self):
        return False

    def join(self, basepath, *paths):
        return posixpath.join(basepath, *paths)

    def split(self, path):
        return posixpath.split(path)

    def mkdirs(self, path):
        pass

    def match(self, patterns, limits=None):
        # Object-store semantics: a glob over object names; "dir/**" lists every object below dir/.
        results = []
        for pattern in patterns:
            found = sorted(p for p in glob.glob(self._local(pattern), recursive=True) if os.path.isfile(p))
            results.append(MatchResult(pattern, [
                FileMetadata(self._remote(p), os.path.getsize(p), os.path.getmtime(p)) for p in found]))
        return results

    def create(self, path, *args, **kwargs):
        return super().create(self._local(path), *args, **kwargs)

    def open(self, path, *args, **kwargs):
        return super().open(self._local(path), *args, **kwargs)

    # The rest is implemented here rather than delegated: LocalFileSystem calls
    # its own match() with local paths internally.
    def copy(self, sources, destinations):
        for src, dst in zip(sources, destinations):
            os.makedirs(os.path.dirname(self._local(dst)), exist_ok=True)
            shutil.copyfile(self._local(src), self._local(dst))

    def rename(self, sources, destinations):
        for src, dst in zip(sources, destinations):
            os.makedirs(os.path.dirname(self._local(dst)), exist_ok=True)
            os.rename(self._local(src), self._local(dst))

    def exists(self, path):
        return os.path.isfile(self._local(path))  # objects only: a "directory" prefix does not exist

    def size(self, path):
        return os.path.getsize(self._local(path))

    def last_updated(self, path):
        return os.path.getmtime(self._local(path))

    def checksum(self, path):
        return str(os.path.getsize(self._local(path)))

    def metadata(self, path):
        local = self._local(path)
        return FileMetadata(path, os.path.getsize(local), os.path.getmtime(local))

    def delete(self, paths):
        for path in paths:
            local = self._local(path)
            if os.path.isdir(local):
                shutil.rmtree(local)
            elif os.path.exists(local):
                os.remove(local)


# --------------------------------------------------------------------------- generation preconditions
# gcp-storage-emulator ignores if_generation_match, so compare-and-swap (pipelines/cas.py's
# GcsCasStore) is tested against this stand-in of google-cloud-storage's Client/Bucket/Blob,
# which keeps its objects in the same local root as FakeGcsFileSystem and enforces generations.

import threading  # noqa: E402

from google.api_core import exceptions as gexc  # noqa: E402


class FakeBlob:
    _lock = threading.Lock()

    def __init__(self, root, bucket, name):
        self._local = os.path.join(root, bucket, name)
        self.name = name
        self.generation = None

    def _generation(self):
        st = os.stat(self._local)
        return (st.st_ino << 32) ^ st.st_mtime_ns ^ (st.st_size << 8) or 1

    def reload(self):
        with self._lock:
            if not os.path.isfile(self._local):
                raise gexc.NotFound(self.name)
            self.generation = self._generation()

    def _check(self, if_generation_match):
        exists = os.path.isfile(self._local)
        if if_generation_match is None:
            return
        if if_generation_match == 0 and exists:
            raise gexc.PreconditionFailed(f"{self.name} exists")
        if if_generation_match != 0 and (not exists or self._generation() != if_generation_match):
            raise gexc.PreconditionFailed(f"{self.name} changed")

    def download_as_bytes(self, if_generation_match=None):
        with self._lock:
            if not os.path.isfile(self._local):
                raise gexc.NotFound(self.name)
            self._check(if_generation_match)
            with open(self._local, "rb") as f:
                return f.read()

    def upload_from_string(self, data, content_type=None, if_generation_match=None):
        with self._lock:
            self._check(if_generation_match)
            os.makedirs(os.path.dirname(self._local), exist_ok=True)
            tmp = f"{self._local}.upload-{threading.get_ident()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self._local)

    def delete(self, if_generation_match=None):
        with self._lock:
            if not os.path.isfile(self._local):
                raise gexc.NotFound(self.name)
            self._check(if_generation_match)
            os.remove(self._local)


class FakeBucket:
    def __init__(self, root, name):
        self._root, self.name = root, name

    def blob(self, name):
        return FakeBlob(self._root, self.name, name)


class FakeStorageClient:
    """Enough of google.cloud.storage.Client for GcsCasStore, with real generation preconditions."""

    def __init__(self, root=None):
        self._root = root

    def bucket(self, name):
        return FakeBucket(self._root or FakeGcsFileSystem.root, name)
