"""Composite transforms under TestPipeline on the DirectRunner, with labelled assert_that."""


import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
import pytest
from PIL import Image

from embedding import fusion as fus
from pipelines import inference
from pipelines import shards as shd
from pipelines import transforms as tr
from schemas import rejected as rej
from schemas.errors import CatalogIndexError


def row(item_id, title="t", image_uri=None, source="a.parquet", n=0, description=None):
    return tr.CatalogRow(item_id, title, description, image_uri, source, n)


@pytest.mark.parametrize("batch_rows", [4, tr.READ_BATCH_ROWS])
def test_read_catalog_reads_every_row_group_with_source_and_row(tmp_path, monkeypatch, batch_rows):
    # Batches of 4 rows cut each 10-row group in three (issue 9: a row group is decoded a batch at a time).
    monkeypatch.setattr(tr, "READ_BATCH_ROWS", batch_rows)
    path = str(tmp_path / "c.parquet")
    table = pa.table({"item_id": [f"i{k}" for k in range(25)], "title": ["x"] * 25, "price": [1.0] * 25})
    pq.write_table(table, path, row_group_size=10)  # 3 row groups, no description/image columns
    with TestPipeline() as p:
        rows = p | tr.ReadCatalog([path])
        assert_that(rows | beam.Map(lambda r: (r.item_id, r.row, r.source, r.image_uri)),
                    equal_to([(f"i{k}", k, path, None) for k in range(25)]), label="CheckRows")


def _unvalidated_strings(values):
    """A string array holding exactly these bytes (None = null), invalid UTF-8 included."""
    raw = pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.string(), len(raw), raw.buffers(), raw.null_count)


@pytest.mark.parametrize("batch_rows", [4, tr.READ_BATCH_ROWS])
def test_read_catalog_rejects_rows_with_invalid_utf8_and_reads_the_rest(tmp_path, monkeypatch, batch_rows):
    monkeypatch.setattr(tr, "READ_BATCH_ROWS", batch_rows)  # rows 3 and 17 fall in the 1st and 5th batch of 4
    path = str(tmp_path / "bad.parquet")
    n = 25
    ids = [f"i{k}".encode() for k in range(n)]
    titles = [f"title {k}".encode() for k in range(n)]
    titles[17] = b"ab\xffcd"  # row 17: bad title (second row group)
    ids[3] = b"i\xc3("  # row 3: bad item_id (first row group)
    titles[2] = None  # row 2: null title and no image (an ordinary rejection)
    table = pa.table({"item_id": _unvalidated_strings(ids), "title": _unvalidated_strings(titles),
                      "image_uri": pa.array([None] * 4 + ["/x.png"] * (n - 4))})
    pq.write_table(table, path, row_group_size=10)
    assert pq.read_schema(path).field("title").type == pa.string()
    assert pq.read_schema(path).field("item_id").type == pa.string()
    with TestPipeline() as p:
        rows = p | tr.ReadCatalog([path])
        valid = rows | tr.ValidateItems()
        counts = (
            (rows | "CountRead" >> beam.combiners.Count.Globally(),
             valid["items"] | "CountItems" >> beam.combiners.Count.Globally(),
             valid[tr.REJECTED] | "CountRejected" >> beam.combiners.Count.Globally())
            | beam.Flatten()
        )
        assert_that(counts, equal_to([n, n - 3, 3]), label="CountsAddUp")
        assert_that(valid[tr.REJECTED] | beam.Map(lambda r: (r.item_id, r.source, r.row, r.reason, r.message)),
                    equal_to([
                        (None, path, 3, rej.INVALID_VALUE,
                         f"column 'item_id' at row 3 of {path} is not valid UTF-8 (byte 0xc3 at offset 1)"),
                        ("i17", path, 17, rej.INVALID_VALUE,
                         f"column 'title' at row 17 of {path} is not valid UTF-8 (byte 0xff at offset 2)"),
                        ("i2", path, 2, rej.NO_TITLE_OR_IMAGE, "item has neither a non-empty title nor an image_uri"),
                    ]), label="CheckRejected")
        good = [k for k in range(n) if k not in (2, 3, 17)]
        assert_that(valid["items"] | beam.Map(lambda r: (r.item_id, r.title, r.row, r.problem)),
                    equal_to([(f"i{k}", f"title {k}", k, None) for k in good]), label="CheckItems")


