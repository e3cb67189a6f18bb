"""Sharded Annoy indexes: stable shard assignment and the build of one shard.

A shard is built with ``on_disk_build`` in local temp space (so the index never
has to fit in memory twice), single-threaded with a fixed seed (Annoy's
multi-threaded build orders trees by thread timing, which would make files
differ between identical runs), checked by loading it back, and then copied to
the output filesystem. Annoy ids are the positions of the shard's items sorted
by item_id, so identical input gives byte-identical shard files.

In the index pipeline the items reach their shard through staging files
(``write_staging``: ``<release>/_staging/shard-NNNNN/*.parquet``, written as the
items are fused) rather than through an in-memory shuffle; ``write_shard`` takes
either the items or those files' rows (``read_staged``) and writes the same
bytes from both.
"""

import dataclasses
import functools
import os
import tempfile
from typing import NamedTuple, Optional, Sequence

import numpy as np
import pyarrow as pa
from annoy import AnnoyIndex

from pipelines import files
from pipelines import progress
from schemas import embeddings as emb
from schemas import layout

METRIC = layout.METRIC


# The rules are the published layout's (schemas/layout.py); re-exported for the pipeline's code.
stable_shard = layout.stable_shard
shard_name = layout.shard_name
shard_paths = layout.shard_paths


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """What was written for one shard; becomes an entry of the manifest's ``shards``."""

    index: int
    path: str
    count: int
    size: int
    sha256: str
    id_map: str
    embeddings: str

    # (size, sha256) of the id map and the embeddings part, as written: the manifest's ``files``.
    id_map_checksum: tuple = ()
    embeddings_checksum: tuple = ()
    # The shard's items by how their vectors came about (pipelines/reuse.py): {reused,encoded}_{text,image}.
    # Per modality, reused + encoded = the shard's items with that vector.
    vectors: tuple = ()  # ((name, count), ...) sorted by name
    # Incremental runs: the query-sample candidates among the shard's carried rows (transforms.SampleQueryInputs).
    samples: tuple = ()

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("id_map_checksum", "embeddings_checksum", "vectors", "samples"):
            del out[name]
        return out

    def file_entries(self) -> dict:
        """{relative path: {size, sha256}} of the shard's three files."""
        return {path: {"size": size, "sha256": sha} for path, (size, sha) in (
            (self.path, (self.size, self.sha256)), (self.id_map, self.id_map_checksum),
            (self.embeddings, self.embeddings_checksum))}


@dataclasses.dataclass
class IndexedItem:
    """One fused item on its way into a shard."""

    item_id: str
    title: Optional[str]
    text_embedding: Optional[np.ndarray]
    image_embedding: Optional[np.ndarray]
    embedding: np.ndarray
    # Content keys for later incremental runs (schemas/embeddings.py) and whether each vector was reused.
    text_sha256: Optional[str] = None
    image_sha256: Optional[str] = None
    image_uri: Optional[str] = None
    image_version: Optional[str] = None
    text_reused: bool = False
    image_reused: bool = False


VECTOR_COUNTS = progress.VECTOR_COUNTERS  # the manifest's counts and the Beam counters of the same names


def vector_counts(items: Sequence[IndexedItem]) -> dict:
    """{reused,encoded}_{text,image}: how many of ``items`` have each vector, by whether it was reused."""
    out = dict.fromkeys(VECTOR_COUNTS, 0)
    for it in items:
        if it.text_embedding is not None:
            out["reused_text" if it.text_reused else "encoded_text"] += 1
        if it.image_embedding is not None:
            out["reused_image" if it.image_reused else "encoded_image"] += 1
    return out


def build_annoy(vectors: Sequence[np.ndarray], dim: int, trees: int, seed: int, path: str) -> None:
    """Builds an angular Annoy index of ``vectors`` (annoy id = position) at a local path."""
    index = AnnoyIndex(dim, METRIC)
    index.set_seed(seed)
    index.on_disk_build(path)
    for i, v in enumerate(vectors):
        index.add_item(i, v)
    index.build(trees, n_jobs=1)
    index.unload()


def _vectors(values) -> pa.ListArray:
    """list<float32> column of per-item vectors (None: null). One flat float32 buffer plus offsets: no
    per-item Arrow objects (a 1M-item shard spent ~9 s converting vectors one by one)."""
    present = [v is not None for v in values]
    lengths = np.array([len(v) if p else 0 for v, p in zip(values, present)], np.int64)
    flat = [np.asarray(v, np.float32) for v, p in zip(values, present) if p]
    return _list_array(np.array(present, bool), lengths, np.concatenate(flat) if flat else np.zeros(0, np.float32))


