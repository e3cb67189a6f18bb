"""Shared fixtures: tiny real SavedModel encoders (built once per session) and catalogs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

GROCERY = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "grocery-store", "dataset")


@pytest.fixture(scope="session", autouse=True)
def _log_files_in_tmp(tmp_path_factory):
    """`catalog-index` run as a program (subprocess tests) writes a log file per run: keep those out of the
    user's cache (catalog_index.cli.LOG_DIR_ENV; children inherit the environment)."""
    os.environ.setdefault("CATALOG_INDEX_LOG_DIR", str(tmp_path_factory.mktemp("logs")))


@pytest.fixture
def fake_gcs_root(tmp_path):
    """A fake gs://-like object store (tests/fake_gcs.py, scheme fakegs://) rooted in tmp_path; pointers and
    the lease go through generation preconditions, as on GCS."""
    from pipelines import cas
    from tests import fake_gcs

    fake_gcs.FakeGcsFileSystem.root = str(tmp_path / "bucket-root")
    os.makedirs(fake_gcs.FakeGcsFileSystem.root)
    cas.register(fake_gcs.SCHEME, lambda: cas.GcsCasStore(fake_gcs.FakeStorageClient(), scheme=fake_gcs.SCHEME))
    yield fake_gcs.FakeGcsFileSystem.root
    fake_gcs.FakeGcsFileSystem.root = None


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory):
    """(text_path, image_path) of tiny real SavedModels: 64-d text, 48-d image from 32x32 input."""
    from embedding import tiny

    root = tmp_path_factory.mktemp("encoders")
    return tiny.build_text_encoder(str(root / "text")), tiny.build_image_encoder(str(root / "image"))


@pytest.fixture(scope="session")
def sample_catalog(tmp_path_factory):
    """A generated catalog of 300 good items plus every deliberately bad row (see catalog_index/sample.py)."""
    from catalog_index import sample

    return sample.generate_catalog(str(tmp_path_factory.mktemp("catalog")), n_items=300, seed=7)


@pytest.fixture(scope="session")
def grocery_dir():
    path = os.path.abspath(GROCERY)
    if not os.path.isdir(path):
        pytest.skip(f"shared Grocery Store data not found at {path}; it is optional (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """One model cache for the whole session: each built-in model is converted at most once.

    Honours $CATALOG_INDEX_MODEL_CACHE when set, so repeated local runs reuse built models.
    """
    from embedding import builtin

    return os.environ.get(builtin.CACHE_ENV) or str(tmp_path_factory.mktemp("model-cache"))
