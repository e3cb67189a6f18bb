"""The index pipeline: catalog Parquet -> fused vectors -> sharded Annoy indexes, published atomically.

    ReadCatalog | ValidateItems | BatchItems | EncodeItems | FuseEmbeddings
                | WriteAnnoyShards | PublishIndex

The run holds the output root's lease (pipelines/lease.py) and writes into a new
release folder ``OUTPUT/<version>/<release>/`` that no pointer names yet.
``PublishIndex`` runs once all of it is complete: it checks the accounting and
the limits, writes ``manifest.json`` (size and sha256 of every file), verifies
the release as ``catalog-index verify`` does, and only then moves
``<version>/CURRENT`` and ``LATEST`` by compare-and-swap (schemas/layout.py).
A failed or killed run never moves a pointer, so readers that follow LATEST
never see it; a failed run removes its own folder, ``gc`` a killed one's.

Incremental runs: ``ReadPrevious`` (pipelines/reuse.py) reads the content keys of a
previous version's embeddings table into ``BatchItems``; ``EncodeItems`` reuses the
vectors of unchanged items instead of encoding them, and items with every vector
reused skip fusion: ``WriteAnnoyShards`` copies their previous rows into their
shards. The manifest counts reused and encoded vectors.
"""

import dataclasses
import datetime
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

from schemas.errors import CatalogIndexError, ConfigError, PublicationError, VerificationError
from embedding import fusion as fus
from embedding import query_encoder as qe
from pipelines import capacity
from pipelines import files
from pipelines import lease
from pipelines import preflight
from pipelines import progress
from pipelines import publication as pub
from pipelines import recall
from pipelines import reuse
from pipelines import shards as shd
from pipelines import transforms as tr
from pipelines.options import PREPROCESSING_VERSION, IndexOptions, IndexPlan
from schemas import layout
from schemas import manifest as mf
from schemas import rejected as rej

_log = logging.getLogger(__name__)


def _count(reasons) -> dict:
    return {reason: int(n) for reason, n in sorted(dict(reasons).items())}


