"""Publishing, verifying and collecting releases (the layout is in schemas/layout.py).

- ``verify_release`` checks one release against its manifest: schema and
  accounting, the size and sha256 of every file, row counts, no extra file. The
  publisher runs it before any pointer moves; ``catalog-index verify`` runs the same.
- ``switch_pointers`` moves ``<version>/CURRENT`` and then ``LATEST`` by
  compare-and-swap, under the output root's lease; LATEST only to a later snapshot.
- ``collect_garbage`` removes abandoned and replaced releases and old versions.
"""

import dataclasses
import datetime
import hashlib
import logging
import os
import signal
from typing import List, Optional, Tuple

import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from schemas.errors import PublicationError, VerificationError
from pipelines import cas
from pipelines import files
from schemas import layout
from schemas import verification

_log = logging.getLogger(__name__)

FAILPOINT_ENV = "CATALOG_INDEX_FAILPOINT"


def failpoint(name: str) -> None:
    """Test hook: SIGKILL this process at the named publication step ($CATALOG_INDEX_FAILPOINT).

    The fault-injection tests use it to kill a real run at an exact step; unset, it costs one dict lookup.
    """
    if os.environ.get(FAILPOINT_ENV) == name:
        _log.warning("failpoint %s: killing this process", name)
        os.kill(os.getpid(), signal.SIGKILL)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parquet_rows(path: str) -> int:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return pq.ParquetFile(f).metadata.num_rows


# --------------------------------------------------------------------------- reading pointers


def read_pointer(path: str) -> Tuple[Optional[layout.Pointer], object]:
    """(pointer or None, CAS token) of LATEST or a CURRENT file."""
    data, token = cas.store_for(path).read(path)
    if data is None:
        return None, token
    return layout.Pointer.loads(data, path), token


def _read_latest(latest_path: str) -> Tuple[Optional[layout.Pointer], object]:
    """read_pointer for a LATEST about to be replaced: an unreadable one counts as none (logged), with the
    CAS token of what is there, so the swap replaces exactly that."""
    try:
        return read_pointer(latest_path)
    except VerificationError as e:
        _log.warning("replacing an unreadable LATEST: %s", e)
        return None, cas.store_for(latest_path).read(latest_path)[1]


def resolve(output: str, version: Optional[str] = None) -> layout.Pointer:
    """The release a reader should load: LATEST's, or ``version``'s CURRENT."""
    output = output.rstrip("/")
    path = files.join(output, *layout.pointer_file(version).split("/"))
    pointer, _ = read_pointer(path)
    if pointer is None:
        what = f"version {version!r} is not published" if version else "nothing is published yet (no LATEST)"
        raise VerificationError(f"{output}: {what}")
    return pointer


# --------------------------------------------------------------------------- verification


class BeamStorage:
    """verification.Storage over Beam's FileSystems: local paths, gs:// and any registered scheme."""

    join = staticmethod(files.join)
    relative = staticmethod(files.relative)
    read_bytes = staticmethod(files.read_bytes)
    list_files = staticmethod(files.list_files)
    checksum = staticmethod(files.checksum)
    size = staticmethod(files.size)
    parquet_rows = staticmethod(_parquet_rows)


Verified = verification.Verified
data_files = verification.data_files


def verify_release(release_dir: str, pointer: Optional[layout.Pointer] = None, checksums: bool = True):
    """verification.verify_release through Beam's FileSystems (what the publisher and `verify` use)."""
    return verification.verify_release(release_dir, pointer, checksums, BeamStorage)


def verify(output: str, version: Optional[str] = None) -> Verified:
    pointer = resolve(output, version)
    return verify_release(files.join(output.rstrip("/"), pointer.path), pointer)


# --------------------------------------------------------------------------- switching pointers


@dataclasses.dataclass
class Outcome:
    """What the pointers say after a publication."""

    current: layout.Pointer  # the version's live release (ours, or an identical one already live)
    latest: Optional[layout.Pointer]
    switched_current: bool
    moved_latest: bool


def switch_pointers(output: str, candidate: layout.Pointer, force: bool, identical=None, lease=None) -> Outcome:
    """Points ``<version>/CURRENT`` and then LATEST at ``candidate``, each by compare-and-swap.

    CURRENT: set when absent; when it names another release, replaced only with
    ``force`` (or kept when ``identical(other_pointer)`` says the live release
    has the same content: an idempotent rerun). LATEST: moved only forward
    (layout.later). ``lease``, when given, is checked (and re-taken if it
    lapsed) right before the first pointer moves.
    """
    output = output.rstrip("/")
    if lease is not None:
        lease.ensure()
    current_path = files.join(output, candidate.version, layout.CURRENT_FILE)
    store = cas.store_for(current_path)
    switched = False
    for _ in range(20):
        live, token = read_pointer(current_path)
        if live == candidate:
            break
        if live is not None and not force:
            if identical is not None and identical(live):
                candidate = live
                break
            raise PublicationError(
                f"version {candidate.version!r} was published meanwhile ({live.path}) with other content; "
                f"rerun with --force to replace it")
        if store.write_if(current_path, candidate.dumps(), token):
            switched = True
            break
    else:
        raise PublicationError(f"{current_path} keeps changing; another publisher is running")
    failpoint("after_current")

    latest_path = files.join(output, layout.LATEST_FILE)
    moved = False
    for _ in range(20):
        latest, token = _read_latest(latest_path)
        if latest == candidate or not layout.later(candidate, latest):
            break
        if cas.store_for(latest_path).write_if(latest_path, candidate.dumps(), token):
            latest, moved = candidate, True
            break
    else:
        raise PublicationError(f"{latest_path} keeps changing; another publisher is running")
    failpoint("after_latest")
    return Outcome(candidate, latest, switched, moved)


