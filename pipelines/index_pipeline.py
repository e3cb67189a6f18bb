"""The index pipeline: catalog Parquet -> fused vectors -> sharded Annoy indexes, published atomically.

    ReadCatalog | ValidateItems | DeduplicateItems | BatchItems | EncodeItems | FuseEmbeddings
                | WriteAnnoyShards | PublishIndex

Everything is written below ``OUTPUT/_staging/<version>.<run id>/`` first. ``PublishIndex``
runs once all of it is complete: it checks the accounting and the rejected
fraction, verifies every shard's checksum, moves the files to
``OUTPUT/<version>/``, writes ``manifest.json`` and then ``OUTPUT/LATEST``. A
failed or interrupted run never reaches the last two steps, so readers that
follow LATEST never see it.
"""

import datetime
import json
import logging
import sys
import time
from typing import Optional

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

import catalog_index
from catalog_index.errors import PublicationError
from pipelines import files
from pipelines import progress
from pipelines import transforms as tr
from pipelines.options import STAGING_DIR, IndexOptions, IndexPlan
from schemas import manifest as mf
from schemas import rejected as rej

_log = logging.getLogger(__name__)


def _parquet_rows(path: str) -> int:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _count(reasons) -> dict:
    return {reason: int(n) for reason, n in sorted(dict(reasons).items())}


def _version_files(manifest: dict) -> set:
    """Every data file of a version, relative to its directory (the manifest itself aside)."""
    out = set()
    for shard in manifest["shards"]:
        out.update((shard["path"], shard["id_map"], shard["embeddings"]))
    for paths in manifest["tables"].values():
        out.update(paths)
    return out


class _Publish(beam.DoFn):
    """Checks, moves and announces the finished version (runs once, on one worker)."""

    def __init__(self, plan: IndexPlan, options: dict, max_rejected_fraction: float, trees: int, seed: int):
        self._plan = plan
        self._options = options
        self._max_rejected_fraction = max_rejected_fraction
        self._trees = trees
        self._seed = seed

    def process(self, _, shards, read, rejected_counts, degraded_counts, rejected_files, degraded_files):
        plan = self._plan
        shards = sorted(shards, key=lambda s: s.index)
        rejected_by_reason = _count(rejected_counts)
        degraded_by_reason = _count(degraded_counts)
        read = int(read)
        rejected = sum(rejected_by_reason.values())
        fraction = rejected / read if read else 0.0
        if fraction > self._max_rejected_fraction:
            raise PublicationError(
                f"{rejected} of {read} rows rejected ({fraction:.1%}), over --max-rejected-fraction "
                f"{self._max_rejected_fraction:.1%}; by reason: {rejected_by_reason}. Nothing was published; "
                f"see {files.join(plan.staging_dir, 'rejected')}"
            )
        manifest = {
            "format_version": mf.FORMAT_VERSION,
            "version": plan.version,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "catalog": {"pattern": plan.catalog_pattern, "files": list(plan.catalog_files)},
            "dimension": plan.fusion.dim,
            "metric": "angular",
            "trees": self._trees,
            "seed": self._seed,
            "encoders": {"text": plan.text_encoder.to_json(), "image": plan.image_encoder.to_json()},
            "fusion": plan.fusion.to_json(),
            "shards": [s.to_json() for s in shards],
            "tables": {
                "embeddings": [s.embeddings for s in shards],
                "rejected": sorted(files.relative(p, plan.staging_dir) for p in rejected_files),
                "degraded": sorted(files.relative(p, plan.staging_dir) for p in degraded_files),
            },
            "counts": {
                "read": read,
                "indexed": sum(s.count for s in shards),
                "rejected": rejected,
                "rejected_by_reason": rejected_by_reason,
                "degraded": sum(degraded_by_reason.values()),
                "degraded_by_reason": degraded_by_reason,
            },
            "options": self._options,
            "tool": {"name": "catalog-index", "version": catalog_index.__version__},
        }
        mf.validate_manifest(manifest)
        self._verify(manifest, plan.staging_dir, checksums=True)

        # Whatever is in the version directory and not part of this version goes first: the
        # replaced version (--force) or leftovers of an interrupted run. Files this version
        # already moved stay, so a retried publication completes instead of failing.
        wanted = _version_files(manifest)
        stale = [p for p in files.list_files(plan.version_dir) if files.relative(p, plan.version_dir) not in wanted]
        if stale:
            FileSystems.delete(stale)
        files.move_tree(plan.staging_dir, plan.version_dir, sorted(wanted))
        # Renames keep content; sizes catch a move that went wrong without re-reading everything.
        self._verify(manifest, plan.version_dir, checksums=False)
        files.write_atomically(files.join(plan.version_dir, mf.MANIFEST_FILE), mf.dumps(manifest))
        self._update_latest(plan)
        files.delete_tree(plan.staging_dir)
        staging_root = files.join(plan.output, STAGING_DIR)
        if not files.list_files(staging_root):
            files.delete_tree(staging_root)
        yield manifest

    def _verify(self, manifest, base, checksums):
        tables = manifest["tables"]
        for shard in manifest["shards"]:
            path = files.join(base, shard["path"])
            if checksums:
                size, sha = files.checksum(path)
                if (size, sha) != (shard["size"], shard["sha256"]):
                    raise PublicationError(f"{path}: content differs from what was built "
                                           f"({size} bytes, sha256 {sha[:12]}...)")
            elif files.size(path) != shard["size"]:
                raise PublicationError(f"{path}: size differs from what was built")
            for key in ("id_map", "embeddings"):
                rows = _parquet_rows(files.join(base, shard[key]))
                if rows != shard["count"]:
                    raise PublicationError(f"{shard[key]}: {rows} rows, shard holds {shard['count']}")
        for table, expected in (("rejected", manifest["counts"]["rejected"]),
                                ("degraded", manifest["counts"]["degraded"])):
            rows = sum(_parquet_rows(files.join(base, p)) for p in tables[table])
            if rows != expected:
                raise PublicationError(f"{table} table holds {rows} rows, counted {expected}")

    @staticmethod
    def _update_latest(plan: IndexPlan):
        latest = files.join(plan.output, mf.LATEST_FILE)
        current = files.read_bytes(latest).decode().strip() if files.exists(latest) else None
        # LATEST only moves forward, so backfilling an old date never hides a newer version.
        if current is not None and current > plan.version:
            _log.warning("published %s; LATEST stays at the later version %s", plan.version, current)
            return
        files.write_atomically(latest, (plan.version + "\n").encode())