def test_read_catalog_names_every_bad_column_of_a_row(tmp_path):
    path = str(tmp_path / "both.parquet")
    table = pa.table({"item_id": _unvalidated_strings([b"ok", b"x\x80"]),
                      "title": pa.array(["fine", "fine"]),
                      "description": _unvalidated_strings([None, b"\xfe"])})
    pq.write_table(table, path)
    with TestPipeline() as p:
        rows = p | tr.ReadCatalog([path])
        assert_that(rows | beam.Map(lambda r: (r.row, r.item_id, r.description, r.problem)), equal_to([
            (0, "ok", None, None),
            (1, None, None, f"column 'item_id' at row 1 of {path} is not valid UTF-8 (byte 0x80 at offset 1); "
                            f"column 'description' at row 1 of {path} is not valid UTF-8 (byte 0xfe at offset 0)"),
        ]))


def test_validate_items_routes_each_bad_row_with_its_reason():
    rows = [row(None), row(""), row("  "), row("ok"), row("x", title=" ", image_uri=None),
            row("img", title=None, image_uri="/a.png"), row("n", title=None)]
    with TestPipeline() as p:
        out = p | beam.Create(rows) | tr.ValidateItems()
        assert_that(out["items"] | beam.Map(lambda r: r.item_id), equal_to(["ok", "img"]), label="CheckItems")
        assert_that(out[tr.REJECTED] | beam.Map(lambda r: (r.item_id, r.reason)), equal_to([
            (None, rej.MISSING_ITEM_ID), ("", rej.EMPTY_ITEM_ID), ("  ", rej.EMPTY_ITEM_ID),
            ("x", rej.NO_TITLE_OR_IMAGE), ("n", rej.NO_TITLE_OR_IMAGE)]), label="CheckRejected")


def test_batch_items_keeps_first_file_then_lowest_row_of_an_item_id(tmp_path):
    rows = [row("d", "late", source="b.parquet", n=0), row("d", "second", source="a.parquet", n=5),
            row("d", "first", source="a.parquet", n=2), row("u", "unique"),
            row("e", "only in b", source="b.parquet", n=9), row("e", "in a", source="a.parquet", n=30)]
    with TestPipeline() as p:
        out = p | beam.Create(rows) | tr.BatchItems(num_buckets=2, batch_size=2, staging_dir=str(tmp_path))
        assert_that(out["batches"] | beam.FlatMap(lambda b: [(r.item_id, r.title) for r in b[1]]),
                    equal_to([("d", "first"), ("u", "unique"), ("e", "in a")]), label="CheckKept")
        assert_that(out[tr.REJECTED] | beam.Map(lambda r: (r.item_id, r.source, r.row, r.reason, r.message)),
                    equal_to([("d", "a.parquet", 5, rej.DUPLICATE_ITEM_ID, "item_id also at a.parquet row 2, which is indexed"),
                              ("d", "b.parquet", 0, rej.DUPLICATE_ITEM_ID, "item_id also at a.parquet row 2, which is indexed"),
                              ("e", "b.parquet", 9, rej.DUPLICATE_ITEM_ID, "item_id also at a.parquet row 30, which is indexed")]),
                    label="CheckDuplicates")


