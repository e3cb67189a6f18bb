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
