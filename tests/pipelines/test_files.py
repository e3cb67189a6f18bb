"""File helpers over Beam's FileSystems."""

from pipelines import files


def test_write_atomically_replaces_without_leftovers(tmp_path):
    target = str(tmp_path / "LATEST")
    files.write_atomically(target, b"v1\n")
    files.write_atomically(target, b"v2\n")
    assert files.read_bytes(target) == b"v2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["LATEST"]


def test_write_parquet_returns_the_checksum_of_what_it_wrote(tmp_path):
    import hashlib

    import pyarrow as pa

    target = str(tmp_path / "t.parquet")
    size, sha = files.write_parquet(target, pa.table({"a": [1, 2, 3]}))
    data = (tmp_path / "t.parquet").read_bytes()
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    assert files.checksum(target) == (size, sha)


def test_list_and_relative(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"x")
    (tmp_path / "y.bin").write_bytes(b"y")
    assert files.list_files(str(tmp_path)) == [str(tmp_path / "a" / "x.bin"), str(tmp_path / "y.bin")]
    assert files.relative(str(tmp_path / "a" / "x.bin"), str(tmp_path)) == "a/x.bin"
    files.delete_tree(str(tmp_path / "a"))
    assert files.list_files(str(tmp_path)) == [str(tmp_path / "y.bin")]


def test_local_path_is_the_one_file_uri_rule():
    assert files.local_path("file:///data/x.parquet") == "/data/x.parquet"
    assert files.local_path("FILE:///data/x") == "/data/x"
    assert files.local_path("file:///data/my%20dir") == "/data/my%20dir"  # as-is, like image URIs
    assert files.local_path("/data/x") == "/data/x"
    assert files.local_path("gs://b/x") == "gs://b/x"
    assert files.local_path(None) is None
    assert [files.scheme(p) for p in ("/a", "file:///a", "rel/a", "gs://b/a", "HTTPS://h/a", "fakegs://b")] == [
        "", "", "", "gs", "https", "fakegs"]
    assert files.is_local("file:///a") and files.is_local("a/b") and not files.is_local("gs://b/a")


def test_every_helper_takes_file_uris_and_returns_plain_paths(tmp_path):
    base = "file://" + str(tmp_path)
    target = files.join(base, "d", "x.bin")
    assert target == str(tmp_path / "d" / "x.bin")
    files.write_atomically(base + "/d/x.bin", b"one")
    files.write_bytes(base + "/d/y.bin", b"two")
    assert files.exists(base + "/d/x.bin") and files.read_bytes(base + "/d/x.bin") == b"one"
    assert files.size(base + "/d/y.bin") == 3
    assert files.checksum(base + "/d/y.bin")[0] == 3
    assert files.list_files(base + "/d") == [str(tmp_path / "d" / "x.bin"), str(tmp_path / "d" / "y.bin")]
    assert files.relative(str(tmp_path / "d" / "x.bin"), base) == "d/x.bin"
    assert files.match_paths(base + "/d/*.bin", "--catalog") == files.list_files(str(tmp_path / "d"))
    assert files.any_file_below(base + "/d") and not files.any_file_below(base + "/nothing")
    files.delete_file(base + "/d/y.bin")
    assert not (tmp_path / "d" / "y.bin").exists()
    files.delete_tree(base + "/d")
    assert not (tmp_path / "d").exists()


def test_match_paths_refuses_a_folder_and_names_the_glob(tmp_path):
    import pytest

    from schemas.errors import ConfigError

    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog" / "part-0.parquet").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"is a folder; pass its files, e.g. '.*/catalog/\*\.parquet'"):
        files.match_paths(str(tmp_path / "catalog"), "--catalog")
    assert files.match_paths(str(tmp_path / "catalog" / "*.parquet"), "--catalog") == [
        str(tmp_path / "catalog" / "part-0.parquet")]


ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.dirname(
    __import__("os").path.abspath(__file__))))


