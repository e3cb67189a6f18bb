import collections

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from annoy import AnnoyIndex

from embedding.fusion import l2_normalize
from pipelines import shards as shd


def items(n, dim, seed=0, prefix="item"):
    rng = np.random.default_rng(seed)
    vecs = l2_normalize(rng.normal(size=(n, dim)))
    return [shd.IndexedItem(f"{prefix}-{i:04d}", f"title {i}", vecs[i][:4], None, vecs[i]) for i in range(n)]


def test_stable_shard_is_pinned():
    # Pinned values (sha256-based): a change here would move every published item to another shard.
    assert [shd.stable_shard(x, 16) for x in ("a", "item-000001", "有机绿茶", "b", "c")] == [10, 10, 11, 10, 2]
    assert shd.stable_shard("a", 4) == 2
    assert all(shd.stable_shard(f"x{i}", 1) == 0 for i in range(50))


def test_stable_shard_spreads_items_evenly():
    counts = collections.Counter(shd.stable_shard(f"item-{i}", 8) for i in range(8000))
    assert sorted(counts) == list(range(8))
    assert max(counts.values()) < 1.15 * 1000 and min(counts.values()) > 0.85 * 1000


def test_write_shard_tiny_exact_case(tmp_path):
    vecs = [np.array(v, np.float32) for v in ([1, 0, 0], [0, 1, 0], [0.9, 0.1, 0])]
    its = [shd.IndexedItem(i, None, None, None, v) for i, v in zip(["c", "a", "b"], vecs)]
    info = shd.write_shard(its, 0, 1, 3, trees=3, seed=1, version_dir=str(tmp_path))
    assert (info.count, info.path) == (3, "shards/shard-00000-of-00001.ann")
    ids = pq.read_table(tmp_path / info.id_map).to_pydict()
    assert ids == {"annoy_id": [0, 1, 2], "item_id": ["a", "b", "c"]}  # sorted by item_id
    index = AnnoyIndex(3, "angular")
    index.load(str(tmp_path / info.path))
    # "c" = [1,0,0] is nearest to "b" = [0.9,0.1,0]; annoy ids: a=0, b=1, c=2.
    assert index.get_nns_by_item(2, 2) == [2, 1]
    assert index.get_nns_by_item(0, 1) == [0]
    table = pq.read_table(tmp_path / info.embeddings).to_pylist()
    assert [r["item_id"] for r in table] == ["a", "b", "c"]
    assert table[0]["embedding"] == pytest.approx([0, 1, 0])
    assert table[0]["image_embedding"] is None and table[0]["shard"] == 0 and table[2]["annoy_id"] == 2


def test_write_shard_is_byte_identical_for_identical_input(tmp_path):
    its = items(300, 16)
    a = shd.write_shard(its, 0, 1, 16, trees=5, seed=3, version_dir=str(tmp_path / "a"))
    b = shd.write_shard(list(reversed(its)), 0, 1, 16, trees=5, seed=3, version_dir=str(tmp_path / "b"))
    assert (a.sha256, a.size) == (b.sha256, b.size)
    assert (tmp_path / "a" / a.path).read_bytes() == (tmp_path / "b" / b.path).read_bytes()


def test_empty_shard_is_written(tmp_path):
    info = shd.write_shard([], 2, 4, 8, trees=2, seed=0, version_dir=str(tmp_path))
    assert info.count == 0 and info.path == "shards/shard-00002-of-00004.ann"
    index = AnnoyIndex(8, "angular")
    index.load(str(tmp_path / info.path))
    assert index.get_n_items() == 0
    assert pq.read_table(tmp_path / info.id_map).num_rows == 0


def test_every_item_is_its_own_neighbour_and_recall_vs_brute_force(tmp_path):
    its = items(2000, 32, seed=5)
    info = shd.write_shard(its, 0, 1, 32, trees=10, seed=0, version_dir=str(tmp_path))
    index = AnnoyIndex(32, "angular")
    index.load(str(tmp_path / info.path))
    ordered = sorted(its, key=lambda it: it.item_id)
    vecs = np.stack([it.embedding for it in ordered])
    assert all(index.get_nns_by_item(i, 1) == [i] for i in range(len(ordered)))
    rng = np.random.default_rng(9)
    queries = l2_normalize(rng.normal(size=(100, 32)))
    truth = np.argsort(-(queries @ vecs.T), axis=1)[:, :10]
    found = [index.get_nns_by_vector(q, 10, search_k=10 * 10 * 20) for q in queries]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.9, recall


# ---------------------------------------------------------------------------
# Staging (issue 9): a shard built from its staging files is the shard built from its items.