def test_batch_items_cuts_sorted_batches_per_bucket(tmp_path):
    rows = [row(f"i{k:02d}") for k in reversed(range(23))]

    def check(batches):
        ids = [r.item_id for _, batch in batches for r in batch]
        assert sorted(ids) == sorted(r.item_id for r in rows)  # every item exactly once
        for bucket, batch in batches:
            batch_ids = [r.item_id for r in batch]
            assert 1 <= len(batch) <= 4 and batch_ids == sorted(batch_ids)
            assert {shd.stable_shard(i, 3) for i in batch_ids} == {bucket}
        per_bucket = {}
        for bucket, batch in batches:
            per_bucket[bucket] = per_bucket.get(bucket, 0) + len(batch)
        # Only the last batch of a bucket may be short.
        assert len(batches) == sum(-(-n // 4) for n in per_bucket.values())

    with TestPipeline() as p:
        batches = (p | beam.Create(rows) | tr.BatchItems(num_buckets=3, batch_size=4, staging_dir=str(tmp_path)))["batches"]
        assert_that(batches, check, label="CheckBatches")


def test_rows_go_through_staging_files_exactly_and_only_references_come_out(tmp_path):
    """_StageByBucket: each bucket gets a StagedRef per file it has rows in (small max_bytes: several files),
    and read_staged gives every bucket exactly its rows back, values of every type intact."""
    rows = [tr.CatalogRow(f"i{k:02d}", f"title {k}", None if k % 3 else "desc " * k, f"/img/{k}.png",
                          f"part-{k % 2}.parquet", k, None, [None, "etag-1", "2026-11-29T00:00:00"][k % 3]) for k in range(30)]
    rows[4] = rows[4]._replace(problem="title: not valid UTF-8", title=None)
    elements = [(k % 4, r) for k, r in enumerate(rows)]
    with TestPipeline() as p:
        refs = p | beam.Create(elements) | beam.ParDo(tr._StageByBucket(str(tmp_path), "rows", tr._row_bytes, max_bytes=1500))
        assert_that(refs | beam.Map(lambda kv: type(kv[1]).__name__) | beam.Distinct(), equal_to(["StagedRef"]),
                    label="OnlyReferences")
        got = refs | beam.GroupByKey() | beam.FlatMap(lambda kv: [(kv[0], r) for r in tr.read_staged(kv[1])])
        assert_that(got, equal_to(elements), label="EveryRowBack")
    staged = list((tmp_path / "_staging" / "rows").iterdir())
    assert len(staged) > 1
    ref = tr.StagedRef(str(staged[0]), 0, staged[0].stat().st_size + 5)
    with pytest.raises(CatalogIndexError, match="staging file .* is short"):
        tr.read_staged([ref])


def _drain(dofn, elements):
    """A holding DoFn run by hand over one bundle: what it emits per element, then at the bundle's end."""
    dofn.start_bundle()
    out = [list(dofn.process(e)) for e in elements]
    return out, [w.value for w in dofn.finish_bundle()]


def test_pack_images_holds_batches_until_a_model_batch_of_images_is_there():
    recs = [tr._Images(None, tuple(f"i{n}{k}" for k in range(n)), {}, {}, {}) for n in (0, 1, 2, 3, 0, 1)]
    arrays = [[np.full((2, 2, 3), n + k / 10, np.float32) for k in range(n)] for n in (0, 1, 2, 3, 0, 1)]
    per_element, at_end = _drain(tr._Pack(4), [[([r], a)] for r, a in zip(recs, arrays)])
    # Nothing to encode: passes at once, alone. 1 + 2 + 3 images reach 4: one pack of three batches.
    assert [len(o) for o in per_element] == [1, 0, 0, 1, 1, 0]
    (packed, pack_arrays), = per_element[3][0]
    assert packed == recs[1:4] and len(pack_arrays) == 6
    assert [a[0, 0, 0] for a in pack_arrays] == [np.float32(x) for x in (1.0, 2.0, 2.1, 3.0, 3.1, 3.2)]
    assert per_element[0] == [[([recs[0]], [])]] and per_element[4] == [[([recs[4]], [])]]
    (packed, pack_arrays), = at_end[0]  # the bundle's end flushes what is held
    assert packed == [recs[5]] and len(pack_arrays) == 1


def test_group_texts_lists_each_distinct_text_once_with_its_buckets():
    values = [("kb", 2, "tea"), ("ka", 1, "green tea"), ("kb", 0, "tea"), ("ka", 3, "green tea"), ("kc", 1, "jam")]
    records, texts = tr.group_texts(values)
    # Length order, then key order: "tea" (kb) and "jam" (kc) both have 3 characters.
    assert texts == ["tea", "jam", "green tea"]
    assert records == [("kb", (0, 2)), ("kc", (1,)), ("ka", (1, 3))]
    assert tr.group_texts(values[::-1]) == (records, texts)  # the order the values come in does not matter


def test_pack_texts_merges_small_groups():
    groups = [[([(f"k{g}{n}", (g,)) for n in range(size)], [f"t{g}{n}" for n in range(size)])]
              for g, size in enumerate((2, 1, 5, 1))]
    per_element, at_end = _drain(tr._Pack(4), groups)
    assert [len(o) for o in per_element] == [0, 0, 1, 0]
    (records, texts), = per_element[2][0]
    assert texts == ["t00", "t01", "t10", "t20", "t21", "t22", "t23", "t24"]
    assert [k for k, _ in records] == [t.replace("t", "k") for t in texts]
    assert at_end == [[([("k30", (3,))], ["t30"])]]


def _png(path, colour):
    Image.new("RGB", (20, 20), colour).save(path)
    return str(path)


def test_encode_items_degrades_or_rejects_bad_images(tmp_path, tiny_encoders):
    text, image = tiny_encoders
    good = _png(tmp_path / "g.png", (200, 10, 10))
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    rows = [row("text-only", "red shoes"), row("both", "red shoes", image_uri=good),
            row("image-only", None, image_uri=good),
            row("bad-image", "blue hat", image_uri=str(tmp_path / "bad.jpg")),
            row("bad-image-no-title", None, image_uri=str(tmp_path / "missing.png"))]

    def shape(it):
        return (it.row.item_id, None if it.text_embedding is None else it.text_embedding.shape,
                None if it.image_embedding is None else it.image_embedding.shape)

    for reject_on_error in (False, True):
        with TestPipeline() as p:
            batches = (p | beam.Create(rows) | tr.BatchItems(num_buckets=2, batch_size=2, staging_dir=str(tmp_path)))["batches"]
            out = batches | tr.EncodeItems(text, image, (32, 32), num_buckets=2,
                                           reject_on_image_error=reject_on_error, staging_dir=str(tmp_path))
            expected = [("text-only", (64,), None), ("both", (64,), (48,)), ("image-only", None, (48,))]
            rejected = [("bad-image-no-title", rej.IMAGE_FETCH_FAILED)]
            degraded = [("bad-image", rej.IMAGE_DECODE_FAILED)]
            if reject_on_error:
                rejected, degraded = rejected + degraded, []
            else:
                expected.append(("bad-image", (64,), None))
            assert_that(out["items"] | beam.FlatMap(lambda batch: map(shape, batch)), equal_to(expected),
                        label="CheckEncoded")
            assert_that(out[tr.REJECTED] | beam.Map(lambda r: (r.item_id, r.reason)), equal_to(rejected),
                        label="CheckRejected")
            assert_that(out[tr.DEGRADED] | beam.Map(lambda r: (r.item_id, r.reason)), equal_to(degraded),
                        label="CheckDegraded")


def test_fuse_embeddings_normalises_and_rejects_empty_vectors():
    spec = fus.FusionSpec(fus.PROJECTION, 3, 2, 8)
    items = [
        tr.EncodedItem(row("a"), np.array([1, 0, 0], np.float32), np.array([0, 1], np.float32)),
        tr.EncodedItem(row("b"), np.array([0, 2, 0], np.float32), None),
        tr.EncodedItem(row("zero"), np.zeros(3, np.float32), None),
    ]
    with TestPipeline() as p:
        out = p | beam.Create([items[:2], items[2:]]) | tr.FuseEmbeddings(spec)
        assert_that(out["items"] | beam.Map(lambda it: (it.item_id, round(float(np.linalg.norm(it.embedding)), 5),
                                                         it.embedding.shape)),
                    equal_to([("a", 1.0, (8,)), ("b", 1.0, (8,))]), label="CheckFused")
        assert_that(out[tr.REJECTED] | beam.Map(lambda r: (r.item_id, r.reason)),
                    equal_to([("zero", rej.EMPTY_EMBEDDING)]), label="CheckRejected")


def test_write_annoy_shards_writes_every_shard(tmp_path):
    rng = np.random.default_rng(0)
    vecs = fus.l2_normalize(rng.normal(size=(40, 8)))
    items = [shd.IndexedItem(f"i{k}", None, None, None, vecs[k]) for k in range(40)]
    with TestPipeline() as p:
        infos = p | beam.Create(items) | tr.WriteAnnoyShards(str(tmp_path), 5, 8, trees=3, seed=0)
        assert_that(infos | beam.Map(lambda s: s.index), equal_to(list(range(5))), label="CheckIndices")
        assert_that(infos | beam.Map(lambda s: s.count) | beam.CombineGlobally(sum), equal_to([40]),
                    label="CheckTotal")
    expected = {k: sum(shd.stable_shard(f"i{j}", 5) == k for j in range(40)) for k in range(5)}
    for k, n in expected.items():
        ids = pq.read_table(tmp_path / "shards" / f"shard-{k:05d}-of-00005.ids.parquet").column("item_id")
        assert len(ids) == n and all(shd.stable_shard(i, 5) == k for i in ids.to_pylist())


def _shard_bytes(folder):
    return {f.name: f.read_bytes() for f in sorted((folder / "shards").iterdir())}


def test_shards_build_side_by_side_and_the_files_do_not_depend_on_the_thread_count(tmp_path, monkeypatch):
    import threading

    rng = np.random.default_rng(1)
    vecs = fus.l2_normalize(rng.normal(size=(60, 8)))
    items = [shd.IndexedItem(f"i{k}", f"t{k}", vecs[k], None, vecs[k]) for k in range(60)]
    for threads, name in ((1, "one"), (3, "three")):
        with TestPipeline() as p:
            _ = p | beam.Create(items) | tr.WriteAnnoyShards(str(tmp_path / name), 3, 8, trees=4, seed=2,
                                                               threads=threads)
    assert _shard_bytes(tmp_path / "one") == _shard_bytes(tmp_path / "three")

    # With 2 threads two shards are in write_shard at the same time: a barrier of 2 only opens then.
    barrier = threading.Barrier(2, timeout=30)
    real = shd.write_shard

    def meet_then_write(*args, **kwargs):
        barrier.wait()  # raises BrokenBarrierError after 30 s if the shards were built one after another
        return real(*args, **kwargs)

    monkeypatch.setattr(shd, "write_shard", meet_then_write)
    with TestPipeline() as p:
        infos = p | beam.Create(items) | tr.WriteAnnoyShards(str(tmp_path / "two"), 2, 8, trees=4, seed=2,
                                                               threads=2)
        assert_that(infos | beam.Map(lambda s: s.index), equal_to([0, 1]))


def test_identical_texts_are_encoded_once(tmp_path, tiny_encoders):
    from apache_beam.metrics.metric import MetricsFilter

    text, image = tiny_encoders
    rows = [row(f"v{k}", "blue jeans, slim fit", description="cotton") for k in range(6)] + [row("other", "red hat")]
    p = TestPipeline()
    batches = (p | beam.Create(rows) | tr.BatchItems(num_buckets=3, batch_size=2, staging_dir=str(tmp_path)))["batches"]
    out = batches | tr.EncodeItems(text, image, (32, 32), num_buckets=3, batch_size=2, staging_dir=str(tmp_path))
    assert_that(out["items"] | beam.FlatMap(lambda b: [(it.row.item_id, it.text_embedding.tobytes()) for it in b])
                | beam.Map(lambda kv: ("other" if kv[0] == "other" else "variant", kv[1]))
                | beam.Distinct() | beam.Map(lambda kv: kv[0]),
                equal_to(["variant", "other"]), label="OneVectorPerDistinctText")
    result = p.run()
    result.wait_until_finish()
    sizes = result.metrics().query(MetricsFilter().with_name("text_encoder_batch_size"))["distributions"]
    assert sum(d.committed.sum for d in sizes) == 2  # two distinct texts reached the encoder


def test_text_vectors_go_through_staging_files_bit_for_bit_and_only_references_come_out(tmp_path):
    """_StageTextVectors: each bucket gets a TextRef per file it has rows in (small max_bytes: several
    files), and read_text_refs gives every (bucket, text key) its exact vector back."""
    rng = np.random.default_rng(5)
    texts = {f"k{n:02d}": (tuple(sorted({int(b) for b in rng.integers(0, 4, size=1 + n % 3)})),
                           rng.normal(size=6).astype(np.float32)) for n in range(20)}
    items = [((key, buckets), vector) for key, (buckets, vector) in texts.items()]
    failure = inference.BatchFailure(ValueError("no"), 2)
    items.insert(7, (("kfail", (1, 3)), failure))  # a text whose model batch failed
    groups = [items[:9], items[9:15], items[15:]]  # (records, vectors) per text group, as RunInference gives
    elements = [([r for r, _ in g], [v for _, v in g]) for g in groups]
    with TestPipeline() as p:
        staged = (p | beam.Create(elements)
                  | beam.ParDo(tr._StageTextVectors(str(tmp_path), max_bytes=6 * 4 * 5)).with_outputs(
                      tr._StageTextVectors.FAILED, main="refs"))
        refs = staged.refs
        failed = staged[tr._StageTextVectors.FAILED]
        assert_that(failed, equal_to([(b, ("kfail", (rej.ENCODER_FAILED, "encoder failed on a batch of 2: ValueError: no")))
                                      for b in (1, 3)]), label="FailuresPerBucket")
        checked = refs | beam.Map(lambda kv: (isinstance(kv[1], tr.TextRef), kv[1].dim))
        assert_that(checked | beam.Distinct(), equal_to([(True, 6)]), label="OnlyReferences")
        got = (refs | beam.GroupByKey()
               | beam.FlatMap(lambda kv: [(kv[0], key, vector.tobytes())
                                          for key, vector in tr.read_text_refs(kv[1]).items()]))
        expected = [(b, key, vector.tobytes()) for key, (buckets, vector) in texts.items() for b in buckets]
        assert_that(got, equal_to(expected), label="EveryVectorBack")
    staged = list((tmp_path / "_staging" / "text").iterdir())
    assert len(staged) > 1 and all(f.suffix == ".f32" for f in staged)


def _failing_text_encoder(path):
    """A real SavedModel text encoder that fails on any batch containing the word 'boom'."""
    import tensorflow as tf

    class Failing(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, texts):
            ok = tf.logical_not(tf.reduce_any(tf.strings.regex_full_match(texts, ".*boom.*")))
            with tf.control_dependencies([tf.debugging.Assert(ok, ["boom in batch"])]):
                return tf.ones([tf.shape(texts)[0], 4]) * 0.5

    module = Failing()
    tf.saved_model.save(module, path)
    return path


def test_encoder_failures_reject_the_batch_items(tmp_path, tiny_encoders):
    text = _failing_text_encoder(str(tmp_path / "failing"))
    rows = [row("good", "plain title"), row("bad", "boom goes the title")]
    with TestPipeline() as p:
        batches = (p | beam.Create(rows) | tr.BatchItems(num_buckets=1, batch_size=1, staging_dir=str(tmp_path)))["batches"]
        out = batches | tr.EncodeItems(text, tiny_encoders[1], (32, 32), num_buckets=1, batch_size=1,
                                       staging_dir=str(tmp_path))
        assert_that(out["items"] | beam.FlatMap(lambda b: [it.row.item_id for it in b]), equal_to(["good"]),
                    label="CheckEncoded")
        assert_that(out[tr.REJECTED] | beam.Map(lambda r: (r.item_id, r.reason, r.message)),
                    equal_to([("bad", rej.ENCODER_FAILED, "encoder failed on a batch of 1: "
                                                          "InvalidArgumentError: assertion failed: [boom in batch]")]),
                    label="CheckRejected")


def _failing_image_encoder(path):
    """A real SavedModel image encoder (32 x 32) that fails on any batch holding a near-white image."""
    import tensorflow as tf

    class Failing(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
        def __call__(self, images):
            ok = tf.reduce_all(tf.reduce_mean(images, axis=[1, 2, 3]) < 0.9)
            with tf.control_dependencies([tf.debugging.Assert(ok, ["white image in batch"])]):
                return tf.reduce_mean(images, axis=[1, 2])[:, :3] + 0.25

    tf.saved_model.save(Failing(), path)
    return path


def test_image_encoder_failure_rejects_that_batch_only_and_keeps_its_batch_mates_text(tmp_path, tiny_encoders):
    """The image encoder's dead letter (RunInference with a whole batch as one example) comes back to its
    batch: the batch's items with a loaded image are rejected with the encoder's message; a text-only
    item of the same batch and the other batches are indexed."""
    image = _failing_image_encoder(str(tmp_path / "failing"))
    dark, white = _png(tmp_path / "d.png", (20, 60, 90)), _png(tmp_path / "w.png", (255, 255, 255))
    rows = [row("a-dark", "dark", image_uri=dark), row("b-white", "white", image_uri=white),
            row("c-text", "text only"), row("d-white", None, image_uri=white)]
    with TestPipeline() as p:
        # One bucket, batches of 2 in item_id order: [a-dark, b-white] fails, [c-text, d-white] fails.
        batches = (p | beam.Create(rows) | tr.BatchItems(num_buckets=1, batch_size=2, staging_dir=str(tmp_path)))["batches"]
        out = batches | tr.EncodeItems(tiny_encoders[0], image, (32, 32), num_buckets=1, batch_size=2,
                                       staging_dir=str(tmp_path))
        assert_that(out["items"] | beam.FlatMap(lambda b: [(it.row.item_id, it.image_embedding is None)
                                                           for it in b]),
                    equal_to([("c-text", True)]), label="CheckEncoded")
        message = "encoder failed on a batch of {}: InvalidArgumentError: assertion failed: [white image in batch]"
        assert_that(out[tr.REJECTED] | beam.Map(lambda r: (r.item_id, r.reason, r.message)),
                    equal_to([("a-dark", rej.ENCODER_FAILED, message.format(2)),
                              ("b-white", rej.ENCODER_FAILED, message.format(2)),
                              ("d-white", rej.ENCODER_FAILED, message.format(1))]), label="CheckRejected")


# ---------------------------------------------------------------------------
# The shard stage stages items in files (issue 9): only file names go through the shuffle.


def _staging_items(n, seed=3):
    rng = np.random.default_rng(seed)
    vecs = fus.l2_normalize(rng.normal(size=(n, 8))).astype(np.float32)
    return [shd.IndexedItem(f"i{k:03d}", None if k % 4 == 0 else f"t{k}", vecs[k][:3] if k % 5 else None,
                            vecs[k][3:7] if k % 3 else None, vecs[k], text_sha256=f"ts{k}", image_sha256=f"is{k}",
                            image_uri=f"u{k}" if k % 2 else None, text_reused=k % 2 == 0, image_reused=k % 7 == 0)
            for k in range(n)]


def test_stage_items_sends_file_names_and_counts_not_items(tmp_path):
    items = _staging_items(50)
    with TestPipeline() as p:
        staged = p | beam.Create(items) | beam.ParDo(tr._StageItems(str(tmp_path), 4, max_bytes=4096))
        checked = staged | beam.Map(lambda kv: (isinstance(kv[0], int), type(kv[1][0]).__name__,
                                                 type(kv[1][1]).__name__))
        assert_that(checked | beam.Distinct(), equal_to([(True, "str", "int")]), label="CheckTypes")
        assert_that(staged | beam.Map(lambda kv: kv[1][1]) | beam.CombineGlobally(sum), equal_to([50]),
                    label="CheckRows")
    files_by_shard = {d.name: sorted(d.iterdir()) for d in (tmp_path / shd.STAGING_DIR).iterdir()}
    assert sorted(files_by_shard) == sorted({f"shard-{shd.stable_shard(it.item_id, 4):05d}" for it in items})
    assert sum(len(v) for v in files_by_shard.values()) > 4  # a small buffer: several flushes
    for name, paths in files_by_shard.items():
        ids = [i for path in paths for i in shd.read_staged([str(path)]).column("item_id").to_pylist()]
        assert all(f"shard-{shd.stable_shard(i, 4):05d}" == name for i in ids)


def test_write_annoy_shards_from_staging_files_is_byte_identical_to_write_shard_on_all_items(tmp_path, monkeypatch):
    items = _staging_items(120)
    monkeypatch.setattr(tr, "STAGE_BUFFER_BYTES", 3000)  # many small staging files per shard
    for threads in (1, 2):
        out = tmp_path / f"beam-{threads}"
        with TestPipeline() as p:
            infos = p | beam.Create(items) | tr.WriteAnnoyShards(str(out), 4, 8, trees=3, seed=5, threads=threads)
            assert_that(infos | beam.Map(lambda s: s.index), equal_to([0, 1, 2, 3]), label="CheckIndices")
        assert not (out / shd.STAGING_DIR).exists()  # nothing staged is left behind
        for k in range(4):
            # The reference: the shard's items as one in-memory list, as the stage took them before staging.
            ref = shd.write_shard([it for it in items if shd.stable_shard(it.item_id, 4) == k], k, 4, 8, trees=3,
                                  seed=5, version_dir=str(tmp_path / "reference"))
            for rel in (ref.path, ref.id_map, ref.embeddings):
                assert (out / rel).read_bytes() == (tmp_path / "reference" / rel).read_bytes(), rel
        assert sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()) == sorted(
            str(f.relative_to(tmp_path / "reference")) for f in (tmp_path / "reference").rglob("*") if f.is_file())


def test_write_annoy_shards_writes_empty_shards_and_counts_vectors_from_staging(tmp_path):
    from apache_beam.metrics.metric import MetricsFilter

    items = _staging_items(3)
    p = TestPipeline()
    infos = p | beam.Create(items) | tr.WriteAnnoyShards(str(tmp_path), 6, 8, trees=2, seed=0, threads=2)
    assert_that(infos | beam.Map(lambda s: (s.index, s.count)),
                equal_to([(k, sum(shd.stable_shard(it.item_id, 6) == k for it in items)) for k in range(6)]))
    result = p.run()
    result.wait_until_finish()
    counters = {r.key.metric.name: r.committed for r in result.metrics().query(MetricsFilter())["counters"]}
    expected = shd.vector_counts(items)
    assert counters["items_indexed"] == 3
    assert {name: counters.get(name, 0) for name in expected} == expected
    assert len(list((tmp_path / "shards").glob("*.ann"))) == 6 and not (tmp_path / shd.STAGING_DIR).exists()


def test_the_query_sample_is_the_indexed_items_of_smallest_rank_with_their_text_and_pixels():
    rng = np.random.default_rng(3)
    ids = [f"item-{k}" for k in range(60)]
    indexed = [i for k, i in enumerate(ids) if k % 5]  # every fifth row was rejected later on
    batches = [(0, [row(i, title=f"title {i}") for i in ids[:30]]), (1, [row(i, title=f"title {i}") for i in ids[30:]])]
    images = [[(i, rng.random((2, 2, 3)).astype(np.float32)) for i in ids[:30]],
              [(i, rng.random((2, 2, 3)).astype(np.float32)) for i in ids[30:]]]
    pixels = {i: a for batch in images for i, a in batch}
    vec = np.ones(4, np.float32)
    items = [shd.IndexedItem(i, None, vec, vec, vec) for i in indexed]
    want = sorted(indexed, key=tr.sample_rank)[:8]  # computed from the rank rule, not from the transform
    with TestPipeline() as p:
        out = {"batches": p | "B" >> beam.Create(batches), "images": p | "I" >> beam.Create(images),
               "items": p | "V" >> beam.Create(items)} | tr.SampleQueryInputs(size=8)
        assert_that(out | beam.Map(lambda s: (s.item_id, s.text, s.pixels.tolist())),
                    equal_to([(i, f"title {i}", np.round(pixels[i] * 255).astype(np.uint8).tolist())
                              for i in want]))
