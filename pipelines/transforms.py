"""The index pipeline's composite transforms.

    ReadCatalog | ValidateItems | BatchItems (one row per item_id) | EncodeItems | FuseEmbeddings
                | WriteAnnoyShards

Every row read leaves exactly one of two ways: as an indexed item in a shard,
or as a ``Rejection`` (with a stable reason code from ``schemas.rejected``).
Items indexed without their image additionally produce a degraded record.
"""

import dataclasses
import hashlib
import logging
from typing import NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.utils import shared

from schemas.errors import CatalogIndexError, brief
from embedding import encoders as enc
from embedding import fusion as fus
from embedding import images
from pipelines import files
from pipelines import inference
from pipelines import progress
from pipelines import reuse
from pipelines import shards as shd
from pipelines.publication import failpoint
from schemas import catalog as cat
from schemas import embeddings as emb
from schemas import rejected as rej

_log = logging.getLogger(__name__)

REJECTED = "rejected"
DEGRADED = "degraded"
IMAGES = "images"
CARRIED = "carried"  # incremental runs: items whose previous row goes into their shard as it is
PARTIAL = "partial"  # incremental runs: items with a reused vector still to be read

# Texts longer than this are cut before encoding: encoders truncate tokens
# anyway, and this bounds the memory a pathological description can take.
MAX_TEXT_CHARS = 4096


class CatalogRow(NamedTuple):
    """One catalog row as read, with where it came from (file and 0-based row).

    ``problem`` is set when a value of the row could not be read (e.g. a string
    that is not valid UTF-8); that value is None and ValidateItems rejects the
    row with ``invalid_value`` and this message.
    """

    item_id: Optional[str]
    title: Optional[str]
    description: Optional[str]
    image_uri: Optional[str]
    source: str
    row: int
    problem: Optional[str] = None
    image_version: Optional[str] = None  # the optional catalog column, as a string (schemas/catalog.py)


class Rejection(NamedTuple):
    """A row that was not indexed (or, in the degraded table, indexed without its image)."""

    item_id: Optional[str]
    source: str
    row: int
    reason: str
    message: str

    def to_dict(self) -> dict:
        return self._asdict()


def reject(row: CatalogRow, reason: str, message: str) -> Rejection:
    return Rejection(row.item_id, row.source, row.row, reason, message)


def _blank(value: Optional[str]) -> bool:
    return value is None or not value.strip()


def item_text(row: CatalogRow) -> Optional[str]:
    """The text the text encoder sees: title and description, or None if both are empty."""
    parts = [p.strip() for p in (row.title, row.description) if not _blank(p)]
    return "\n".join(parts)[:MAX_TEXT_CHARS] if parts else None


@dataclasses.dataclass
class EncodedItem:
    row: CatalogRow
    text_embedding: Optional[np.ndarray]
    image_embedding: Optional[np.ndarray]
    # Content keys (schemas/embeddings.py) and whether each vector came from a previous version.
    text_sha256: Optional[str] = None
    image_sha256: Optional[str] = None
    text_reused: bool = False
    image_reused: bool = False
    # Incremental runs: the previous part that holds a reused vector still to be read (text_reused or
    # image_reused with the vector None); None once the vectors are in place.
    part: Optional[int] = None


# ---------------------------------------------------------------------------
# ReadCatalog


class _ListRowGroups(beam.DoFn):
    """file -> (file, row group, first row number): the unit of parallel reading."""

    def process(self, path):
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            meta = pq.ParquetFile(f).metadata
        first = 0
        for i in range(meta.num_row_groups):
            yield path, i, first
            first += meta.row_group(i).num_rows


def _decode_column(column, name: str, path: str, first: int, problems: dict) -> list:
    """A string column's values; an undecodable value becomes None and a problem of its row.

    Fast path: Arrow decodes the whole column. Only a column that fails is read
    again as binary and decoded value by value, to find the bad ones.
    """
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        pass
    binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
    values = column.cast(binary).to_pylist()
    for i, raw in enumerate(values):
        if raw is None:
            continue
        try:
            values[i] = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            values[i] = None
            problems.setdefault(i, []).append(
                f"column {name!r} at row {first + i} of {path} is not valid UTF-8 "
                f"(byte 0x{raw[e.start]:02x} at offset {e.start})")
    return values


# Rows decoded at a time within a row group: catalogs written by Spark or BigQuery hold up to ~1M rows in
# one group, and decoding a whole group into Python strings held all of them at once (issue 9).
READ_BATCH_ROWS = 4096


class _ReadRowGroup(beam.DoFn):
    def __init__(self):
        self._read = progress.counter(progress.ROWS_READ)

    def process(self, element):
        path, group, first = element
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            pf = pq.ParquetFile(f)
            wanted = [c for c in cat.COLUMNS if pf.schema_arrow.get_field_index(c) >= 0]
            has_version = pf.schema_arrow.get_field_index(cat.IMAGE_VERSION) >= 0
            for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[group],
                                         columns=wanted + ([cat.IMAGE_VERSION] if has_version else [])):
                yield from self._rows(batch, wanted, has_version, path, first)
                first += batch.num_rows

    def _rows(self, batch, wanted, has_version, path, first):
        n = batch.num_rows
        problems = {}  # row index in the batch -> messages, in column order
        columns = {c: (_decode_column(batch.column(c), c, path, first, problems) if c in wanted else [None] * n)
                   for c in cat.COLUMNS}
        versions = [None] * n
        if has_version:
            column = batch.column(cat.IMAGE_VERSION)
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                versions = _decode_column(column, cat.IMAGE_VERSION, path, first, problems)
            else:
                versions = cat.image_version_values(column)
        for i in range(n):
            yield CatalogRow(
                columns[cat.ITEM_ID][i],
                columns[cat.TITLE][i],
                columns[cat.DESCRIPTION][i],
                columns[cat.IMAGE_URI][i],
                path,
                first + i,
                "; ".join(problems[i]) if i in problems else None,
                versions[i],
            )
        self._read.inc(n)
        progress.add(progress.ROWS_READ, n)


class ReadCatalog(beam.PTransform):
    """Reads catalog Parquet files (already matched and schema-checked) into CatalogRows.

    Parallel by row group, so one big file does not serialise the read.
    """

    def __init__(self, paths: Sequence[str]):
        super().__init__()
        self._paths = sorted(paths)

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[CatalogRow]:
        return (
            pbegin
            | "ListFiles" >> beam.Create(self._paths)
            | "ListRowGroups" >> beam.ParDo(_ListRowGroups())
            | "SpreadRowGroups" >> beam.Reshuffle()
            | "ReadRowGroups" >> beam.ParDo(_ReadRowGroup())
        )


# ---------------------------------------------------------------------------
# ValidateItems


class _Validate(beam.DoFn):
    def process(self, row):
        if row.problem is not None:
            yield beam.pvalue.TaggedOutput(REJECTED, reject(row, rej.INVALID_VALUE, row.problem))
        elif row.item_id is None:
            yield beam.pvalue.TaggedOutput(REJECTED, reject(row, rej.MISSING_ITEM_ID, "item_id is null"))
        elif not row.item_id.strip():
            yield beam.pvalue.TaggedOutput(REJECTED, reject(row, rej.EMPTY_ITEM_ID, "item_id is empty"))
        elif _blank(row.title) and _blank(row.image_uri):
            yield beam.pvalue.TaggedOutput(
                REJECTED, reject(row, rej.NO_TITLE_OR_IMAGE, "item has neither a non-empty title nor an image_uri")
            )
        else:
            yield row