def mixed_items(n, seed=0):
    """Items with every field write_shard uses: missing text/image vectors, keys, reuse flags, titles."""
    rng = np.random.default_rng(seed)
    fused = l2_normalize(rng.normal(size=(n, 16))).astype(np.float32)
    text = rng.normal(size=(n, 6)).astype(np.float32)
    image = rng.normal(size=(n, 5)).astype(np.float32)
    out = []
    for i in range(n):
        has_text, has_image = i % 5 != 1, i % 3 != 0
        out.append(shd.IndexedItem(
            f"id-{(i * 7919) % 1000:04d}-{i}", None if i % 4 == 0 else f"title {i} é",
            text[i] if has_text else None, image[i] if has_image else None, fused[i],
            text_sha256=f"t{i}", image_sha256=f"i{i}" if i % 6 else None,
            image_uri=f"gs://b/{i}.jpg" if i % 2 else None, image_version="v1" if i % 7 == 0 else None,
            text_reused=i % 2 == 0, image_reused=i % 3 == 1))
    return out


def _written(info, folder):
    return {rel: (folder / rel).read_bytes() for rel in (info.path, info.id_map, info.embeddings)}


def test_a_shard_built_from_staging_files_is_byte_identical_to_one_built_from_its_items(tmp_path):
    its = mixed_items(97)
    reference = shd.write_shard(its, 1, 3, 16, trees=5, seed=4, version_dir=str(tmp_path / "items"))
    # Staged in arrival order, split unevenly over files that are read back in another order.
    order = np.random.default_rng(1).permutation(len(its))
    parts = [[its[k] for k in order[a:b]] for a, b in ((0, 10), (10, 11), (11, 60), (60, 97))]
    paths = [str(tmp_path / "staging" / f"part-{k}.arrow") for k in range(len(parts))]
    assert [shd.write_staging(part, path) for part, path in zip(parts, paths)] == [10, 1, 49, 37]
    table = shd.read_staged(list(reversed(paths)), expected_rows=97)
    staged = shd.write_shard(table, 1, 3, 16, trees=5, seed=4, version_dir=str(tmp_path / "staged"))
    assert staged == reference  # counts, checksums and vector counts
    assert _written(staged, tmp_path / "staged") == _written(reference, tmp_path / "items")
    assert dict(staged.vectors) == shd.vector_counts(its)
    # Sorted before the call (what _BuildShard does, so that it can drop the unsorted rows): the same bytes.
    ordered = shd.sorted_by_id(shd.read_staged(list(reversed(paths)), expected_rows=97))
    assert ordered.column("item_id").to_pylist() == sorted(it.item_id for it in its)
    assert all(ordered.column(name).num_chunks == 1 for name in ordered.column_names)
    again = shd.write_shard(ordered, 1, 3, 16, trees=5, seed=4, version_dir=str(tmp_path / "sorted"))
    assert _written(again, tmp_path / "sorted") == _written(reference, tmp_path / "items")
    # Already sorted but in several chunks (staging files read in order): one chunk, same rows.
    chunked = pa.concat_tables([ordered.slice(0, 40), ordered.slice(40)])
    assert shd.sorted_by_id(chunked).equals(ordered) and shd.sorted_by_id(chunked).column(2).num_chunks == 1


def test_an_empty_shard_from_no_staging_files_matches_the_empty_shard(tmp_path):
    reference = shd.write_shard([], 2, 4, 8, trees=2, seed=0, version_dir=str(tmp_path / "items"))
    staged = shd.write_shard(shd.read_staged([], expected_rows=0), 2, 4, 8, trees=2, seed=0,
                             version_dir=str(tmp_path / "staged"))
    assert staged == reference and staged.count == 0
    assert _written(staged, tmp_path / "staged") == _written(reference, tmp_path / "items")


def test_staging_files_that_do_not_hold_the_announced_rows_are_refused(tmp_path):
    path = str(tmp_path / "s.arrow")
    shd.write_staging(mixed_items(5), path)
    with pytest.raises(RuntimeError, match="hold 5 rows, expected 6"):
        shd.read_staged([path], expected_rows=6)