_VECTOR = pa.list_(pa.float32())


def _list_array(present: np.ndarray, lengths: np.ndarray, flat: np.ndarray) -> pa.ListArray:
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    mask = pa.array(~present) if not present.all() else None
    return pa.ListArray.from_arrays(offsets, pa.array(flat), _VECTOR, mask=mask)


class _Rows(NamedTuple):
    """One shard's rows, sorted by item_id, as the files need them."""

    ids: list
    titles: list
    text: pa.ListArray
    image: pa.ListArray
    fused: Sequence  # per row a float32 vector of the fused dimension, for Annoy
    fused_column: pa.ListArray
    text_sha256: list  # already None where the row has no text vector (same for image)
    image_sha256: list
    image_uri: list
    image_version: list
    vector_counts: dict


def _rows_from_items(items: Sequence[IndexedItem]) -> _Rows:
    items = sorted(items, key=lambda it: it.item_id)
    return _Rows(
        [it.item_id for it in items], [it.title for it in items],
        _vectors([it.text_embedding for it in items]), _vectors([it.image_embedding for it in items]),
        [it.embedding for it in items], _vectors([it.embedding for it in items]),
        # A key only where its vector is: no text vector, no text_sha256; no image vector, no image_sha256.
        [it.text_sha256 if it.text_embedding is not None else None for it in items],
        [it.image_sha256 if it.image_embedding is not None else None for it in items],
        [it.image_uri for it in items], [it.image_version for it in items], vector_counts(items))


