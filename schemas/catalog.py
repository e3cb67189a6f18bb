"""The catalog input schema: the columns the index pipeline reads, in one place.

Other columns may be present and are ignored. ``image_version`` is optional and
not a text column: a string, integer or timestamp that changes whenever the
image behind ``image_uri`` does (an ETag, a generation, an updated-at), read
as a string; an incremental run reuses a previous version's image vector
without fetching the image when (image_uri, image_version) are equal and not
null (pipelines/reuse.py). Schema problems are file-level
(they fail the run before work starts); value problems are row-level (they
become rejected rows, see ``schemas.rejected``).
"""

import pyarrow as pa

from schemas.errors import CatalogSchemaError

ITEM_ID = "item_id"
TITLE = "title"
DESCRIPTION = "description"
IMAGE_URI = "image_uri"

# name -> (arrow type, required). Large string variants are accepted too.
COLUMNS = {
    ITEM_ID: (pa.string(), True),
    TITLE: (pa.string(), False),
    DESCRIPTION: (pa.string(), False),
    IMAGE_URI: (pa.string(), False),
}

# Optional, not a text column (see the module's docstring); not part of CATALOG_SCHEMA.
IMAGE_VERSION = "image_version"

CATALOG_SCHEMA = pa.schema([pa.field(name, typ, nullable=True) for name, (typ, _) in COLUMNS.items()])

_STRING_TYPES = (pa.string(), pa.large_string())


def _version_type_ok(typ: pa.DataType) -> bool:
    return (typ in _STRING_TYPES or typ == pa.null() or pa.types.is_integer(typ)
            or pa.types.is_timestamp(typ) or pa.types.is_date(typ))


def image_version_values(column) -> list:
    """An ``image_version`` column as Python strings (None for null): strings as they are, integers
    and timestamps as Arrow casts them to text (the same value always gives the same string)."""
    if column.type in _STRING_TYPES or column.type == pa.null():
        return column.to_pylist()
    return column.cast(pa.string()).to_pylist()


def check_catalog_schema(schema: pa.Schema, source: str) -> list:
    """Checks one file's schema; returns the catalog columns it has, in COLUMNS order (then image_version).

    Raises CatalogSchemaError naming the file and the column when a required
    column is missing or any catalog column is not a string column.
    """
    present = []
    for name, (_, required) in COLUMNS.items():
        index = schema.get_field_index(name)
        if index < 0:
            if required:
                raise CatalogSchemaError(
                    f"{source}: required column {name!r} is missing "
                    f"(columns present: {', '.join(schema.names) or 'none'})"
                )
            continue
        field = schema.field(index)
        # A writer that saw only nulls in an optional column types it "null"; its values read as None.
        if field.type not in _STRING_TYPES and not (field.type == pa.null() and not required):
            raise CatalogSchemaError(
                f"{source}: column {name!r} has type {field.type}, expected string "
                f"(cast it to string when writing the catalog)"
            )
        present.append(name)
    index = schema.get_field_index(IMAGE_VERSION)
    if index >= 0:
        if not _version_type_ok(schema.field(index).type):
            raise CatalogSchemaError(
                f"{source}: column {IMAGE_VERSION!r} has type {schema.field(index).type}, expected a string, "
                f"integer or timestamp (an ETag, generation or updated-at of the image)"
            )
        present.append(IMAGE_VERSION)
    return present