class ValidateItems(beam.PTransform):
    """Splits rows into usable items and rejections (null/empty id, no title and no image)."""

    def expand(self, rows):
        results = rows | "CheckRows" >> beam.ParDo(_Validate()).with_outputs(REJECTED, main="items")
        return {"items": results.items, REJECTED: results[REJECTED]}


def _pick_first(rows):
    """The rows of one item_id -> the one indexed, then a Rejection for each other.

    The deterministic rule: the occurrence from the first source file (by path) at the
    lowest row number wins; the others are rejected."""
    rows = sorted(rows, key=lambda r: (r.source, r.row))
    yield rows[0]
    for dup in rows[1:]:
        yield reject(dup, rej.DUPLICATE_ITEM_ID, f"item_id also at {rows[0].source} row {rows[0].row}, which is indexed")


# ---------------------------------------------------------------------------
# BatchItems, EncodeItems, FuseEmbeddings
#
# Items are grouped by a stable hash of item_id into buckets, sorted, and cut
# into batches of at most batch_size, and the same batches flow through image
# loading, the join with their texts' vectors and the fusion: a deterministic
# order, and no item waits for the whole catalog. Vectors do not depend on the
# batches: encoders and fusion run on fixed-shape model batches
# (Encoder.fixed_batches, fusion.fuse_fixed), since oneDNN / cuDNN pick kernels
# by shape and a vector's last bits would otherwise move with its batch mates.


def _unique_rows(rows):
    """A bucket's rows -> (its rows, one per item_id, by _pick_first's rule; the duplicates' Rejections).

    Duplicates share an item_id, hence a bucket: deduplicating inside the bucket's group spares a
    shuffle of every row by item_id."""
    by_id = {}
    for r in rows:
        by_id.setdefault(r.item_id, []).append(r)
    kept, duplicates = [], []
    for same in by_id.values():
        first, *others = _pick_first(same) if len(same) > 1 else same
        kept.append(first)
        duplicates.extend(others)
    return kept, duplicates


def _cut_batches(element, batch_size):
    bucket, refs = element
    rows, duplicates = _unique_rows(read_staged(refs))
    for dup in duplicates:
        yield beam.pvalue.TaggedOutput(REJECTED, dup)
    rows.sort(key=lambda r: r.item_id)
    for start in range(0, len(rows), batch_size):
        yield bucket, rows[start:start + batch_size]


def _cut_batches_with_previous(element, batch_size):
    """Like _cut_batches, each batch with {item_id: reuse.Previous} of its items that have a previous row
    (the previous rows of items no longer in the catalog end here)."""
    bucket, joined = element
    previous = dict(joined["previous"])
    for out in _cut_batches((bucket, joined["rows"]), batch_size):
        if isinstance(out, beam.pvalue.TaggedOutput):
            yield out
        else:
            _, rows = out
            yield bucket, rows, {r.item_id: previous[r.item_id] for r in rows if r.item_id in previous}


class _CutBatches(beam.DoFn):
    """_cut_batches (or _cut_batches_with_previous) as a DoFn, for its tagged output of duplicates."""

    def __init__(self, batch_size: int, with_previous: bool):
        self._batch_size = batch_size
        self._cut = _cut_batches_with_previous if with_previous else _cut_batches

    def process(self, element):
        yield from self._cut(element, self._batch_size)


def batch_rows(batch) -> list:
    """The rows of a batch: (bucket, rows) or, in an incremental run, (bucket, rows, previous)."""
    return batch[1]


def batch_previous(batch) -> dict:
    """{item_id: reuse.Previous} of a batch's items with a previous row ({} in a full run)."""
    return batch[2] if len(batch) > 2 else {}


class _Staging(beam.DoFn):
    """A DoFn that holds a bundle's elements and hands them on in ``_flush`` (a generator of what goes
    downstream: references to the staging files it wrote them to, or one pack of them) whenever about
    ``max_bytes`` (or another measure of size) are held, and at the end of the bundle."""

    def __init__(self, max_bytes: int):
        self._max_bytes = max_bytes
        self._held, self._bytes = [], 0

    def start_bundle(self):
        self._held, self._bytes = [], 0

    def _hold(self, value, nbytes: int) -> bool:
        """Holds ``value``; True when enough is held to flush."""
        self._held.append(value)
        self._bytes += nbytes
        return self._bytes >= self._max_bytes

    def _take(self) -> list:
        """What is held, in arrival order; nothing is held afterwards."""
        held, self._held, self._bytes = self._held, [], 0
        return held

    def _flush(self):
        raise NotImplementedError

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        for element in self._flush():
            yield GlobalWindows.windowed_value(element)


# What a worker holds before it writes a staging file (rows, slim batches, texts; text vectors; fused items).
# Each is a fixed cap, but a catalog below it never reaches it, so the caps were part of the growth from
# 10k to 100k items: 32 MiB each put the 100k run's peak ~85 MiB higher than 8 MiB does (issue 9,
# benchmarks/README.md). Smaller caps mean more, smaller staging files (at 1M items and 16 shards, ~180
# files per shard, read back once).
STAGE_BYTES = 8 << 20  # rows, batches or texts held per worker before they go to a staging file


class StagedRef(NamedTuple):
    """One bucket's values from one staging file: a pickled list at bytes offset..offset+size."""

    path: str
    offset: int
    size: int


def _row_bytes(row) -> int:
    """Rough memory of a CatalogRow waiting to be staged."""
    return 200 + sum(len(v) for v in (row.item_id, row.title, row.description, row.image_uri, row.source)
                     if isinstance(v, str))


def _batch_bytes(batch) -> int:
    """Rough memory of a slim batch (rows without descriptions, text keys, previous rows) waiting to be staged."""
    rows, keys, previous = batch
    return sum(_row_bytes(r) for r in rows) + 150 * len(keys) + 300 * len(previous)


class _StageByBucket(_Staging):
    """(bucket, value) -> values in staging files; (bucket, StagedRef) out.

    The values of a bundle wait until about ``max_bytes`` are held (``sizer`` tells a value's size) or
    the bundle ends, then go to one file ``<release>/_staging/<kind>/<uuid>.pkl`` grouped by bucket,
    each bucket's values one pickled list, and each bucket gets one StagedRef. Only the references go
    through the shuffle that gathers a bucket: the local runner holds a shuffle in memory, and every
    catalog row (descriptions included) used to wait there until the last one was read. Pickle, not
    Parquet: values come back exactly as they were, and the files are this run's own, read by it alone.
    """

    def __init__(self, version_dir: str, kind: str, sizer, max_bytes: Optional[int] = None):
        super().__init__(STAGE_BYTES if max_bytes is None else max_bytes)
        self._dir = files.join(shd.staging_dir(version_dir), kind)
        self._sizer = sizer

    def process(self, element):
        if self._hold(element, self._sizer(element[1])):
            yield from self._flush()

    def _flush(self):
        import pickle
        import uuid

        held = self._take()
        if not held:
            return
        by_bucket = {}
        for bucket, value in held:
            by_bucket.setdefault(bucket, []).append(value)
        path = files.join(self._dir, f"{uuid.uuid4().hex}.pkl")
        refs, offset = [], 0
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            for bucket in sorted(by_bucket):
                blob = pickle.dumps(by_bucket[bucket], protocol=pickle.HIGHEST_PROTOCOL)
                f.write(blob)
                refs.append((bucket, StagedRef(path, offset, len(blob))))
                offset += len(blob)
        yield from refs