def test_a_staging_file_of_another_schema_is_refused(tmp_path):
    path = str(tmp_path / "old.arrow")
    table = pa.table({"item_id": ["a"], "embedding": pa.array([[1.0]], pa.list_(pa.float32()))})
    with pa.ipc.new_file(path, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(RuntimeError, match="not a staging file of this version"):
        shd.read_staged([path])


def test_embeddings_parts_are_written_in_small_row_groups(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    its = mixed_items(97)
    whole = shd.write_shard(its, 0, 1, 16, trees=2, seed=0, version_dir=str(tmp_path / "a"))
    monkeypatch.setattr(shd, "EMBEDDINGS_ROW_GROUP_ROWS", 40)
    grouped = shd.write_shard(its, 0, 1, 16, trees=2, seed=0, version_dir=str(tmp_path / "b"))
    first, second = (pq.ParquetFile(str(tmp_path / d / info.embeddings)) for d, info in (("a", whole), ("b", grouped)))
    assert first.metadata.num_row_groups == 1  # 97 rows < 1,024
    assert [second.metadata.row_group(i).num_rows for i in range(second.metadata.num_row_groups)] == [40, 40, 17]
    assert first.read().equals(second.read())


def test_sorted_by_id_gives_the_rows_python_sorts_vectors_gathered_row_by_row():
    # Independent check: the rows as Python dicts, sorted by item_id. Chunks of 3 sizes, null vectors, and
    # a vector column whose rows differ in length (gathered by Arrow's take instead).
    its = mixed_items(41, seed=3)
    order = np.random.default_rng(2).permutation(len(its))
    table = pa.concat_tables([shd.staging_table([its[k] for k in order[a:b]]) for a, b in ((0, 1), (1, 30), (30, 41))])
    want = sorted(table.to_pylist(), key=lambda r: r["item_id"])
    got = shd.sorted_by_id(table)
    assert got.to_pylist() == want and got.schema.equals(shd.STAGING_SCHEMA)
    assert [got.column(name).num_chunks for name in got.column_names] == [1] * got.num_columns
    ragged = table.set_column(2, "text_embedding", pa.chunked_array(
        [pa.array([[1.0] * (k % 3) if k % 4 else None for k in range(len(table))], pa.list_(pa.float32()))]))
    assert shd._take_vectors(ragged.column("text_embedding"), np.arange(len(table))) is None
    assert shd.sorted_by_id(ragged).to_pylist() == sorted(ragged.to_pylist(), key=lambda r: r["item_id"])


def test_sorted_sources_reads_one_source_at_a_time_and_gives_sorted_by_id(tmp_path):
    # Staging files (each read twice) and rows held in memory (an incremental run's carried rows).
    its = mixed_items(53, seed=5)
    order = np.random.default_rng(4).permutation(len(its))
    parts = [[its[k] for k in order[a:b]] for a, b in ((0, 7), (7, 8), (8, 40))]
    paths = [str(tmp_path / f"part-{k}.arrow") for k in range(len(parts))]
    for part, path in zip(parts, paths):
        shd.write_staging(part, path)
    held = shd.staging_table([its[k] for k in order[40:]])
    calls = []

    def counted(path):
        calls.append(path)
        return shd._read_staging_file(path)

    sources = [lambda p=p: counted(p) for p in paths] + [lambda: held]
    got = shd.sorted_sources(sources, expected_rows=53)
    want = shd.sorted_by_id(pa.concat_tables([shd.read_staged(paths), held]))
    assert got.equals(want) and got.to_pylist() == sorted(want.to_pylist(), key=lambda r: r["item_id"])
    assert calls == paths + paths  # ids first, then the vectors: one file in memory at a time
    reference = shd.write_shard(its, 0, 1, 16, trees=5, seed=4, version_dir=str(tmp_path / "items"))
    again = shd.write_shard(got, 0, 1, 16, trees=5, seed=4, version_dir=str(tmp_path / "sources"))
    assert _written(again, tmp_path / "sources") == _written(reference, tmp_path / "items")
    assert shd.sorted_sources([], expected_rows=0).equals(shd.STAGING_SCHEMA.empty_table())


def test_sorted_sources_refuses_what_does_not_add_up(tmp_path):
    its = mixed_items(9)
    table = shd.staging_table(its)
    with pytest.raises(RuntimeError, match="hold 9 rows, expected 10"):
        shd.sorted_sources([lambda: table], expected_rows=10)
    shrinking = iter([table, table.slice(0, 5)])
    with pytest.raises(RuntimeError, match="gave 9 rows, then 5"):
        shd.sorted_sources([lambda: next(shrinking)])
    with pytest.raises(RuntimeError, match="expected the staging schema"):
        shd.sorted_sources([lambda: table.drop_columns(["title"])])
    # Vectors of unequal lengths in a column: read whole and sorted by sorted_by_id.
    ragged = table.set_column(2, "text_embedding", pa.chunked_array(
        [pa.array([[1.0] * (k % 3) for k in range(len(table))], pa.list_(pa.float32()))]))
    assert shd.sorted_sources([lambda: ragged]).to_pylist() == sorted(ragged.to_pylist(), key=lambda r: r["item_id"])
