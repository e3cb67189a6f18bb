"""The training pipeline's Beam preprocessing: click logs -> training examples (issue 8).

    ReadClicks | ValidateClicks | EncodeQueryTexts | EncodeQueryImages | SplitByTime | ComputeLogQ
               | WriteExamples, WriteRejected | WriteSummary

Input: click log Parquet (``schemas/clicks.py``) and a published index release
that the caller has verified (its embeddings table lists the items; its
manifest names the text and image encoders). Output, in ``out_dir``:

``examples-*.parquet``  (clicks.EXAMPLES_SCHEMA) one row per kept positive event
``rejected-*.parquet``  (clicks.REJECTED_CLICKS_SCHEMA) one row per rejected row, with reason and detail
``summary.json``        the PreprocessSummary (paths relative to out_dir), options, encoders, status

Every row read leaves one way: kept (a click, add_to_cart or purchase, written
as an example), counted as an impression (valid, never trained on), or
rejected with one reason (clicks.REJECT_REASONS), so

    read == kept + impressions + sum(rejected_by_reason)    and    kept == train + eval

which run_preprocess checks before it returns. The row rules (clicks.row_problem)
apply to every row, impressions included; only positive rows go on to the
encoders, so only they can be rejected for their photo or an encoder failure.

Query encoding: each distinct query text (stripped, cut to 4,096 characters:
clicks.query_text) is encoded once with the index's text encoder, each distinct
photo URI fetched, decoded (embedding.images.load_image, as the index pipeline
loads item images: same pixel bound, timeout, host and root rules) and encoded
once with its image encoder. Distinct inputs are cut into batches
deterministically (by a stable hash bucket, then sorted), as the index pipeline
does, so identical logs give identical vectors. A row whose photo cannot be
used is rejected with the image reason, even when it also has text: the
example would otherwise misstate what the shopper searched with.

The split: the UTC calendar days present among the kept rows are listed; the
last ``eval_days`` of them are ``eval``, everything earlier ``train``
(``eval_start`` is the first eval day). No train row left is a DataError.

log_q, the logQ correction of the in-batch softmax (Yi et al., RecSys 2019):
the log of the item's share of the train rows, ``log(n_item / n_train)``,
written on eval rows too (from the train counts). An item that has no train
row (only clicked on the held-out days) gets ``log(1 / (n_train + 1))``: below
any item seen in train, as if it had been seen once in one more row; finite, so
it never turns a loss into -inf/NaN.

Weights: clicks.DEFAULT_EVENT_WEIGHTS unless ``event_weights`` says otherwise.

Beam metrics (namespace ``catalog_index``, as the index pipeline's): counters
``clicks_read``, ``clicks_kept``, ``clicks_impressions``,
``clicks_rejected_<reason>``, ``query_texts_encoded``, ``query_images_loaded``,
``query_images_encoded``; the encoders' ``<kind>_encoder_batch_size`` and
``<kind>_encoder_latency_ms`` distributions (pipelines/inference.py).
"""

import datetime
import hashlib
import json
import logging
import math
import os
import time
from typing import Mapping, NamedTuple, Optional, Sequence, Union

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

from embedding import encoders as enc
from embedding import images
from pipelines import files
from pipelines import inference
from pipelines import progress
from pipelines import shards as shd
from pipelines import transforms as tr
from schemas import clicks as clk
from schemas import embeddings as emb
from schemas import layout
from schemas import rejected as rej
from schemas.errors import CatalogIndexError, ConfigError, DataError, brief

_log = logging.getLogger(__name__)

REJECTED = "rejected"
IMPRESSIONS = "impressions"
SUMMARY_FILE = "summary.json"
EXAMPLES_PREFIX = "examples"
REJECTED_PREFIX = "rejected"

# Metric names (namespace progress.NAMESPACE).
CLICKS_READ = "clicks_read"
CLICKS_KEPT = "clicks_kept"
CLICKS_IMPRESSIONS = "clicks_impressions"
CLICKS_REJECTED = "clicks_rejected"  # + "_<reason>"
QUERY_TEXTS_ENCODED = "query_texts_encoded"
QUERY_IMAGES_LOADED = "query_images_loaded"
QUERY_IMAGES_ENCODED = "query_images_encoded"

LOG_Q_RULE = ("log(train rows of the item / train rows); an item with no train row: "
              "log(1 / (train rows + 1))")

assert clk.MAX_QUERY_CHARS == tr.MAX_TEXT_CHARS  # queries are cut as item texts are


# ---------------------------------------------------------------------------
# Records


class ClickRow(NamedTuple):
    """One click log row as read, with where it came from (file and 0-based row)."""

    source: str
    row: int
    event_time: Optional[datetime.datetime]  # aware UTC; None when unusable (then event_time_problem says why)
    event_time_text: Optional[str]  # the value as written, as a string
    event_time_problem: Optional[str]
    query: Optional[str]
    query_image_uri: Optional[str]
    item_id: Optional[str]
    event: Optional[str]
    session_id: Optional[str]
    position: Optional[int]
    problem: Optional[str] = None  # a value that could not be read (not valid UTF-8)