def _child(code: str, preset=None) -> list:
    """Runs ``code`` in a fresh interpreter (the pool is process-wide: the test process's own is not
    touched) with ARROW_DEFAULT_MEMORY_POOL unset or ``preset``; its last line of stdout as JSON, and
    its stderr."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != files.ARROW_POOL_ENV}
    if preset:
        env[files.ARROW_POOL_ENV] = preset
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


# Reads a Parquet file of list<float> vectors (Arrow's C++ reader allocates from Arrow's C++ default pool,
# not from pyarrow's) and reports how much mimalloc, the wheels' default pool, ever held.
_READ_VECTORS = (
    "import json, os, tempfile, pyarrow as pa, pyarrow.parquet as pq\n"
    "path = os.path.join(tempfile.mkdtemp(), 'v.parquet')\n"
    "pq.write_table(pa.table({'v': [[float(i)] * 64 for i in range(5000)]}), path)\n"
    "pq.read_table(path)\n"
    "print(json.dumps([pa.mimalloc_memory_pool().max_memory(), pa.default_memory_pool().backend_name, "
    "os.environ.get('ARROW_DEFAULT_MEMORY_POOL')]))\n")


def _require_mimalloc():
    import pyarrow as pa
    import pytest

    try:
        pa.mimalloc_memory_pool()
    except NotImplementedError:  # pragma: no cover - the pinned wheels have it
        pytest.skip("this pyarrow build has no mimalloc pool, the default this test switches away from")


def test_importing_pipelines_moves_arrows_cpp_readers_off_mimalloc():
    # The issue 9 finding: pyarrow.set_memory_pool after pyarrow loaded left Arrow's C++ readers on
    # mimalloc (which kept what bundle threads freed). Importing the package first sets the variable
    # Arrow's C++ library reads when it loads.
    _require_mimalloc()
    control, _ = _child("import pyarrow as pa; pa.set_memory_pool(pa.system_memory_pool())\n" + _READ_VECTORS)
    assert control[0] > 0  # the instrument sees mimalloc used when the pool is set too late
    mimalloc, backend, env = _child("import pipelines\n" + _READ_VECTORS)[0]
    assert (mimalloc, backend, env) == (0, "system", "system")


def test_the_command_line_loads_pipelines_before_pyarrow():
    # catalog-index's pipeline commands import pipelines.* first; nothing on the way loads pyarrow.
    loaded, _ = _child("import json, sys, catalog_index.cli; from pipelines import index_pipeline; "
                       "import pipelines; print(json.dumps([pipelines.POOL_CHOSEN_HERE]))")
    assert loaded == [True]
    before, _ = _child("import json, sys, catalog_index.cli; print(json.dumps(['pyarrow' in sys.modules]))")
    assert before == [False]


def test_use_system_memory_pool_after_a_late_pyarrow_warns_and_switches_pyarrows_pool():
    code = ("import json, logging, os, pyarrow as pa; logging.basicConfig(); from pipelines import files; "
            "r = files.use_system_memory_pool(); "
            "print(json.dumps([r, pa.default_memory_pool().backend_name, os.environ.get(files.ARROW_POOL_ENV)]))")
    out, err = _child(code)
    assert out == ["system", "system", "system"]
    assert "pyarrow was loaded before catalog-index set ARROW_DEFAULT_MEMORY_POOL=system" in err


def test_the_users_pool_is_kept():
    _require_mimalloc()
    out, err = _child("import pipelines; from pipelines import files; files.use_system_memory_pool()\n"
                      + _READ_VECTORS, preset="jemalloc")
    assert out[1:] == ["jemalloc", "jemalloc"] and "pyarrow was loaded" not in err
    out, _ = _child("import pipelines; from pipelines import files; files.use_system_memory_pool()\n"
                    + _READ_VECTORS, preset="mimalloc")
    assert out[0] > 0 and out[1:] == ["mimalloc", "mimalloc"]


def test_pipelines_switch_the_pool_before_anything_else(monkeypatch):
    import pytest

    from pipelines import index_pipeline, train_pipeline
    from schemas.errors import ConfigError

    for module in (index_pipeline, train_pipeline):
        calls = []
        monkeypatch.setattr(files, "use_system_memory_pool", lambda: calls.append(1) or "system")
        with pytest.raises(ConfigError):  # no --catalog / --clicks: stops at validation
            module.run([])
        assert calls == [1], module.__name__