class _Publish(beam.DoFn):
    """Checks, seals and announces the finished release (runs once, on one worker).

    Order: limits and accounting, checksums of every file, manifest (written
    last into the release folder), the same verification ``catalog-index
    verify`` runs, then ``<version>/CURRENT`` and ``LATEST`` by compare-and-swap.
    A kill at any point leaves the pointers on complete, verified releases.
    """

    def __init__(self, plan: IndexPlan, options: dict, limits: dict, trees: int, seed: int, lease_seconds: int,
                 model_cache: Optional[str] = None):
        self._plan = plan
        self._options = options
        self._limits = limits
        self._trees = trees
        self._seed = seed
        self._lease_seconds = lease_seconds
        self._model_cache = model_cache  # where built-in encoders live, for the query encoder's export

    def _check_limits(self, read, rejected_by_reason, indexed, degraded_by_reason):
        rejected = sum(rejected_by_reason.values())
        fraction = rejected / read if read else 0.0
        if fraction > self._limits["max_rejected_fraction"]:
            raise PublicationError(
                f"{rejected} of {read} rows rejected ({fraction:.1%}), over --max-rejected-fraction "
                f"{self._limits['max_rejected_fraction']:.1%}; by reason: {rejected_by_reason}. Nothing was "
                f"published (LATEST was not touched)")
        degraded = sum(degraded_by_reason.values())
        fraction = degraded / indexed if indexed else 0.0
        if fraction > self._limits["max_degraded_fraction"]:
            raise PublicationError(
                f"{degraded} of {indexed} indexed items lost their image ({fraction:.1%}), over "
                f"--max-degraded-fraction {self._limits['max_degraded_fraction']:.1%}; by reason: "
                f"{degraded_by_reason}. Nothing was published (LATEST was not touched); is the image store "
                f"reachable? Raise the limit if this is expected")
        if indexed == 0:
            raise PublicationError(f"no item of the {read} rows read could be indexed; nothing was published")

    def process(self, _, shards, read, rejected_counts, degraded_counts, rejected_files, degraded_files,
                query_sample=()):
        plan = self._plan
        shards = sorted(shards, key=lambda s: s.index)
        rejected_by_reason = _count(rejected_counts)
        degraded_by_reason = _count(degraded_counts)
        read = int(read)
        indexed = sum(s.count for s in shards)
        self._check_limits(read, rejected_by_reason, indexed, degraded_by_reason)
        vectors = dict.fromkeys(shd.VECTOR_COUNTS, 0)
        for shard in shards:
            for name, n in shard.vectors:
                vectors[name] += n

        entries = {}
        for shard in shards:
            entries.update(shard.file_entries())
        tables = {
            "embeddings": [s.embeddings for s in shards],
            "rejected": sorted(files.relative(p, plan.release_dir) for p in rejected_files),
            "degraded": sorted(files.relative(p, plan.release_dir) for p in degraded_files),
        }
        for rel in tables["rejected"] + tables["degraded"]:
            size, sha = files.checksum(files.join(plan.release_dir, rel))
            entries[rel] = {"size": size, "sha256": sha}
        query_encoder = None
        if not files.exists(files.join(plan.release_dir, layout.MANIFEST_FILE)):  # a sealed release stays as is
            query_encoder, query_files = _ship_query_encoder(plan, query_sample, self._model_cache)
            entries.update(query_files)
        manifest = {
            "format_version": mf.FORMAT_VERSION,
            "version": plan.version,
            "release": plan.release,
            "snapshot": plan.snapshot,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "catalog": {"pattern": plan.catalog_pattern, "files": list(plan.catalog_files)},
            "inputs": plan.inputs(),
            "dimension": plan.fusion.dim,
            "metric": layout.METRIC,
            "trees": self._trees,
            "seed": self._seed,
            "encoders": {"text": dict(plan.text_encoder.to_json(),
                                      **({"chosen_by": plan.text_choice.to_json()} if plan.text_choice else {})),
                         "image": plan.image_encoder.to_json()},
            "fusion": plan.fusion.to_json(),
            **({"query_encoder": query_encoder} if query_encoder is not None else {}),
            "shards": [s.to_json() for s in shards],
            "tables": tables,
            "files": dict(sorted(entries.items())),
            "counts": {
                "read": read,
                "indexed": indexed,
                "rejected": sum(rejected_by_reason.values()),
                "rejected_by_reason": rejected_by_reason,
                "degraded": sum(degraded_by_reason.values()),
                "degraded_by_reason": degraded_by_reason,
                **vectors,
            },
            # Where unchanged items' vectors came from (pipelines/reuse.py); not part of "inputs".
            "reuse": {"source": plan.reuse.to_json() if plan.reuse is not None else None,
                      "preprocessing": PREPROCESSING_VERSION},
            "options": self._options,
            "tool": {"name": layout.TOOL, "version": layout.TOOL_VERSION},
        }
        # The recall gate: search_k for readers, or a refusal (pipelines/recall.py).
        manifest["validation"] = recall.measure(plan.release_dir, manifest, self._limits["min_recall"])
        mf.validate_manifest(manifest)
        raw = mf.dumps(manifest)
        pub.failpoint("before_manifest")
        manifest_path = files.join(plan.release_dir, layout.MANIFEST_FILE)
        if files.exists(manifest_path):
            # A retried bundle (Dataflow retries failed work): an earlier attempt sealed this release and a
            # pointer may already name it, so it is never rewritten; the checks below still apply.
            raw = files.read_bytes(manifest_path)
            manifest = json.loads(raw)
        else:
            files.write_atomically(manifest_path, raw)
        pub.failpoint("after_manifest")
        # What was written is what the manifest says, read back: the same check as `catalog-index verify`.
        pub.verify_release(plan.release_dir)
        pointer = layout.Pointer(plan.version, plan.release, plan.snapshot, pub.sha256_bytes(raw))
        owner = lease.Lease(plan.output, plan.run_id, plan.version, seconds=self._lease_seconds)
        with owner.held():  # the launching process's lease, or (a Flex Template launch) taken just for this
            pub.switch_pointers(plan.output, pointer, plan.force, identical=_same_content(plan.output, manifest),
                                lease=owner)
        yield manifest