class ClickRejection(NamedTuple):
    """A rejected row: provenance, its columns as strings, reason and detail (REJECTED_CLICKS_SCHEMA)."""

    source: str
    row: int
    event_time: Optional[str]
    query: Optional[str]
    query_image_uri: Optional[str]
    item_id: Optional[str]
    event: Optional[str]
    session_id: Optional[str]
    position: Optional[str]
    reason: str
    detail: str

    def to_dict(self) -> dict:
        return self._asdict()


def reject(row: ClickRow, reason: str, detail: str) -> ClickRejection:
    return ClickRejection(row.source, row.row, row.event_time_text, row.query, row.query_image_uri, row.item_id,
                          row.event, row.session_id, None if row.position is None else str(row.position),
                          reason, detail)


class Click(NamedTuple):
    """A valid positive event on its way through the encoders."""

    row: ClickRow
    text: Optional[str]  # clicks.query_text(row.query)
    image_uri: Optional[str]  # clicks.query_image(row.query_image_uri)
    event: str  # normalised
    text_embedding: Optional[np.ndarray] = None
    image_embedding: Optional[np.ndarray] = None


class Example(NamedTuple):
    """One training example (EXAMPLES_SCHEMA)."""

    event_time: datetime.datetime
    split: str
    query: Optional[str]
    query_image_uri: Optional[str]
    item_id: str
    event: str
    weight: float
    log_q: float
    query_text_embedding: Optional[np.ndarray]
    query_image_embedding: Optional[np.ndarray]

    def to_dict(self) -> dict:
        out = self._asdict()
        for name in (clk.QUERY_TEXT_EMBEDDING, clk.QUERY_IMAGE_EMBEDDING):
            if out[name] is not None:
                out[name] = np.asarray(out[name], np.float32).tolist()
        return out


class PreprocessSummary(NamedTuple):
    """What run_preprocess did. ``summary.json`` holds the same fields (paths relative to out_dir)."""

    read: int
    kept: int  # examples written: train + eval
    impressions: int
    rejected_by_reason: dict
    train: int
    eval: int
    distinct_texts: int  # distinct query texts among the valid positive rows (sent to the text encoder)
    distinct_images: int  # distinct query photo URIs among them (fetched, and encoded when they load)
    eval_start: Optional[str]  # ISO date: the first held-out day; None when nothing was kept
    paths: dict  # {"examples": [...], "rejected": [...], "summary": path}
    texts_encoded: Optional[int] = None  # texts the text encoder ran on (Beam metric); None if unavailable
    images_encoded: Optional[int] = None  # images the image encoder ran on (Beam metric)

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    def describe(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected_by_reason.items())) or "none"
        return (f"read {self.read} click rows: kept {self.kept} (train {self.train}, eval {self.eval} from "
                f"{self.eval_start}), impressions {self.impressions}, rejected {self.rejected} ({reasons}); "
                f"{self.distinct_texts} distinct query texts, {self.distinct_images} distinct query photos")


# ---------------------------------------------------------------------------
# ReadClicks


class _ListRowGroups(beam.DoFn):
    """file -> (file, row group, first row number): the unit of parallel reading."""

    def process(self, path):
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            meta = pq.ParquetFile(f).metadata
        first = 0
        for i in range(meta.num_row_groups):
            yield path, i, first
            first += meta.row_group(i).num_rows


class _ReadRowGroup(beam.DoFn):
    def __init__(self):
        self._read = progress.counter(CLICKS_READ)

    def process(self, element):
        path, group, first = element
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            pf = pq.ParquetFile(f)
            wanted = [c for c in clk.COLUMNS if pf.schema_arrow.get_field_index(c) >= 0]
            table = pf.read_row_group(group, columns=wanted)
        n = table.num_rows
        problems = {}  # row index in the group -> messages
        columns = {}
        for name in clk.STRING_COLUMNS:
            columns[name] = (tr._decode_column(table.column(name), name, path, first, problems)  # pylint: disable=protected-access
                             if name in wanted else [None] * n)
        positions = table.column(clk.POSITION).to_pylist() if clk.POSITION in wanted else [None] * n
        times = clk.read_event_times(table.column(clk.EVENT_TIME))
        for i in range(n):
            t = times[i]
            yield ClickRow(path, first + i, t.value, t.text, t.problem, columns[clk.QUERY][i],
                           columns[clk.QUERY_IMAGE_URI][i], columns[clk.ITEM_ID][i], columns[clk.EVENT][i],
                           columns[clk.SESSION_ID][i], positions[i],
                           "; ".join(problems[i]) if i in problems else None)
        self._read.inc(n)
        progress.add(CLICKS_READ, n)


class ReadClicks(beam.PTransform):
    """Reads click log files (already matched and schema-checked) into ClickRows, in parallel by row group."""

    def __init__(self, paths: Sequence[str]):
        super().__init__()
        self._paths = sorted(paths)

    def expand(self, pbegin):
        return (
            pbegin
            | "ListFiles" >> beam.Create(self._paths)
            | "ListRowGroups" >> beam.ParDo(_ListRowGroups())
            | "SpreadRowGroups" >> beam.Reshuffle()
            | "ReadRowGroups" >> beam.ParDo(_ReadRowGroup())
        )


