"""Incremental runs: reusing a previous version's vectors for the items that did not change.

``resolve`` picks the source before the pipeline is built: ``--no-reuse`` none;
``--reuse-from DIR`` that version, release or output root, refused with
ConfigError when it cannot be used; by default the release LATEST names under
``--output``, skipped with one log line when it cannot be used. A source is used
only when it verifies (its manifest, then every file's size and sha256), its
embeddings table has the content keys (schemas/embeddings.py) and it was built
with the same vector settings (options.vector_identity: encoders, fusion,
dimension, the options in options.VECTOR_OPTIONS, preprocessing). It is used
whole or not at all.

``ReadPrevious`` reads the content keys of its embeddings table into
``(item_id, Previous)``: keys and the part that holds the row, never vectors, so
the join with the catalog moves a few short strings per item. The rules below
decide per item (pipelines/transforms.py applies them):

- text: reused when the sha256 of item_text equals the previous row's
  ``text_sha256`` for the same item_id;
- image: reused without a fetch when (image_uri, image_version) equal the
  previous row's and neither version is null; otherwise fetched, and reused
  without decoding or encoding when the bytes' sha256 equals ``image_sha256``.

Everything else is encoded as in a full run. An item whose every vector is
reused is *carried*: its row (fused vector included: same fusion) is copied from
the previous part straight into its new shard (``read_rows``), never fused again
nor moved through a shuffle. An item with one vector reused and the other encoded
gets the reused one from its part before fusion. The inputs digest does not depend
on reuse; the manifest's ``reuse`` says where vectors came from.
"""

import dataclasses
import logging
from typing import NamedTuple, Optional

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from schemas.errors import CatalogIndexError, ConfigError, brief
from pipelines import files
from pipelines import options as opt
from pipelines import publication as pub
from schemas import embeddings as emb
from schemas import layout

_log = logging.getLogger(__name__)

_KEY_COLUMNS = [emb.ITEM_ID, *emb.CONTENT_KEYS]


@dataclasses.dataclass(frozen=True)
class Source:
    """A verified previous release whose vectors this run may reuse."""

    version: str
    release: str
    release_dir: str
    embeddings: tuple  # full paths of its embeddings table's parts
    items: int
    # ((relative path, size, sha256), ...) of its query encoder's files when this tool version wrote it:
    # the publisher copies them instead of exporting the same model again (and checks parity either way).
    query_encoder: tuple = ()

    def to_json(self) -> dict:
        """The manifest's ``reuse.source``."""
        return {"version": self.version, "release": self.release}

    def describe(self) -> str:
        return f"{self.version}/{self.release}"


class Previous(NamedTuple):
    """One item's row of the previous embeddings table: its content keys and where the row is.

    A row has a text (image) vector exactly when its text_sha256 (image_sha256) is set
    (schemas/embeddings.py), so the vectors themselves are not read to know which it has."""

    text_sha256: Optional[str]
    image_sha256: Optional[str]
    image_uri: Optional[str]
    image_version: Optional[str]
    part: int  # position of its embeddings part in Source.embeddings

    @property
    def has_text(self) -> bool:
        return self.text_sha256 is not None

    @property
    def has_image(self) -> bool:
        return self.image_sha256 is not None


class Carried(NamedTuple):
    """An item whose every vector is reused: its previous row goes into its new shard as it is, with
    the catalog's current title, image_uri and image_version (equal content, maybe a new URI or version)."""

    item_id: str
    part: int
    title: Optional[str]
    image_uri: Optional[str]
    image_version: Optional[str]


# --------------------------------------------------------------------------- the rules


def text_unchanged(previous: Optional[Previous], text_sha256: str) -> bool:
    """The text the encoder would see is the one the previous text vector was computed from."""
    return previous is not None and previous.has_text and previous.text_sha256 == text_sha256


def image_unchanged_by_version(previous: Optional[Previous], image_uri: Optional[str],
                               image_version: Optional[str]) -> bool:
    """Same (image_uri, image_version), neither version null, and a previous image vector: no fetch at all."""
    return (previous is not None and previous.has_image and image_version is not None
            and previous.image_version == image_version and previous.image_uri == image_uri)


def image_unchanged_by_bytes(previous: Optional[Previous], image_sha256: str) -> bool:
    """The fetched bytes are the ones the previous image vector was computed from."""
    return previous is not None and previous.has_image and previous.image_sha256 == image_sha256


# --------------------------------------------------------------------------- choosing the source


