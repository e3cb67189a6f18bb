"""The embeddings table: one row per indexed item, written next to the shards.

The training pipeline and evaluations read it; the search service can use it
to re-rank or to rebuild an index without re-encoding.
"""

import pyarrow as pa

ITEM_ID = "item_id"
TITLE = "title"
TEXT_EMBEDDING = "text_embedding"
IMAGE_EMBEDDING = "image_embedding"
EMBEDDING = "embedding"
SHARD = "shard"
ANNOY_ID = "annoy_id"

EMBEDDINGS_SCHEMA = pa.schema(
    [
        pa.field(ITEM_ID, pa.string(), nullable=False),
        pa.field(TITLE, pa.string(), nullable=True),
        # Null when the item has no text (no title and no description).
        pa.field(TEXT_EMBEDDING, pa.list_(pa.float32()), nullable=True),
        # Null when the item has no image or its image could not be used.
        pa.field(IMAGE_EMBEDDING, pa.list_(pa.float32()), nullable=True),
        pa.field(EMBEDDING, pa.list_(pa.float32()), nullable=False),
        pa.field(SHARD, pa.int32(), nullable=False),
        pa.field(ANNOY_ID, pa.int64(), nullable=False),
    ]
)

# Id map per shard: row i holds the item_id of annoy id i (annoy_id == row index).
IDMAP_SCHEMA = pa.schema(
    [
        pa.field(ANNOY_ID, pa.int64(), nullable=False),
        pa.field(ITEM_ID, pa.string(), nullable=False),
    ]
)