def _read_item_ids(path):
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        yield from pq.read_table(f, columns=[emb.ITEM_ID]).column(emb.ITEM_ID).to_pylist()


class ReadIndexItemIds(beam.PTransform):
    """The index's embeddings tables -> one frozenset of their item_ids (for a side input)."""

    def __init__(self, paths: Sequence[str]):
        super().__init__()
        self._paths = sorted(paths)

    def expand(self, pbegin):
        return (
            pbegin
            | "ListTables" >> beam.Create(self._paths)
            | "ReadItemIds" >> beam.FlatMap(_read_item_ids)
            | "CollectItemIds" >> beam.combiners.ToSet()
            | "Freeze" >> beam.Map(frozenset)
        )


# ---------------------------------------------------------------------------
# ValidateClicks


class _Validate(beam.DoFn):
    def __init__(self):
        self._impressions = progress.counter(CLICKS_IMPRESSIONS)

    def process(self, row, known):
        found = clk.row_problem(clk.EventTime(row.event_time, row.event_time_text, row.event_time_problem),
                                row.item_id, row.event, row.query, row.query_image_uri, known, row.problem)
        if found is not None:
            yield beam.pvalue.TaggedOutput(REJECTED, reject(row, *found))
            return
        event = clk.normalize_event(row.event)
        if event == clk.IMPRESSION:
            self._impressions.inc()
            yield beam.pvalue.TaggedOutput(IMPRESSIONS, row)
            return
        yield Click(row, clk.query_text(row.query), clk.query_image(row.query_image_uri), event)


class ValidateClicks(beam.PTransform):
    """ClickRow -> {"clicks": Click (valid positives), "impressions": ClickRow, "rejected": ClickRejection}."""

    def __init__(self, known_items):
        super().__init__()
        self._known = known_items  # AsSingleton(frozenset of item_ids)

    def expand(self, rows):
        results = rows | "CheckRows" >> beam.ParDo(_Validate(), self._known).with_outputs(
            REJECTED, IMPRESSIONS, main="clicks")
        return {"clicks": results.clicks, IMPRESSIONS: results[IMPRESSIONS], REJECTED: results[REJECTED]}


# ---------------------------------------------------------------------------
# EncodeQueryTexts, EncodeQueryImages: each distinct input encoded once


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _bucket(key: str, num_buckets: int) -> int:
    return shd.stable_shard(key, num_buckets)


def _cut_batches(element, batch_size):
    """(bucket, [(key, value)]) -> lists of at most batch_size (key, value), sorted by (length, key)."""
    _, pairs = element
    pairs = sorted(pairs, key=lambda kv: (len(kv[1]), kv[0]))
    for start in range(0, len(pairs), batch_size):
        yield pairs[start:start + batch_size]


def _failed_keys(element):
    """RunInference dead letter (batch of (key, input), exception) -> (key, (reason, message)) per key."""
    yield from tr._failed_batch(element)  # pylint: disable=protected-access


def _split_by(field):
    def split(click):
        if getattr(click, field) is None:
            yield beam.pvalue.TaggedOutput("without", click)
        else:
            yield click

    return split


class _Count(beam.DoFn):
    def __init__(self, name):
        self._name = name
        self._counter = progress.counter(name)

    def process(self, element):
        self._counter.inc()
        progress.add(self._name)
        yield element


def _attach(element, field):
    """(key, {"clicks", "vector", "failed"}) -> each click with the vector set, or rejected with the failure."""
    _, joined = element
    vectors, failed = list(joined["vector"]), list(joined["failed"])
    for click in joined["clicks"]:
        if failed:
            reason, message = failed[0]
            yield beam.pvalue.TaggedOutput(REJECTED, reject(click.row, reason, message))
        elif vectors:
            yield click._replace(**{field: vectors[0]})
        else:  # cannot happen: every distinct input yields a vector or a failure
            yield beam.pvalue.TaggedOutput(REJECTED, reject(click.row, clk.ENCODER_FAILED, "no vector came back"))


