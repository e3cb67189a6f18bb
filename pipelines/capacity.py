"""Will a local run fit in this machine's memory? An estimate before any work, not a kill by the kernel;
and how many shards a local run may build at once (``shard_threads``).

The local runners hold every shuffle (and every multi-input Flatten) in memory. The index pipeline keeps
vectors and rows out of them (issue 9): catalog rows, slim batches, texts and text vectors wait in
staging files with only references shuffled, each batch runs from its images to its shard staging files
in one fused chain, and each shard is built from its own files. What grows with the catalog is keys and
references, the runner's bookkeeping, what the allocator keeps, plus the shards built at once (from 10k
to 100k items, tiny encoders: the run's peak +0.7 KiB per item; benchmarks/README.md, "The bound at
10k -> 100k"); the constants below predate that and stay on the safe side. The model: a fixed base
for TensorFlow and the encoders; per item an overhead and a quarter of its text, image and fused
vectors in float32 (transient buffers); and one shard's build on top (shard_bytes; shard_threads builds
more at once only when they fit). Measured
(`benchmarks/bench_memory.py`, 16 shards, 256-d, tiny encoders; benchmarks/README.md, "The encode stage
without vectors in shuffles"): 1M items at the built-in sizes 384/1,280-d peaked at 5.6 GiB (estimate
9.1), 100k at 1.6 GiB (2.7), 100k at 64/48-d 1.3 GiB (2.5); one 100k shard at the built-in sizes
(`bench_incremental.py --shards 1`) 3.7 GiB (5.0). The estimate is meant to refuse what cannot fit,
not to predict the peak to the megabyte.

Dataflow and other distributed runners spill shuffles to disk: no check there.
"""

from typing import NamedTuple, Optional

from schemas.errors import ConfigError

BASE_BYTES = 2 * 1024 ** 3  # TensorFlow, two encoders, Beam
PER_ITEM_OVERHEAD = 4 * 1024  # rows and keys in the shuffles, the runner's bookkeeping (measured ~2 KiB at 1M)
VECTOR_SHARE = 0.25  # of each item's text + image + fused vector bytes: transient buffers
HEADROOM = 0.9  # of the memory available when the run starts
# Building one shard holds its items' staged rows (text, image and fused vectors, read back from Parquet)
# and Annoy's arrays of the fused vectors: measured ~22 KiB per item for 384/1,280/256-d (100k items,
# two shards at once: +280 MiB over the encode stage), about 3 x the raw bytes of each.
SHARD_COPIES = 3
SHARD_SHARE = 0.5  # of the memory available at the start: the rest of the pipeline is still held


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


def shard_bytes(rows: int, num_shards: int, text_dim: int, image_dim: int, dim: int) -> int:
    """What building one shard holds: its items' staged rows and Annoy's copy of their fused vectors."""
    return -(-rows // max(1, num_shards)) * SHARD_COPIES * 4 * (text_dim + image_dim + 2 * dim)


def estimate(rows: int, text_dim: int, image_dim: int, dim: int, available: Optional[int] = None,
             num_shards: Optional[int] = None) -> Estimate:
    """The base, the per-item cost, and (with ``num_shards``) one shard's build on top: shard_threads
    builds more at once only when they fit, but never fewer than one."""
    per_item = PER_ITEM_OVERHEAD + VECTOR_SHARE * 4 * (text_dim + image_dim + dim)
    one_shard = shard_bytes(rows, num_shards, text_dim, image_dim, dim) if num_shards else 0
    return Estimate(rows, BASE_BYTES + int(rows * per_item) + one_shard, available)


def check_local_memory(rows: int, text_dim: int, image_dim: int, dim: int, runner,
                       available: Optional[int] = None, num_shards: Optional[int] = None) -> Optional[Estimate]:
    """Raises ConfigError when a local run of ``rows`` items would not fit; returns the estimate (None when the
    runner is not local)."""
    if not is_local(runner):
        return None
    found = estimate(rows, text_dim, image_dim, dim, available if available is not None else available_bytes(),
                     num_shards)
    if not found.fits:
        gib = 1024 ** 3
        raise ConfigError(
            f"{rows} catalog rows with {text_dim}-d text, {image_dim}-d image and {dim}-d fused vectors need about "
            f"{found.bytes_needed / gib:.1f} GiB on the local runner (it keeps every shuffle in memory and builds "
            f"each shard in memory: more --shards make shards smaller), but "
            f"{found.bytes_available / gib:.1f} GiB are available; run on Dataflow (--runner DataflowRunner), "
            f"on a machine with more memory, split the catalog, or pass --no-memory-check to try anyway")
    return found




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
    per_shard = shard_bytes(rows, num_shards, text_dim, image_dim, dim)
    return max(1, min(cpus, int(SHARD_SHARE * available // max(1, per_shard))))