class _Unusable(Exception):
    """Why a previous release cannot be reused (one line)."""


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def differences(previous, current, path: str = "") -> list:
    """'key: previous X, this run Y' for every leaf where two vector identities differ."""
    if isinstance(previous, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(previous) | set(current)):
            out.extend(differences(previous.get(key), current.get(key), f"{path}.{key}" if path else key))
        return out
    if previous == current:
        return []
    return [f"{path}: previous {_short(previous)}, this run {_short(current)}"]


def _locate(path: str) -> tuple:
    """(release folder, pointer or None) that --reuse-from names; ConfigError when it names none."""
    path = path.rstrip("/")
    try:
        if files.exists(files.join(path, layout.MANIFEST_FILE)):
            return path, None
        for name, base in ((layout.CURRENT_FILE, None), (layout.LATEST_FILE, path)):
            pointer_path = files.join(path, name)
            if files.exists(pointer_path):
                pointer, _ = pub.read_pointer(pointer_path)
                if pointer is None:
                    break
                return (files.join(path, pointer.release) if base is None else files.join(base, pointer.path)), pointer
    except CatalogIndexError as e:
        raise ConfigError(f"--reuse-from {path}: cannot read its pointer ({e})") from None
    raise ConfigError(f"--reuse-from {path}: neither a version folder (with {layout.CURRENT_FILE}), a release folder "
                      f"(with {layout.MANIFEST_FILE}) nor an output root (with {layout.LATEST_FILE})")


def _check(plan, release_dir: str, pointer) -> Source:
    """The Source for a release, or _Unusable saying why not. Cheap checks first, checksums last."""
    try:
        manifest = pub.verify_release(release_dir, pointer, checksums=False).manifest
        parts = tuple(files.join(release_dir, p) for p in manifest["tables"]["embeddings"])
        for part in parts:
            with FileSystems.open(part, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                names = pq.ParquetFile(f).schema_arrow.names
            missing = [c for c in emb.CONTENT_KEYS if c not in names]
            if missing:
                raise _Unusable(f"its embeddings table has no content keys ({', '.join(missing)}): "
                                f"it was written before incremental runs")
        previous = opt.vector_identity(manifest["encoders"], manifest["fusion"], manifest["dimension"],
                                       manifest.get("options") or {},
                                       (manifest.get("reuse") or {}).get("preprocessing"))
        changed = differences(previous, plan.vector_identity())
        if changed:
            raise _Unusable("built with other vector settings: " + "; ".join(changed))
        pub.verify_release(release_dir, pointer, checksums=True)
    except _Unusable:
        raise
    except CatalogIndexError as e:
        raise _Unusable(f"it does not verify: {e}") from None
    except Exception as e:  # unreadable in any other way: never half-used
        raise _Unusable(f"it cannot be read: {brief(e)}") from None
    query_encoder = ()
    entry = manifest.get("query_encoder")
    if entry and (manifest.get("tool") or {}).get("version") == layout.TOOL_VERSION:
        prefix = entry["path"].rstrip("/") + "/"
        query_encoder = tuple((rel, f["size"], f["sha256"]) for rel, f in sorted(manifest["files"].items())
                              if rel.startswith(prefix))
    return Source(manifest["version"], manifest["release"], release_dir, parts, manifest["counts"]["indexed"],
                  query_encoder)


def resolve(plan, reuse_from: Optional[str] = None, no_reuse: bool = False) -> Optional[Source]:
    """The previous release whose vectors the run reuses, or None for a full encode (see the module)."""
    if no_reuse:
        _log.info("--no-reuse: every item is encoded")
        return None
    if reuse_from:
        release_dir, pointer = _locate(reuse_from)
        try:
            source = _check(plan, release_dir, pointer)
        except _Unusable as e:
            raise ConfigError(f"--reuse-from {reuse_from}: cannot reuse its vectors: {e}; name another version "
                              f"or pass --no-reuse") from None
    else:
        latest = files.join(plan.output, layout.LATEST_FILE)
        try:
            pointer, _ = pub.read_pointer(latest)
        except Exception as e:  # a damaged LATEST is not this run's problem: encode everything
            _log.warning("not reusing vectors: %s cannot be read (%s); every item is encoded", latest, brief(e))
            return None
        if pointer is None:
            _log.info("no previous version under %s (no %s): every item is encoded", plan.output, layout.LATEST_FILE)
            return None
        try:
            source = _check(plan, files.join(plan.output, pointer.path), pointer)
        except _Unusable as e:
            _log.warning("not reusing vectors of LATEST (%s): %s; every item is encoded", pointer.path, e)
            return None
    _log.info("reusing the vectors of unchanged items from %s (%d items)", source.describe(), source.items)
    return source


# --------------------------------------------------------------------------- reading the previous table


class _ListRowGroups(beam.DoFn):
    def process(self, element):
        part, path = element
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            groups = pq.ParquetFile(f).metadata.num_row_groups
        for group in range(groups):
            yield part, path, group


class _ReadRowGroup(beam.DoFn):
    def process(self, element):
        part, path, group = element
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            table = pq.ParquetFile(f).read_row_group(group, columns=_KEY_COLUMNS)
        ids = table.column(emb.ITEM_ID).to_pylist()
        keys = [table.column(c).to_pylist() for c in emb.CONTENT_KEYS]
        for item_id, text_sha, image_sha, uri, version in zip(ids, *keys):
            yield item_id, Previous(text_sha, image_sha, uri, version, part)


class ReadPrevious(beam.PTransform):
    """A previous release's embeddings table -> (item_id, Previous): content keys only, read in parallel
    by row group. ``paths`` in the order of Source.embeddings (Previous.part indexes it)."""

    def __init__(self, paths):
        super().__init__()
        self._paths = list(paths)

    def expand(self, pbegin):
        return (
            pbegin
            | "ListPreviousParts" >> beam.Create(list(enumerate(self._paths)))
            | "ListPreviousRowGroups" >> beam.ParDo(_ListRowGroups())
            | "SpreadPreviousRowGroups" >> beam.Reshuffle()
            | "ReadPreviousKeys" >> beam.ParDo(_ReadRowGroup())
        )


ROW_BATCH = 8192  # rows read at a time from a previous part, so a big part is never held whole


def read_rows(path: str, item_ids, columns) -> pa.Table:
    """The rows of one previous embeddings part whose item_id is in ``item_ids``: ``columns`` (item_id
    first), in the part's order. Raises CatalogIndexError when any id is missing: the part changed since
    the run chose its source, and a half-used previous version would publish wrong vectors."""
    import pyarrow.compute as pc

    wanted = pa.array(sorted(set(item_ids)), pa.string())
    columns = [emb.ITEM_ID] + [c for c in columns if c != emb.ITEM_ID]
    pieces = []
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=ROW_BATCH, columns=columns):
            keep = pc.is_in(batch.column(0), value_set=wanted)
            if pc.any(keep).as_py():
                pieces.append(pa.Table.from_batches([batch.filter(keep)]))
    table = pa.concat_tables(pieces) if pieces else None
    found = 0 if table is None else table.num_rows
    if found != len(wanted):
        raise CatalogIndexError(f"the previous embeddings part {path} holds {found} of the {len(wanted)} rows "
                                f"this run reuses from it: it changed during the run; rerun (or --no-reuse)")
    return table


