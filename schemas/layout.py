"""The published layout: where a version's files live and what the pointers say.

One place owns these rules; the publisher, ``verify``, ``gc`` and readers use
them. No Beam and no I/O here, so a search service can import it alone.

    OUTPUT/
      LATEST                       pointer (JSON) to the newest release, by snapshot time
      _lease.json                  the publisher's lease (one publisher per output root)
      <version>/
        CURRENT                    pointer (JSON) to this version's live release
        <release>/                 immutable once CURRENT or LATEST names it
          manifest.json            written last; lists size and sha256 of every file
          shards/shard-NNNNN-of-NNNNN.ann, .ids.parquet   (shard_paths; items by stable_shard)
        embeddings/part-NNNNN-of-NNNNN.parquet, rejected/, degraded/

A run writes its files straight into a new release folder that nothing names
yet, writes the manifest last, then switches ``<version>/CURRENT`` and
``LATEST`` by compare-and-swap. Nothing is renamed (object stores cannot
rename atomically) and nothing a pointer names is ever modified: ``--force``
publishes another release of the same version and switches the pointers to it.
"""

import datetime
import hashlib
import json
import os
import re
import uuid
from typing import NamedTuple, Optional

from schemas.errors import ConfigError, VerificationError

TOOL = "catalog-index"
TOOL_VERSION = "0.1.0"  # the manifest's "tool"; catalog_index.__version__ repeats it for the application
METRIC = "angular"  # Annoy's metric for every shard: cosine distance on L2-normalised vectors

LATEST_FILE = "LATEST"
CURRENT_FILE = "CURRENT"
LEASE_FILE = "_lease.json"
MANIFEST_FILE = "manifest.json"
POINTER_FORMAT = 1

# Whole-name match (re.fullmatch): "v2\n" is not a version name.
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RESERVED_NAMES = frozenset({LATEST_FILE})
_RELEASE_RE = re.compile(r"r\d{8}T\d{6}Z-[0-9a-f]{8}")


def check_version_name(name: str) -> str:
    """Returns ``name`` or raises ConfigError: letters, digits, '.', '_', '-', not reserved."""
    if not isinstance(name, str) or not _VERSION_RE.fullmatch(name):
        raise ConfigError(f"--version {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a "
                          f"letter or digit (names starting with '_' or '.' are reserved)")
    if name.upper() in RESERVED_NAMES:
        raise ConfigError(f"--version {name!r} is reserved (it is the pointer file); pick another name")
    return name


def is_version_name(name: str) -> bool:
    try:
        check_version_name(name)
    except ConfigError:
        return False
    return True


def new_release_id(now: Optional[datetime.datetime] = None) -> str:
    """A unique, time-sortable release folder name: r20261129T112233Z-1a2b3c4d."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"r{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"


def is_release_id(name: str) -> bool:
    return bool(_RELEASE_RE.fullmatch(name))


def pointer_file(version: Optional[str] = None) -> str:
    """The pointer a reader follows, relative to the output root: LATEST, or ``<version>/CURRENT``."""
    return LATEST_FILE if version is None else f"{check_version_name(version)}/{CURRENT_FILE}"


def release_path(version: str, release: str) -> str:
    """Path of a release folder relative to the output root."""
    return f"{version}/{release}"


# --------------------------------------------------------------------------- files of a release


def stable_shard(item_id: str, num_shards: int) -> int:
    """First 8 bytes of sha256(item_id), big-endian, modulo num_shards.

    Stable across processes, machines and Python versions (unlike hash()), so
    an item lands in the same shard in every run with the same shard count.
    """
    value = int.from_bytes(hashlib.sha256(item_id.encode("utf-8")).digest()[:8], "big")
    return value % num_shards


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}"


def shard_paths(index: int, num_shards: int) -> dict:
    """Paths of one shard's files, relative to the release folder."""
    name = shard_name(index, num_shards)
    return {
        "path": f"shards/{name}.ann",
        "id_map": f"shards/{name}.ids.parquet",
        "embeddings": f"embeddings/part-{index:05d}-of-{num_shards:05d}.parquet",
    }



# --------------------------------------------------------------------------- snapshot times


FILE_SCHEME = "file://"


def local_path(path):
    """``file://X`` -> ``X`` (the scheme in any case, no percent-decoding: "file:///a/b.jpg" is "/a/b.jpg",
    as Beam users expect); anything else unchanged (None stays None). The one rule for ``file://``."""
    if isinstance(path, str) and path[:len(FILE_SCHEME)].lower() == FILE_SCHEME:
        return path[len(FILE_SCHEME):]
    return path


