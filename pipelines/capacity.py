"""Will a local run fit in this machine's memory? An estimate before any work, not a kill by the kernel;
and how many shards a local run may build at once (``shard_threads``).

The local runners hold every shuffle in memory. Since the encode stage was reworked (issue 9),
image vectors and pixels go through no shuffle (each batch runs from its images to its staging files
in one fused chain) and fused vectors go to staging files; what still grows with the catalog is the
rows in the batching shuffle and the text vectors joined back to their batches (several copies of
each in the runner's buffers). The model: a fixed base for TensorFlow and the encoders, plus per item
an overhead, TEXT_COPIES copies of its text vector, a fraction of its image vector (the shards built
at once) and one copy of its fused vector, in float32. Measured (`benchmarks/bench_memory.py`, 100k
items, 16 shards, 256-d, tiny encoders; benchmarks/README.md, "Encode stage without image vectors in
shuffles"): 5.9 KiB per item above the start at 64/48-d, 12.8 KiB at the built-in 384/1,280-d. The
constants below leave room above both (8.3 and 17.0 KiB): the estimate is meant to refuse what
cannot fit, not to predict the peak to the megabyte.

Dataflow and other distributed runners spill shuffles to disk: no check there.
"""

from typing import NamedTuple, Optional

from schemas.errors import ConfigError

BASE_BYTES = 2 * 1024 ** 3  # TensorFlow, two encoders, Beam
PER_ITEM_OVERHEAD = 6 * 1024  # rows, keys and the runner's bookkeeping
TEXT_COPIES = 5  # the text vectors' join: measured ~4.5 copies
IMAGE_COPIES = 0.5  # no shuffle; the shards being built and Parquet's buffers
FUSED_COPIES = 1
HEADROOM = 0.9  # of the memory available when the run starts


class Estimate(NamedTuple):
    rows: int
    bytes_needed: int
    bytes_available: Optional[int]

    @property
    def fits(self) -> bool:
        return self.bytes_available is None or self.bytes_needed <= HEADROOM * self.bytes_available


def is_local(runner) -> bool:
    from pipelines import preflight

    return preflight.is_local_runner(runner)  # one rule for what runs on this machine


def available_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read (then nothing is refused)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def estimate(rows: int, text_dim: int, image_dim: int, dim: int, available: Optional[int] = None) -> Estimate:
    per_item = PER_ITEM_OVERHEAD + 4 * (TEXT_COPIES * text_dim + IMAGE_COPIES * image_dim + FUSED_COPIES * dim)
    return Estimate(rows, BASE_BYTES + int(rows * per_item), available)


def check_local_memory(rows: int, text_dim: int, image_dim: int, dim: int, runner,
                       available: Optional[int] = None) -> Optional[Estimate]:
    """Raises ConfigError when a local run of ``rows`` items would not fit; returns the estimate (None when the
    runner is not local)."""
    if not is_local(runner):
        return None
    found = estimate(rows, text_dim, image_dim, dim, available if available is not None else available_bytes())
    if not found.fits:
        gib = 1024 ** 3
        raise ConfigError(
            f"{rows} catalog rows with {text_dim}-d text, {image_dim}-d image and {dim}-d fused vectors need about "
            f"{found.bytes_needed / gib:.1f} GiB on the local runner (it keeps every shuffle in memory), but "
            f"{found.bytes_available / gib:.1f} GiB are available; run on Dataflow (--runner DataflowRunner), "
            f"on a machine with more memory, split the catalog, or pass --no-memory-check to try anyway")
    return found


# Building one shard holds its items' staged rows (text, image and fused vectors, read back from Parquet)
# and Annoy's arrays of the fused vectors: measured ~22 KiB per item for 384/1,280/256-d (100k items,
# two shards at once: +280 MiB over the encode stage), about 3 x the raw bytes of each.
SHARD_COPIES = 3
SHARD_SHARE = 0.5  # of the memory available at the start: the rest of the pipeline is still held


def shard_threads(rows: int, num_shards: int, text_dim: int, image_dim: int, dim: int, runner,
                  cpus: Optional[int] = None, available: Optional[int] = None) -> int:
    """How many shards a run builds at once on one machine: one per CPU, fewer when that many shards'
    items would not fit in SHARD_SHARE of the memory available (never fewer than one). Distributed
    runners: the CPU count (each worker builds its own shards in its own memory)."""
    import os

    cpus = cpus or os.cpu_count() or 1
    if not is_local(runner):
        return cpus
    available = available if available is not None else available_bytes()
    if available is None:
        return cpus
    per_shard = -(-rows // max(1, num_shards)) * SHARD_COPIES * 4 * (text_dim + image_dim + 2 * dim)
    return max(1, min(cpus, int(SHARD_SHARE * available // max(1, per_shard))))