def carried_rows(carried, paths) -> pa.Table:
    """The previous rows of carried items (reuse.Carried, any parts), as staging rows (shards.STAGING_SCHEMA):
    vectors and content keys as they were, title, image_uri and image_version as the catalog has them now,
    every present vector marked reused. One read of each part named."""
    import pyarrow.compute as pc

    from pipelines import shards as shd

    by_part = {}
    for c in carried:
        by_part.setdefault(c.part, []).append(c)
    tables = []
    for part in sorted(by_part):
        now = {c.item_id: c for c in by_part[part]}
        table = read_rows(paths[part], list(now), [emb.TEXT_EMBEDDING, emb.IMAGE_EMBEDDING, emb.EMBEDDING,
                                                   emb.TEXT_SHA256, emb.IMAGE_SHA256])
        rows = [now[item_id] for item_id in table.column(emb.ITEM_ID).to_pylist()]
        text, image = table.column(emb.TEXT_EMBEDDING), table.column(emb.IMAGE_EMBEDDING)
        tables.append(pa.Table.from_arrays([
            table.column(emb.ITEM_ID), pa.array([r.title for r in rows], pa.string()), text, image,
            table.column(emb.EMBEDDING), table.column(emb.TEXT_SHA256), table.column(emb.IMAGE_SHA256),
            pa.array([r.image_uri for r in rows], pa.string()), pa.array([r.image_version for r in rows], pa.string()),
            pc.is_valid(text), pc.is_valid(image),
        ], schema=shd.STAGING_SCHEMA))
    return pa.concat_tables(tables) if tables else shd.STAGING_SCHEMA.empty_table()
