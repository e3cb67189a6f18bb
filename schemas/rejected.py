"""Rejected and degraded rows: their table schema and the stable reason codes.

A row that is read but not indexed lands in ``rejected/`` with one of the
REJECT_REASONS. An item indexed without its image (fetch or decode failed)
lands in ``degraded/`` with the same schema and an image reason.
"""

import pyarrow as pa

ITEM_ID = "item_id"
SOURCE = "source"
ROW = "row"
REASON = "reason"
MESSAGE = "message"

MISSING_ITEM_ID = "missing_item_id"
EMPTY_ITEM_ID = "empty_item_id"
DUPLICATE_ITEM_ID = "duplicate_item_id"
NO_TITLE_OR_IMAGE = "no_title_or_image"
# A value of the row could not be read (a string that is not valid UTF-8).
INVALID_VALUE = "invalid_value"
IMAGE_FETCH_FAILED = "image_fetch_failed"
IMAGE_DECODE_FAILED = "image_decode_failed"
IMAGE_TOO_LARGE = "image_too_large"
ENCODER_FAILED = "encoder_failed"
# The fused vector was zero or not finite (e.g. an encoder returned zeros or NaN).
EMPTY_EMBEDDING = "empty_embedding"

IMAGE_REASONS = (IMAGE_FETCH_FAILED, IMAGE_DECODE_FAILED, IMAGE_TOO_LARGE)

REJECT_REASONS = (
    INVALID_VALUE,
    MISSING_ITEM_ID,
    EMPTY_ITEM_ID,
    DUPLICATE_ITEM_ID,
    NO_TITLE_OR_IMAGE,
    *IMAGE_REASONS,
    ENCODER_FAILED,
    EMPTY_EMBEDDING,
)

REJECTED_SCHEMA = pa.schema(
    [
        pa.field(ITEM_ID, pa.string(), nullable=True),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(ROW, pa.int64(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(MESSAGE, pa.string(), nullable=False),
    ]
)

