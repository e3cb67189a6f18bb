"""Will a local run fit in this machine's memory? An estimate before any work, not a kill by the kernel.

The local runners hold every shuffle in memory, and the index pipeline's
shuffles carry the items' vectors (encoded, fused). Peak memory therefore grows
with the item count times the vector sizes. The model: a fixed base for
TensorFlow and the encoders, plus per item an overhead and three copies of its
text, image and fused vectors in float32. Measured (`catalog-index index`, tiny
64/48-d encoders, 256-d, 16 shards, 10k and 100k items; benchmarks/README.md,
"Flat memory"): 44.8 KiB per item while the query sample held every image's
pixels, 9.5 KiB per item since it keeps only its picks (vectors included). The
overhead below leaves room above that: the estimate is meant to refuse what
cannot fit, not to predict the peak to the megabyte.

Dataflow and other distributed runners spill shuffles to disk: no check there.
"""

from typing import NamedTuple, Optional

from schemas.errors import ConfigError

BASE_BYTES = 2 * 1024 ** 3  # TensorFlow, two encoders, Beam
PER_ITEM_OVERHEAD = 12 * 1024  # measured 9.5 KiB per item in all, tiny vectors included
VECTOR_COPIES = 3
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
    per_item = PER_ITEM_OVERHEAD + VECTOR_COPIES * 4 * (text_dim + image_dim + dim)
    return Estimate(rows, BASE_BYTES + rows * per_item, available)


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