def user_cache_dir(*parts: str) -> str:
    """The tool's local cache on this machine ($XDG_CACHE_HOME or ~/.cache, then catalog-index/...):
    built-in models under ``models``, local copies of remote releases under ``releases``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "catalog-index", *parts)


def format_time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str, flag: str = "--snapshot-time") -> datetime.datetime:
    """ISO 8601 date or date-time; a time without an offset is UTC. Returns an aware UTC datetime."""
    try:
        value = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        raise ConfigError(f"{flag} {text!r} is not an ISO 8601 time like 2026-11-28T07:00:00Z") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value.astimezone(datetime.timezone.utc)


def date_snapshot(date: str) -> str:
    """The snapshot of a backfilled date: its midnight, UTC."""
    return format_time(parse_time(date + "T00:00:00Z"))


# --------------------------------------------------------------------------- pointers


class Pointer(NamedTuple):
    """What LATEST and <version>/CURRENT hold: one release and the facts to check it by."""

    version: str
    release: str
    snapshot: str  # ISO UTC, from the manifest
    manifest_sha256: str

    @property
    def path(self) -> str:
        return release_path(self.version, self.release)

    @property
    def snapshot_time(self) -> datetime.datetime:
        return parse_time(self.snapshot, "snapshot")

    def dumps(self) -> bytes:
        body = {"format": POINTER_FORMAT, "version": self.version, "release": self.release, "path": self.path,
                "snapshot": self.snapshot, "manifest_sha256": self.manifest_sha256}
        return (json.dumps(body, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def loads(cls, data: bytes, where: str = "pointer") -> "Pointer":
        try:
            body = json.loads(data.decode("utf-8"))
            pointer = cls(body["version"], body["release"], body["snapshot"], body["manifest_sha256"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise VerificationError(f"{where} is not a catalog-index pointer ({type(e).__name__}); "
                                    f"it may be from an older layout: republish or repair it") from None
        if not (is_version_name(pointer.version) and is_release_id(pointer.release)
                and body.get("path") == pointer.path):
            raise VerificationError(f"{where} names an invalid release {body.get('path')!r}")
        pointer.snapshot_time  # noqa: B018 - raises on a bad time
        return pointer


def later(candidate: Pointer, current: Optional[Pointer]) -> bool:
    """Whether LATEST may move from ``current`` to ``candidate``.

    Only to a strictly later snapshot, or to another release of the version it
    already names (a --force replacement); never backwards.
    """
    if current is None:
        return True
    if candidate.version == current.version:
        return candidate.snapshot_time >= current.snapshot_time
    return candidate.snapshot_time > current.snapshot_time


# --------------------------------------------------------------------------- trained models (catalog-index train)
#
#   MODELS_DIR/
#     LATEST                 pointer (JSON) to the promoted version; moved by compare-and-swap
#     _lease.json            the trainer's lease
#     _work/<version>/       a remote run's preprocessing output (examples, rejected rows), removed by its fit step
#     <version>/             never rewritten once training.json is there
#       fusion/              the item tower: a fusion SavedModel (embedding/fusion.py's interface)
#       query/               the query tower: the same interface, for queries
#       evaluation.json, report.html, rejected/part-*.parquet
#       training.json        written last: options, data counts, encoders, size and sha256 of every file

MODELS_WORK_DIR = "_work"
MODELS_FUSION_DIR = "fusion"
MODELS_QUERY_DIR = "query"
TRAINING_FILE = "training.json"
EVALUATION_FILE = "evaluation.json"
REPORT_FILE = "report.html"
MODELS_POINTER_FORMAT = 1


class ModelsPointer(NamedTuple):
    """What MODELS_DIR/LATEST holds: the promoted models version and its training.json checksum."""

    version: str
    training_sha256: str

    def dumps(self) -> bytes:
        body = {"format": MODELS_POINTER_FORMAT, "version": self.version, "training_sha256": self.training_sha256}
        return (json.dumps(body, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def loads(cls, data: bytes, where: str = "models pointer") -> "ModelsPointer":
        try:
            body = json.loads(data.decode("utf-8"))
            pointer = cls(body["version"], body["training_sha256"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise VerificationError(f"{where} is not a catalog-index models pointer ({type(e).__name__})") from None
        if not is_version_name(pointer.version):
            raise VerificationError(f"{where} names an invalid models version {pointer.version!r}")
        return pointer


def new_models_version(now: Optional[datetime.datetime] = None) -> str:
    """A fresh models version name: m<UTC time>-<8 hex> (sorts by time, never collides)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"m{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"
