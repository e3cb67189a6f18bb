"""Click logs for the training pipeline: one row per (query, clicked item)."""

import pyarrow as pa

QUERY = "query"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"

CLICKS_SCHEMA = pa.schema(
    [
        pa.field(QUERY, pa.string(), nullable=False),
        pa.field(ITEM_ID, pa.string(), nullable=False),
        pa.field(TIMESTAMP, pa.timestamp("us", tz="UTC"), nullable=True),
    ]
)