class _EncodeDistinct(beam.PTransform):
    """Shared shape of the two encode steps.

    Click (the field set) -> distinct (key, value) -> deterministic batches -> [load] ->
    RunInference -> joined back onto every click by key. Clicks without the field pass
    through. Outputs {"clicks": Click, "rejected": ClickRejection, "distinct": (key, value)}.
    """

    def __init__(self, field, key_fn, vector_field, handler, num_buckets, batch_size, encoded_counter, load=None):
        super().__init__()
        self._field = field
        self._key_fn = key_fn
        self._vector_field = vector_field
        self._handler = handler
        self._num_buckets = num_buckets
        self._batch_size = batch_size
        self._encoded_counter = encoded_counter
        self._load = load  # DoFn: batch of (key, value) -> batch of (key, model input), FAILED-tagged failures

    def expand(self, clicks):
        field, key_fn, nb = self._field, self._key_fn, self._num_buckets
        split = clicks | "SplitWithout" >> beam.FlatMap(_split_by(field)).with_outputs("without", main="with")
        keyed = split["with"] | "KeyClicks" >> beam.Map(lambda c: (key_fn(getattr(c, field)), c))
        distinct = (
            split["with"]
            | "KeyValues" >> beam.Map(lambda c: (key_fn(getattr(c, field)), getattr(c, field)))
            | "Distinct" >> beam.Distinct()
        )
        batches = (
            distinct
            | "KeyBuckets" >> beam.Map(lambda kv: (_bucket(kv[0], nb), kv))
            | "GroupBuckets" >> beam.GroupByKey()
            | "CutBatches" >> beam.FlatMap(_cut_batches, self._batch_size)
        )
        failures = []
        if self._load is not None:
            loaded = batches | "Load" >> beam.ParDo(self._load).with_outputs(_LoadQueryImages.FAILED, main="inputs")
            batches = loaded.inputs
            failures.append(loaded[_LoadQueryImages.FAILED])
        vectors, dlq = batches | "RunEncoder" >> RunInference(self._handler).with_exception_handling()
        vectors = vectors | "CountEncoded" >> beam.ParDo(_Count(self._encoded_counter))
        failures.append(dlq.failed_inferences | "ExplodeFailures" >> beam.FlatMap(_failed_keys))
        failed = tuple(failures) | "FlattenFailures" >> beam.Flatten()
        joined = (
            {"clicks": keyed, "vector": vectors, "failed": failed}
            | "JoinVectors" >> beam.CoGroupByKey()
            | "Attach" >> beam.FlatMap(_attach, self._vector_field).with_outputs(REJECTED, main="clicks")
        )
        out = (joined.clicks, split["without"]) | "Rejoin" >> beam.Flatten()
        return {"clicks": out, REJECTED: joined[REJECTED], "distinct": distinct}


class EncodeQueryTexts(beam.PTransform):
    """Sets Click.text_embedding: each distinct query text encoded once (keyed by sha256)."""

    def __init__(self, spec: enc.EncoderSpec, num_buckets: int, batch_size: int, model_cache=None):
        super().__init__()
        handler = KeyedModelHandler(inference.EncoderModelHandler(
            spec.handle, enc.TEXT, model_cache=model_cache, max_batch_size=batch_size,
            fingerprint=spec.fingerprint)).with_no_batching()
        self._inner = _EncodeDistinct("text", text_key, "text_embedding", handler, num_buckets, batch_size,
                                      QUERY_TEXTS_ENCODED)

    def expand(self, clicks):
        return clicks | "EncodeDistinctTexts" >> self._inner


class _LoadQueryImages(beam.DoFn):
    """[(uri, uri)] -> [(uri, float32 [h, w, 3])] for the batch, and one FAILED (uri, (reason, message)) per bad image.

    The index pipeline's image loading (transforms._LoadImages): embedding.images.load_image in a
    small thread pool, an unexpected library error counted as a decode failure.
    """

    FAILED = "failed"
    THREADS = 8

    def __init__(self, size, max_pixels, fetch_options):
        self._size = tuple(size)
        self._max_pixels = max_pixels
        self._fetch_options = dict(fetch_options)
        self._loaded = progress.counter(QUERY_IMAGES_LOADED)
        self._pool = None

    def setup(self):
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(self.THREADS, thread_name_prefix="load-query-image")

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def _load(self, uri):
        try:
            return images.load_image(uri, self._size, max_pixels=self._max_pixels, **self._fetch_options), None
        except images.ImageError as e:
            return None, (e.reason, str(e))
        except Exception as e:  # an image library bug must not take the run down
            return None, (rej.IMAGE_DECODE_FAILED, brief(e))

    def process(self, batch):
        loaded = []
        uris = [uri for _, uri in batch]
        for (key, _), (array, failure) in zip(batch, self._pool.map(self._load, uris)):
            if failure is not None:
                yield beam.pvalue.TaggedOutput(self.FAILED, (key, failure))
            else:
                loaded.append((key, array))
        if loaded:
            self._loaded.inc(len(loaded))
            progress.add(QUERY_IMAGES_LOADED, len(loaded))
            yield loaded


class EncodeQueryImages(beam.PTransform):
    """Sets Click.image_embedding: each distinct photo URI fetched, decoded and encoded once."""

    def __init__(self, spec: enc.EncoderSpec, num_buckets: int, batch_size: int, max_pixels: int,
                 fetch_options: dict, model_cache=None):
        super().__init__()
        size = tuple(spec.image_size or (enc.DEFAULT_IMAGE_SIZE, enc.DEFAULT_IMAGE_SIZE))
        handler = KeyedModelHandler(inference.EncoderModelHandler(
            spec.handle, enc.IMAGE, image_size=size, model_cache=model_cache,
            max_batch_size=batch_size, fingerprint=spec.fingerprint)).with_no_batching()
        self._inner = _EncodeDistinct("image_uri", lambda uri: uri, "image_embedding", handler, num_buckets,
                                      batch_size, QUERY_IMAGES_ENCODED,
                                      load=_LoadQueryImages(size, max_pixels, fetch_options))

    def expand(self, clicks):
        return clicks | "EncodeDistinctImages" >> self._inner


# ---------------------------------------------------------------------------
# SplitByTime, ComputeLogQ


def utc_day(click: Click) -> str:
    return click.row.event_time.astimezone(datetime.timezone.utc).date().isoformat()


