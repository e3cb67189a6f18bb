"""Following LATEST while serving: open and verify the new release, swap, then close the old one."""

import logging
import threading
from contextlib import contextmanager
from typing import Optional

from schemas.errors import CatalogIndexError
from search.index import Searcher, open_index
from search.release import open_release, read_pointer

_log = logging.getLogger(__name__)


class Watcher:
    """Keeps the release LATEST (or ``version``'s CURRENT) names open, swapping when it moves.

    ``current()`` is the searcher to use now; ``search(...)`` and ``with watcher.acquire() as s:``
    hold a reference so a swap never closes a searcher under a query. A replaced searcher is closed
    once its in-flight queries are done and ``grace_seconds`` have passed (covering a caller that
    took ``current()`` just before the swap and has not started its query yet).
    """

    def __init__(self, root: str, cache_dir: Optional[str] = None, poll_seconds: float = 30.0,
                 version: Optional[str] = None, *, grace_seconds: float = 5.0):
        self.root, self.cache_dir, self.poll_seconds, self.version = root, cache_dir, poll_seconds, version
        self.grace_seconds = grace_seconds
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._current = open_index(root, version, cache_dir)
        self._refused = set()
        self._retiring = []
        self._stop = threading.Event()
        self._thread = None

    def current(self) -> Searcher:
        with self._lock:
            return self._current

    @contextmanager
    def acquire(self):
        """The current searcher, held (not closed by a swap) until the block ends."""
        with self._lock:
            searcher = self._current
            searcher.acquire()
        try:
            yield searcher
        finally:
            searcher.release_ref()

    def search(self, *args, **kwargs) -> list:
        with self.acquire() as searcher:
            return searcher.search(*args, **kwargs)

    def check_now(self) -> bool:
        """Swaps to the release the pointer names now, if it is another one; returns whether it swapped."""
        with self._check_lock:
            try:
                pointer = read_pointer(self.root, self.version)
            except CatalogIndexError as e:
                _log.warning("keeping %s/%s: %s", self._current.version, self._current.release, e)
                return False
            old = self.current()
            if (pointer.version, pointer.release) == (old.version, old.release):
                return False
            key = (pointer.version, pointer.release, pointer.manifest_sha256)
            if key in self._refused:
                return False
            try:
                new = Searcher.from_release(open_release(self.root, pointer, self.cache_dir))
            except CatalogIndexError as e:
                self._refused.add(key)
                _log.warning("refused %s (keeping %s/%s): %s", pointer.path, old.version, old.release, e)
                return False
            if old._embedder is not None:  # warm: the first query after the swap should not load models
                try:
                    new.embedder()
                except CatalogIndexError as e:
                    self._refused.add(key)
                    new.close()
                    _log.warning("refused %s (keeping %s/%s): %s", pointer.path, old.version, old.release, e)
                    return False
            with self._lock:
                self._current = new
            _log.info("now serving %s (was %s/%s)", pointer.path, old.version, old.release)
            self._retire(old)
            return True

    def _retire(self, old: Searcher) -> None:
        def close_later():
            self._stop.wait(self.grace_seconds)
            old.close()  # waits for the queries in flight on it

        thread = threading.Thread(target=close_later, name=f"retire-{old.release}", daemon=True)
        self._retiring = [t for t in self._retiring if t.is_alive()] + [thread]
        thread.start()

    def _poll(self):
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check_now()
            except Exception:  # pragma: no cover - keep polling whatever one check does
                _log.exception("index check failed; keeping the current release")

    def start(self) -> "Watcher":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name="index-watcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stops polling (the current searcher stays open; ``close`` closes it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        for thread in self._retiring:
            thread.join()
        self.current().close()