def _ship_query_encoder(plan: IndexPlan, samples, model_cache: Optional[str]) -> tuple:
    """Exports the query encoder, checks it against the pipeline's own vectors, copies it into the release.

    Exported to local temp space first (``tf.saved_model.save`` writes to local disks; files.* to any
    filesystem). Returns (the manifest's ``query_encoder`` entry, {relative path: {size, sha256}} of
    its files). Raises PublicationError when a sampled item's query vector is off.
    """
    def export(local):
        qe.export_query_encoder(plan.text_encoder, plan.image_encoder, plan.fusion, local, model_cache,
                                tr.MAX_TEXT_CHARS)
        return "exported"

    def check(local):
        parity = qe.measure_parity(qe.QueryEncoder(local), fus.make_fusion(plan.fusion.query_spec()), samples,
                                   query_tower=plan.fusion.query_path is not None)
        return parity, qe.parity_problem(parity)

    with tempfile.TemporaryDirectory(prefix="catalog-index-query-encoder-") as tmp:
        local = os.path.join(tmp, qe.DIRECTORY)
        # An incremental run's previous version has the same encoders and fusion (reuse's vector identity):
        # its query encoder is copied, not exported again, and checked on this run's sample all the same.
        how = _copy_previous_query_encoder(plan, local) or export(local)
        parity, problem = check(local)
        if problem is not None and how != "exported":
            _log.warning("the query encoder of %s does not reproduce this run's vectors (%s); exporting a new one",
                         plan.reuse.describe(), problem)
            shutil.rmtree(local)
            how = export(local)
            parity, problem = check(local)
        if problem is not None:
            raise PublicationError(f"the query encoder does not reproduce the pipeline's vectors: {problem}. "
                                   f"Nothing was published (LATEST was not touched)")
        entries = {}
        for root, _, names in os.walk(local):
            for name in names:
                rel = qe.DIRECTORY + "/" + os.path.relpath(os.path.join(root, name), local).replace(os.sep, "/")
                size, sha = files.copy_local_file(os.path.join(root, name), files.join(plan.release_dir, rel))
                entries[rel] = {"size": size, "sha256": sha}
    _log.info("query encoder: %d files, %s; parity %s", len(entries), how,
              {n: parity[n].get("min_cosine") for n in qe.SIGNATURES})
    return {"path": qe.DIRECTORY, "parity": parity}, entries