def eval_start_of(days, eval_days: int) -> Optional[str]:
    """The first of the last ``eval_days`` days present (ISO dates); None when there are none."""
    days = sorted(set(days))
    if not days:
        return None
    return days[max(0, len(days) - eval_days)]


class SplitByTime(beam.PTransform):
    """Click -> (split, Click): the last ``eval_days`` UTC days present are eval, the rest train.

    Also outputs "eval_start" (singleton ISO date or None) and "days" (singleton sorted list).
    """

    def __init__(self, eval_days: int):
        super().__init__()
        self._eval_days = eval_days

    def expand(self, clicks):
        days = (
            clicks
            | "ListDays" >> beam.Map(utc_day)
            | "DistinctDays" >> beam.Distinct()
            | "CollectDays" >> beam.combiners.ToList()
            | "SortDays" >> beam.Map(sorted)
        )
        eval_start = days | "FindEvalStart" >> beam.Map(eval_start_of, self._eval_days)
        labelled = clicks | "LabelSplits" >> beam.Map(
            lambda c, start: (clk.EVAL if start is not None and utc_day(c) >= start else clk.TRAIN, c),
            beam.pvalue.AsSingleton(eval_start))
        return {"examples": labelled, "eval_start": eval_start, "days": days}


def log_q(item_train_rows: int, train_rows: int) -> float:
    """The logQ rule (module docstring): log(n_item / n_train), or log(1 / (n_train + 1)) for an unseen item."""
    if item_train_rows > 0:
        return math.log(item_train_rows / train_rows)
    return -math.log(train_rows + 1)


class _MakeExamples(beam.DoFn):
    def __init__(self, weights: Mapping[str, float]):
        self._weights = dict(weights)
        self._kept = progress.counter(CLICKS_KEPT)

    def process(self, element, train_rows):
        item_id, joined = element
        counts = list(joined["count"])
        n = counts[0] if counts else 0
        q = log_q(n, train_rows)
        for split, click in joined["examples"]:
            self._kept.inc()
            yield Example(click.row.event_time, split, click.text, click.image_uri, item_id, click.event,
                          self._weights[click.event], q, click.text_embedding, click.image_embedding)


class ComputeLogQ(beam.PTransform):
    """(split, Click) -> Example with weight and log_q (from the train rows' item counts, joined by item)."""

    def __init__(self, weights: Mapping[str, float]):
        super().__init__()
        self._weights = dict(weights)

    def expand(self, labelled):
        train_items = (
            labelled
            | "KeepTrain" >> beam.Filter(lambda sc: sc[0] == clk.TRAIN)
            | "TrainItems" >> beam.Map(lambda sc: sc[1].row.item_id)
        )
        counts = train_items | "CountPerItem" >> beam.combiners.Count.PerElement()
        total = train_items | "CountTrainRows" >> beam.combiners.Count.Globally()
        return (
            {"examples": labelled | "KeyByItem" >> beam.Map(lambda sc: (sc[1].row.item_id, sc)), "count": counts}
            | "JoinCounts" >> beam.CoGroupByKey()
            | "MakeExamples" >> beam.ParDo(_MakeExamples(self._weights), beam.pvalue.AsSingleton(total))
        )


# ---------------------------------------------------------------------------
# Writing


class WriteTable(beam.PTransform):
    """Records with to_dict() -> Parquet files ``directory/prefix-SSSSS-of-NNNNN.parquet``; returns their paths."""

    def __init__(self, directory: str, prefix: str, schema):
        super().__init__()
        self._path = files.join(directory, prefix)
        self._schema = schema

    def expand(self, records):
        return (
            records
            | "ToDicts" >> beam.Map(lambda r: r.to_dict())
            | "WriteParquet" >> beam.io.WriteToParquet(self._path, self._schema, file_name_suffix=".parquet")
        )


class _WriteSummary(beam.DoFn):
    """Writes summary.json from the run's counts (runs once). The driver checks it and adds its status."""

    def __init__(self, plan: "PreprocessPlan"):
        self._plan = plan

    def process(self, _, read, kept, impressions, rejected_counts, split_counts, distinct_texts, distinct_images,
                eval_start, days, example_files, rejected_files):
        plan = self._plan
        splits = dict(split_counts)
        summary = PreprocessSummary(
            read=int(read), kept=int(kept), impressions=int(impressions),
            rejected_by_reason={k: int(v) for k, v in sorted(dict(rejected_counts).items())},
            train=int(splits.get(clk.TRAIN, 0)), eval=int(splits.get(clk.EVAL, 0)),
            distinct_texts=int(distinct_texts), distinct_images=int(distinct_images), eval_start=eval_start,
            paths={"examples": sorted(files.relative(p, plan.out_dir) for p in example_files),
                   "rejected": sorted(files.relative(p, plan.out_dir) for p in rejected_files),
                   "summary": SUMMARY_FILE})
        data = plan.describe()
        data.update(summary._asdict())
        data["rejected"] = summary.rejected
        data["days"] = list(days)
        files.write_atomically(files.join(plan.out_dir, SUMMARY_FILE), _dumps(data))
        yield summary


def _count_rejection(r: ClickRejection) -> None:
    progress.counter(CLICKS_REJECTED).inc()
    progress.counter(f"{CLICKS_REJECTED}_{r.reason}").inc()


