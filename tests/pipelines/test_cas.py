"""Compare-and-swap stores and the publication lease."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys

import pytest

from schemas.errors import LeaseHeldError
from pipelines import cas
from pipelines import lease
from schemas import layout
from tests import fake_gcs


@pytest.fixture
def gcs_store(tmp_path):
    fake_gcs.FakeGcsFileSystem.root = str(tmp_path)
    yield cas.GcsCasStore(fake_gcs.FakeStorageClient(str(tmp_path)), scheme="fakegs"), "fakegs://bucket/out/LATEST"
    fake_gcs.FakeGcsFileSystem.root = None


@pytest.fixture(params=["local", "gcs"])
def store_and_path(request, tmp_path):
    if request.param == "local":
        return cas.LocalCasStore(), str(tmp_path / "out" / "LATEST")
    return request.getfixturevalue("gcs_store")


def test_compare_and_swap_semantics(store_and_path):
    store, path = store_and_path
    assert store.read(path) == (None, cas.ABSENT)
    assert store.write_if(path, b"a", cas.ABSENT)
    assert not store.write_if(path, b"b", cas.ABSENT)  # create-only fails once it exists
    data, token = store.read(path)
    assert data == b"a"
    assert store.write_if(path, b"b", token)
    assert not store.write_if(path, b"c", token)  # the token is stale: someone wrote in between
    assert store.read(path)[0] == b"b"
    assert not store.delete_if(path, token)
    assert store.delete_if(path, store.read(path)[1])
    assert store.read(path) == (None, cas.ABSENT)


def _increment(path, times):
    store = cas.LocalCasStore()
    for _ in range(times):
        while True:
            data, token = store.read(path)
            value = int(data) if data is not None else 0
            if store.write_if(path, str(value + 1).encode(), token):
                break


def test_local_cas_loses_no_update_across_processes(tmp_path):
    path = str(tmp_path / "counter")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_increment, args=(path, 50)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert int(open(path).read()) == 200
    assert sorted(os.listdir(tmp_path)) == [".counter.lock", "counter"]  # no temp file left behind


def test_local_cas_lock_does_not_follow_a_planted_symlink(tmp_path):
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    (tmp_path / "out").mkdir()
    os.symlink(target, tmp_path / "out" / ".LATEST.lock")
    with pytest.raises(OSError):
        cas.LocalCasStore().write_if(str(tmp_path / "out" / "LATEST"), b"x", cas.ABSENT)
    assert target.read_bytes() == b"keep me"


def test_unsupported_scheme_is_a_config_error():
    with pytest.raises(Exception, match="compare-and-swap"):
        cas.store_for("s3://bucket/out/LATEST")


def test_second_holder_gets_an_error_naming_the_first(tmp_path):
    first = lease.Lease(str(tmp_path), "run-a", "v1").acquire()
    with pytest.raises(LeaseHeldError, match=r"run run-a \(index of version v1, pid \d+ on "):
        lease.Lease(str(tmp_path), "run-b", "v2").acquire()
    first.release()
    assert not (tmp_path / layout.LEASE_FILE).exists()
    lease.Lease(str(tmp_path), "run-b", "v2").acquire().release()


def test_held_takes_a_free_lease_for_the_step_and_gives_it_back(tmp_path):
    """A job's publication step when the launcher only submitted it (a Flex Template launch)."""
    step = lease.Lease(str(tmp_path), "run-a", "v1")
    with step.held():
        assert json.loads((tmp_path / layout.LEASE_FILE).read_text())["owner"] == "run-a"
    assert not (tmp_path / layout.LEASE_FILE).exists()


def test_held_leaves_the_launching_process_lease_in_place(tmp_path):
    """The same step on a local runner: the launching process holds the lease (same run id) and keeps it."""
    driver = lease.Lease(str(tmp_path), "run-a", "v1").acquire()
    with lease.Lease(str(tmp_path), "run-a", "v1").held():
        pass
    assert driver.holds()
    driver.release()


def test_held_and_check_free_refuse_a_lease_another_run_holds(tmp_path):
    other = lease.Lease(str(tmp_path), "run-b", "v2").acquire()
    for attempt in (lambda: lease.Lease(str(tmp_path), "run-a", "v1").check_free(),
                    lambda: lease.Lease(str(tmp_path), "run-a", "v1").held().__enter__()):
        with pytest.raises(LeaseHeldError, match=r"run run-b \(index of version v2"):
            attempt()
    assert other.holds()
    other.release()
    lease.Lease(str(tmp_path), "run-a", "v1").check_free()  # free now: nothing raised, nothing written
    assert not (tmp_path / layout.LEASE_FILE).exists()


def test_an_expired_lease_is_taken_over(tmp_path):
    (tmp_path / layout.LEASE_FILE).write_text(json.dumps({
        "owner": "dead", "host": "elsewhere", "pid": 1, "acquired_at": "2026-01-01T00:00:00Z",
        "expires_at": "2026-01-01T00:05:00Z"}))
    taken = lease.Lease(str(tmp_path), "run-b").acquire()
    assert json.loads((tmp_path / layout.LEASE_FILE).read_text())["owner"] == "run-b"
    taken.release()


def test_a_lease_whose_process_died_on_this_host_is_taken_over_at_once(tmp_path):
    # A real process takes the lease and is killed; its lease has not expired.
    code = ("import sys, os, signal; sys.path.insert(0, %r); from pipelines import lease; "
            "lease.Lease(%r, 'killed', seconds=3600).acquire(); os.kill(os.getpid(), signal.SIGKILL)"
            % (os.getcwd(), str(tmp_path)))
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == -9
    holder = json.loads((tmp_path / layout.LEASE_FILE).read_text())
    assert holder["owner"] == "killed" and holder["host"] == socket.gethostname()
    lease.Lease(str(tmp_path), "next").acquire().release()


def test_heartbeat_renews_and_release_only_removes_our_own(tmp_path):
    mine = lease.Lease(str(tmp_path), "mine", seconds=10).acquire()
    before = json.loads((tmp_path / layout.LEASE_FILE).read_text())["expires_at"]
    import time

    time.sleep(1.1)
    assert mine.renew()
    assert json.loads((tmp_path / layout.LEASE_FILE).read_text())["expires_at"] > before
    # Someone took it over (e.g. after we looked dead): our release must not delete theirs.
    (tmp_path / layout.LEASE_FILE).write_text(json.dumps({"owner": "other", "expires_at": "2999-01-01T00:00:00Z"}))
    assert not mine.holds()
    mine.release()
    assert json.loads((tmp_path / layout.LEASE_FILE).read_text())["owner"] == "other"


def test_lease_on_the_object_store_uses_generations(gcs_store):
    cas.register("fakegs", lambda: gcs_store[0])
    first = lease.Lease("fakegs://bucket/out", "a").acquire()
    with pytest.raises(LeaseHeldError, match="run a"):
        lease.Lease("fakegs://bucket/out", "b").acquire()
    first.release()
    lease.Lease("fakegs://bucket/out", "b").acquire().release()
