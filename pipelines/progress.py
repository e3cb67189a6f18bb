"""Progress for long runs: Beam counters plus a throttled log line per worker.

Counters show in the Dataflow console; the log line is what a person running
on the DirectRunner sees while the pipeline works (the DirectRunner gives no
live metrics). Each worker process logs its own running totals at most every
``INTERVAL_S`` seconds.
"""

import logging
import threading
import time

from apache_beam.metrics import Metrics

NAMESPACE = "catalog_index"
INTERVAL_S = 10.0

ROWS_READ = "rows_read"
TEXTS_ENCODED = "texts_encoded"
IMAGES_LOADED = "images_loaded"
ITEMS_FUSED = "items_fused"
ITEMS_INDEXED = "items_indexed"
ITEMS_REJECTED = "items_rejected"
ITEMS_DEGRADED = "items_degraded"
IMAGES_NOT_FETCHED = "images_not_fetched"  # image vectors reused on (image_uri, image_version) alone
ITEMS_CARRIED = "items_carried"  # every vector reused: the previous row copied into its shard, not fused again
# Indexed items by how each vector came about (pipelines/reuse.py); the manifest's counts of the same names.
REUSED_TEXT = "reused_text"
ENCODED_TEXT = "encoded_text"
REUSED_IMAGE = "reused_image"
ENCODED_IMAGE = "encoded_image"
VECTOR_COUNTERS = (ENCODED_IMAGE, ENCODED_TEXT, REUSED_IMAGE, REUSED_TEXT)

_log = logging.getLogger("catalog_index.progress")
_lock = threading.Lock()
_totals = {}
_last_log = [0.0]


def counter(name: str):
    return Metrics.counter(NAMESPACE, name)


def add(name: str, n: int = 1) -> None:
    """Adds to this process's running total and logs all totals when it is time."""
    now = time.monotonic()
    with _lock:
        _totals[name] = _totals.get(name, 0) + n
        if now - _last_log[0] < INTERVAL_S:
            return
        _last_log[0] = now
        line = ", ".join(f"{k}={v}" for k, v in sorted(_totals.items()))
    _log.info("progress (this worker): %s", line)