class PublishIndex(beam.PTransform):
    """Waits for every output of the run, then checks and publishes the version (see _Publish)."""

    def __init__(self, plan: IndexPlan, options: dict, max_rejected_fraction: float, trees: int, seed: int):
        super().__init__()
        self._publish = _Publish(plan, options, max_rejected_fraction, trees, seed)

    def expand(self, inputs):
        as_dict = beam.pvalue.AsDict
        return (
            inputs["shards"].pipeline
            | "Start" >> beam.Create([None])
            | "CheckAndPublish" >> beam.ParDo(
                self._publish,
                shards=beam.pvalue.AsList(inputs["shards"]),
                read=beam.pvalue.AsSingleton(inputs["read"]),
                rejected_counts=as_dict(inputs["rejected_counts"]),
                degraded_counts=as_dict(inputs["degraded_counts"]),
                rejected_files=beam.pvalue.AsList(inputs["rejected_files"]),
                degraded_files=beam.pvalue.AsList(inputs["degraded_files"]),
            )
        )


class WriteRows(beam.PTransform):
    """Writes Rejection records as a Parquet table below ``directory``; returns the file names."""

    def __init__(self, directory: str):
        super().__init__()
        self._directory = directory

    def expand(self, rows):
        return (
            rows
            | "ToDicts" >> beam.Map(lambda r: r.to_dict())
            | "WriteParquet" >> beam.io.WriteToParquet(
                files.join(self._directory, "part"), rej.REJECTED_SCHEMA, file_name_suffix=".parquet")
        )