def vector_list(column) -> list:
    """A list<float32> column as [float32 array or None] per row, from one flat buffer (no Python floats)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return []
    present = np.asarray(arr.is_valid(), bool)
    lengths = np.asarray(arr.value_lengths().fill_null(0), np.int64)
    flat = np.asarray(arr.flatten(), np.float32)
    ends = np.cumsum(lengths)
    return [flat[end - n:end].copy() if p else None for p, n, end in zip(present, lengths, ends)]


def _one_chunk(column):
    """A column as one Array: combine_chunks copies even a single chunk (a shard's vectors, once more)."""
    if not isinstance(column, pa.ChunkedArray):
        return column
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _flat_values(arr: pa.ListArray, present: np.ndarray) -> np.ndarray:
    """The values of the present rows of a list<float32> array, in row order, as float32: a view of Arrow's
    buffer when null rows hold no values (as _list_array and our staging files make them), else a copy
    (``flatten``: with nulls, Arrow copies the present rows' values; a shard's image column at the built-in
    sizes is ~24 MiB per 6,300 rows, issue 9)."""
    if not len(arr):
        return np.zeros(0, np.float32)
    offsets = np.asarray(arr.offsets, np.int64)  # respects a slice; arr.values does not
    if not np.any(np.diff(offsets)[~present]):
        start = int(offsets[0])
        return np.asarray(arr.values.slice(start, int(offsets[-1]) - start), np.float32)
    return np.asarray(arr.flatten(), np.float32)


def _relist(column) -> tuple:
    """(present, list<float32> rebuilt as ``_vectors`` builds it) of a staged vector column."""
    arr = _one_chunk(column)
    present = np.asarray(arr.is_valid(), bool) if len(arr) else np.zeros(0, bool)
    lengths = np.asarray(arr.value_lengths().fill_null(0), np.int64) if len(arr) else np.zeros(0, np.int64)
    flat = _flat_values(arr, present)
    return present, _list_array(present, lengths, flat), flat


def _id_order(ids: list) -> Optional[list]:
    """The row order sorted(items, key=item_id) gives, or None when the rows are in it already."""
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return None if all(i == r for i, r in enumerate(order)) else order


def _sort_order(ids: list) -> np.ndarray:
    """_id_order as row numbers (the identity when the rows are sorted already)."""
    order = _id_order(ids)
    return np.arange(len(ids), dtype=np.int64) if order is None else np.asarray(order, np.int64)


class _Scatter:
    """One vector column of one width (or nulls) put into its sorted rows, one source at a time: the output
    is allocated once and each source's present rows are copied into their places with numpy. Arrow's
    take of a list column makes an index per value (int64: twice the vectors' bytes) beside its output:
    sorting a shard peaked at ~3.6 copies of its vectors, two shards at a time (issue 9); this holds the
    output beside one source's values."""

    def __init__(self, present: np.ndarray, order: np.ndarray, inverse: np.ndarray, width: int):
        self._present = present[order]
        self._slot = np.cumsum(self._present) - 1  # row of the output's values for each present output row
        self._inverse = inverse
        self._width = width
        self._matrix = np.empty((int(self._present.sum()), width), np.float32)

    def put(self, rows: np.ndarray, flat: np.ndarray) -> None:
        """``rows``: the input row numbers of a source's present rows; ``flat``: their values, in row order."""
        if len(rows):
            self._matrix[self._slot[self._inverse[rows]]] = flat.reshape(len(rows), self._width)

    def array(self) -> pa.ListArray:
        return _list_array(self._present, self._present.astype(np.int64) * self._width, self._matrix.reshape(-1))


def _inverse(order: np.ndarray) -> np.ndarray:
    """For each input row, its place in the sorted output."""
    inverse = np.empty(len(order), np.int64)
    inverse[order] = np.arange(len(order))
    return inverse


def _take_vectors(column, order: np.ndarray) -> Optional[pa.ListArray]:
    """``column.take(order)`` for a list<float32> column of vectors of one length (or nulls), as one chunk
    (_Scatter, a chunk at a time); None when the vectors differ in length."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts, width = [], None
    for arr in chunks:
        present = np.asarray(arr.is_valid(), bool) if len(arr) else np.zeros(0, bool)
        lengths = np.asarray(arr.value_lengths().fill_null(0), np.int64)[present] if len(arr) else present
        for w in np.unique(lengths).tolist():
            if width is not None and w != width:
                return None
            width = w
        parts.append((present, _flat_values(arr, present)))
    present = np.concatenate([p for p, _ in parts]) if parts else np.zeros(0, bool)
    scatter = _Scatter(present, order, _inverse(order), width or 0)
    base = 0
    for chunk_present, flat in parts:
        scatter.put(base + np.flatnonzero(chunk_present), flat)
        base += len(chunk_present)
    return scatter.array()


def sorted_by_id(table: pa.Table) -> pa.Table:
    """The rows sorted by item_id, as write_shard orders them, one chunk per column. Sorting before the
    call lets the caller drop the unsorted table: write_shard then holds one copy of the shard's vectors,
    not two; the vector columns are gathered row by row (_take_vectors), the others by Arrow's take."""
    order = _sort_order(table.column("item_id").to_pylist())
    indices = pa.array(order, pa.int64())
    columns = []
    for field in table.schema:
        column = table.column(field.name)
        taken = _take_vectors(column, order) if field.type == _VECTOR else None
        columns.append(taken if taken is not None else column.take(indices).combine_chunks())
    return pa.Table.from_arrays(columns, schema=table.schema)


def sorted_sources(sources: Sequence, expected_rows: Optional[int] = None) -> pa.Table:
    """sorted_by_id of the concatenated tables of ``sources`` (callables that return a table of
    ``STAGING_SCHEMA``: a staging file read, or rows held in memory), reading one source at a time: first
    every source's ids, validity and small columns; then each source again, its vectors scattered into
    their sorted places (_Scatter). So the shard's vectors are held once (the output) beside one source,
    where reading every file and sorting held them twice (issue 9: two shards at once at the built-in
    sizes, ~90 MiB per 100k items). ``expected_rows``: rows the sources must hold. Vectors of unequal
    lengths in a column: read whole and sorted_by_id."""
    vector_names = [f.name for f in STAGING_SCHEMA if f.type == _VECTOR]
    small = {f.name: [] for f in STAGING_SCHEMA if f.type != _VECTOR}
    present = {name: [] for name in vector_names}
    widths = {name: set() for name in vector_names}
    counts = []
    for source in sources:
        table = _checked(source())
        counts.append(table.num_rows)
        for name in small:
            small[name].extend(table.column(name).to_pylist())
        for name in vector_names:
            arr = _one_chunk(table.column(name))
            valid = np.asarray(arr.is_valid(), bool) if len(arr) else np.zeros(0, bool)
            present[name].append(valid)
            if len(arr):
                widths[name].update(np.unique(np.asarray(arr.value_lengths().fill_null(0))[valid]).tolist())
        del table
    n = sum(counts)
    if expected_rows is not None and n != expected_rows:
        raise RuntimeError(f"staging files hold {n} rows, expected {expected_rows}")
    if any(len(w) > 1 for w in widths.values()):
        tables = [_checked(source()) for source in sources]
        return sorted_by_id(pa.concat_tables(tables) if tables else STAGING_SCHEMA.empty_table())
    order = _sort_order(small["item_id"])
    inverse = _inverse(order)
    out = {name: _Scatter(np.concatenate(present[name]) if present[name] else np.zeros(0, bool), order, inverse,
                          next(iter(widths[name]), 0))
           for name in vector_names}
    base = 0
    for k, source in enumerate(sources):
        table = _checked(source())
        if table.num_rows != counts[k]:
            raise RuntimeError(f"a staging source gave {counts[k]} rows, then {table.num_rows}")
        for name in vector_names:
            valid = present[name][k]
            out[name].put(base + np.flatnonzero(valid), _flat_values(_one_chunk(table.column(name)), valid))
        base += counts[k]
        del table
    columns = []
    for field in STAGING_SCHEMA:
        if field.type == _VECTOR:
            columns.append(out.pop(field.name).array())
        else:
            values = small.pop(field.name)
            columns.append(pa.array([values[i] for i in order], field.type))
    return pa.Table.from_arrays(columns, schema=STAGING_SCHEMA)


def _rows_from_table(table: pa.Table, dim: int) -> _Rows:
    ids = table.column("item_id").to_pylist()
    order = _id_order(ids)
    if order is not None:
        table = table.take(pa.array(order, pa.int64()))
    else:
        order = range(len(ids))
    text_present, text, _ = _relist(table.column("text_embedding"))
    image_present, image, _ = _relist(table.column("image_embedding"))
    fused_present, fused_column, flat = _relist(table.column("embedding"))
    n = len(order)
    if not fused_present.all() or len(flat) != n * dim:
        raise ValueError(f"staged rows: {int((~fused_present).sum())} without a fused vector, "
                         f"{len(flat)} values for {n} x {dim}")
    text_reused = np.asarray(table.column("text_reused").to_numpy(zero_copy_only=False), bool)
    image_reused = np.asarray(table.column("image_reused").to_numpy(zero_copy_only=False), bool)
    counts = {"reused_text": int((text_present & text_reused).sum()),
              "encoded_text": int((text_present & ~text_reused).sum()),
              "reused_image": int((image_present & image_reused).sum()),
              "encoded_image": int((image_present & ~image_reused).sum())}
    if set(counts) != set(VECTOR_COUNTS):
        raise RuntimeError(f"vector counts {sorted(counts)} do not match {sorted(VECTOR_COUNTS)}")

    def keys(name, present):
        return [k if p else None for k, p in zip(table.column(name).to_pylist(), present)]

    return _Rows([ids[i] for i in order], table.column("title").to_pylist(), text, image,
                 flat.reshape(n, dim), fused_column, keys("text_sha256", text_present),
                 keys("image_sha256", image_present), table.column("image_uri").to_pylist(),
                 table.column("image_version").to_pylist(), counts)


# Rows per row group of an embeddings part: Parquet's writer holds a row group's encoded columns until it
# is complete, so one group per shard held ~1.4 copies of the shard's vectors on top of the table; 1,024
# rows (~7.5 MiB at the built-in encoders' sizes) hold a few MiB (issue 9). Readers are unaffected.
EMBEDDINGS_ROW_GROUP_ROWS = 1024


def write_shard(items, index: int, num_shards: int, dim: int, trees: int, seed: int,
                version_dir: str) -> ShardInfo:
    """Builds and writes shard ``index``: Annoy file, id map and embeddings part.

    ``items``: IndexedItems, or a table of ``STAGING_SCHEMA`` (the shard's staging files read back,
    ``read_staged``); the same rows give the same bytes either way."""
    rows = _rows_from_table(items, dim) if isinstance(items, pa.Table) else _rows_from_items(items)
    n = len(rows.ids)
    paths = shard_paths(index, num_shards)
    with tempfile.TemporaryDirectory(prefix="catalog-index-shard-") as tmp:
        local = os.path.join(tmp, "shard.ann")
        build_annoy(rows.fused, dim, trees, seed, local)
        check = AnnoyIndex(dim, METRIC)
        check.load(local)
        if check.get_n_items() != n:
            raise RuntimeError(f"shard {index}: Annoy holds {check.get_n_items()} items, expected {n}")
        check.unload()
        size, sha = files.copy_local_file(local, files.join(version_dir, paths["path"]))

    annoy_ids = pa.array(range(n), pa.int64())
    id_map_checksum = files.write_parquet(
        files.join(version_dir, paths["id_map"]),
        pa.Table.from_arrays([annoy_ids, pa.array(rows.ids, pa.string())], schema=emb.IDMAP_SCHEMA),
    )

    table = pa.Table.from_arrays(
        [
            pa.array(rows.ids, pa.string()),
            pa.array(rows.titles, pa.string()),
            rows.text,
            rows.image,
            rows.fused_column,
            pa.array([index] * n, pa.int32()),
            annoy_ids,
            pa.array(rows.text_sha256, pa.string()),
            pa.array(rows.image_sha256, pa.string()),
            pa.array(rows.image_uri, pa.string()),
            pa.array(rows.image_version, pa.string()),
        ],
        schema=emb.EMBEDDINGS_SCHEMA,
    )
    embeddings_checksum = files.write_parquet(files.join(version_dir, paths["embeddings"]), table,
                                              row_group_size=EMBEDDINGS_ROW_GROUP_ROWS)
    return ShardInfo(index, paths["path"], n, size, sha, paths["id_map"], paths["embeddings"],
                     id_map_checksum, embeddings_checksum, tuple(sorted(rows.vector_counts.items())))


# ---------------------------------------------------------------------------
# Staging: fused items on their way to their shard, in files rather than in a shuffle.

STAGING_DIR = "_staging"  # under the release folder; removed once every shard is written

STAGING_SCHEMA = pa.schema([
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("title", pa.string()),
    pa.field("text_embedding", pa.list_(pa.float32())),
    pa.field("image_embedding", pa.list_(pa.float32())),
    pa.field("embedding", pa.list_(pa.float32())),
    pa.field("text_sha256", pa.string()),
    pa.field("image_sha256", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("image_version", pa.string()),
    pa.field("text_reused", pa.bool_()),
    pa.field("image_reused", pa.bool_()),
])


def staging_dir(version_dir: str) -> str:
    return files.join(version_dir, STAGING_DIR)


def text_staging_dir(version_dir: str) -> str:
    """Where the index pipeline's encoded text vectors wait for their batches (transforms._StageTextVectors)."""
    return files.join(staging_dir(version_dir), "text")


def shard_staging_dir(version_dir: str, index: int) -> str:
    return files.join(staging_dir(version_dir), f"shard-{index:05d}")


def staged_bytes(item: IndexedItem) -> int:
    """Rough memory of one item waiting to be staged: its vectors plus Python objects."""
    return 512 + sum(v.nbytes for v in (item.text_embedding, item.image_embedding, item.embedding)
                     if v is not None and hasattr(v, "nbytes"))


def staging_table(items: Sequence[IndexedItem]) -> pa.Table:
    """The items (in any order) as a table of ``STAGING_SCHEMA``: every field ``write_shard`` uses."""
    return pa.Table.from_arrays([
        pa.array([it.item_id for it in items], pa.string()),
        pa.array([it.title for it in items], pa.string()),
        _vectors([it.text_embedding for it in items]),
        _vectors([it.image_embedding for it in items]),
        _vectors([it.embedding for it in items]),
        pa.array([it.text_sha256 for it in items], pa.string()),
        pa.array([it.image_sha256 for it in items], pa.string()),
        pa.array([it.image_uri for it in items], pa.string()),
        pa.array([it.image_version for it in items], pa.string()),
        pa.array([bool(it.text_reused) for it in items], pa.bool_()),
        pa.array([bool(it.image_reused) for it in items], pa.bool_()),
    ], schema=STAGING_SCHEMA)


STAGING_SUFFIX = ".arrow"


def write_staging(items: Sequence[IndexedItem], path: str) -> int:
    """Writes items to one staging file, Arrow IPC (uncompressed: it lives minutes); returns the row count.

    Arrow IPC rather than Parquet: reading it back is one copy of its bytes (the table points into them),
    where decoding Parquet's list<float> columns peaked at ~2.5 copies, two shards at a time (issue 9)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, STAGING_SCHEMA) as writer:
        writer.write_table(staging_table(items))
    files.write_bytes(path, memoryview(sink.getvalue()))
    return len(items)


def _read_staging_file(path: str) -> pa.Table:
    table = pa.ipc.open_file(pa.py_buffer(files.read_bytes(path))).read_all()
    if not table.schema.equals(STAGING_SCHEMA):
        raise RuntimeError(f"{path}: not a staging file of this version (schema {table.schema})")
    return table


def staged_file(path: str):
    """A source for sorted_sources: the rows of one staging file, read again each time it is called."""
    return functools.partial(_read_staging_file, path)


def _checked(table: pa.Table) -> pa.Table:
    if not table.schema.equals(STAGING_SCHEMA):
        raise RuntimeError(f"rows of schema {table.schema}, expected the staging schema")
    return table


def read_staged(paths: Sequence[str], expected_rows: Optional[int] = None) -> pa.Table:
    """The rows of staging files, concatenated (``STAGING_SCHEMA``; empty without files)."""
    tables = [_read_staging_file(p) for p in paths]
    table = pa.concat_tables(tables) if tables else STAGING_SCHEMA.empty_table()
    if expected_rows is not None and table.num_rows != expected_rows:
        raise RuntimeError(f"staging files hold {table.num_rows} rows, expected {expected_rows}: {list(paths)}")
    return table
