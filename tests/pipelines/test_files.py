"""File helpers over Beam's FileSystems."""

from pipelines import files


def test_write_atomically_replaces_without_leftovers(tmp_path):
    target = str(tmp_path / "LATEST")
    files.write_atomically(target, b"v1\n")
    files.write_atomically(target, b"v2\n")
    assert files.read_bytes(target) == b"v2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["LATEST"]


def test_move_tree_is_rerunnable(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.bin").write_bytes(b"x")
    (src / "y.bin").write_bytes(b"y")
    files.move_tree(str(src), str(dst), ["a/x.bin", "y.bin"])
    files.move_tree(str(src), str(dst), ["a/x.bin", "y.bin"])  # a retried publication: already moved
    assert (dst / "a" / "x.bin").read_bytes() == b"x" and (dst / "y.bin").read_bytes() == b"y"
    assert files.list_files(str(src)) == []
    assert files.list_files(str(dst)) == [str(dst / "a" / "x.bin"), str(dst / "y.bin")]
    assert files.relative(str(dst / "a" / "x.bin"), str(dst)) == "a/x.bin"
