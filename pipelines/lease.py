"""One publisher per output root: a lease with an owner and an expiry, in ``OUTPUT/_lease.json``.

A run takes the lease before any work, renews it from a heartbeat thread while
it runs, and gives it back at the end. A second run fails at once with a line
naming the holder. A holder that crashed does not block for ever: its lease
expires (``--lease-seconds``), and on the holder's own host a lease whose
process is gone is taken over at once. Correctness does not rest on the lease
alone: every pointer change is still a compare-and-swap (pipelines/cas.py).
"""

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
from typing import Optional

from schemas.errors import LeaseHeldError
from pipelines import cas
from schemas import layout

_log = logging.getLogger(__name__)

DEFAULT_SECONDS = 300


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict) -> str:
    return (f"run {holder.get('owner')} ({holder.get('command', '?')} of version {holder.get('version', '?')}, "
            f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('acquired_at')}, "
            f"lease expires {holder.get('expires_at')})")


class Lease:
    """The publication lease of one output root, held by ``owner`` (a run id)."""

    def __init__(self, output: str, owner: str, version: str = "", command: str = "index",
                 seconds: int = DEFAULT_SECONDS):
        self.path = output.rstrip("/") + "/" + layout.LEASE_FILE
        self.owner = owner
        self.version = version
        self.command = command
        self.seconds = seconds
        self._store = cas.store_for(self.path)
        self._token = cas.ABSENT
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _body(self) -> bytes:
        now = _now()
        return json.dumps({
            "owner": self.owner, "command": self.command, "version": self.version,
            "host": socket.gethostname(), "pid": os.getpid(),
            "acquired_at": layout.format_time(now),
            "expires_at": layout.format_time(now + datetime.timedelta(seconds=self.seconds)),
        }, sort_keys=True).encode()

    @staticmethod
    def _parse(data: bytes) -> dict:
        try:
            holder = json.loads(data.decode())
            return holder if isinstance(holder, dict) else {}
        except ValueError:
            return {}

    def _stale(self, holder: dict) -> Optional[str]:
        """Why a lease held by someone else may be taken over, or None."""
        try:
            expires = layout.parse_time(holder["expires_at"], "lease")
        except (KeyError, Exception):  # unreadable lease: treat as abandoned
            return "the lease file is unreadable"
        if expires <= _now():
            return f"it expired at {holder['expires_at']}"
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                and holder["pid"] != os.getpid() and not _pid_alive(holder["pid"]):
            return f"its process {holder['pid']} on this host is gone"
        return None

    def _held_elsewhere(self, holder: dict) -> LeaseHeldError:
        return LeaseHeldError(f"another run is publishing to {self.path.rsplit('/', 1)[0]}: {describe(holder)}; "
                              f"wait for it to finish, or if it is dead, for the lease to expire")

    def check_free(self) -> None:
        """LeaseHeldError when another live run holds the lease; takes nothing (a job that only gets
        submitted from here takes the lease later, in its own publication step)."""
        data, _ = self._store.read(self.path)
        if data is not None:
            holder = self._parse(data)
            if holder.get("owner") != self.owner and self._stale(holder) is None:
                raise self._held_elsewhere(holder)

    def acquire(self) -> "Lease":
        """Takes the lease or raises LeaseHeldError naming the holder."""
        for _ in range(10):
            data, token = self._store.read(self.path)
            if data is not None:
                holder = self._parse(data)
                if holder.get("owner") != self.owner:
                    why = self._stale(holder)
                    if why is None:
                        raise self._held_elsewhere(holder)
                    _log.warning("taking over the publication lease of %s: %s", describe(holder), why)
            if self._store.write_if(self.path, self._body(), token):
                self._token = self._store.read(self.path)[1]
                return self
        raise LeaseHeldError(f"could not take the lease {self.path}: it keeps changing under us")

    def holds(self) -> bool:
        """Whether the lease is still ours (read fresh), renewing our token."""
        data, token = self._store.read(self.path)
        if data is None or self._parse(data).get("owner") != self.owner:
            return False
        self._token = token
        return True

    def ensure(self) -> None:
        """Ours, or taken (again) if free or stale; else LeaseHeldError. Used right before a pointer moves."""
        if not self.holds():
            self.acquire()

    def renew(self) -> bool:
        if not self.holds():
            return False
        ok = self._store.write_if(self.path, self._body(), self._token)
        if ok:
            self._token = self._store.read(self.path)[1]
        return ok

    @contextlib.contextmanager
    def held(self):
        """The lease for one short step (a publication step on a worker): taken if it is not ours already,
        and given back afterwards only if taken here. When the launching process holds it (local runners),
        this changes nothing; when the launcher only submitted the job (a Flex Template launch), the job
        holds the lease just while its pointers move."""
        taken = not self.holds()
        if taken:
            self.acquire()
        try:
            yield self
        finally:
            if taken:
                self.release()

    def start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(max(1.0, self.seconds / 3)):
                try:
                    if not self.renew():
                        _log.error("lost the publication lease %s to another run", self.path)
                        return
                except Exception as e:  # a flaky store must not kill the run; publication re-checks
                    _log.warning("could not renew the lease %s: %s", self.path, e)

        self._thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        data, token = self._store.read(self.path)
        if data is not None and self._parse(data).get("owner") == self.owner:
            self._store.delete_if(self.path, token)
