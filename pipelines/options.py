"""Options of the index pipeline, as a PipelineOptions subclass that validates itself.

``IndexOptions.validate()`` runs before the pipeline is built: it matches the
catalog and checks every file's schema, loads and probes both encoders and the
fusion model, and checks the output location, so that a configuration mistake
fails at once with one line that says how to fix it.
"""

import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import logging
from typing import Optional

import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from schemas.errors import CatalogSchemaError, ConfigError, PublicationError, brief
from embedding import builtin
from embedding import encoders as enc
from embedding import fusion as fus
from embedding import images
from embedding import languages
from pipelines import files
from pipelines import lease
from pipelines import preflight
from schemas import catalog as cat
from schemas import layout


_log = logging.getLogger(__name__)


def default_version(now: Optional[datetime.datetime] = None) -> str:
    """UTC timestamp; sorts after a date-named version of the same day (backfills)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H%M%SZ")


def positive(name, value, minimum=1):
    if value is None or value < minimum:
        raise ConfigError(f"--{name} must be at least {minimum}, got {value}")


class IndexOptions(PipelineOptions):
    """App options of ``catalog-index index``; every Beam flag passes through beside them."""

    @classmethod
    def _add_argparse_args(cls, parser):
        from pipelines.flags import SharedFlags

        parser = SharedFlags(parser)
        # Dashed flags also answer to Beam's underscore style (and to Flex Template
        # parameter names, which cannot contain dashes). Help texts: "[required]" marks the flags that
        # check() requires (argparse must not enforce them: Beam's PipelineOptions parses the same
        # flags), and every default is stated as "(default: ...)", %(default)s where argparse knows it.
        parser.add_argument("--catalog",
                            help="[required] Catalog Parquet path or glob: local, file://, gs:// or any Beam "
                                 "filesystem.")
        parser.add_argument("--output",
                            help="[required] Output root (local or gs://); the run writes a new release under "
                                 "OUTPUT/<version>/, then moves OUTPUT/<version>/CURRENT and OUTPUT/LATEST.")
        parser.add_argument("--version", dest="index_version", default=None, metavar="VERSION",
                            help="Version name: 1-128 letters, digits, '.', '_', '-', starting with a letter or "
                                 "digit; LATEST is reserved (default: the run's start in UTC, like "
                                 "2026-11-28T072300Z).")
        parser.add_argument("--shards", type=int, default=1,
                            help="Number of Annoy shards; an item goes to shard S = (the first 8 bytes of "
                                 "sha256(item_id), as a big-endian integer) mod N (default: %(default)s).")
        parser.add_argument("--dimension", type=int, default=None,
                            help="Fused vector size (default: 256, or the fusion model's output size).")
        parser.add_argument("--text-encoder", "--text_encoder", dest="text_encoder", default="auto",
                            help="Text encoder: auto, builtin:NAME, TF Hub handle or SavedModel path (1-D tf.string "
                                 f"in). auto picks {languages.ENGLISH_ENCODER} for English-dominant catalogs, "
                                 f"{languages.MULTILINGUAL_ENCODER} when more than "
                                 f"{languages.NON_ENGLISH_SHARE * 100:.0f}%% of the sampled texts are in another "
                                 "language (default: %(default)s).")
        parser.add_argument("--languages", default=None,
                            help="Languages the queries will be in, as ISO 639-1 codes (e.g. en,zh); with "
                                 "--text-encoder auto, any language but en picks the multilingual encoder "
                                 "(default: none named).")
        parser.add_argument("--image-encoder", "--image_encoder", dest="image_encoder",
                            default=builtin.DEFAULT_IMAGE_ENCODER,
                            help="Image encoder: builtin:NAME, TF Hub handle or SavedModel path "
                                 "(float32 [b,h,w,3] in [0,1]) (default: %(default)s).")
        parser.add_argument("--model-cache", "--model_cache", dest="model_cache", default=None,
                            help="Folder of built-in models converted on first use "
                                 f"(default: ${builtin.CACHE_ENV}, else ~/.cache/catalog-index/models).")
        parser.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=None,
                            help="Square input size for image encoders whose signature leaves it open "
                                 f"(default: the model's, else {enc.DEFAULT_IMAGE_SIZE}).")
        parser.add_argument("--fusion-model", "--fusion_model", dest="fusion_model", default=None,
                            help="Trained fusion: a `catalog-index train` models directory (its LATEST), one of its "
                                 "versions (item and query towers), or a bare fusion SavedModel (see "
                                 "embedding/fusion.py) (default: the seeded projection).")
        parser.add_argument("--text-weight", "--text_weight", dest="text_weight", type=float, default=1.0,
                            help="Weight of the text vector in the default fusion (the seeded projection; not used "
                                 "with --fusion-model); >= 0, not both weights 0 (default: %(default)s).")
        parser.add_argument("--image-weight", "--image_weight", dest="image_weight", type=float, default=1.0,
                            help="Weight of the image vector in the default fusion (the seeded projection; not "
                                 "used with --fusion-model); >= 0, not both weights 0 (default: %(default)s).")
        parser.add_argument("--trees", type=int, default=50,
                            help="Annoy trees per shard; 50 rather than 10: at recall@10 0.95, 1.45-2.8x fewer "
                                 "candidates for 19-35%% longer builds, benchmarks/README.md (default: %(default)s).")
        parser.add_argument("--seed", type=int, default=0,
                            help="Seed of the projection and of the Annoy builds (default: %(default)s).")
        parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=32,
                            help="Rows of every encoder batch (default: %(default)s); vectors are reused only "
                                 "from versions built with the same.")
        parser.add_argument("--max-rejected-fraction", "--max_rejected_fraction", dest="max_rejected_fraction",
                            type=float, default=0.05,
                            help="Fail before publication when more than this fraction of rows is rejected "
                                 "(default: %(default)s).")
        parser.add_argument("--reject-on-image-error", "--reject_on_image_error", dest="reject_on_image_error",
                            action="store_true",
                            help="Reject items whose image fails instead of indexing them from text.")
        parser.add_argument("--max-image-pixels", "--max_image_pixels", dest="max_image_pixels", type=int,
                            default=images.DEFAULT_MAX_PIXELS,
                            help="Images declaring more pixels than this are refused from their header, never "
                                 "decoded (default: %(default)s).")
        parser.add_argument("--large-model", "--large_model", dest="large_model", action="store_true",
                            help="Load one encoder copy per machine, shared by its processes.")
        parser.add_argument("--max-degraded-fraction", "--max_degraded_fraction", dest="max_degraded_fraction",
                            type=float, default=0.10,
                            help="Fail before publication when more than this fraction of the indexed items lost "
                                 "their image (default: %(default)s).")
        parser.add_argument("--min-recall", "--min_recall", dest="min_recall", type=float, default=0.95,
                            help="Refuse to publish unless the sharded index reaches this recall@10 against exact "
                                 "search on a sample of the items at some search_k; the smallest such search_k "
                                 "goes into the manifest for readers (default: %(default)s).")
        parser.add_argument("--snapshot-time", "--snapshot_time", dest="snapshot_time", default=None,
                            help="What time the catalog describes (ISO 8601, UTC unless an offset is given); LATEST "
                                 "only moves to a later snapshot (default: the run's start; backfill: the date).")
        parser.add_argument("--image-timeout", "--image_timeout", dest="image_timeout", type=float,
                            default=images.DEFAULT_TIMEOUT_S,
                            help="Overall deadline in seconds for fetching one image (DNS, connect, headers, body, "
                                 "object-store retries) (default: %(default)s).")
        parser.add_argument("--allow-private-image-hosts", "--allow_private_image_hosts",
                            dest="allow_private_image_hosts", action="store_true",
                            help="Allow http(s) images from loopback, private and link-local addresses "
                                 "(intranet catalogs); refused by default.")
        parser.add_argument("--image-root", "--image_root", dest="image_root", default=None,
                            help="Only read local and object-store images below this prefix (default: no limit).")
        parser.add_argument("--lease-seconds", "--lease_seconds", dest="lease_seconds", type=int,
                            default=lease.DEFAULT_SECONDS,
                            help="Expiry of the output root's publication lease, renewed while the run lives; "
                                 "a crashed run blocks others at most this long (default: %(default)s).")
        parser.add_argument("--reuse-from", "--reuse_from", dest="reuse_from", default=None,
                            help="Reuse the vectors of unchanged items from this published version folder "
                                 "(OUTPUT/<version>), release folder or output root; refused (exit 2) when it "
                                 "does not verify or was built with other encoders, fusion or vector options "
                                 "(default: the version LATEST names under --output, when it matches).")
        parser.add_argument("--shard-build-threads", "--shard_build_threads", dest="shard_build_threads", type=int,
                            default=None,
                            help="Shards built at once by each worker; 1 builds them one after another; the shard "
                                 "files are the same for any value (default: the worker's CPU count; on a local runner "
                                 "at most as many as fit in half the memory available, pipelines/capacity.py).")
        parser.add_argument("--no-memory-check", "--no_memory_check", dest="no_memory_check", action="store_true",
                            help="Run on the local runner even when the memory estimate says the catalog will not "
                                 "fit (pipelines/capacity.py); by default such a run stops before any work.")
        parser.add_argument("--no-reuse", "--no_reuse", dest="no_reuse", action="store_true",
                            help="Encode every item (no incremental reuse of a previous version's vectors).")
        parser.add_argument("--force", action="store_true",
                            help="Publish even if the version is already published with other content (as a new "
                                 "release; the old one stays until gc) or its folder holds foreign files.")

    def check(self) -> str:
        """The checks that need no I/O; returns the output root. Runs before the lease is taken.

        ``file://`` path flags become plain local paths here, once for the whole run (pipelines/preflight.py).
        """
        preflight.normalise_paths(self, preflight.INDEX_PATHS)
        if not self.catalog:
            raise ConfigError("--catalog is required: a Parquet path or glob")
        if not self.output:
            raise ConfigError("--output is required: the directory (local or gs://) that receives versions")
        positive("shards", self.shards)
        positive("trees", self.trees)
        if self.shard_build_threads is not None:
            positive("shard-build-threads", self.shard_build_threads)
        positive("batch-size", self.batch_size)
        positive("max-image-pixels", self.max_image_pixels)
        positive("lease-seconds", self.lease_seconds, 10)
        if self.dimension is not None:
            positive("dimension", self.dimension)
        if self.image_size is not None:
            positive("image-size", self.image_size)
        for flag, value in (("max-rejected-fraction", self.max_rejected_fraction),
                            ("max-degraded-fraction", self.max_degraded_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"--{flag} must be within [0, 1], got {value}")
        if not 0.0 <= self.min_recall <= 1.0:
            raise ConfigError(f"--min-recall must be within [0, 1], got {self.min_recall}")
        if not self.image_timeout > 0:
            raise ConfigError(f"--image-timeout must be > 0 seconds, got {self.image_timeout}")
        if self.text_weight < 0 or self.image_weight < 0 or self.text_weight + self.image_weight == 0:
            raise ConfigError("--text-weight and --image-weight must be >= 0 and not both 0")
        if self.index_version is not None:
            layout.check_version_name(self.index_version)
        if self.no_reuse and self.reuse_from:
            raise ConfigError("--reuse-from and --no-reuse contradict each other; pass one of them")
        if self.snapshot_time is not None:
            layout.parse_time(self.snapshot_time)
        return self.output.rstrip("/")

    def validate(self, run_id: Optional[str] = None, started: Optional[datetime.datetime] = None) -> "IndexPlan":
        """Checks every option and input; returns the plan or raises ConfigError.

        First what needs no model (pipelines/preflight.py: the runner's needs, credentials, a probe write in
        the output root, the image root), then the catalog, then the encoders and the fusion model.
        """
        output = self.check()
        dry_run = preflight.check_index(self)
        started = started or datetime.datetime.now(datetime.timezone.utc)
        version = self.index_version or default_version(started)
        snapshot = layout.parse_time(self.snapshot_time) if self.snapshot_time else started
        version_dir = files.join(output, version)
        foreign = foreign_files(version_dir)
        if foreign and not self.force:
            raise ConfigError(
                f"{version_dir} holds {len(foreign)} file(s) that are not releases of this tool, e.g. "
                f"{foreign[0]}; move them away or pass --force to publish beside them (they are never deleted)")

        query_languages = languages.parse_languages(self.languages)
        languages.preload()  # the detector's model loads while the catalog is matched and hashed
        catalog_files, catalog_rows, catalog_inputs, rows_per_file = match_catalog(self.catalog)
        if catalog_rows == 0:
            raise PublicationError(f"--catalog {self.catalog!r}: {len(catalog_files)} file(s) with no rows; "
                                   f"nothing to publish (LATEST was not touched)")
        texts = sample_texts(catalog_files, rows_per_file)
        # The image encoder first: loading TensorFlow and the model hides the detector's model load.
        size = (self.image_size, self.image_size) if self.image_size else None
        image = enc.inspect_encoder(self.image_encoder, enc.IMAGE, size, model_cache=self.model_cache)
        text_choice = languages.choose(self.text_encoder, texts, query_languages)
        _log.info("text encoder: %s; language detection took %.2fs", text_choice.describe(), text_choice.seconds)
        if text_choice.warning:
            _log.warning("%s", text_choice.warning)
        text = enc.inspect_encoder(text_choice.handle, enc.TEXT, model_cache=self.model_cache)
        fusion = fus.inspect_fusion(self.fusion_model, text.output_dim, image.output_dim, self.dimension,
                                    self.text_weight, self.image_weight, self.seed,
                                    encoders={enc.TEXT: text, enc.IMAGE: image})
        preflight.create_output(output)  # a missing local folder, now that nothing above refused the run
        release = layout.new_release_id(started)
        return IndexPlan(
            catalog_pattern=self.catalog,
            catalog_files=catalog_files,
            catalog_rows=catalog_rows,
            catalog_inputs=catalog_inputs,
            output=output,
            version=version,
            version_dir=version_dir,
            release=release,
            release_dir=files.join(version_dir, release),
            snapshot=layout.format_time(snapshot),
            run_id=run_id or release,
            force=bool(self.force),
            text_encoder=text,
            image_encoder=image,
            fusion=fusion,
            content_options=self.content_options(),
            text_choice=text_choice,
            dry_run=dry_run,
        )

    def content_options(self) -> dict:
        """The options that shape what is published (the batch size too: encoders' last bits depend on it)."""
        return {
            "shards": self.shards,
            "trees": self.trees,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "reject_on_image_error": bool(self.reject_on_image_error),
            "max_image_pixels": self.max_image_pixels,
            "image_timeout": self.image_timeout,
            "allow_private_image_hosts": bool(self.allow_private_image_hosts),
            "image_root": self.image_root,
        }


# Incremental runs (pipelines/reuse.py) reuse a previous version's text and image vectors only when
# everything that shapes those vectors, or decides whether an item has one, is the same. The one place
# that says what that is, next to content_options: the encoders (fingerprints, output sizes, image
# size), the fusion and dimension (conservative: vectors are fused again anyway), and these options.
# --max-image-pixels decides which images decode at all; --image-root and --allow-private-image-hosts
# which images may be read (an image reused without a fetch must still be one this run may read).
# --batch-size is the rows of every model batch (Encoder.fixed_batches): a vector's last bits depend on it,
# and a reused vector must equal what this run would compute. Not here: shards, trees, seed and limits.
VECTOR_OPTIONS = ("max_image_pixels", "image_root", "allow_private_image_hosts", "batch_size")
# Bump when what an encoder sees for the same text or image bytes changes (item_text's cut, image
# decoding, crop or resize, how inputs are batched into the model): the manifest records it and vectors
# of another value are never reused. 2: fixed-shape model batches, fusion in fixed blocks.
PREPROCESSING_VERSION = 2


def vector_identity(encoders: dict, fusion: dict, dimension: int, options: dict, preprocessing) -> dict:
    """What must be equal between two runs for one to reuse the other's vectors, from manifest-shaped
    parts (``encoders`` {"text", "image"} as EncoderSpec.to_json, ``fusion`` as FusionSpec.to_json,
    ``options`` holding VECTOR_OPTIONS). Handles and model paths are left out: fingerprints say it all."""
    def model(spec: dict, drop) -> dict:
        return {k: v for k, v in spec.items() if k not in drop}

    return {
        "encoders": {kind: model(encoders.get(kind) or {}, ("handle", "chosen_by")) for kind in ("text", "image")},
        "fusion": model(fusion, ("path", "query_path")),
        "dimension": dimension,
        "options": {k: options.get(k) for k in VECTOR_OPTIONS},
        "preprocessing": preprocessing,
    }


def foreign_files(version_dir: str) -> list:
    """Files in a version folder that are neither its CURRENT pointer (and its lock/temp files) nor releases."""
    out = []
    for path in files.list_files(version_dir):
        first = files.relative(path, version_dir).split("/")[0]
        if first == layout.CURRENT_FILE or first.startswith(".") or first.startswith(layout.CURRENT_FILE + ".tmp-"):
            continue
        if layout.is_release_id(first) and path != files.join(version_dir, first):
            continue
        out.append(path)
    return out


@dataclasses.dataclass(frozen=True)
class IndexPlan:
    """Everything validation learnt; the pipeline is built from it."""

    catalog_pattern: str
    catalog_files: tuple
    catalog_rows: int
    catalog_inputs: tuple  # ({"path", "size", "sha256"}, ...) in path order
    output: str
    version: str
    version_dir: str
    release: str
    release_dir: str  # OUTPUT/<version>/<release>/: this run writes here and nowhere else
    snapshot: str
    run_id: str
    force: bool
    text_encoder: enc.EncoderSpec
    image_encoder: enc.EncoderSpec
    fusion: fus.FusionSpec
    content_options: dict
    text_choice: Optional[languages.TextEncoderChoice] = None  # how --text-encoder was resolved
    # Incremental runs: where unchanged items' vectors come from (pipelines/reuse.py Source), or None.
    # Not part of inputs(): reuse never changes the digest.
    reuse: Optional[object] = None
    dry_run: bool = False  # a Dataflow --dry_run: the job is built, not submitted

    def vector_identity(self) -> dict:
        """This run's side of the reuse check (vector_identity)."""
        return vector_identity({"text": self.text_encoder.to_json(), "image": self.image_encoder.to_json()},
                               self.fusion.to_json(), self.fusion.dim, self.content_options, PREPROCESSING_VERSION)

    def inputs(self) -> dict:
        """The manifest's ``inputs``: catalog checksums and a digest of everything that shapes the content."""
        shaping = {
            "catalog": [{"sha256": c["sha256"], "size": c["size"]} for c in self.catalog_inputs],
            "text_encoder": {k: v for k, v in self.text_encoder.to_json().items() if k != "handle"},
            "image_encoder": {k: v for k, v in self.image_encoder.to_json().items() if k != "handle"},
            # Where the models lie does not shape the content; their fingerprints do.
            "fusion": {k: v for k, v in self.fusion.to_json().items() if k not in ("path", "query_path")},
            "options": self.content_options,
        }
        digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()
        return {"digest": "sha256:" + digest, "catalog": [dict(c) for c in self.catalog_inputs]}

    def encode_buckets(self, batch_size: int) -> int:
        """How many groups the items are batched in: about 8 batches per group."""
        return max(1, -(-self.catalog_rows // (batch_size * 8)))


def _check_file(path: str) -> tuple:
    """Checks one file's schema from its footer; returns (row count, {path, size, sha256})."""
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
    except Exception as e:
        raise CatalogSchemaError(f"{path}: not a readable Parquet file ({brief(e)})") from e
    cat.check_catalog_schema(schema, path)
    size, sha = files.checksum(path)
    return meta.num_rows, {"path": path, "size": size, "sha256": sha}


SAMPLE_TEXTS = 5000


def _sample_file(path: str, rows: int, want: int) -> list:
    """``want`` texts (title and description, as the text encoder sees them) evenly spread over one file.

    Reads only the row groups that hold the chosen rows, and only the text columns; values that
    are not valid UTF-8 are decoded with replacement (their rows are rejected later anyway).
    """
    import pyarrow as pa

    if want <= 0 or rows <= 0:
        return []
    picks = sorted({int(i * rows / want) for i in range(want)})
    out = []
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        # A column typed null (all values missing) has nothing to sample.
        columns = [c for c in (cat.TITLE, cat.DESCRIPTION) if schema.get_field_index(c) >= 0
                   and (pa.types.is_string(schema.field(c).type) or pa.types.is_large_string(schema.field(c).type))]
        first, k = 0, 0
        for group in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            local = []
            while k < len(picks) and picks[k] < first + n:
                local.append(picks[k] - first)
                k += 1
            first += n
            if not local or not columns:
                continue
            table = pf.read_row_group(group, columns=columns)
            values = [table.column(c).cast(pa.large_binary()).to_pylist() for c in columns]
            for i in local:
                parts = [v[i].decode("utf-8", "replace").strip() for v in values if v[i]]
                out.append("\n".join(p for p in parts if p) or None)
    return out


def sample_texts(paths, rows_per_file, n: int = SAMPLE_TEXTS) -> list:
    """Up to ``n`` catalog texts spread over the files in proportion to their rows."""
    total = sum(rows_per_file)
    out = []
    for path, rows in zip(paths, rows_per_file):
        want = min(rows, max(1, round(n * rows / total))) if total else 0
        out.extend(_sample_file(path, rows, want))
    return out


def match_catalog(pattern: str) -> tuple:
    """Matches the catalog glob and checks each file's schema (in parallel: GCS is slow per file).

    Returns (sorted paths, total row count, per-file {path, size, sha256}, per-file row counts).
    """
    paths = files.match_paths(pattern, "--catalog")
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        checked = [future.result() for future in [pool.submit(_check_file, p) for p in paths]]
    return (tuple(paths), sum(rows for rows, _ in checked), tuple(info for _, info in checked),
            tuple(rows for rows, _ in checked))
