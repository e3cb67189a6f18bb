"""Options of the index pipeline, as a PipelineOptions subclass that validates itself.

``IndexOptions.validate()`` runs before the pipeline is built: it matches the
catalog and checks every file's schema, loads and probes both encoders and the
fusion model, and checks the output location, so that a configuration mistake
fails at once with one line that says how to fix it.
"""

import concurrent.futures
import dataclasses
import datetime
import re
import uuid
from typing import Optional

import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from catalog_index.errors import CatalogSchemaError, ConfigError, brief
from embedding import builtin
from embedding import encoders as enc
from embedding import fusion as fus
from embedding import images
from pipelines import files
from schemas import catalog as cat
from schemas import manifest as mf

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
STAGING_DIR = "_staging"


def default_version(now: Optional[datetime.datetime] = None) -> str:
    """UTC timestamp; sorts after a date-named version of the same day (backfills)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H%M%SZ")


def _positive(name, value, minimum=1):
    if value is None or value < minimum:
        raise ConfigError(f"--{name} must be at least {minimum}, got {value}")


class IndexOptions(PipelineOptions):
    """App options of ``catalog-index index``; every Beam flag passes through beside them."""

    @classmethod
    def _add_argparse_args(cls, parser):
        # Dashed flags also answer to Beam's underscore style (and to Flex Template
        # parameter names, which cannot contain dashes).
        parser.add_argument("--catalog", help="Catalog Parquet path or glob (local, gs://, any Beam filesystem).")
        parser.add_argument("--output", help="Output root; the run writes OUTPUT/<version>/ and OUTPUT/LATEST.")
        parser.add_argument("--version", dest="index_version", default=None,
                            help="Version name (default: UTC timestamp like 2026-11-28T072300Z).")
        parser.add_argument("--shards", type=int, default=1, help="Number of Annoy shards.")
        parser.add_argument("--dimension", type=int, default=None,
                            help="Fused vector size (default 256, or the fusion model's output size).")
        parser.add_argument("--text-encoder", "--text_encoder", dest="text_encoder",
                            default=builtin.DEFAULT_TEXT_ENCODER,
                            help="Text encoder: builtin:NAME, TF Hub handle or SavedModel path (1-D tf.string in). "
                                 f"Default {builtin.DEFAULT_TEXT_ENCODER}.")
        parser.add_argument("--image-encoder", "--image_encoder", dest="image_encoder",
                            default=builtin.DEFAULT_IMAGE_ENCODER,
                            help="Image encoder: builtin:NAME, TF Hub handle or SavedModel path "
                                 f"(float32 [b,h,w,3] in [0,1]). Default {builtin.DEFAULT_IMAGE_ENCODER}.")
        parser.add_argument("--model-cache", "--model_cache", dest="model_cache", default=None,
                            help="Folder of built-in models converted on first use "
                                 f"(default ${builtin.CACHE_ENV} or ~/.cache/catalog-index/models).")
        parser.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=None,
                            help="Square input size for image encoders whose signature leaves it open (224).")
        parser.add_argument("--fusion-model", "--fusion_model", dest="fusion_model", default=None,
                            help="Fusion SavedModel (see embedding/fusion.py); default: seeded projection.")
        parser.add_argument("--text-weight", "--text_weight", dest="text_weight", type=float, default=1.0)
        parser.add_argument("--image-weight", "--image_weight", dest="image_weight", type=float, default=1.0)
        parser.add_argument("--trees", type=int, default=10, help="Annoy trees per shard.")
        parser.add_argument("--seed", type=int, default=0, help="Seed of the projection and the Annoy builds.")
        parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=32,
                            help="Largest encoder batch.")
        parser.add_argument("--max-rejected-fraction", "--max_rejected_fraction", dest="max_rejected_fraction",
                            type=float, default=0.05,
                            help="Fail before publication when more than this fraction of rows is rejected.")
        parser.add_argument("--reject-on-image-error", "--reject_on_image_error", dest="reject_on_image_error",
                            action="store_true",
                            help="Reject items whose image fails instead of indexing them from text.")
        parser.add_argument("--max-image-pixels", "--max_image_pixels", dest="max_image_pixels", type=int,
                            default=images.DEFAULT_MAX_PIXELS, help="Larger images are refused undecoded.")
        parser.add_argument("--large-model", "--large_model", dest="large_model", action="store_true",
                            help="Load one encoder copy per machine, shared by its processes.")
        parser.add_argument("--force", action="store_true",
                            help="Replace an already published version of the same name.")

    def validate(self) -> "IndexPlan":
        """Checks every option and input; returns the plan or raises ConfigError."""
        if not self.catalog:
            raise ConfigError("--catalog is required: a Parquet path or glob")
        if not self.output:
            raise ConfigError("--output is required: the directory (local or gs://) that receives versions")
        _positive("shards", self.shards)
        _positive("trees", self.trees)
        _positive("batch-size", self.batch_size)
        _positive("max-image-pixels", self.max_image_pixels)
        if self.dimension is not None:
            _positive("dimension", self.dimension)
        if self.image_size is not None:
            _positive("image-size", self.image_size)
        if not 0.0 <= self.max_rejected_fraction <= 1.0:
            raise ConfigError(f"--max-rejected-fraction must be within [0, 1], got {self.max_rejected_fraction}")
        if self.text_weight < 0 or self.image_weight < 0 or self.text_weight + self.image_weight == 0:
            raise ConfigError("--text-weight and --image-weight must be >= 0 and not both 0")
        version = self.index_version or default_version()
        if not _VERSION_RE.match(version):
            raise ConfigError(f"--version {version!r} must be letters, digits, '.', '_' or '-' (not first)")

        output = self.output.rstrip("/")
        version_dir = files.join(output, version)
        if files.exists(files.join(version_dir, mf.MANIFEST_FILE)) and not self.force:
            raise ConfigError(f"version {version!r} is already published in {output}; "
                              f"pick another --version or pass --force to replace it")

        catalog_files, catalog_rows = match_catalog(self.catalog)
        size = (self.image_size, self.image_size) if self.image_size else None
        text = enc.inspect_encoder(self.text_encoder, enc.TEXT, model_cache=self.model_cache)
        image = enc.inspect_encoder(self.image_encoder, enc.IMAGE, size, model_cache=self.model_cache)
        fusion = fus.inspect_fusion(self.fusion_model, text.output_dim, image.output_dim, self.dimension,
                                    self.text_weight, self.image_weight, self.seed)
        return IndexPlan(
            catalog_pattern=self.catalog,
            catalog_files=catalog_files,
            catalog_rows=catalog_rows,
            output=output,
            version=version,
            version_dir=version_dir,
            # A run id keeps two runs of the same version from writing over each other's work.
            staging_dir=files.join(output, STAGING_DIR, f"{version}.{uuid.uuid4().hex[:8]}"),
            text_encoder=text,
            image_encoder=image,
            fusion=fusion,
        )


@dataclasses.dataclass(frozen=True)
class IndexPlan:
    """Everything validation learnt; the pipeline is built from it."""

    catalog_pattern: str
    catalog_files: tuple
    catalog_rows: int
    output: str
    version: str
    version_dir: str
    staging_dir: str
    text_encoder: enc.EncoderSpec
    image_encoder: enc.EncoderSpec
    fusion: fus.FusionSpec

    def encode_buckets(self, batch_size: int) -> int:
        """How many groups the items are batched in: about 8 batches per group."""
        return max(1, -(-self.catalog_rows // (batch_size * 8)))


def _check_file(path: str) -> int:
    """Checks one file's schema from its footer; returns its row count."""
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
    except Exception as e:
        raise CatalogSchemaError(f"{path}: not a readable Parquet file ({brief(e)})") from e
    cat.check_catalog_schema(schema, path)
    return meta.num_rows


def match_catalog(pattern: str) -> tuple:
    """Matches the catalog glob and checks each file's schema (in parallel: GCS is slow per file).

    Returns (sorted paths, total row count).
    """
    try:
        matched = FileSystems.match([pattern])[0].metadata_list
    except (BeamIOError, ValueError) as e:
        raise ConfigError(f"--catalog {pattern!r}: cannot list files: {brief(e)}") from e
    paths = sorted(m.path for m in matched)
    if not paths:
        raise ConfigError(f"--catalog {pattern!r} matches no file; check the path or glob")
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        rows = sum(future.result() for future in [pool.submit(_check_file, p) for p in paths])
    return tuple(paths), rows
