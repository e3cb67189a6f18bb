import pyarrow as pa
import pytest

from schemas.errors import CatalogSchemaError
from schemas import catalog as cat


def test_full_schema_accepted():
    assert cat.check_catalog_schema(cat.CATALOG_SCHEMA, "f.parquet") == list(cat.COLUMNS)


def test_optional_columns_may_be_missing_and_extra_columns_are_ignored():
    schema = pa.schema([("item_id", pa.large_string()), ("price", pa.float64()), ("title", pa.string())])
    assert cat.check_catalog_schema(schema, "f.parquet") == ["item_id", "title"]


def test_missing_item_id_names_file_and_column():
    schema = pa.schema([("title", pa.string())])
    with pytest.raises(CatalogSchemaError, match=r"gs://b/c\.parquet: required column 'item_id' is missing"):
        cat.check_catalog_schema(schema, "gs://b/c.parquet")


@pytest.mark.parametrize("column", ["item_id", "title", "description", "image_uri"])
def test_wrong_type_names_file_and_column(column):
    fields = [(name, pa.int64() if name == column else pa.string()) for name in cat.COLUMNS]
    with pytest.raises(CatalogSchemaError, match=rf"x\.parquet: column '{column}' has type int64"):
        cat.check_catalog_schema(pa.schema(fields), "x.parquet")


def test_all_null_optional_column_is_accepted_but_not_item_id():
    schema = pa.schema([("item_id", pa.string()), ("description", pa.null()), ("image_uri", pa.null())])
    assert cat.check_catalog_schema(schema, "f.parquet") == ["item_id", "description", "image_uri"]
    with pytest.raises(CatalogSchemaError, match="column 'item_id' has type null"):
        cat.check_catalog_schema(pa.schema([("item_id", pa.null())]), "f.parquet")