def read_staged(refs) -> list:
    """The values behind a bucket's StagedRefs (one ranged read per reference), in a stable order."""
    import pickle

    values = []
    for ref in sorted(refs):
        with FileSystems.open(ref.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.seek(ref.offset)
            data = f.read(ref.size)
        if len(data) != ref.size:
            raise CatalogIndexError(f"staging file {ref.path} is short: {len(data)} of {ref.size} bytes "
                                    f"at offset {ref.offset}")
        values.extend(pickle.loads(data))
    return values


class BatchItems(beam.PTransform):
    """CatalogRow -> {"batches": (bucket, [CatalogRow]), "rejected": Rejection}: one row per item_id (the
    first file by path, then the lowest row; the others rejected as duplicates), in deterministic
    batches of at most batch_size items.

    With ``previous`` ((item_id, reuse.Previous) of a previous version, pipelines/reuse.py), each batch
    is (bucket, rows, {item_id: Previous}) for its items that have one. The batches are the same
    either way: they depend on the catalog only. The rows wait in staging files under ``staging_dir``
    (_StageByBucket): only references to them go through the shuffle by bucket.
    """

    def __init__(self, num_buckets: int, batch_size: int, previous=None, *, staging_dir: str):
        super().__init__()
        self._num_buckets = num_buckets
        self._batch_size = batch_size
        self._previous = previous
        self._staging_dir = staging_dir

    def expand(self, items):
        nb = self._num_buckets
        keyed = (items
                 | "KeyByBucket" >> beam.Map(lambda r: (shd.stable_shard(r.item_id, nb), r))
                 | "StageRows" >> beam.ParDo(_StageByBucket(self._staging_dir, "rows", _row_bytes)))
        if self._previous is None:
            grouped = keyed | "GroupByBucket" >> beam.GroupByKey()
        else:
            previous = self._previous | "KeyPreviousByBucket" >> beam.Map(
                lambda kv: (shd.stable_shard(kv[0], nb), kv))
            grouped = {"rows": keyed, "previous": previous} | "GroupByBucket" >> beam.CoGroupByKey()
        cut = grouped | "CutBatches" >> beam.ParDo(
            _CutBatches(self._batch_size, self._previous is not None)).with_outputs(REJECTED, main="batches")
        return {"batches": cut.batches, REJECTED: cut[REJECTED]}


class _Joined(NamedTuple):
    """One batch with its texts encoded: what loading its images and _Assemble need. Made right after
    EncodeItems' join (which holds slim rows, text keys and TextRefs, no vector); the image work that
    follows runs batch by batch in one fused chain, so no vector waits in a runner's memory."""

    rows: list  # CatalogRows without descriptions, in item_id order
    text_keys: dict  # item_id -> sha256 of the item's text
    previous: dict  # item_id -> reuse.Previous (incremental runs; {} otherwise)
    text: dict  # item_id -> text vector encoded in this run
    text_failed: dict  # item_id -> (reason, message): the text encoder failed on the item's text batch


class _Images(NamedTuple):
    """A batch after its images were fetched and decoded (the arrays go to the image encoder)."""

    batch: _Joined
    ids: tuple  # item ids of the arrays sent to the encoder, in order
    keys: dict  # item_id -> sha256 of the bytes, for the loaded images
    reused: dict  # item_id -> sha256: fetched and found unchanged since the previous version, not decoded
    failed: dict  # item_id -> (reason, message)


def _split_joined(element):
    """(bucket, {batch, text, text_failed}) -> one _Joined per batch of the bucket, each item given the
    vector (or failure) of its text when the text was encoded in this run (reused ones were not)."""
    _, joined = element
    text, failed = read_text_refs(joined["text"]), dict(joined["text_failed"])  # by text key
    for rows, keys, previous in sorted(read_staged(joined["batch"]), key=lambda b: b[0][0].item_id):
        encoded = {i: k for i, k in keys.items() if not reuse.text_unchanged(previous.get(i), k)}
        yield _Joined(rows, keys, previous, {i: text[k] for i, k in encoded.items() if k in text},
                      {i: failed[k] for i, k in encoded.items() if k in failed})


class _LoadImages(beam.DoFn):
    """_Joined -> its images fetched and decoded, in a small thread pool (fetches wait on the network or
    GCS; Pillow releases the GIL while it decodes).

    Outputs: [(_Images, [float32 [h, w, 3]])], one element per batch for RunInference (its key the
    batch's record, its example the arrays; possibly none); IMAGES: the arrays [(item_id, array)] for
    SampleQueryInputs. Images fetched and found unchanged since the
    previous version (pipelines/reuse.py) are not decoded; images whose (image_uri, image_version) match
    are not even fetched: _Assemble applies the same rule to the batch.
    """

    THREADS = 8

    def __init__(self, size, max_pixels, fetch_options=None):
        self._size = tuple(size)
        self._max_pixels = max_pixels
        # images.load_image keywords: timeout, allow_private_hosts, image_root.
        self._fetch_options = dict(fetch_options or {})
        self._loaded = progress.counter(progress.IMAGES_LOADED)
        self._not_fetched = progress.counter(progress.IMAGES_NOT_FETCHED)
        self._pool = None

    def setup(self):
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(self.THREADS, thread_name_prefix="load-image")

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def _load(self, job):
        """(row, previous) -> (array or None, sha256 of the bytes or None, failure or None).

        images.load_image in its three steps, so that bytes equal to the previous version's are
        neither decoded nor encoded (array None, sha256 set, no failure).
        """
        row, previous = job
        uri = row.image_uri.strip()
        try:
            data = images.fetch_image_bytes(uri, **self._fetch_options)
            sha = hashlib.sha256(data).hexdigest()
            if reuse.image_unchanged_by_bytes(previous, sha):
                return None, sha, None
            img = images.decode_image(data, max_pixels=self._max_pixels, uri=uri, min_size=self._size)
            return images.to_model_input(img, self._size), sha, None
        except images.ImageError as e:
            return None, None, (e.reason, str(e))
        except Exception as e:  # an image library bug must not take the run down
            return None, None, (rej.IMAGE_DECODE_FAILED, brief(e))

    def process(self, batch: _Joined):
        jobs = []
        for row in batch.rows:
            if _blank(row.image_uri):
                continue
            before = batch.previous.get(row.item_id)
            if reuse.image_unchanged_by_version(before, row.image_uri, row.image_version):
                self._not_fetched.inc()
            else:
                jobs.append((row, before))
        ids, arrays, keys, reused, failed = [], [], {}, {}, {}
        for (row, _), (array, sha, failure) in zip(jobs, self._pool.map(self._load, jobs)):
            if failure is not None:
                failed[row.item_id] = failure
            elif array is None:
                reused[row.item_id] = sha
            else:
                ids.append(row.item_id)
                arrays.append(array)
                keys[row.item_id] = sha
        if arrays:
            self._loaded.inc(len(arrays))
            progress.add(progress.IMAGES_LOADED, len(arrays))
            yield beam.pvalue.TaggedOutput(IMAGES, list(zip(ids, arrays)))
        # Every batch goes through the encoder step (an empty one is not encoded): a second path around
        # it would need a Flatten, which the local runner materialises.
        yield [([_Images(batch, tuple(ids), keys, reused, failed)], arrays)]  # one key: the batch (_Pack)


class _Pack(_Staging):
    """[(keys, inputs)] -> [(keys, inputs)] of several elements concatenated, once at least ``min_inputs``
    inputs are held (or the bundle ends); elements with no input pass at once, alone.

    The encoders run on model batches of a fixed shape (Encoder.fixed_batches), so an element with two
    inputs would pay for a whole model batch. In an incremental run most item batches have no image to
    encode or one or two, and text groups hold the few changed texts: packed, they fill dense model
    batches, and memory holds about two elements' inputs. Used for the images of item batches (keys: the
    batch's _Images) and for text groups (keys: one record per text)."""

    def process(self, element):
        (keys, inputs), = element
        if not inputs:
            yield [(keys, inputs)]
        elif self._hold((keys, inputs), len(inputs)):
            yield from self._flush()

    def _flush(self):
        held = self._take()
        if held:
            yield [([k for keys, _ in held for k in keys], [x for _, inputs in held for x in inputs])]


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _texts_by_key(element):
    """(text key, (bucket, text)) per item to encode. Items whose text is the one their previous vector
    was computed from (pipelines/reuse.py) produce nothing: _split_joined and _Assemble apply the same rule."""
    bucket, previous = element[0], batch_previous(element)
    for r in batch_rows(element):
        text = item_text(r)
        if text is not None:
            key = text_key(text)
            if not reuse.text_unchanged(previous.get(r.item_id), key):
                yield key, (bucket, text)


def group_texts(values) -> tuple:
    """(text key, bucket, text) of the items of one text group -> (records, texts): each distinct text once,
    with the sorted buckets holding an item with it (records: (text key, buckets)), in length order, then
    key order (where the encoder cannot count its tokens, Encoder.fixed_batches keeps this order, and
    neighbours of similar length share model batches). The order depends on the group's texts alone."""
    by_key = {}
    for key, bucket, text in values:
        entry = by_key.get(key)
        if entry is None:
            by_key[key] = (text, {bucket})
        else:
            entry[1].add(bucket)
    keys = sorted(by_key, key=lambda k: (len(by_key[k][0]), k))
    return [(k, tuple(sorted(by_key[k][1]))) for k in keys], [by_key[k][0] for k in keys]


def _text_bytes(value) -> int:
    """Rough memory of a (text key, bucket, text) waiting to be staged."""
    return 250 + len(value[2])


# Distinct texts per text group, about: big groups leave fewer model batches part-filled (each group
# fills one per token-length class), and a group is one example for the encoder.
TEXTS_PER_GROUP = 8192


def text_groups(num_buckets: int, batch_size: int) -> int:
    """How many groups the distinct texts are encoded in (num_buckets holds ~8 batches of items)."""
    return max(1, -(-num_buckets * batch_size * 8 // TEXTS_PER_GROUP))


STAGE_TEXT_BYTES = 8 << 20  # text vectors held per worker before they go to a staging file (see STAGE_BYTES)


class TextRef(NamedTuple):
    """Where one bucket's text vectors from one staging file are: rows start..start+len(keys) of a raw
    little-endian float32 [rows, dim] file, in the order of ``keys`` (their texts' sha256)."""

    path: str
    start: int
    dim: int
    keys: tuple


class _StageTextVectors(_Staging):
    """(records, vectors) of a text group -> text vectors in staging files; (bucket, TextRef) out, and
    FAILED (bucket, (text key, (reason, message))) for texts whose model batch failed.

    Vectors wait per bundle until about ``max_bytes`` are held (or the bundle ends); then one file
    ``<release>/_staging/text/<uuid>.f32`` holds them sorted by bucket, one row per bucket that needs
    the text, and each bucket gets one TextRef. Only these references go through the join with the
    batches: the local runner, which holds a shuffle in memory, kept ~4.5 copies of every text vector
    when the vectors went through it. A retried bundle leaves a file nothing names; the staging
    folder goes once every shard is written.
    """

    FAILED = "failed"

    def __init__(self, version_dir: str, max_bytes: Optional[int] = None):
        super().__init__(STAGE_TEXT_BYTES if max_bytes is None else max_bytes)
        self._dir = shd.text_staging_dir(version_dir)

    def process(self, element):
        records, vectors = element
        flush = False
        for (key, buckets), vector in zip(records, vectors):
            if isinstance(vector, inference.BatchFailure):
                failure = _encoder_failure(vector)
                for bucket in buckets:
                    yield beam.pvalue.TaggedOutput(self.FAILED, (bucket, (key, failure)))
                continue
            for bucket in buckets:
                flush = self._hold((bucket, key, vector), vector.nbytes) or flush
        if flush:
            yield from self._flush()

    def _flush(self):
        import uuid

        held = self._take()
        if not held:
            return
        held.sort(key=lambda h: (h[0], h[1]))
        matrix = np.ascontiguousarray(np.stack([h[2] for h in held]), dtype="<f4")
        path = files.join(self._dir, f"{uuid.uuid4().hex}.f32")
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(matrix.tobytes())
        start = 0
        while start < len(held):
            bucket, end = held[start][0], start
            while end < len(held) and held[end][0] == bucket:
                end += 1
            yield bucket, TextRef(path, start, matrix.shape[1], tuple(h[1] for h in held[start:end]))
            start = end


def read_text_refs(refs) -> dict:
    """{text key: float32 vector} from a bucket's TextRefs (one ranged read per reference)."""
    vectors = {}
    for ref in refs:
        size = len(ref.keys) * ref.dim * 4
        with FileSystems.open(ref.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.seek(ref.start * ref.dim * 4)
            data = f.read(size)
        if len(data) != size:
            raise CatalogIndexError(f"text vector staging file {ref.path} is short: {len(data)} of {size} bytes "
                                    f"at row {ref.start}")
        matrix = np.frombuffer(data, "<f4").reshape(len(ref.keys), ref.dim).astype(np.float32)
        vectors.update(zip(ref.keys, matrix))
    return vectors


class _KeyTexts(beam.DoFn):
    """_texts_by_key as a DoFn (Beam's type inference reads a FlatMap's tagged outputs as its main type)."""

    def process(self, element):
        yield from _texts_by_key(element)


class _EncodeTexts(beam.PTransform):
    """Encodes each distinct text once, in fixed-shape model batches.

    Catalogs repeat texts (variants sharing a title and description; the
    Grocery train split has 81 distinct texts for 2,640 items), and the text
    encoder costs as much as the image encoder, so identical texts are grouped
    by sha256 and encoded once; each vector then goes to a staging file under
    ``version_dir`` once for each bucket with an item that has the text
    (_StageTextVectors). The texts are spread over ``text_groups`` groups by
    sha256 and wait in staging files (_StageByBucket, kind "texts"): only
    references go through the shuffle that gathers a group (issue 9: a combiner
    of the texts held every distinct text in the local runner's shuffle, ~1 KiB
    per item at the peak). Each group is read back and listed once
    (group_texts, ~TEXTS_PER_GROUP texts); each (small ones packed together,
    _Pack) is one example for the encoder, which cuts it
    into model batches whose shape depends on each text alone
    (Encoder.fixed_batches): a text's vector is the same whatever else the
    catalog holds, so reused and re-encoded vectors agree bit for bit.
    Outputs {"vectors": (bucket, TextRef), FAILED: (bucket, (text key, (reason,
    message)))}; reused texts never reach the encoder.
    """

    FAILED = _StageTextVectors.FAILED

    def __init__(self, handler, num_groups, version_dir):
        super().__init__()
        self._handler = handler
        self._num_groups = num_groups
        self._version_dir = version_dir

    def expand(self, batches):
        ng = self._num_groups
        staged = (
            batches
            | "KeyTexts" >> beam.ParDo(_KeyTexts())
            | "KeyTextGroups" >> beam.Map(lambda kv: (int(kv[0][:8], 16) % ng, (kv[0], kv[1][0], kv[1][1])))
            | "StageTexts" >> beam.ParDo(_StageByBucket(self._version_dir, "texts", _text_bytes))
            | "GroupTextFiles" >> beam.GroupByKey()
            | "ListGroupTexts" >> beam.Map(lambda kv: [group_texts(read_staged(kv[1]))])
            | "PackTexts" >> beam.ParDo(_Pack(TEXTS_PER_GROUP))
            | "RunTextEncoder" >> RunInference(self._handler)
            | "StageTextVectors" >> beam.ParDo(_StageTextVectors(self._version_dir)).with_outputs(
                self.FAILED, main="vectors")
        )
        return {"vectors": staged.vectors, self.FAILED: staged[self.FAILED]}


def _failure_text(exc) -> str:
    """Beam's dead letter holds (type, repr, formatted traceback), not the exception itself."""
    if isinstance(exc, BaseException):
        return brief(exc, 1000)
    if isinstance(exc, tuple) and len(exc) == 3:
        kind, _, trace = exc
        last = "".join(trace[-1:]) if isinstance(trace, (list, tuple)) else str(trace)
        # The last traceback entry reads "module.Type: message ..."; keep the message.
        head, _, message = last.partition(": ")
        name = getattr(kind, "__name__", head.rsplit(".", 1)[-1])
        return f"{name}: {brief(Exception(message or last), 1000).split(': ', 1)[1]}"
    return str(exc)[:1000]


def _encoder_failure(failure) -> tuple:
    """inference.BatchFailure -> the (reason, message) its inputs are rejected with."""
    return rej.ENCODER_FAILED, f"encoder failed on a batch of {failure.inputs}: {_failure_text(failure.error)}"


def _failed_batch(element):
    """RunInference DLQ entry (batch of (key, input), exception) -> one failure per key."""
    batch, exc = element
    message = f"encoder failed on a batch of {len(batch)}: {_failure_text(exc)}"
    for key, _ in batch:
        yield key, (rej.ENCODER_FAILED, message)


class _Assemble(beam.DoFn):
    """Puts one batch's items together with their vectors and failures.

    Input: (a pack of _Images, their image vectors in order, inference.BatchFailure for those that failed).
    Decides per item: indexed, indexed but degraded (image failed, title present),
    or rejected. Yields the batch's EncodedItems as one list. In an incremental
    run, items whose every vector is reused (and that have the vectors their previous rows
    had) go out tagged CARRIED, a list of reuse.Carried per batch: their previous rows go
    into their shards as they are. An item with some vector reused goes out tagged PARTIAL as (part, EncodedItem)
    to have it read from its previous part before fusion.
    """

    def __init__(self, reject_on_image_error: bool):
        self._reject_on_image_error = reject_on_image_error
        self._carried = progress.counter(progress.ITEMS_CARRIED)

    def process(self, element):
        packed, vectors = element  # the batches _Pack put together, their image vectors in order
        start = 0
        for loaded in packed:
            yield from self._assemble(loaded, vectors[start:start + len(loaded.ids)])
            start += len(loaded.ids)

    def _assemble(self, loaded, vectors):
        batch = loaded.batch
        encode_failed = dict(batch.text_failed)
        image = {}
        for item_id, vector in zip(loaded.ids, vectors):
            if isinstance(vector, inference.BatchFailure):
                encode_failed[item_id] = _encoder_failure(vector)
            else:
                image[item_id] = vector
        text_keys, previous, text = batch.text_keys, batch.previous, batch.text
        out, carried = [], []
        for row in batch.rows:
            item_id = row.item_id
            if item_id in encode_failed:
                yield beam.pvalue.TaggedOutput(REJECTED, reject(row, *encode_failed[item_id]))
                continue
            before = previous.get(item_id)
            # The rules of pipelines/reuse.py, as _KeyTexts and _LoadImages applied them to this batch.
            reused_text = item_id in text_keys and reuse.text_unchanged(before, text_keys[item_id])
            t = None if reused_text else text.get(item_id)
            has_text = reused_text or t is not None
            if item_id in loaded.failed:
                reason, message = loaded.failed[item_id]
                if self._reject_on_image_error or not has_text or _blank(row.title):
                    yield beam.pvalue.TaggedOutput(REJECTED, reject(row, reason, message))
                    continue
                yield beam.pvalue.TaggedOutput(
                    DEGRADED, reject(row, reason, message + "; indexed from text alone"))
            reused_sha = loaded.reused.get(item_id)
            if reused_sha is None and not _blank(row.image_uri) and reuse.image_unchanged_by_version(
                    before, row.image_uri, row.image_version):
                reused_sha = before.image_sha256
            reused_image = reused_sha is not None
            img, image_sha = (None, reused_sha) if reused_image else (image.get(item_id), loaded.keys.get(item_id))
            has_image = reused_image or img is not None
            if (before is not None and (reused_text or reused_image) and item_id not in loaded.failed
                    and (reused_text or not (has_text or before.has_text))
                    and (reused_image or not (has_image or before.has_image))):
                carried.append(reuse.Carried(item_id, before.part, row.title,
                                             None if _blank(row.image_uri) else row.image_uri, row.image_version))
                continue
            item = EncodedItem(row, t, img,
                               text_sha256=text_keys.get(item_id) if has_text else None,
                               image_sha256=image_sha if has_image else None,
                               text_reused=reused_text, image_reused=reused_image,
                               part=before.part if reused_text or reused_image else None)
            if item.part is not None:
                yield beam.pvalue.TaggedOutput(PARTIAL, (item.part, item))
            else:
                out.append(item)
        if out:
            yield out
        if carried:  # one element per batch, not per item: most items of a nightly run are carried
            self._carried.inc(len(carried))
            progress.add(progress.ITEMS_CARRIED, len(carried))
            yield beam.pvalue.TaggedOutput(CARRIED, carried)


class _FillReused(beam.DoFn):
    """(part, [EncodedItem]) -> batches of those items with their reused vectors read from the previous
    part (one read per part), ready for fusion: the items of an incremental run that keep one vector
    and have the other encoded."""

    def __init__(self, paths, batch_size: int):
        self._paths = tuple(paths)
        self._batch_size = batch_size

    def process(self, element):
        part, items = element
        items = sorted(items, key=lambda it: it.row.item_id)
        table = reuse.read_rows(self._paths[part], [it.row.item_id for it in items],
                                [emb.TEXT_EMBEDDING, emb.IMAGE_EMBEDDING])
        where = {item_id: n for n, item_id in enumerate(table.column(0).to_pylist())}
        text, image = shd.vector_list(table.column(1)), shd.vector_list(table.column(2))
        filled = []
        for it in items:
            n = where[it.row.item_id]
            t = text[n] if it.text_reused else it.text_embedding
            img = image[n] if it.image_reused else it.image_embedding
            if (it.text_reused and t is None) or (it.image_reused and img is None):
                raise CatalogIndexError(f"the previous row of {it.row.item_id!r} in {self._paths[part]} lacks "
                                              f"a vector its content keys promise; rerun with --no-reuse")
            filled.append(dataclasses.replace(it, text_embedding=t, image_embedding=img, part=None))
        for start in range(0, len(filled), self._batch_size):
            yield filled[start:start + self._batch_size]


def _slim_batch(batch):
    rows = batch_rows(batch)
    keys = {}
    for r in rows:
        text = item_text(r)
        if text is not None:
            keys[r.item_id] = text_key(text)
    return batch[0], ([r._replace(description=None) for r in rows], keys, batch_previous(batch))


class EncodeItems(beam.PTransform):
    """Runs the text and image encoders as RunInference steps on the deterministic batches.

    Input: batches from BatchItems. Texts are encoded once per distinct text (_EncodeTexts), their
    vectors written to staging files under ``staging_dir`` and only references (TextRef) joined back
    to the batches by bucket; then each batch runs, in one fused chain with no shuffle and no Flatten,
    through loading its images, the image encoder (RunInference on packs of batches, _Pack)
    and _Assemble. So the join holds rows without descriptions, text keys and file references, and no
    vector or pixel goes through a shuffle: the local runner holds every shuffle (and every Flatten)
    in memory, and this is what keeps its memory flat in the catalog's vectors.

    Outputs {"items": [EncodedItem] per batch (in an incremental run a pair of such PCollections: the
    items encoded in full, and those with a reused vector read back; see streams()), "rejected":
    Rejection, "degraded": Rejection, "images":
    the loaded pixels per batch, "carried": [reuse.Carried] per batch}. Batches with previous rows
    (BatchItems with ``previous``) reuse vectors by pipelines/reuse.py's rules: items with every vector
    reused leave as "carried" (WriteAnnoyShards copies their rows), the vectors of the others are read
    from ``previous_parts`` (reuse.Source.embeddings).
    """

    def __init__(self, text_encoder: str, image_encoder: str, image_size, num_buckets: int, batch_size: int = 32,
                 max_pixels: int = images.DEFAULT_MAX_PIXELS, reject_on_image_error: bool = False,
                 large_model: bool = False, model_cache: Optional[str] = None,
                 image_timeout: float = images.DEFAULT_TIMEOUT_S, allow_private_hosts: bool = False,
                 image_root: Optional[str] = None, previous_parts=(), *, staging_dir: str,
                 fingerprints: Tuple[Optional[str], Optional[str]] = (None, None)):
        super().__init__()
        self._staging_dir = staging_dir  # the release folder: text vectors wait in its _staging/text/
        self._previous_parts = tuple(previous_parts)
        self._fetch_options = {"timeout": image_timeout, "allow_private_hosts": allow_private_hosts,
                               "image_root": image_root}
        # Inputs are grouped upstream, so RunInference must not re-batch: a group of distinct texts, or a
        # batch's images, is one example keyed by its records, encoded in fixed-shape model batches.
        # fingerprints: (text, image) as the launcher inspected them; a worker's built-in model must match.
        self._text = KeyedModelHandler(inference.WholeBatches(inference.EncoderModelHandler(
            text_encoder, enc.TEXT, large_model=large_model, model_cache=model_cache, fingerprint=fingerprints[0]),
            batch_size)).with_no_batching()
        self._image = KeyedModelHandler(inference.WholeBatches(inference.EncoderModelHandler(
            image_encoder, enc.IMAGE, image_size=image_size, large_model=large_model,
            model_cache=model_cache, fingerprint=fingerprints[1]), batch_size)).with_no_batching()
        self._image_size = tuple(image_size)
        self._num_buckets = num_buckets
        self._batch_size = batch_size
        self._max_pixels = max_pixels
        self._reject_on_image_error = reject_on_image_error

    def expand(self, batches):
        texts = batches | "EncodeTexts" >> _EncodeTexts(
            self._text, text_groups(self._num_buckets, self._batch_size), self._staging_dir)
        # The join needs ids, titles and provenance, not the descriptions nor the previous vectors: leave
        # them behind, keeping each text's sha256 (the embeddings table's text_sha256).
        slim = (batches
                | "DropDescriptions" >> beam.Map(_slim_batch)
                | "StageBatches" >> beam.ParDo(_StageByBucket(self._staging_dir, "batches", _batch_bytes)))
        joined = (
            {
                "batch": slim,
                "text": texts["vectors"],
                "text_failed": texts[_EncodeTexts.FAILED],
            }
            | "JoinTextVectors" >> beam.CoGroupByKey()
            | "SplitBatches" >> beam.FlatMap(_split_joined)
        )
        loaded = joined | "LoadImages" >> beam.ParDo(
            _LoadImages(self._image_size, self._max_pixels, self._fetch_options)).with_outputs(IMAGES, main="batches")
        assembled = (
            loaded.batches
            | "PackImages" >> beam.ParDo(_Pack(self._batch_size))
            | "EncodeImages" >> RunInference(self._image)
            | "AssembleItems" >> beam.ParDo(_Assemble(self._reject_on_image_error)).with_outputs(
                REJECTED, DEGRADED, CARRIED, PARTIAL, main="items")
        )
        items = assembled.items
        if self._previous_parts:
            filled = (assembled[PARTIAL]
                      | "GroupPartialByPart" >> beam.GroupByKey()
                      | "ReadReusedVectors" >> beam.ParDo(_FillReused(self._previous_parts, self._batch_size)))
            # Two streams, not a Flatten: the local runner materialises a Flatten, which would hold every
            # item fused in this run. FuseEmbeddings, WriteAnnoyShards and SampleQueryInputs take both.
            items = (items, filled)
        # "images": the prepared pixels, per batch [(item_id, float32 [h, w, 3])], for SampleQueryInputs.
        return {"items": items, REJECTED: assembled[REJECTED], DEGRADED: assembled[DEGRADED],
                IMAGES: loaded[IMAGES], CARRIED: assembled[CARRIED]}


def streams(pcolls) -> tuple:
    """A PCollection, or a tuple of them (EncodeItems' "items" in an incremental run), as a tuple."""
    return tuple(pcolls) if isinstance(pcolls, (tuple, list)) else (pcolls,)


def each_stream(pcolls, label: str, make) -> list:
    """``make()``'s transform applied to each stream on its own (labels ``label``, ``label1``, ...), so
    that no Flatten, which the local runner materialises, joins the heavy elements."""
    return [stream | (f"{label}{i}" if i else label) >> make() for i, stream in enumerate(streams(pcolls))]


class _Fuse(beam.DoFn):
    def __init__(self, spec: fus.FusionSpec):
        self._spec = spec
        self._shared = shared.Shared()
        self._fused = progress.counter(progress.ITEMS_FUSED)

    def setup(self):
        # One fusion model per worker process, shared by its threads.
        spec = self._spec
        self._fusion = self._shared.acquire(lambda: _Holder(fus.make_fusion(spec)), tag=repr(spec)).value

    def process(self, batch):
        spec = self._spec
        n = len(batch)
        text = np.zeros((n, spec.text_dim), np.float32)
        image = np.zeros((n, spec.image_dim), np.float32)
        text_mask = np.zeros(n, np.float32)
        image_mask = np.zeros(n, np.float32)
        for i, it in enumerate(batch):
            if it.text_embedding is not None:
                text[i], text_mask[i] = it.text_embedding, 1.0
            if it.image_embedding is not None:
                image[i], image_mask[i] = it.image_embedding, 1.0
        fused = fus.fuse_fixed(self._fusion, text, text_mask, image, image_mask)
        ok = np.isfinite(fused).all(axis=1) & (np.linalg.norm(fused, axis=1) > 0.5)
        for i, it in enumerate(batch):
            if not ok[i]:
                yield beam.pvalue.TaggedOutput(
                    REJECTED, reject(it.row, rej.EMPTY_EMBEDDING, "fused vector is zero or not finite"))
                continue
            row = it.row
            yield shd.IndexedItem(row.item_id, row.title, it.text_embedding, it.image_embedding, fused[i],
                                  text_sha256=it.text_sha256, image_sha256=it.image_sha256,
                                  image_uri=None if _blank(row.image_uri) else row.image_uri,
                                  image_version=row.image_version, text_reused=it.text_reused,
                                  image_reused=it.image_reused)
        self._fused.inc(int(ok.sum()))
        progress.add(progress.ITEMS_FUSED, int(ok.sum()))


class _Holder:
    """Shared.acquire needs a weak-referenceable object."""

    def __init__(self, value):
        self.value = value


class FuseEmbeddings(beam.PTransform):
    """Batches of EncodedItem -> IndexedItem with the fused, L2-normalised vector (embedding/fusion.py)."""

    def __init__(self, spec: fus.FusionSpec):
        super().__init__()
        self._spec = spec

    def expand(self, batches):
        """``batches``: a PCollection or a tuple of them (fused each on its own: see streams()); "items"
        is then a tuple too, and "rejected" one PCollection."""
        results = each_stream(batches, "FuseVectors",
                              lambda: beam.ParDo(_Fuse(self._spec)).with_outputs(REJECTED, main="items"))
        if len(results) == 1:
            return {"items": results[0].items, REJECTED: results[0][REJECTED]}
        return {"items": tuple(r.items for r in results),
                REJECTED: tuple(r[REJECTED] for r in results) | "FlattenFuseRejections" >> beam.Flatten()}


# ---------------------------------------------------------------------------
# SampleQueryInputs

QUERY_SAMPLE_SIZE = 32


class QuerySample(NamedTuple):
    """One indexed item's raw inputs and vectors: the publisher checks the query encoder on them."""

    item_id: str
    text: Optional[str]  # what the text encoder saw (item_text), or None
    pixels: Optional[np.ndarray]  # uint8 [h, w, 3]: the image encoder saw pixels / 255; None without an image
    text_embedding: Optional[np.ndarray]
    image_embedding: Optional[np.ndarray]
    embedding: np.ndarray  # the fused vector, as indexed

    @property
    def image(self) -> Optional[np.ndarray]:
        """float32 [h, w, 3] in [0, 1], bit for bit what the image encoder saw (images.to_model_input)."""
        return None if self.pixels is None else self.pixels.astype(np.float32) / np.float32(255.0)


def sample_rank(item_id: str) -> tuple:
    """Sampled items are the ones with the smallest rank: a stable hash, the same in every run."""
    return shd.stable_shard(item_id, 1 << 64), item_id


# Texts and pixels are picked among all rows and loaded images (some of which end up rejected), the
# items among the indexed ones: a margin keeps the chosen items' texts and pixels in the picks.
SAMPLE_MARGIN = 4


def _keyed_texts(batch):
    for row in batch[1]:
        text = item_text(row)
        if text is not None:
            yield row.item_id, text


def _keyed_vectors(item):
    return item.item_id, ((item.text_embedding, item.image_embedding, item.embedding),
                          (item.image_uri, item.image_sha256))


def _reload_pixels(item_id, uri, sha, image_options) -> Optional[np.ndarray]:
    """The pixels of a sampled item whose image vector was reused (never decoded in this run): fetched
    again and decoded when the bytes are still the ones the vector came from, else None (then the
    query encoder's image parity leaves the item out)."""
    size, max_pixels, fetch_options = image_options
    try:
        data = images.fetch_image_bytes(uri.strip(), **fetch_options)
        if hashlib.sha256(data).hexdigest() != sha:
            _log.info("query sample: the image of %s changed since its vector was computed; left out of the "
                      "image parity check", item_id)
            return None
        img = images.decode_image(data, max_pixels=max_pixels, uri=uri, min_size=size)
        return np.round(images.to_model_input(img, size) * 255.0).astype(np.uint8)
    except Exception as e:  # the check loses one item, the run goes on
        _log.info("query sample: the image of %s cannot be read again (%s); left out of the image parity "
                  "check", item_id, brief(e))
        return None


def _join_sample(chosen, texts, pixels, image_options=None):
    """QuerySamples of the chosen items, best rank first, with their text and pixels when picked."""
    texts, pixels = dict(texts), dict(pixels)
    for item_id, (vectors, (uri, sha)) in chosen:
        array = pixels.get(item_id)
        pixel = None if array is None else np.round(array * 255.0).astype(np.uint8)
        if pixel is None and vectors[1] is not None and uri is not None and sha is not None and image_options:
            pixel = _reload_pixels(item_id, uri, sha, image_options)
        yield QuerySample(item_id, texts.get(item_id), pixel, *vectors)


class SampleQueryInputs(beam.PTransform):
    """Carries up to ``size`` indexed items' raw text, pixels and vectors to the publisher.

    Input: {"batches": BatchItems' output, "images": EncodeItems' "images", "items":
    FuseEmbeddings' items, and in an incremental run "shards": WriteAnnoyShards' output,
    whose ShardInfo.samples are the candidates among carried items}. The items are the
    indexed ones with the smallest ``sample_rank`` (carried or not: the same items as a
    full run), so reruns check the same items. Output: QuerySample.

    ``image_options`` (image size, max pixels, images.fetch_image_bytes keywords): in an incremental
    run, a sampled item whose image vector was reused has no pixels in "images"; its image is then
    read again (see _reload_pixels). Without them such an item's pixels stay None.
    """

    def __init__(self, size: int = QUERY_SAMPLE_SIZE, image_options: Optional[tuple] = None):
        super().__init__()
        self._size = size
        self._image_options = image_options

    def expand(self, inputs):
        # Each stream keeps only its smallest sample ranks in a Top combiner, right where it is produced:
        # filtering the whole streams by a side input of the chosen ids made the local runner hold every
        # item's pixels (600 KB each at 224 x 224) and fused vectors until the side input was ready.
        n, wide = self._size, self._size * SAMPLE_MARGIN

        def by_rank(kv):
            return sample_rank(kv[0])

        # Each stream is cut to its n best before they meet: the local runner materialises a Flatten,
        # which would hold every fused item's vectors.
        picks = each_stream(inputs["items"], "PickSampleItems",
                            lambda: beam.Map(_keyed_vectors) | beam.combiners.Top.Smallest(n, key=by_rank))
        if "shards" in inputs:  # incremental runs: candidates among the carried items, from their shards
            picks.append(inputs["shards"] | "CarriedSamples" >> beam.FlatMap(lambda info: info.samples)
                         | "PickCarriedSamples" >> beam.combiners.Top.Smallest(n, key=by_rank))
        vectors = picks[0]
        if len(picks) > 1:
            vectors = (tuple(picks) | "FlattenSamplePicks" >> beam.Flatten()
                       | "ListSamplePicks" >> beam.FlatMap(lambda best: best)
                       | "PickSampleOfAll" >> beam.combiners.Top.Smallest(n, key=by_rank))
        texts = (inputs["batches"] | "KeyTexts" >> beam.FlatMap(_keyed_texts)
                 | "PickSampleTexts" >> beam.combiners.Top.Smallest(wide, key=by_rank))
        pixels = (inputs["images"] | "KeyPixels" >> beam.FlatMap(lambda loaded: loaded)
                  | "PickSamplePixels" >> beam.combiners.Top.Smallest(wide, key=by_rank))
        return vectors | "MakeQuerySamples" >> beam.FlatMap(
            _join_sample, beam.pvalue.AsSingleton(texts), beam.pvalue.AsSingleton(pixels), self._image_options)


# ---------------------------------------------------------------------------
# WriteAnnoyShards


STAGE_BUFFER_BYTES = 8 << 20  # items held per worker before they go to staging files (see STAGE_BYTES)


class _StageItems(_Staging):
    """Fused items -> staging files (Arrow IPC), one per shard per flush: ``(shard, (path, rows))``.

    Items wait in per-shard buffers until about ``max_bytes`` are held (or the bundle ends), then each
    shard's buffer becomes one file ``<release>/_staging/shard-NNNNN/<uuid>.arrow``. Only the file
    names and row counts travel through the shuffle, so the local runner never holds the vectors of the
    whole catalog. (Not one file per fused batch: with 16 shards a batch of 32 would make files of ~2 rows.)
    A retried bundle leaves files no element names; nothing reads them and the staging folder goes.
    """

    def __init__(self, version_dir: str, num_shards: int, max_bytes: Optional[int] = None):
        super().__init__(STAGE_BUFFER_BYTES if max_bytes is None else max_bytes)
        self._version_dir = version_dir
        self._num_shards = num_shards

    def process(self, item):
        if self._hold(item, shd.staged_bytes(item)):
            yield from self._flush()

    def _flush(self):
        import uuid

        buffers = {}
        for item in self._take():
            buffers.setdefault(shd.stable_shard(item.item_id, self._num_shards), []).append(item)
        for index in sorted(buffers):
            name = uuid.uuid4().hex + shd.STAGING_SUFFIX
            path = files.join(shd.shard_staging_dir(self._version_dir, index), name)
            yield index, (path, shd.write_staging(buffers[index], path))


class _BuildShard(beam.DoFn):
    """Builds each shard from its staging files into its files, then deletes those staging files. With
    ``threads`` > 1 the shards of a bundle build at once in a thread pool (Annoy's build and Parquet
    writing release the GIL): on the local runner every shard group arrives in one bundle, so the
    machine's cores build shards side by side. Each shard's bytes do not depend on the others, on the
    order, or on how its items were split into staging files, so the output is the same for any thread
    count. (A distributed runner that retries a bundle after a shard's staging files were deleted fails
    the run there: nothing wrong is published, the failed run's release folder is removed.)"""

    def __init__(self, num_shards, dim, trees, seed, version_dir, threads=1, previous_parts=(),
                 sample_size=QUERY_SAMPLE_SIZE):
        self._args = (num_shards, dim, trees, seed, version_dir)
        self._threads = max(1, int(threads or 1))
        self._previous_parts = tuple(previous_parts)
        self._sample_size = sample_size
        self._indexed = progress.counter(progress.ITEMS_INDEXED)
        # Counted where the shard is written, from its items: exactly what the manifest counts.
        self._vectors = {name: progress.counter(name) for name in progress.VECTOR_COUNTERS}
        self._pool = None
        self._pending = []

    def _write(self, element):
        index, joined = element
        num_shards, dim, trees, seed, version_dir = self._args
        table, samples = self._read(joined)
        info = shd.write_shard(table, index, num_shards, dim, trees, seed, version_dir)
        del table
        files.delete_tree(shd.shard_staging_dir(version_dir, index))  # also any file a retried bundle left
        return dataclasses.replace(info, samples=samples)

    def _read(self, joined) -> tuple:
        """(the shard's rows sorted by item_id, the query-sample candidates among carried rows). Only the
        sorted table outlives this call: one copy of the shard's vectors while it is written, and while it
        is sorted one staging file beside it (shards.sorted_sources reads each file twice)."""
        staged = sorted(joined["staged"])
        sources = [shd.staged_file(path) for path, _ in staged]
        carried = [c for group in joined.get("carried") or () for c in group]
        samples = ()
        if carried:  # incremental runs: unchanged items' previous rows, read straight from their parts
            rows = reuse.carried_rows(carried, self._previous_parts)
            samples = _sample_rows(rows, self._sample_size)
            sources.append(lambda: rows)
        expected = sum(n for _, n in staged) + (rows.num_rows if carried else 0)
        return shd.sorted_sources(sources, expected), samples

    def _done(self, info):
        failpoint("after_shard")
        self._indexed.inc(info.count)
        progress.add(progress.ITEMS_INDEXED, info.count)
        for name, n in info.vectors:
            self._vectors[name].inc(n)
            progress.add(name, n)
        _log.info("built shard %d/%d: %d items, %d bytes", info.index + 1, self._args[0], info.count, info.size)
        return info

    def start_bundle(self):
        self._pending = []

    def process(self, element):
        if self._threads == 1:
            yield self._done(self._write(element))
            return
        if self._pool is None:
            import concurrent.futures

            self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="build-shard")
        self._pending.append(self._pool.submit(self._write, element))

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        pending, self._pending = self._pending, []
        for future in pending:  # in submission order; the first failure stops the bundle
            yield GlobalWindows.windowed_value(self._done(future.result()))

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _carried_by_shard(carried: list, num_shards: int):
    """[reuse.Carried] of one batch -> (shard, [reuse.Carried]) per shard it touches."""
    by_shard = {}
    for c in carried:
        by_shard.setdefault(shd.stable_shard(c.item_id, num_shards), []).append(c)
    yield from by_shard.items()


def _sample_rows(rows: pa.Table, n: int) -> tuple:
    """The query-sample candidates among carried rows: the ``n`` smallest sample ranks, keyed as
    SampleQueryInputs keys fused items (_keyed_vectors)."""
    ids = rows.column(emb.ITEM_ID).to_pylist()
    picked = sorted(range(len(ids)), key=lambda i: sample_rank(ids[i]))[:n]
    sub = rows.take(pa.array(picked, pa.int64()))
    text, image, fused = (shd.vector_list(sub.column(c)) for c in (emb.TEXT_EMBEDDING, emb.IMAGE_EMBEDDING,
                                                                    emb.EMBEDDING))
    uris, shas = sub.column(emb.IMAGE_URI).to_pylist(), sub.column(emb.IMAGE_SHA256).to_pylist()
    return tuple((ids[i], ((t, img, e), (uri, sha)))
                 for i, t, img, e, uri, sha in zip(picked, text, image, fused, uris, shas))


class WriteAnnoyShards(beam.PTransform):
    """Assigns items to shards by stable hash and builds each shard as one Beam element.

    The items go to staging files (Arrow IPC) under ``<version_dir>/_staging/`` as they arrive
    (``_StageItems``); only (shard, file name, row count) go through the shuffle, and each shard is
    built from its own files. Shards build in parallel across workers and in a thread pool within one
    (one shard's items must fit in one worker's memory). Every shard 0..N-1 is written, empty ones
    included, so readers can rely on N files.

    Input: the fused IndexedItems (a PCollection or a tuple of them, see streams()), or {"items": them,
    "carried": [reuse.Carried]} in an incremental run
    (``previous_parts``: reuse.Source.embeddings): only carried items' ids and current catalog fields go
    through the shuffle; each shard reads their rows from the previous parts (reuse.carried_rows) and
    reports its query-sample candidates among them in ShardInfo.samples.
    """

    def __init__(self, version_dir: str, num_shards: int, dim: int, trees: int, seed: int, threads: int = 1,
                 previous_parts=()):
        super().__init__()
        self._version_dir = version_dir
        self._num_shards = num_shards
        self._dim = dim
        self._trees = trees
        self._seed = seed
        self._threads = threads
        self._previous_parts = tuple(previous_parts)

    def expand(self, inputs) -> beam.PCollection[shd.ShardInfo]:
        n = self._num_shards
        items, carried = (inputs["items"], inputs.get("carried")) if isinstance(inputs, dict) else (inputs, None)
        # Each stream of items (see streams()) goes to its own staging files; only the file names meet.
        staged = each_stream(items, "StageByShard", lambda: beam.ParDo(_StageItems(self._version_dir, n)))
        staged = staged[0] if len(staged) == 1 else tuple(staged) | "FlattenStagedFiles" >> beam.Flatten()
        slots = staged.pipeline | "ListShards" >> beam.Create([(i, None) for i in range(n)])
        grouped = {"staged": staged, "slot": slots}
        if carried is not None:
            grouped["carried"] = carried | "KeyCarriedByShard" >> beam.FlatMap(_carried_by_shard, n)
        infos = (
            grouped
            | "GroupByShard" >> beam.CoGroupByKey()
            | "BuildShards" >> beam.ParDo(
                _BuildShard(n, self._dim, self._trees, self._seed, self._version_dir, self._threads,
                            self._previous_parts))
        )
        # Once every shard is written the staging folder goes (with any file a retried bundle left), so
        # nothing of it reaches the manifest or outlives the run.
        return (infos
                | "CollectShards" >> beam.combiners.ToList()
                | "RemoveStaging" >> beam.FlatMap(_remove_staging, self._version_dir))


def _remove_staging(infos, version_dir):
    files.delete_tree(shd.staging_dir(version_dir))
    return sorted(infos, key=lambda info: info.index)
