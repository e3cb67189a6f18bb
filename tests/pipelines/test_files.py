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
