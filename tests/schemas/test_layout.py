"""The published layout's rules: version names, pointers, snapshot ordering."""

import pytest

from schemas.errors import ConfigError, VerificationError
from schemas import layout


@pytest.mark.parametrize("name", ["v1", "2026-11-28", "2026-11-28T072300Z", "smoke-test", "a.b_c-d", "x" * 128])
def test_valid_version_names(name):
    assert layout.check_version_name(name) == name


@pytest.mark.parametrize("name", ["v2\n", "LATEST", "latest", "_staging", ".hidden", "../x", "a/b", "", "x" * 129,
                                  "-v", "v 1", "v1\r"])
def test_refused_version_names(name):
    with pytest.raises(ConfigError, match="--version"):
        layout.check_version_name(name)


def test_release_ids_are_unique_and_recognised():
    ids = {layout.new_release_id() for _ in range(100)}
    assert len(ids) == 100 and all(layout.is_release_id(r) for r in ids)
    assert not layout.is_release_id("r20261129T112233Z-1a2b3c4d\n")
    assert not layout.is_release_id("shards")


def pointer(version, snapshot, release="r20261129T000000Z-00000000"):
    return layout.Pointer(version, release, snapshot, "0" * 64)


def test_latest_moves_only_to_a_later_snapshot():
    live = pointer("smoke-test", "2026-11-29T10:00:00Z")
    # A named version does not pin LATEST: any later snapshot moves it (names are not compared).
    assert layout.later(pointer("2026-11-29T110000Z", "2026-11-29T11:00:00Z"), live)
    assert not layout.later(pointer("2026-11-28", "2026-11-28T00:00:00Z"), live)  # a backfilled date
    assert not layout.later(pointer("other", "2026-11-29T10:00:00Z"), live)  # a tie does not move it
    # --force of the version LATEST names: another release, same snapshot, moves it.
    assert layout.later(pointer("smoke-test", "2026-11-29T10:00:00Z", "r20261129T120000Z-11111111"), live)
    assert layout.later(live, None)


def test_pointer_round_trip_and_garbage():
    p = pointer("v1", "2026-11-29T10:00:00Z")
    assert layout.Pointer.loads(p.dumps()) == p
    assert p.path == "v1/r20261129T000000Z-00000000"
    for bad in (b"v1\n", b"{}", b'{"version": "../x", "release": "r20261129T000000Z-00000000", '
                b'"snapshot": "2026-11-29T10:00:00Z", "manifest_sha256": "0", "path": "../x/r"}', b"\xff"):
        with pytest.raises(VerificationError):
            layout.Pointer.loads(bad, "LATEST")


def test_snapshot_times():
    assert layout.format_time(layout.parse_time("2026-11-28")) == "2026-11-28T00:00:00Z"
    assert layout.format_time(layout.parse_time("2026-11-28T09:30:00+02:00")) == "2026-11-28T07:30:00Z"
    assert layout.date_snapshot("2026-11-01") == "2026-11-01T00:00:00Z"
    with pytest.raises(ConfigError, match="--snapshot-time"):
        layout.parse_time("yesterday")


def test_pointer_file_is_latest_or_the_versions_current():
    assert layout.pointer_file() == "LATEST"
    assert layout.pointer_file("v1") == "v1/CURRENT"
    with pytest.raises(ConfigError):
        layout.pointer_file("../x")
