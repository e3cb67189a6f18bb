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
# Content keys: what an incremental run compares to reuse an item's vectors (pipelines/reuse.py).
TEXT_SHA256 = "text_sha256"
IMAGE_SHA256 = "image_sha256"
IMAGE_URI = "image_uri"
IMAGE_VERSION = "image_version"
CONTENT_KEYS = (TEXT_SHA256, IMAGE_SHA256, IMAGE_URI, IMAGE_VERSION)

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
        # Added later, at the end (tables written before them lack these columns; readers name the
        # columns they read). sha256 hex of exactly the text the text encoder saw
        # (pipelines.transforms.item_text); null when the item has no text vector.
        pa.field(TEXT_SHA256, pa.string(), nullable=True),
        # sha256 hex of the image bytes that were decoded for the image vector; null without one.
        pa.field(IMAGE_SHA256, pa.string(), nullable=True),
        # The catalog's image_uri and optional image_version, as read (null when absent).
        pa.field(IMAGE_URI, pa.string(), nullable=True),
        pa.field(IMAGE_VERSION, pa.string(), nullable=True),
    ]
)

# Id map per shard: row i holds the item_id of annoy id i (annoy_id == row index).
IDMAP_SCHEMA = pa.schema(
    [
        pa.field(ANNOY_ID, pa.int64(), nullable=False),
        pa.field(ITEM_ID, pa.string(), nullable=False),
    ]
)
