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