# --------------------------------------------------------------------------- rolling back


@dataclasses.dataclass
class RollBack:
    """What `catalog-index rollback` did."""

    before: Optional[layout.Pointer]  # what LATEST named
    after: layout.Pointer  # what it names now: the version's live release
    checked: Verified  # that release, verified file by file before LATEST moved
    moved: bool  # False when LATEST already named it


def roll_back(output: str, version: str, lease=None) -> RollBack:
    """Points LATEST at ``version``'s live release (its CURRENT), the one deliberate backward move.

    The release is verified completely first (manifest, every file's size and sha256). LATEST is
    replaced by compare-and-swap against what was read, once: if it changed in between (a publisher
    outside the lease), nothing is written and the caller is told. ``lease`` (held by the caller, so
    no index run publishes meanwhile) is checked right before the swap. Publication still moves LATEST
    only forward, so the next run with a later snapshot replaces the rollback.
    """
    output = output.rstrip("/")
    checked = verify(output, version)
    target = checked.pointer
    latest_path = files.join(output, layout.LATEST_FILE)
    latest, token = _read_latest(latest_path)
    if latest == target:
        return RollBack(latest, target, checked, moved=False)
    if lease is not None:
        lease.ensure()
    if not cas.store_for(latest_path).write_if(latest_path, target.dumps(), token):
        now, _ = read_pointer(latest_path)
        raise PublicationError(
            f"{latest_path} changed while rolling back (it names {now.path if now else 'nothing'} now); "
            f"nothing was written: check what published it, then rerun")
    return RollBack(latest, target, checked, moved=True)


# --------------------------------------------------------------------------- garbage collection


@dataclasses.dataclass
class Removal:
    path: str  # a release folder or a version folder
    why: str


def _newest_mtime(paths: List[str]) -> Optional[float]:
    times = []
    for p in paths:
        try:
            times.append(FileSystems.last_updated(p))
        except Exception:
            pass
    return max(times) if times else None


def plan_garbage(output: str, keep: Optional[int], older_than_days: Optional[float], grace_minutes: float,
                 now: Optional[datetime.datetime] = None) -> List[Removal]:
    """What ``gc`` would remove. Never the release LATEST names, nor any version's CURRENT release
    unless the whole version goes (only versions beyond the ``keep`` newest by snapshot, and older than
    ``older_than_days`` when given)."""
    output = output.rstrip("/")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    latest, _ = read_pointer(files.join(output, layout.LATEST_FILE))
    by_version = {}
    for path in files.list_files(output):
        rel = files.relative(path, output)
        parts = rel.split("/")
        if len(parts) < 2 or not layout.is_version_name(parts[0]):
            continue
        by_version.setdefault(parts[0], []).append(parts[1:])
    removals, published = [], []
    # Staging folders of the layout before release folders (OUTPUT/_staging/<version>.<run id>/).
    legacy = files.join(output, "_staging")
    staged = files.list_files(legacy)
    newest = _newest_mtime(staged)
    if staged and (now.timestamp() - newest) / 60 >= grace_minutes:
        removals.append(Removal(legacy, "staging folder of an older layout, abandoned"))
    for version, entries in sorted(by_version.items()):
        current, _ = read_pointer(files.join(output, version, layout.CURRENT_FILE))
        if current is not None:
            published.append((current.snapshot_time, version, current))
        releases = {}
        for parts in entries:
            if len(parts) >= 2 and layout.is_release_id(parts[0]):
                releases.setdefault(parts[0], []).append(files.join(output, version, *parts))
        for release, paths in sorted(releases.items()):
            if (current is not None and release == current.release) or (
                    latest is not None and (version, release) == (latest.version, latest.release)):
                continue
            newest = _newest_mtime(paths)
            age_min = (now.timestamp() - newest) / 60 if newest is not None else float("inf")
            if age_min < grace_minutes:
                continue  # may be a run in progress, or a replaced release a reader still has open
            finished = any(p.endswith("/" + layout.MANIFEST_FILE) for p in paths)
            removals.append(Removal(files.join(output, version, release),
                                    "replaced or orphaned release" if finished else "abandoned (unfinished) release"))
    if keep is not None or older_than_days is not None:
        published.sort(reverse=True)
        protected = {v for _, v, _ in published[:keep or 0]}
        if latest is not None:
            protected.add(latest.version)
        for snapshot, version, _ in published:
            if version in protected:
                continue
            if older_than_days is not None and (now - snapshot).total_seconds() < older_than_days * 86400:
                continue
            removals = [r for r in removals if not r.path.startswith(files.join(output, version) + "/")]
            removals.append(Removal(files.join(output, version), f"old version (snapshot {layout.format_time(snapshot)})"))
    return removals


def remove(removal: Removal, output: str) -> None:
    """Deletes a release or a whole version; a version's CURRENT pointer goes first, so it stops
    being published before its files disappear."""
    rel = files.relative(removal.path, output.rstrip("/"))
    if "/" not in rel and layout.is_version_name(rel):
        current = files.join(removal.path, layout.CURRENT_FILE)
        if files.exists(current):
            FileSystems.delete([current])
    files.delete_tree(removal.path)
