"""Sharded Annoy indexes: stable shard assignment and the build of one shard.

A shard is built with ``on_disk_build`` in local temp space (so the index never
has to fit in memory twice), single-threaded with a fixed seed (Annoy's
multi-threaded build orders trees by thread timing, which would make files
differ between identical runs), checked by loading it back, and then copied to
the output filesystem. Annoy ids are the positions of the shard's items sorted
by item_id, so identical input gives byte-identical shard files.
"""

import dataclasses
import os
import tempfile
from typing import Optional, Sequence

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

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        del out["id_map_checksum"], out["embeddings_checksum"], out["vectors"]
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


def write_shard(items: Sequence[IndexedItem], index: int, num_shards: int, dim: int, trees: int, seed: int,
                version_dir: str) -> ShardInfo:
    """Builds and writes shard ``index``: Annoy file, id map and embeddings part."""
    items = sorted(items, key=lambda it: it.item_id)
    paths = shard_paths(index, num_shards)
    with tempfile.TemporaryDirectory(prefix="catalog-index-shard-") as tmp:
        local = os.path.join(tmp, "shard.ann")
        build_annoy([it.embedding for it in items], dim, trees, seed, local)
        check = AnnoyIndex(dim, METRIC)
        check.load(local)
        if check.get_n_items() != len(items):
            raise RuntimeError(f"shard {index}: Annoy holds {check.get_n_items()} items, expected {len(items)}")
        check.unload()
        size, sha = files.copy_local_file(local, files.join(version_dir, paths["path"]))

    ids = [it.item_id for it in items]
    annoy_ids = pa.array(range(len(items)), pa.int64())
    id_map_checksum = files.write_parquet(
        files.join(version_dir, paths["id_map"]),
        pa.Table.from_arrays([annoy_ids, pa.array(ids, pa.string())], schema=emb.IDMAP_SCHEMA),
    )

    def vectors(values):
        # One flat float32 buffer plus offsets: no per-item Arrow objects (a 1M-item
        # shard spent ~9 s converting vectors one by one).
        present = [v is not None for v in values]
        lengths = np.array([len(v) if p else 0 for v, p in zip(values, present)], np.int64)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        flat = [np.asarray(v, np.float32) for v, p in zip(values, present) if p]
        data = pa.array(np.concatenate(flat) if flat else np.zeros(0, np.float32))
        mask = pa.array(~np.array(present, bool)) if not all(present) else None
        return pa.ListArray.from_arrays(offsets, data, pa.list_(pa.float32()), mask=mask)

    table = pa.Table.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.array([it.title for it in items], pa.string()),
            vectors([it.text_embedding for it in items]),
            vectors([it.image_embedding for it in items]),
            vectors([it.embedding for it in items]),
            pa.array([index] * len(items), pa.int32()),
            annoy_ids,
            # A key only where its vector is: no text vector, no text_sha256; no image vector, no image_sha256.
            pa.array([it.text_sha256 if it.text_embedding is not None else None for it in items], pa.string()),
            pa.array([it.image_sha256 if it.image_embedding is not None else None for it in items], pa.string()),
            pa.array([it.image_uri for it in items], pa.string()),
            pa.array([it.image_version for it in items], pa.string()),
        ],
        schema=emb.EMBEDDINGS_SCHEMA,
    )
    embeddings_checksum = files.write_parquet(files.join(version_dir, paths["embeddings"]), table)
    return ShardInfo(index, paths["path"], len(items), size, sha, paths["id_map"], paths["embeddings"],
                     id_map_checksum, embeddings_checksum, tuple(sorted(vector_counts(items).items())))