def _copy_previous_query_encoder(plan: IndexPlan, local: str) -> Optional[str]:
    """Copies the reuse source's query encoder to ``local``; returns how (for the log), or None when there
    is none to copy or a file does not match its recorded checksum (then the caller exports one)."""
    source = plan.reuse
    if source is None or not source.query_encoder:
        return None
    prefix = source.query_encoder[0][0].split("/")[0] + "/"
    for rel, size, sha in source.query_encoder:
        data = files.read_bytes(files.join(source.release_dir, rel))
        if len(data) != size or pub.sha256_bytes(data) != sha:
            _log.warning("the query encoder of %s changed since it was verified (%s); exporting a new one",
                         source.describe(), rel)
            shutil.rmtree(local, ignore_errors=True)
            return None
        path = os.path.join(local, *rel[len(prefix):].split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return f"copied from {source.describe()}"


def _same_content(output: str, manifest: dict):
    """identical(pointer): whether the release a pointer names has this manifest's content
    (same inputs digest and the same shard files), so a rerun can keep it instead of failing."""
    def identical(pointer) -> bool:
        try:
            other = pub.verify_release(files.join(output, pointer.path), pointer, checksums=False).manifest
        except CatalogIndexError:
            return False
        return (other["inputs"]["digest"] == manifest["inputs"]["digest"]
                and [s["sha256"] for s in other["shards"]] == [s["sha256"] for s in manifest["shards"]])

    return identical


class PublishIndex(beam.PTransform):
    """Waits for every output of the run, then checks and publishes the version (see _Publish)."""

    def __init__(self, plan: IndexPlan, options: dict, limits: dict, trees: int, seed: int, lease_seconds: int,
                 model_cache: Optional[str] = None):
        super().__init__()
        self._publish = _Publish(plan, options, limits, trees, seed, lease_seconds, model_cache)

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
                query_sample=beam.pvalue.AsList(inputs["query_sample"]),
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
    staging = plan.release_dir  # written straight into the new release folder; nothing names it yet
    rows = p | "ReadCatalog" >> tr.ReadCatalog(plan.catalog_files)
    valid = rows | "ValidateItems" >> tr.ValidateItems()
    buckets = plan.encode_buckets(opts.batch_size)
    # Incremental runs: the previous version's rows join the items in their batches (pipelines/reuse.py).
    previous = p | "ReadPrevious" >> reuse.ReadPrevious(plan.reuse.embeddings) if plan.reuse is not None else None
    previous_parts = plan.reuse.embeddings if plan.reuse is not None else ()
    # One row per item_id (duplicates rejected) in deterministic batches.
    batched = valid["items"] | "BatchItems" >> tr.BatchItems(buckets, opts.batch_size, previous,
                                                             staging_dir=staging)
    batches = batched["batches"]
    encoded = batches | "EncodeItems" >> tr.EncodeItems(
        plan.text_encoder.handle, plan.image_encoder.handle, plan.image_encoder.image_size, buckets,
        batch_size=opts.batch_size,
        max_pixels=opts.max_image_pixels,
        reject_on_image_error=opts.reject_on_image_error, large_model=opts.large_model,
        model_cache=opts.model_cache, image_timeout=opts.image_timeout,
        allow_private_hosts=bool(opts.allow_private_image_hosts), image_root=opts.image_root,
        previous_parts=previous_parts, staging_dir=staging,
        fingerprints=(plan.text_encoder.fingerprint, plan.image_encoder.fingerprint))
    fused = encoded["items"] | "FuseEmbeddings" >> tr.FuseEmbeddings(plan.fusion)
    image_options = (tuple(plan.image_encoder.image_size), opts.max_image_pixels,
                     {"timeout": opts.image_timeout, "allow_private_hosts": bool(opts.allow_private_image_hosts),
                      "image_root": opts.image_root})
    # Unchanged items of an incremental run are not fused again: their rows go from the previous parts
    # into their shards (pipelines/reuse.py).
    threads = opts.shard_build_threads or capacity.shard_threads(
        plan.catalog_rows, opts.shards, plan.text_encoder.output_dim, plan.image_encoder.output_dim, plan.fusion.dim,
        opts.view_as(StandardOptions).runner)
    _log.info("shards built at once per worker: %d%s", threads, " (--shard-build-threads)"
              if opts.shard_build_threads else " (CPUs, bounded by memory on a local runner)")
    shards = {"items": fused["items"], "carried": encoded[tr.CARRIED]} | "WriteAnnoyShards" >> tr.WriteAnnoyShards(
        staging, opts.shards, plan.fusion.dim, opts.trees, opts.seed, threads=threads,
        previous_parts=previous_parts)
    sample_inputs = {"batches": batches, tr.IMAGES: encoded[tr.IMAGES], "items": fused["items"]}
    if plan.reuse is not None:
        sample_inputs["shards"] = shards
    query_sample = sample_inputs | "SampleQueryInputs" >> tr.SampleQueryInputs(image_options=image_options)

    rejected = (
        (valid[tr.REJECTED], batched[tr.REJECTED], encoded[tr.REJECTED], fused[tr.REJECTED])
        | "CollectRejected" >> beam.Flatten()
    )
    degraded = encoded[tr.DEGRADED]
    rejected_files = rejected | "WriteRejected" >> WriteRows(files.join(staging, "rejected"))
    degraded_files = degraded | "WriteDegraded" >> WriteRows(files.join(staging, "degraded"))
    _ = rejected | "CountRejectedMetric" >> beam.Map(lambda r: progress.counter(f"rejected_{r.reason}").inc())
    _ = degraded | "CountDegradedMetric" >> beam.Map(lambda r: progress.counter(f"degraded_{r.reason}").inc())

    limits = {"max_rejected_fraction": opts.max_rejected_fraction, "max_degraded_fraction": opts.max_degraded_fraction,
              "min_recall": opts.min_recall}
    options = {**plan.content_options, **limits}
    return {
        "shards": shards,
        "read": rows | "CountRead" >> beam.combiners.Count.Globally(),
        "rejected_counts": rejected | "RejectedReasons" >> beam.Map(lambda r: r.reason)
        | "CountRejected" >> beam.combiners.Count.PerElement(),
        "degraded_counts": degraded | "DegradedReasons" >> beam.Map(lambda r: r.reason)
        | "CountDegraded" >> beam.combiners.Count.PerElement(),
        "rejected_files": rejected_files,
        "degraded_files": degraded_files,
        "query_sample": query_sample,
    } | "PublishIndex" >> PublishIndex(plan, options, limits, opts.trees, opts.seed, opts.lease_seconds,
                                       opts.model_cache)


class IndexRunResult:
    """What ``run`` returns: the published manifest, where the pointers ended, how long it took."""

    def __init__(self, plan, manifest, wall_s, pipeline_result, validation_s=0.0, outcome=None, note=""):
        self.plan = plan
        self.manifest = manifest
        self.wall_s = wall_s  # from parsing the options to publication, validation included
        self.validation_s = validation_s
        self.pipeline_result = pipeline_result
        self.outcome = outcome  # publication.Outcome-like: current / latest pointers after the run
        self.note = note  # e.g. "already published with identical inputs"

    @property
    def release_dir(self) -> str:
        if self.outcome is not None:
            return files.join(self.plan.output, self.outcome.current.path)
        return self.plan.release_dir

    def summary(self) -> str:
        if self.manifest is None:
            if self.plan.dry_run:
                return (f"dry run: nothing submitted (the job for version {self.plan.version} was built and "
                        f"checked; nothing was published to {self.plan.output})")
            return (f"job graph written for version {self.plan.version} (a template launch: Dataflow starts the "
                    f"job); it takes the publication lease of {self.plan.output} and publishes when it finishes")
        c = self.manifest["counts"]
        rate = c["indexed"] / self.wall_s if self.wall_s > 0 else float("nan")
        reasons = ", ".join(f"{k}={v}" for k, v in c["rejected_by_reason"].items()) or "none"
        degraded = ", ".join(f"{k}={v}" for k, v in c["degraded_by_reason"].items()) or "none"
        latest = self.outcome.latest if self.outcome is not None else None
        if latest is not None and latest.version == self.plan.version:
            where = "LATEST names it"
        else:
            where = (f"LATEST stays at {latest.version} (snapshot {latest.snapshot} is not earlier than "
                     f"{self.manifest['snapshot']})" if latest is not None else "LATEST was not moved")
        head = f"published {self.release_dir}" + (f" ({self.note})" if self.note else "")
        chosen = self.plan.text_choice
        text = f"  text encoder {chosen.describe()}\n" if chosen is not None else ""
        vectors = ""
        if "encoded_text" in c:
            source = (self.manifest.get("reuse") or {}).get("source")
            origin = f"from {source['version']}/{source['release']}" if source else "no previous version reused"
            vectors = (f"  text vectors reused {c['reused_text']}, encoded {c['encoded_text']}; image vectors "
                       f"reused {c['reused_image']}, encoded {c['encoded_image']} ({origin})\n")
        return (
            f"{head}\n"
            f"{text}"
            f"  read {c['read']}, indexed {c['indexed']} in {len(self.manifest['shards'])} shard(s), "
            f"rejected {c['rejected']} ({reasons}), degraded {c['degraded']} ({degraded})\n"
            f"{vectors}"
            f"  {where}\n"
            f"  wall time {self.wall_s:.1f}s (validation and model probes {self.validation_s:.1f}s), "
            f"{rate:.1f} items/s"
        )


def _published_from_other_inputs(plan: IndexPlan, current: layout.Pointer) -> ConfigError:
    return ConfigError(f"version {plan.version!r} is already published ({current.path}) from other inputs "
                       f"(catalog, encoders or options differ); pick another --version or pass --force "
                       f"to publish a replacement")


def _refuse_other_inputs(plan: IndexPlan) -> None:
    """For a template launch, which cannot finish a publication itself: _finish_existing's refusal of a version
    already published from other inputs, before a job is built (the job would fail only at its end)."""
    if plan.force:
        return
    current, _ = pub.read_pointer(files.join(plan.version_dir, layout.CURRENT_FILE))
    if current is None:
        return
    try:
        live = pub.verify_release(files.join(plan.output, current.path), current)
    except VerificationError:
        return  # the job publishes a new release, as a CLI run would
    if live.manifest["inputs"]["digest"] != plan.inputs()["digest"]:
        raise _published_from_other_inputs(plan, current)


def _finish_existing(plan: IndexPlan, owner: lease.Lease) -> Optional[tuple]:
    """A rerun of a version that is already published, or whose release is complete but not yet
    named (a run killed between its manifest and its pointers): finish it instead of redoing it.

    Returns (manifest, outcome, note) when done; None when the pipeline must run. Raises
    ConfigError when the version is published from other inputs and --force is not given.
    """
    digest = plan.inputs()["digest"]
    current, _ = pub.read_pointer(files.join(plan.version_dir, layout.CURRENT_FILE))
    if current is not None:
        try:
            live = pub.verify_release(files.join(plan.output, current.path), current)
        except VerificationError as e:
            _log.warning("the live release of %s does not verify (%s); publishing a new one", plan.version, e)
            return None
        if live.manifest["inputs"]["digest"] == digest and not plan.force:
            pointer = current
        elif plan.force:
            return None
        else:
            raise _published_from_other_inputs(plan, current)
        outcome = pub.switch_pointers(plan.output, pointer, force=False, lease=owner)
        return live.manifest, outcome, "already published with identical inputs; nothing rebuilt"
    if plan.force:
        return None
    # A complete release that no pointer names yet, from the same inputs: adopt the newest.
    releases = sorted({files.relative(p, plan.version_dir).split("/")[0] for p in files.list_files(plan.version_dir)
                       if p.endswith("/" + layout.MANIFEST_FILE)}, reverse=True)
    for release in filter(layout.is_release_id, releases):
        release_dir = files.join(plan.version_dir, release)
        try:
            found = pub.verify_release(release_dir)
        except VerificationError:
            continue
        if found.manifest["inputs"]["digest"] != digest:
            continue
        raw = files.read_bytes(files.join(release_dir, layout.MANIFEST_FILE))
        pointer = layout.Pointer(plan.version, release, found.manifest["snapshot"], pub.sha256_bytes(raw))
        outcome = pub.switch_pointers(plan.output, pointer, force=False, lease=owner)
        return found.manifest, outcome, f"finished the publication of the complete release {release}"
    return None


def _outcome_now(plan: IndexPlan):
    current, _ = pub.read_pointer(files.join(plan.version_dir, layout.CURRENT_FILE))
    try:
        latest, _ = pub.read_pointer(files.join(plan.output, layout.LATEST_FILE))
    except VerificationError:
        latest = None
    return pub.Outcome(current, latest, current is not None and current.release == plan.release,
                       latest is not None and latest.release == plan.release)


def _remove_own_release(plan: IndexPlan) -> None:
    """A failed run removes its own release folder, unless a pointer already names it."""
    try:
        current, _ = pub.read_pointer(files.join(plan.version_dir, layout.CURRENT_FILE))
        if current is not None and current.release == plan.release:
            return
        files.delete_tree(plan.release_dir)
    except Exception as e:  # cleaning up must not hide the failure itself
        _log.warning("could not remove %s after the failure (gc will): %s", plan.release_dir, e)


def run(argv=None, test_pipeline: Optional[beam.Pipeline] = None) -> IndexRunResult:
    """Validates the options, builds and runs the pipeline, and returns the published manifest.

    ``argv`` holds app flags and any Beam flags (``--runner``, ``--direct_num_workers``, ...).
    Raises ConfigError before building anything when the options are unusable, LeaseHeldError
    when another run publishes to the same output root.
    """
    start = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc)
    files.use_system_memory_pool()  # flat memory on the local runner (issue 9)
    options = PipelineOptions(argv if argv is not None else sys.argv[1:])
    opts = options.view_as(IndexOptions)
    opts.check()
    # Validation writes only a probe file, deleted at once (and creates a missing local output folder), so a
    # configuration error leaves no trace in the output root.
    plan = opts.validate(started=started)
    if not opts.no_memory_check:  # a catalog too big for the local runner stops here, not in the kernel's hands
        estimate = capacity.check_local_memory(plan.catalog_rows, plan.text_encoder.output_dim,
                                               plan.image_encoder.output_dim, plan.fusion.dim,
                                               options.view_as(StandardOptions).runner, num_shards=opts.shards)
        if estimate is not None:
            _log.info("memory estimate for the local runner: %.1f GiB of %s available", estimate.bytes_needed / 2 ** 30,
                      "?" if estimate.bytes_available is None else f"{estimate.bytes_available / 2 ** 30:.1f} GiB")
    launch_only = preflight.is_template_launch(options)
    if plan.dry_run or launch_only:
        # A dry run builds the job and submits nothing: no lease, no pointer touched. A Flex Template launch
        # (--template_location) writes the job graph and exits before the job starts, so it cannot hold the
        # lease for the job: it checks that no other run holds it, and the job's PublishIndex takes it for
        # the moment its pointers move (lease.Lease.held). A rerun of a published version runs the job again;
        # its publication keeps the identical live release.
        if launch_only:
            lease.Lease(plan.output, plan.run_id, plan.version, seconds=opts.lease_seconds).check_free()
            _refuse_other_inputs(plan)
        plan = dataclasses.replace(plan, reuse=reuse.resolve(plan, opts.reuse_from, opts.no_reuse))
        options.view_as(SetupOptions).save_main_session = False
        p = test_pipeline if test_pipeline is not None else beam.Pipeline(options=options)
        build_pipeline(p, plan, opts)
        result = p.run()
        return IndexRunResult(plan, None, time.perf_counter() - start, result,
                              validation_s=time.perf_counter() - start)
    owner = lease.Lease(plan.output, plan.run_id, plan.version, seconds=opts.lease_seconds).acquire()
    try:
        owner.start_heartbeat()
        finished = _finish_existing(plan, owner)
        if finished is not None:
            manifest, outcome, note = finished
            return IndexRunResult(plan, manifest, time.perf_counter() - start, None,
                                  validation_s=time.perf_counter() - start, outcome=outcome, note=note)
        # The previous version whose vectors unchanged items reuse (after the rerun check: a finished
        # rerun needs none); a ConfigError for an unusable --reuse-from, a log line for an unusable LATEST.
        plan = dataclasses.replace(plan, reuse=reuse.resolve(plan, opts.reuse_from, opts.no_reuse))
        validated = time.perf_counter()
        # DoFns reference module-level code of this package; workers need the main session for nothing.
        options.view_as(SetupOptions).save_main_session = False
        p = test_pipeline if test_pipeline is not None else beam.Pipeline(options=options)
        _log.info("indexing %d catalog file(s) into %s", len(plan.catalog_files), plan.release_dir)
        build_pipeline(p, plan, opts)
        result = p.run()
        result.wait_until_finish()
        wall = time.perf_counter() - start
        manifest_path = files.join(plan.release_dir, layout.MANIFEST_FILE)
        manifest = json.loads(files.read_bytes(manifest_path)) if files.exists(manifest_path) else None
        outcome = _outcome_now(plan) if manifest is not None else None
        note = ""
        if outcome is not None and outcome.current is not None and outcome.current.release != plan.release:
            # Another run published identical content first; ours was redundant.
            note = f"identical to the live release {outcome.current.release}, which stays"
            files.delete_tree(plan.release_dir)
            manifest = pub.verify_release(files.join(plan.output, outcome.current.path), outcome.current,
                                          checksums=False).manifest
        return IndexRunResult(plan, manifest, wall, result, validation_s=validated - start, outcome=outcome,
                              note=note)
    except BaseException:
        _remove_own_release(plan)
        raise
    finally:
        owner.release()