def _dumps(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _count(pcoll, label):
    return pcoll | label >> beam.combiners.Count.Globally()


# ---------------------------------------------------------------------------
# The plan: everything checked before any work


class PreprocessPlan(NamedTuple):
    clicks_pattern: str
    click_files: tuple
    rows: int
    release_dir: str
    embeddings_tables: tuple  # full paths
    text_encoder: enc.EncoderSpec
    image_encoder: enc.EncoderSpec
    index: dict  # version, release: for the summary
    out_dir: str
    eval_days: int
    event_weights: dict
    max_rejected_fraction: float
    max_image_pixels: int
    fetch_options: dict
    model_cache: Optional[str]
    batch_size: int

    @property
    def num_buckets(self) -> int:
        """Groups the distinct queries are batched in: about 32 batches' worth of rows per group."""
        return max(1, -(-self.rows // (self.batch_size * 32)))

    def describe(self) -> dict:
        """The inputs and options, for summary.json."""
        return {
            "clicks": {"pattern": self.clicks_pattern, "files": list(self.click_files)},
            "index": dict(self.index, release_dir=self.release_dir,
                          encoders={"text": self.text_encoder.to_json(), "image": self.image_encoder.to_json()}),
            "options": {"eval_days": self.eval_days, "event_weights": dict(self.event_weights),
                        "max_rejected_fraction": self.max_rejected_fraction,
                        "max_image_pixels": self.max_image_pixels, "batch_size": self.batch_size},
            "log_q_rule": LOG_Q_RULE,
        }


def _local(path: str) -> str:
    # Beam's local filesystem takes plain paths, not file:// URLs.
    return layout.local_path(path)


def match_clicks(pattern: str) -> tuple:
    """(sorted paths, total rows) of the click files; ConfigError naming the file and column on a bad schema."""
    pattern = _local(pattern)
    paths = files.match_paths(pattern, "--clicks")
    rows = 0
    for path in paths:
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except Exception as e:
            raise ConfigError(f"{path}: not a readable Parquet file ({brief(e)})") from e
        clk.check_clicks_schema(schema, path)
        rows += meta.num_rows
    return tuple(paths), rows


def _number(name, value, low, high=None, integer=False):
    ok = not isinstance(value, bool) and isinstance(value, (int,) if integer else (int, float))
    if ok and isinstance(value, float):
        ok = math.isfinite(value)
    if not ok or value < low or (high is not None and value > high):
        bound = f"within [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"--{name} must be {'an integer' if integer else 'a number'} {bound}, got {value!r}")


def plan_preprocess(clicks: str, release_dir: str, manifest: dict, out_dir: str, *, eval_days: int = 1,
                    event_weights=None, max_rejected_fraction: float = 0.1, image_root: Optional[str] = None,
                    image_timeout: float = images.DEFAULT_TIMEOUT_S, allow_private_image_hosts: bool = False,
                    max_image_pixels: Optional[int] = None, model_cache: Optional[str] = None,
                    batch_size: int = 32) -> PreprocessPlan:
    """Checks every option and input; raises ConfigError (or DataError for a log with no rows) before any work."""
    _number("eval-days", eval_days, 1, integer=True)
    _number("batch-size", batch_size, 1, integer=True)
    _number("max-rejected-fraction", max_rejected_fraction, 0.0, 1.0)
    _number("image-timeout", image_timeout, 0.0)
    if image_timeout <= 0:
        raise ConfigError(f"--image-timeout must be > 0 seconds, got {image_timeout}")
    weights = clk.parse_event_weights(event_weights)
    try:
        tables = manifest["tables"]["embeddings"]
        text = enc.EncoderSpec.from_json(enc.TEXT, manifest["encoders"][enc.TEXT])
        image = enc.EncoderSpec.from_json(enc.IMAGE, manifest["encoders"][enc.IMAGE])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{release_dir}: the manifest lacks the embeddings tables or the encoders ({brief(e)}); "
                          f"is it an index release?") from None
    if not tables:
        raise ConfigError(f"{release_dir}: the manifest lists no embeddings table")
    if max_image_pixels is None:
        max_image_pixels = int((manifest.get("options") or {}).get("max_image_pixels") or images.DEFAULT_MAX_PIXELS)
    _number("max-image-pixels", max_image_pixels, 1, integer=True)
    out_dir = _local(out_dir).rstrip("/")
    leftovers = [p for p in (files.list_files(out_dir) if files.exists(out_dir) else [])
                 if os.path.basename(p) == SUMMARY_FILE
                 or (os.path.basename(p).startswith((EXAMPLES_PREFIX + "-", REJECTED_PREFIX + "-"))
                     and p.endswith(".parquet"))]
    if leftovers:
        raise ConfigError(f"{out_dir} already holds preprocessing output ({os.path.basename(leftovers[0])}...); "
                          f"use a new folder")
    paths, rows = match_clicks(clicks)
    if rows == 0:
        raise DataError(f"--clicks {clicks!r}: {len(paths)} file(s) with no rows; nothing to train on")
    release_dir = _local(release_dir).rstrip("/")
    return PreprocessPlan(
        clicks_pattern=clicks, click_files=paths, rows=rows, release_dir=release_dir,
        embeddings_tables=tuple(files.join(release_dir, rel) for rel in tables),
        text_encoder=text, image_encoder=image,
        index={"version": manifest.get("version"), "release": manifest.get("release")},
        out_dir=out_dir, eval_days=eval_days, event_weights=weights,
        max_rejected_fraction=float(max_rejected_fraction), max_image_pixels=max_image_pixels,
        fetch_options={"timeout": image_timeout, "allow_private_hosts": bool(allow_private_image_hosts),
                       "image_root": image_root},
        model_cache=model_cache, batch_size=batch_size)


# ---------------------------------------------------------------------------
# The graph and the run


def build_preprocess(p: beam.Pipeline, plan: PreprocessPlan):
    """Adds the whole preprocessing to ``p``; returns the PCollection of the one PreprocessSummary."""
    rows = p | "ReadClicks" >> ReadClicks(plan.click_files)
    known = beam.pvalue.AsSingleton(p | "ReadIndexItemIds" >> ReadIndexItemIds(plan.embeddings_tables))
    valid = rows | "ValidateClicks" >> ValidateClicks(known)
    texts = valid["clicks"] | "EncodeQueryTexts" >> EncodeQueryTexts(
        plan.text_encoder, plan.num_buckets, plan.batch_size, plan.model_cache)
    photos = texts["clicks"] | "EncodeQueryImages" >> EncodeQueryImages(
        plan.image_encoder, plan.num_buckets, plan.batch_size, plan.max_image_pixels, plan.fetch_options,
        plan.model_cache)
    split = photos["clicks"] | "SplitByTime" >> SplitByTime(plan.eval_days)
    examples = split["examples"] | "ComputeLogQ" >> ComputeLogQ(plan.event_weights)
    rejected = (valid[REJECTED], texts[REJECTED], photos[REJECTED]) | "CollectRejected" >> beam.Flatten()
    _ = rejected | "CountRejectedMetric" >> beam.Map(_count_rejection)

    example_files = examples | "WriteExamples" >> WriteTable(plan.out_dir, EXAMPLES_PREFIX, clk.EXAMPLES_SCHEMA)
    rejected_files = rejected | "WriteRejected" >> WriteTable(plan.out_dir, REJECTED_PREFIX,
                                                              clk.REJECTED_CLICKS_SCHEMA)
    side = beam.pvalue
    return (
        p
        | "StartSummary" >> beam.Create([None])
        | "WriteSummary" >> beam.ParDo(
            _WriteSummary(plan),
            read=side.AsSingleton(_count(rows, "CountRead")),
            kept=side.AsSingleton(_count(examples, "CountKept")),
            impressions=side.AsSingleton(_count(valid[IMPRESSIONS], "CountImpressions")),
            rejected_counts=side.AsDict(rejected | "RejectedReasons" >> beam.Map(lambda r: r.reason)
                                        | "CountRejected" >> beam.combiners.Count.PerElement()),
            split_counts=side.AsDict(examples | "Splits" >> beam.Map(lambda e: e.split)
                                     | "CountSplits" >> beam.combiners.Count.PerElement()),
            distinct_texts=side.AsSingleton(_count(texts["distinct"], "CountDistinctTexts")),
            distinct_images=side.AsSingleton(_count(photos["distinct"], "CountDistinctImages")),
            eval_start=side.AsSingleton(split["eval_start"]),
            days=side.AsSingleton(split["days"]),
            example_files=side.AsList(example_files),
            rejected_files=side.AsList(rejected_files),
        )
    )


def _metric_totals(result) -> dict:
    """{name: value} of the run's counters and distribution sums in our namespace ({} when unavailable)."""
    out = {}
    try:
        found = result.metrics().query(MetricsFilter().with_namespace(progress.NAMESPACE))
    except Exception as e:  # some runners answer no metrics; the summary does not depend on them
        _log.warning("no Beam metrics from the runner: %s", brief(e))
        return out
    for kind in ("counters", "distributions"):
        for m in found.get(kind, []):
            value = m.committed if m.committed is not None else m.attempted
            if kind == "distributions":
                value = getattr(value, "sum", None)
            if value is not None:
                out[m.key.metric.name] = out.get(m.key.metric.name, 0) + int(value)
    return out


def check_accounting(summary: PreprocessSummary) -> None:
    """read == kept + impressions + rejected and kept == train + eval, or CatalogIndexError (a bug)."""
    if summary.read != summary.kept + summary.impressions + summary.rejected:
        raise CatalogIndexError(
            f"the click accounting does not add up: read {summary.read} != kept {summary.kept} + impressions "
            f"{summary.impressions} + rejected {summary.rejected} ({summary.rejected_by_reason})")
    if summary.kept != summary.train + summary.eval:
        raise CatalogIndexError(f"kept {summary.kept} != train {summary.train} + eval {summary.eval}")


def _refusal(summary: PreprocessSummary, plan: PreprocessPlan, days: list) -> Optional[str]:
    """Why training must not go on, or None."""
    fraction = summary.rejected / summary.read if summary.read else 0.0
    if fraction > plan.max_rejected_fraction:
        top = sorted(summary.rejected_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        return (f"{summary.rejected} of {summary.read} click rows rejected ({fraction:.1%}), over "
                f"--max-rejected-fraction {plan.max_rejected_fraction:.1%}; top reasons: "
                f"{', '.join(f'{k}={v}' for k, v in top)}. The rejected rows (with the bad value in 'detail') "
                f"are in {plan.out_dir}/{REJECTED_PREFIX}-*.parquet; nothing was trained")
    if summary.kept == 0:
        return (f"no click row of the {summary.read} read was kept (impressions {summary.impressions}, rejected "
                f"{summary.rejected}); nothing to train on")
    if summary.train == 0:
        return (f"no train rows: all {summary.kept} kept rows fall on the last --eval-days {plan.eval_days} "
                f"day(s) present ({', '.join(days)}); the log needs events on more days than --eval-days")
    return None


def run_preprocess(clicks: str, release_dir: str, manifest: dict, out_dir: str, *, eval_days: int = 1,
                   event_weights: Union[None, str, Mapping[str, float]] = None, max_rejected_fraction: float = 0.1,
                   image_root: Optional[str] = None, image_timeout: float = images.DEFAULT_TIMEOUT_S,
                   allow_private_image_hosts: bool = False, max_image_pixels: Optional[int] = None,
                   model_cache: Optional[str] = None, batch_size: int = 32,
                   pipeline_options: Union[None, PipelineOptions, Sequence[str]] = None,
                   test_pipeline: Optional[beam.Pipeline] = None) -> PreprocessSummary:
    """Runs the preprocessing (module docstring) and returns its summary.

    ``clicks``: a Parquet path or glob (local, ``file://``, or any Beam filesystem).
    ``release_dir`` and ``manifest``: a published index release the caller has verified.
    ``max_image_pixels``: default the index's own (its manifest's options), else images.DEFAULT_MAX_PIXELS.
    ``pipeline_options``: PipelineOptions or Beam flags (``["--runner", ...]``); DirectRunner by default.

    Raises ConfigError before any work when an option or input is unusable (a missing column names
    the file and the column). After the run, raises DataError when too many rows were rejected, when
    nothing was kept, or when no train row is left; the rejected rows and summary.json (with
    ``status`` and ``refusal``) are written first, so the caller can show them and stop before training.
    """
    start = time.perf_counter()
    plan = plan_preprocess(clicks, release_dir, manifest, out_dir, eval_days=eval_days, event_weights=event_weights,
                           max_rejected_fraction=max_rejected_fraction, image_root=image_root,
                           image_timeout=image_timeout, allow_private_image_hosts=allow_private_image_hosts,
                           max_image_pixels=max_image_pixels, model_cache=model_cache, batch_size=batch_size)
    if test_pipeline is not None:
        p = test_pipeline
    else:
        options = pipeline_options if isinstance(pipeline_options, PipelineOptions) else PipelineOptions(
            list(pipeline_options or []))
        options.view_as(SetupOptions).save_main_session = False
        p = beam.Pipeline(options=options)
    files.mkdirs(plan.out_dir)
    _log.info("preprocessing %d click file(s), %d rows, into %s", len(plan.click_files), plan.rows, plan.out_dir)
    build_preprocess(p, plan)
    result = p.run()
    result.wait_until_finish()
    return settle(plan, _metric_totals(result), started=start)


def settle(plan: PreprocessPlan, metrics: Optional[dict] = None, started: Optional[float] = None) -> PreprocessSummary:
    """After the preprocessing: summary.json read back, the accounting checked (check_accounting), the status
    and refusal recorded in it; DataError when training must not go on (``_refusal``).

    Called by run_preprocess in the launching process (with the run's Beam metrics) and by the training job's
    fit step (pipelines/train_fit.py) on a worker, where Beam's metrics are not available (``metrics``
    None: the encoded counts stay unknown there)."""
    metrics = metrics or {}
    summary_path = files.join(plan.out_dir, SUMMARY_FILE)
    data = json.loads(files.read_bytes(summary_path))
    summary = PreprocessSummary(
        **{name: data[name] for name in PreprocessSummary._fields
           if name not in ("paths", "texts_encoded", "images_encoded")},
        paths={"examples": [files.join(plan.out_dir, rel) for rel in data["paths"]["examples"]],
               "rejected": [files.join(plan.out_dir, rel) for rel in data["paths"]["rejected"]],
               "summary": summary_path},
        texts_encoded=metrics.get(f"{enc.TEXT}_encoder_batch_size"),
        images_encoded=metrics.get(f"{enc.IMAGE}_encoder_batch_size"))
    check_accounting(summary)
    refusal = _refusal(summary, plan, data.get("days", []))
    data.update(texts_encoded=summary.texts_encoded, images_encoded=summary.images_encoded,
                metrics=dict(sorted(metrics.items())), status="refused" if refusal else "ok", refusal=refusal)
    if started is not None:
        data["wall_s"] = round(time.perf_counter() - started, 3)
    files.write_atomically(summary_path, _dumps(data))
    _log.info("%s", summary.describe())
    if refusal:
        raise DataError(refusal, reason="clicks_refused")
    return summary
