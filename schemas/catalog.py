"""The catalog input schema: the columns the index pipeline reads, in one place.

Other columns may be present and are ignored. Schema problems are file-level
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

CATALOG_SCHEMA = pa.schema([pa.field(name, typ, nullable=True) for name, (typ, _) in COLUMNS.items()])

_STRING_TYPES = (pa.string(), pa.large_string())


def check_catalog_schema(schema: pa.Schema, source: str) -> list:
    """Checks one file's schema; returns the catalog columns it has, in COLUMNS order.

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
    return present
