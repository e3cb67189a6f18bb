"""A stand-in for GCS behind Beam's FileSystem interface (scheme ``fakegs://``).

Objects live under a local root, but the pipeline only ever sees ``fakegs://``
paths, so any code that bypasses FileSystems (``open``, ``os.path``) fails.
Like GCS it has no directories: ``mkdirs`` does nothing and renames create
parents implicitly.
"""

import os
import posixpath

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
        results = super().match([self._local(p) for p in patterns], limits)
        return [MatchResult(p, [FileMetadata(self._remote(m.path), m.size_in_bytes, m.last_updated_in_seconds)
                                for m in r.metadata_list if os.path.isfile(m.path)])
                for p, r in zip(patterns, results)]

    def create(self, path, *args, **kwargs):
        return super().create(self._local(path), *args, **kwargs)

    def open(self, path, *args, **kwargs):
        return super().open(self._local(path), *args, **kwargs)

    def copy(self, sources, destinations):
        return super().copy([self._local(s) for s in sources], [self._local(d) for d in destinations])

    def rename(self, sources, destinations):
        for d in destinations:
            os.makedirs(os.path.dirname(self._local(d)), exist_ok=True)
        return super().rename([self._local(s) for s in sources], [self._local(d) for d in destinations])

    def exists(self, path):
        return os.path.isfile(self._local(path))  # objects only: a "directory" prefix does not exist

    def size(self, path):
        return super().size(self._local(path))

    def last_updated(self, path):
        return super().last_updated(self._local(path))

    def checksum(self, path):
        return super().checksum(self._local(path))

    def metadata(self, path):
        m = super().metadata(self._local(path))
        return FileMetadata(path, m.size_in_bytes, m.last_updated_in_seconds)

    def delete(self, paths):
        local = [self._local(p) for p in paths]
        return super().delete([p for p in local if os.path.exists(p)])