def build_pipeline(p: beam.Pipeline, plan: IndexPlan, opts: IndexOptions):
    """Adds the whole index pipeline to ``p``; returns the PCollection of the published manifest."""
    staging = plan.staging_dir
    rows = p | "ReadCatalog" >> tr.ReadCatalog(plan.catalog_files)
    valid = rows | "ValidateItems" >> tr.ValidateItems()
    unique = valid["items"] | "DeduplicateItems" >> tr.DeduplicateItems()
    buckets = plan.encode_buckets(opts.batch_size)
    batches = unique["items"] | "BatchItems" >> tr.BatchItems(buckets, opts.batch_size)
    encoded = batches | "EncodeItems" >> tr.EncodeItems(
        plan.text_encoder.handle, plan.image_encoder.handle, plan.image_encoder.image_size, buckets,
        batch_size=opts.batch_size,
        max_pixels=opts.max_image_pixels,
        reject_on_image_error=opts.reject_on_image_error, large_model=opts.large_model,
        model_cache=opts.model_cache)
    fused = encoded["items"] | "FuseEmbeddings" >> tr.FuseEmbeddings(plan.fusion)
    shards = fused["items"] | "WriteAnnoyShards" >> tr.WriteAnnoyShards(
        staging, opts.shards, plan.fusion.dim, opts.trees, opts.seed)

    rejected = (
        (valid[tr.REJECTED], unique[tr.REJECTED], encoded[tr.REJECTED], fused[tr.REJECTED])
        | "CollectRejected" >> beam.Flatten()
    )
    degraded = encoded[tr.DEGRADED]
    rejected_files = rejected | "WriteRejected" >> WriteRows(files.join(staging, "rejected"))
    degraded_files = degraded | "WriteDegraded" >> WriteRows(files.join(staging, "degraded"))
    _ = rejected | "CountRejectedMetric" >> beam.Map(lambda r: progress.counter(f"rejected_{r.reason}").inc())
    _ = degraded | "CountDegradedMetric" >> beam.Map(lambda r: progress.counter(f"degraded_{r.reason}").inc())

    options = {
        "shards": opts.shards,
        "batch_size": opts.batch_size,
        "max_rejected_fraction": opts.max_rejected_fraction,
        "reject_on_image_error": bool(opts.reject_on_image_error),
        "max_image_pixels": opts.max_image_pixels,
    }
    return {
        "shards": shards,
        "read": rows | "CountRead" >> beam.combiners.Count.Globally(),
        "rejected_counts": rejected | "RejectedReasons" >> beam.Map(lambda r: r.reason)
        | "CountRejected" >> beam.combiners.Count.PerElement(),
        "degraded_counts": degraded | "DegradedReasons" >> beam.Map(lambda r: r.reason)
        | "CountDegraded" >> beam.combiners.Count.PerElement(),
        "rejected_files": rejected_files,
        "degraded_files": degraded_files,
    } | "PublishIndex" >> PublishIndex(plan, options, opts.max_rejected_fraction, opts.trees, opts.seed)


class IndexRunResult:
    """What ``run`` returns: the published manifest and how long it took."""

    def __init__(self, plan, manifest, wall_s, pipeline_result, validation_s=0.0):
        self.plan = plan
        self.manifest = manifest
        self.wall_s = wall_s  # from parsing the options to publication, validation included
        self.validation_s = validation_s
        self.pipeline_result = pipeline_result

    def summary(self) -> str:
        if self.manifest is None:
            return f"pipeline submitted; version {self.plan.version} publishes when the job finishes"
        c = self.manifest["counts"]
        rate = c["indexed"] / self.wall_s if self.wall_s > 0 else float("nan")
        reasons = ", ".join(f"{k}={v}" for k, v in c["rejected_by_reason"].items()) or "none"
        degraded = ", ".join(f"{k}={v}" for k, v in c["degraded_by_reason"].items()) or "none"
        return (
            f"published {self.plan.version_dir}\n"
            f"  read {c['read']}, indexed {c['indexed']} in {len(self.manifest['shards'])} shard(s), "
            f"rejected {c['rejected']} ({reasons}), degraded {c['degraded']} ({degraded})\n"
            f"  wall time {self.wall_s:.1f}s (validation and model probes {self.validation_s:.1f}s), "
            f"{rate:.1f} items/s"
        )


def run(argv=None, test_pipeline: Optional[beam.Pipeline] = None) -> IndexRunResult:
    """Validates the options, builds and runs the pipeline, and returns the published manifest.

    ``argv`` holds app flags and any Beam flags (``--runner``, ``--direct_num_workers``, ...).
    Raises ConfigError before building anything when the options are unusable.
    """
    start = time.perf_counter()
    options = PipelineOptions(argv if argv is not None else sys.argv[1:])
    opts = options.view_as(IndexOptions)
    plan = opts.validate()
    validated = time.perf_counter()
    # DoFns reference module-level code of this package; workers need the main session for nothing.
    options.view_as(SetupOptions).save_main_session = False
    p = test_pipeline if test_pipeline is not None else beam.Pipeline(options=options)
    _log.info("indexing %d catalog file(s) into %s", len(plan.catalog_files), plan.version_dir)
    build_pipeline(p, plan, opts)
    result = p.run()
    result.wait_until_finish()
    wall = time.perf_counter() - start
    manifest_path = files.join(plan.version_dir, mf.MANIFEST_FILE)
    manifest = json.loads(files.read_bytes(manifest_path)) if files.exists(manifest_path) else None
    return IndexRunResult(plan, manifest, wall, result, validation_s=validated - start)
