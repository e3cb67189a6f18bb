"""Publication that readers can trust: kills at every step, --force under a reader, concurrent runs,
idempotent reruns, refusals, verify and gc. Real runs of the CLI in subprocesses where a kill is the point."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from annoy import AnnoyIndex

from catalog_index import cli
from pipelines import cas
from pipelines import index_pipeline
from pipelines import lease
from pipelines import publication as pub
from schemas import layout

EXE = os.path.join(os.path.dirname(sys.executable), "catalog-index")


def index_args(catalog, output, encoders, *extra):
    return ["--catalog", catalog, "--output", str(output), "--text-encoder", encoders[0],
            "--image-encoder", encoders[1], *extra]


def run_cli(*args, env=None, timeout=300):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, env=full_env)


def check_complete(output, pointer_file="LATEST"):
    """Independently of the publisher's code: the pointer names a release whose manifest matches its
    sha256 and whose every listed file matches its size and sha256; each shard loads with its count.
    Returns (version, release)."""
    with open(os.path.join(output, pointer_file), "rb") as f:
        pointer = json.loads(f.read())
    base = os.path.join(output, pointer["version"], pointer["release"])
    with open(os.path.join(base, "manifest.json"), "rb") as f:
        raw = f.read()
    assert hashlib.sha256(raw).hexdigest() == pointer["manifest_sha256"]
    manifest = json.loads(raw)
    assert (manifest["version"], manifest["release"]) == (pointer["version"], pointer["release"])
    for rel, entry in manifest["files"].items():
        with open(os.path.join(base, rel), "rb") as f:
            data = f.read()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"]), rel
    for shard in manifest["shards"]:
        index = AnnoyIndex(manifest["dimension"], "angular")
        index.load(os.path.join(base, shard["path"]))
        assert index.get_n_items() == shard["count"]
        index.unload()
    c = manifest["counts"]
    assert c["read"] == c["indexed"] + c["rejected"]
    return pointer["version"], pointer["release"]


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory):
    from catalog_index import sample

    return sample.generate_catalog(str(tmp_path_factory.mktemp("small")), n_items=40, seed=3, bad_rows=False)


@pytest.fixture(scope="module")
def v0_output(small_catalog, tiny_encoders, tmp_path_factory):
    """An output root with version v0 (snapshot 2026-11-01) published; tests copy it."""
    out = tmp_path_factory.mktemp("v0") / "out"
    index_pipeline.run(index_args(small_catalog["catalog_glob"], out, tiny_encoders, "--version", "v0",
                                  "--snapshot-time", "2026-11-01", "--shards", "2"))
    return str(out)


@pytest.fixture
def output(v0_output, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(v0_output, out)
    return str(out)


# --------------------------------------------------------------------------- kills


@pytest.mark.slow
@pytest.mark.parametrize("step, latest_after_kill", [
    ("after_shard", "v0"),  # files being written into the new release folder
    ("before_manifest", "v0"),  # every data file written and checked, no manifest yet
    ("after_manifest", "v0"),  # release complete, no pointer names it
    ("after_current", "v0"),  # v1/CURRENT switched, LATEST not yet
    ("after_latest", "v1"),  # both pointers switched, lease not given back
])
def test_sigkill_at_each_publication_step_then_rerun(step, latest_after_kill, output, small_catalog, tiny_encoders):
    args = ["index", *index_args(small_catalog["catalog_glob"], output, tiny_encoders, "--version", "v1",
                                 "--snapshot-time", "2026-11-02", "--shards", "2")]
    killed = run_cli(*args, env={pub.FAILPOINT_ENV: step})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert check_complete(output)[0] == latest_after_kill
    if step in ("after_current", "after_latest"):
        check_complete(output, "v1/CURRENT")
    # The rerun completes without --force: it waits for no lease (the holder's process is gone).
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    version, release = check_complete(output)
    assert version == "v1" and check_complete(output, "v1/CURRENT") == (version, release)
    if step == "after_manifest":
        assert "finished the publication of the complete release" in again.stdout
    if step in ("after_current", "after_latest"):
        assert "already published with identical inputs" in again.stdout
    assert run_cli("verify", "--index", output).returncode == 0
    assert not os.path.exists(os.path.join(output, layout.LEASE_FILE))


@pytest.mark.slow
def test_force_over_the_live_version_while_a_reader_polls(output, small_catalog, tiny_encoders):
    old_version, old_release = check_complete(output)
    old_shard = os.path.join(output, old_version, old_release, "shards", "shard-00000-of-00002.ann")
    held = open(old_shard, "rb")  # a reader that loaded the old release keeps reading it
    before = hashlib.sha256(held.read()).hexdigest()
    seen, errors, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.add(check_complete(output))
            except Exception as e:  # noqa: BLE001 - any failure is what the test looks for
                errors.append(repr(e))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        done = run_cli("index", *index_args(small_catalog["catalog_glob"], output, tiny_encoders, "--version", "v0",
                                            "--snapshot-time", "2026-11-01", "--shards", "3", "--force"))
    finally:
        stop.set()
        thread.join()
    assert done.returncode == 0, done.stderr[-2000:]
    assert errors == []
    new = check_complete(output)
    assert new[0] == "v0" and new[1] != old_release
    assert seen <= {(old_version, old_release), new} and (old_version, old_release) in seen
    held.seek(0)
    assert hashlib.sha256(held.read()).hexdigest() == before  # never modified in place
    held.close()


# --------------------------------------------------------------------------- concurrency


def test_a_second_publisher_fails_naming_the_holder(output, small_catalog, tiny_encoders):
    before = sorted(os.listdir(output))
    holder = lease.Lease(output, "r20261129T000000Z-deadbeef", "v9").acquire()
    try:
        rc = run_cli("index", *index_args(small_catalog["catalog_glob"], output, tiny_encoders, "--version", "v1"))
    finally:
        holder.release()
    assert rc.returncode == 1
    lines = rc.stderr.strip().splitlines()
    assert "another run is publishing" in lines[-1] and "run r20261129T000000Z-deadbeef" in lines[-1]
    assert "version v9" in lines[-1] and f"pid {os.getpid()}" in lines[-1]
    assert sorted(os.listdir(output)) == before and check_complete(output)[0] == "v0"


@pytest.mark.slow
@pytest.mark.parametrize("versions", [("v1", "v1"), ("v1", "v2")])
def test_two_runs_at_once(versions, output, small_catalog, tiny_encoders):
    procs = [subprocess.Popen([EXE, "index", *index_args(small_catalog["catalog_glob"], output, tiny_encoders,
                                                         "--version", v, "--snapshot-time", "2026-11-0%d" % (2 + i))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, v in enumerate(versions)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = [rc for rc, _, _ in results]
    assert 0 in codes and set(codes) <= {0, 1}, results
    for rc, _, err in results:
        if rc == 1:
            assert "another run is publishing" in err.strip().splitlines()[-1]
    version, _ = check_complete(output)
    published = {v for (rc, _, _), v in zip(results, versions) if rc == 0}
    assert version in published
    for v in published:
        check_complete(output, f"{v}/CURRENT")


def test_pointer_compare_and_swap_never_moves_latest_backwards(tmp_path):
    """A publisher that read LATEST before another moved it forward must not overwrite it."""
    out = str(tmp_path)
    older = layout.Pointer("a", "r20261101T000000Z-00000001", "2026-11-01T00:00:00Z", "0" * 64)
    newer = layout.Pointer("b", "r20261102T000000Z-00000002", "2026-11-02T00:00:00Z", "0" * 64)
    store = cas.store_for(os.path.join(out, "LATEST"))
    real_write = store.write_if
    raced = []

    def racing_write(path, data, token):
        if path.endswith("LATEST") and not raced:  # another run moves LATEST forward in between
            raced.append(True)
            assert real_write(path, newer.dumps(), token)
        return real_write(path, data, token)

    store.write_if = racing_write
    try:
        outcome = pub.switch_pointers(out, older, force=False)
    finally:
        del store.write_if
    assert raced and not outcome.moved_latest and outcome.latest == newer
    assert layout.Pointer.loads(open(os.path.join(out, "LATEST"), "rb").read()) == newer
    assert layout.Pointer.loads(open(os.path.join(out, "a", "CURRENT"), "rb").read()) == older


# --------------------------------------------------------------------------- refusals


def _one_error_line(done):
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def test_empty_catalog_is_refused_with_exit_1(output, tiny_encoders, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"item_id": pa.array([], pa.string()), "title": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    before = sorted(os.listdir(output))
    rc = cli.main(["index", *index_args(str(tmp_path / "empty.parquet"), output, tiny_encoders, "--version", "e")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "no rows; nothing to publish" in err
    assert sorted(os.listdir(output)) == before and check_complete(output)[0] == "v0"


def test_too_many_degraded_items_are_refused(output, tiny_encoders, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # The image store "is unreachable": every image path is missing, all 20 items would be text-only.
    pq.write_table(pa.table({"item_id": [f"i{i}" for i in range(20)], "title": [f"thing {i}" for i in range(20)],
                             "image_uri": [str(tmp_path / f"gone-{i}.jpg") for i in range(20)]}),
                   tmp_path / "c.parquet")
    done = run_cli("index", *index_args(str(tmp_path / "c.parquet"), output, tiny_encoders, "--version", "d"))
    err = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "20 of 20 indexed items lost their image" in err and "image_fetch_failed" in err
    # One line from the project; Beam's copy of the same error with its traceback is not repeated.
    assert err.startswith("catalog-index index: error: ") and "while running" not in err
    assert "Traceback" not in done.stderr
    assert check_complete(output)[0] == "v0"
    assert not os.path.exists(os.path.join(output, "d", layout.CURRENT_FILE))
    assert [p for p in os.listdir(os.path.join(output, "d")) if not p.startswith(".")] == []  # own folder removed
    rc = cli.main(["index", *index_args(str(tmp_path / "c.parquet"), output, tiny_encoders, "--version", "d",
                                        "--max-degraded-fraction", "1")])
    assert rc == 0


def test_foreign_files_in_the_version_folder_need_force_and_are_kept(output, small_catalog, tiny_encoders, capsys):
    os.makedirs(os.path.join(output, "v1"))
    with open(os.path.join(output, "v1", "notes.txt"), "w") as f:
        f.write("mine")
    args = ["index", *index_args(small_catalog["catalog_glob"], output, tiny_encoders, "--version", "v1")]
    rc = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "notes.txt" in err and "--force" in err and len(err.splitlines()) == 1
    assert cli.main(args + ["--force"]) == 0
    assert open(os.path.join(output, "v1", "notes.txt")).read() == "mine"
    assert check_complete(output)[0] == "v1"


@pytest.mark.parametrize("flags, message", [
    (["--shardz", "4"], "unknown flag --shardz; did you mean --shards?"),
    (["--version", "v2\n"], "--version 'v2\\n' must be"),
    (["--version", "LATEST"], "--version 'LATEST' is reserved"),
    (["--version", "_x"], "names starting with '_' or '.' are reserved"),
    (["--shards", "x"], "invalid int value: 'x'"),
    (["--snapshot-time", "soon"], "--snapshot-time 'soon' is not an ISO 8601 time"),
])
def test_bad_flags_fail_before_any_work(flags, message, small_catalog, tiny_encoders, tmp_path, capsys):
    rc = cli.main(["index", *index_args(small_catalog["catalog_glob"], tmp_path / "out", tiny_encoders, *flags)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [
    ["backfill", "--catalog-pattern", "x/{date}/*.parquet", "--from", "2026-11-01", "--to", "2026-11-01",
     "--output", "o", "--shardz", "2"],
    ["models", "lisst"],
    ["models", "list", "--model-cach", "x"],
    ["verify", "--index", "o", "--versoin", "v"],
    ["gc", "--output", "o", "--dryrun"],
    ["sample", "--output", "o", "--itemz", "3"],
])
def test_every_command_refuses_unknown_flags(command, capsys):
    rc = cli.main(command)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "unknown flag" in err or "invalid choice" in err or "unexpected argument" in err, err


def test_beam_flags_still_pass_through(output, small_catalog, tiny_encoders):
    result = index_pipeline.run(index_args(small_catalog["catalog_glob"], output, tiny_encoders, "--version", "b",
                                           "--direct_num_workers", "1", "--runner", "DirectRunner"))
    assert result.manifest["version"] == "b"


def test_publication_on_the_object_store(small_catalog, tiny_encoders, tmp_path):
    """Publish, rerun, --force and verify through Beam's FileSystems and generation preconditions."""
    from tests import fake_gcs

    fake_gcs.FakeGcsFileSystem.root = str(tmp_path / "bucket-root")
    os.makedirs(fake_gcs.FakeGcsFileSystem.root)
    cas.register(fake_gcs.SCHEME, lambda: cas.GcsCasStore(fake_gcs.FakeStorageClient(), scheme=fake_gcs.SCHEME))
    try:
        out = "fakegs://bucket/index"
        args = index_args(small_catalog["catalog_glob"], out, tiny_encoders, "--version", "g", "--shards", "2")
        first = index_pipeline.run(args)
        assert pub.verify(out).manifest == first.manifest
        again = index_pipeline.run(args)
        assert "already published with identical inputs" in again.note
        assert again.manifest["release"] == first.manifest["release"]
        with pytest.raises(Exception, match="already published .* from other inputs"):
            index_pipeline.run(args + ["--trees", "3"])
        forced = index_pipeline.run(args + ["--trees", "3", "--force"])
        assert forced.manifest["release"] != first.manifest["release"]
        assert pub.resolve(out).release == forced.manifest["release"]
        pub.verify_release(f"{out}/g/{first.manifest['release']}")  # the replaced release is intact
        from pipelines import files

        left = files.list_files(out)
        assert left and not [p for p in left if "_lease" in p or ".tmp-" in p]
    finally:
        fake_gcs.FakeGcsFileSystem.root = None


# --------------------------------------------------------------------------- verify and gc


def test_verify_names_the_first_bad_file(output):
    assert run_cli("verify", "--index", output).returncode == 0
    version, release = check_complete(output)
    base = os.path.join(output, version, release)
    shard = os.path.join(base, "shards", "shard-00001-of-00002.ann")
    with open(shard, "r+b") as f:  # one flipped byte, same size: the damaged shard would still load
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    done = run_cli("verify", "--index", output, "--version", "v0")
    assert done.returncode == 1 and "shard-00001-of-00002.ann: content differs from the manifest" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    os.remove(os.path.join(base, "embeddings", "part-00000-of-00002.parquet"))
    done = run_cli("verify", "--index", output)
    assert done.returncode == 1 and "part-00000-of-00002.parquet: missing" in done.stderr
    assert run_cli("verify", "--index", output, "--version", "nope").returncode == 1


def test_verify_refuses_extra_files_and_a_changed_manifest(output):
    version, release = check_complete(output)
    base = os.path.join(output, version, release)
    with open(os.path.join(base, "shards", "extra.bin"), "wb") as f:
        f.write(b"x")
    with pytest.raises(Exception, match="extra.bin: not listed in the manifest"):
        pub.verify(output)
    os.remove(os.path.join(base, "shards", "extra.bin"))
    with open(os.path.join(base, "manifest.json"), "a") as f:
        f.write(" ")
    with pytest.raises(Exception, match="sha256 differs from the one its pointer recorded"):
        pub.verify(output)


# --------------------------------------------------------------------------- rollback


@pytest.fixture
def two_versions(output, small_catalog, tiny_encoders):
    """v0 (2026-11-01) and v1 (2026-11-02) published; LATEST names v1."""
    index_pipeline.run(index_args(small_catalog["catalog_glob"], output, tiny_encoders, "--version", "v1",
                                  "--snapshot-time", "2026-11-02", "--shards", "2"))
    assert check_complete(output)[0] == "v1"
    return output


def _pointer_bytes(output, name="LATEST"):
    with open(os.path.join(output, name), "rb") as f:
        return f.read()


def test_rollback_points_latest_at_the_earlier_version_and_the_next_publication_moves_it_on(
        two_versions, small_catalog, tiny_encoders, capsys):
    output = two_versions
    v1_current = _pointer_bytes(output, "v1/CURRENT")
    assert cli.main(["rollback", "--index", output, "--to", "v0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("LATEST: v1/r") and " -> v0/r" in out[0] and "verified" in out[0], out
    assert "moves LATEST forward again" in out[1]
    assert check_complete(output)[0] == "v0"
    assert _pointer_bytes(output) == _pointer_bytes(output, "v0/CURRENT")  # the same pointer, byte for byte
    assert _pointer_bytes(output, "v1/CURRENT") == v1_current  # v1 stays published, untouched
    assert not os.path.exists(os.path.join(output, layout.LEASE_FILE))  # the lease was given back
    assert cli.main(["rollback", "--index", output, "--to", "v0"]) == 0
    assert "LATEST already names v0/r" in capsys.readouterr().out
    # Publication still moves LATEST only forward: a later snapshot replaces the rollback.
    index_pipeline.run(index_args(small_catalog["catalog_glob"], output, tiny_encoders, "--version", "v2",
                                  "--snapshot-time", "2026-11-03", "--shards", "2"))
    assert check_complete(output)[0] == "v2"


def test_rollback_refuses_a_damaged_version_an_unknown_one_and_a_held_lease(two_versions, capsys):
    output = two_versions
    latest = _pointer_bytes(output)
    version, release = "v0", json.loads(_pointer_bytes(output, "v0/CURRENT"))["release"]
    shard = os.path.join(output, version, release, "shards", "shard-00000-of-00002.ann")
    with open(shard, "r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert cli.main(["rollback", "--index", output, "--to", "v0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard-00000-of-00002.ann: content differs from the manifest" in err[0], err
    assert cli.main(["rollback", "--index", output, "--to", "v7"]) == 1
    assert "version 'v7' is not published" in capsys.readouterr().err
    holder = lease.Lease(output, "r20261129T000000Z-deadbeef", "v9").acquire()
    try:
        assert cli.main(["rollback", "--index", output, "--to", "v0"]) == 1
    finally:
        holder.release()
    assert "run r20261129T000000Z-deadbeef" in capsys.readouterr().err
    assert _pointer_bytes(output) == latest  # nothing moved
    assert cli.main(["rollback", "--index", output]) == 2  # --to is required


def test_rollback_writes_nothing_when_latest_changes_under_it(two_versions, monkeypatch):
    """The swap is against the LATEST that was read: a publisher sneaking in between wins, the rollback
    writes nothing and says so."""
    output = two_versions
    latest_path = os.path.join(output, layout.LATEST_FILE)
    store = cas.store_for(latest_path)
    real_read = type(store).read
    sneaked = {}

    def read_then_change(self, path):
        got = real_read(self, path)
        if path == latest_path and not sneaked:  # right after the rollback read LATEST, a publisher moves it
            sneaked["pointer"] = layout.Pointer.loads(got[0], path)._replace(snapshot="2026-11-04T00:00:00Z")
            assert real_write(self, path, sneaked["pointer"].dumps(), got[1])
        return got

    real_write = type(store).write_if
    monkeypatch.setattr(type(store), "read", read_then_change)
    with pytest.raises(pub.PublicationError, match="changed while rolling back .* nothing was written"):
        pub.roll_back(output, "v0")
    assert _pointer_bytes(output) == sneaked["pointer"].dumps()  # the publisher's write stands


def test_gc_removes_abandoned_and_replaced_releases_never_the_live_ones(output, small_catalog, tiny_encoders):
    live_version, live_release = check_complete(output)
    abandoned = os.path.join(output, "v0", layout.new_release_id())
    os.makedirs(os.path.join(abandoned, "shards"))
    with open(os.path.join(abandoned, "shards", "shard-00000-of-00001.ann"), "wb") as f:
        f.write(b"partial")
    index_pipeline.run(index_args(small_catalog["catalog_glob"], output, tiny_encoders, "--version", "v0", "--force",
                                  "--snapshot-time", "2026-11-01"))
    index_pipeline.run(index_args(small_catalog["catalog_glob"], output, tiny_encoders, "--version", "v1",
                                  "--snapshot-time", "2026-11-02"))
    v0_live = check_complete(output, "v0/CURRENT")[1]
    dry = run_cli("gc", "--output", output, "--grace-minutes", "0", "--dry-run")
    assert dry.returncode == 0 and "would remove" in dry.stdout and os.path.exists(abandoned)
    # Within the grace period nothing that no pointer names is touched (a run may be writing it).
    assert "0 item(s)" in run_cli("gc", "--output", output).stdout
    done = run_cli("gc", "--output", output, "--grace-minutes", "0")
    assert done.returncode == 0, done.stderr
    assert not os.path.exists(abandoned) and not os.path.exists(os.path.join(output, "v0", live_release))
    assert sorted(p for p in os.listdir(os.path.join(output, "v0")) if not p.startswith(".")) == ["CURRENT", v0_live]
    # --keep 1: v1 (newest, and LATEST) stays, v0 goes entirely.
    done = run_cli("gc", "--output", output, "--keep", "1", "--grace-minutes", "0")
    assert done.returncode == 0 and "old version" in done.stdout
    assert not os.path.exists(os.path.join(output, "v0", layout.CURRENT_FILE))
    assert check_complete(output)[0] == "v1" and live_version == "v0"
    assert run_cli("verify", "--index", output).returncode == 0


# --------------------------------------------------------------------------- hostile rows


def _string_array(values):
    """A string column that may hold invalid UTF-8 (built from raw buffers: Arrow does not validate)."""
    import numpy as np
    import pyarrow as pa

    raw = [v if isinstance(v, bytes) else v.encode() for v in values]
    offsets = np.cumsum([0] + [len(v) for v in raw]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(raw), [None, pa.py_buffer(offsets.tobytes()),
                                                         pa.py_buffer(b"".join(raw))])


def test_hostile_rows_finish_in_bounded_time_with_exact_accounting(small_catalog, tiny_encoders, tmp_path,
                                                                   monkeypatch):
    import faulthandler
    import socket

    import pyarrow as pa
    import pyarrow.parquet as pq

    from embedding import images

    faulthandler.dump_traceback_later(240, exit=True)  # a hang must fail the suite, not stall it
    stop = threading.Event()

    def serve(host, reply):
        listener = socket.create_server((host, 0))
        listener.settimeout(0.1)
        seen = []

        def loop():
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except (TimeoutError, OSError):
                    continue
                path = conn.recv(4096).split(b" ")[1].decode()
                seen.append(path)
                threading.Thread(target=reply, args=(conn, path), daemon=True).start()

        threading.Thread(target=loop, daemon=True).start()
        return listener.getsockname()[1], seen, listener

    def drip_headers(conn, path):  # status line, then one header byte every 0.3 s for two minutes
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for _ in range(400):
            if stop.wait(0.3):
                break
            try:
                conn.sendall(b"X")
            except OSError:
                break
        conn.close()

    secret_port, secret_seen, secret = serve("127.0.0.1", lambda conn, path: conn.close())

    def redirect_or_drip(conn, path):
        if path == "/redirect":
            conn.sendall(f"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{secret_port}/secret\r\n"
                         f"Content-Length: 0\r\n\r\n".encode())
            conn.close()
        else:
            drip_headers(conn, path)

    # 127.0.0.2 plays an outside host (the real classifier refuses every loopback address).
    real = images.refused_address_reason
    monkeypatch.setattr(images, "refused_address_reason", lambda ip: None if ip == "127.0.0.2" else real(ip))
    port, _, outside = serve("127.0.0.2", redirect_or_drip)
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    hostile = {
        "h-fifo": str(fifo),
        "h-slow-headers": f"http://127.0.0.2:{port}/slow.png",
        "h-redirect-to-loopback": f"http://127.0.0.2:{port}/redirect",
        "h-loopback": f"http://127.0.0.1:{secret_port}/direct",
        "h-metadata": "http://169.254.169.254/computeMetadata/v1/",
    }
    ids = list(hostile) + ["h-bad-utf8"]
    pq.write_table(pa.table({
        "item_id": pa.array(ids, pa.string()),
        "title": _string_array([f"hostile {i}".encode() for i in hostile] + [b"caf\xe9 au lait"]),
        "image_uri": pa.array(list(hostile.values()) + [None], pa.string()),
    }), tmp_path / "hostile.parquet")
    catalog_dir = tmp_path / "catalog"
    os.makedirs(catalog_dir)
    for path in small_catalog["files"]:
        shutil.copy(path, catalog_dir)
    shutil.copy(tmp_path / "hostile.parquet", catalog_dir)
    started = time.monotonic()
    try:
        result = index_pipeline.run(index_args(str(catalog_dir / "*.parquet"), tmp_path / "out", tiny_encoders,
                                               "--version", "h", "--image-timeout", "2",
                                               "--max-degraded-fraction", "0.5"))
    finally:
        stop.set()
        faulthandler.cancel_dump_traceback_later()
        secret.close()
        outside.close()
    wall = time.monotonic() - started
    assert wall < 120, wall  # the dripping server alone would hold a fetch for 120 s
    c = result.manifest["counts"]
    good = small_catalog["rows"]
    assert (c["read"], c["indexed"], c["rejected"]) == (good + 6, good + 5, 1)
    assert c["rejected_by_reason"] == {"invalid_value": 1}
    assert c["degraded_by_reason"] == {"image_fetch_failed": 5}
    base = result.release_dir
    degraded = {r["item_id"]: r["message"] for p in result.manifest["tables"]["degraded"]
                for r in pq.read_table(os.path.join(base, p)).to_pylist()}
    assert set(degraded) == set(hostile)
    assert "FIFO" in degraded["h-fifo"]
    assert "loopback" in degraded["h-redirect-to-loopback"] and "redirected to" in degraded["h-redirect-to-loopback"]
    assert "loopback" in degraded["h-loopback"] and "169.254.169.254" in degraded["h-metadata"]
    assert "timed out" in degraded["h-slow-headers"] or "deadline" in degraded["h-slow-headers"]
    assert secret_seen == []  # the loopback service never saw a request, directly or through the redirect
    rejected = [r for p in result.manifest["tables"]["rejected"] for r in pq.read_table(os.path.join(base, p)).to_pylist()]
    assert [(r["item_id"], r["reason"], r["row"]) for r in rejected] == [("h-bad-utf8", "invalid_value", 5)]
    assert "hostile.parquet" in rejected[0]["message"] and "'title'" in rejected[0]["message"]


def test_a_retried_publish_step_never_rewrites_a_sealed_release(small_catalog, tiny_encoders, tmp_path, monkeypatch):
    """Runners retry failed work (Dataflow: 4 times). A retry of the publish step after the first attempt
    sealed the release and switched CURRENT must not rewrite its manifest (a new created_at would no
    longer match the pointer's sha256)."""
    original = index_pipeline._Publish.process
    attempts = []

    def first_attempt_fails_after_current(self, *args, **kwargs):
        real_switch = pub.switch_pointers
        if not attempts:
            def switch_then_fail(output, candidate, *a, **k):
                live, token = pub.read_pointer(os.path.join(output, candidate.version, layout.CURRENT_FILE))
                assert cas.store_for(output).write_if(os.path.join(output, candidate.version, layout.CURRENT_FILE),
                                                      candidate.dumps(), token)
                raise OSError("transient failure after CURRENT moved")

            monkeypatch.setattr(pub, "switch_pointers", switch_then_fail)
        attempts.append(1)
        try:
            yield from original(self, *args, **kwargs)
        except OSError:
            monkeypatch.setattr(pub, "switch_pointers", real_switch)
            time.sleep(1.1)  # created_at has second resolution: a rewrite would change the bytes
            yield from original(self, *args, **kwargs)  # the runner's retry

    monkeypatch.setattr(index_pipeline._Publish, "process", first_attempt_fails_after_current)
    out = tmp_path / "out"
    result = index_pipeline.run(index_args(small_catalog["catalog_glob"], out, tiny_encoders, "--version", "r"))
    assert len(attempts) == 1
    assert check_complete(str(out)) == ("r", result.manifest["release"])
    assert check_complete(str(out), "r/CURRENT") == ("r", result.manifest["release"])


_FAKEGS_CLI = """
import sys
from tests import fake_gcs
from pipelines import cas
fake_gcs.FakeGcsFileSystem.root = sys.argv[1]
cas.register(fake_gcs.SCHEME, lambda: cas.GcsCasStore(fake_gcs.FakeStorageClient(), scheme=fake_gcs.SCHEME))
from catalog_index import cli
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("step", ["before_manifest", "after_manifest", "after_current"])
def test_sigkill_on_the_object_store_then_rerun(step, small_catalog, tiny_encoders, tmp_path):
    """The kill tests again with the output on the fake object store (pointers by generation match)."""
    root = tmp_path / "bucket-root"
    os.makedirs(root)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def run(*args, env=None):
        return subprocess.run([sys.executable, "-c", _FAKEGS_CLI, str(root), *args], capture_output=True, text=True,
                              timeout=300, cwd=repo, env=dict(os.environ, **(env or {})))

    out = "fakegs://bucket/index"
    base = ["index", *index_args(small_catalog["catalog_glob"], out, tiny_encoders, "--shards", "2")]
    assert run(*base, "--version", "v0", "--snapshot-time", "2026-11-01").returncode == 0
    args = [*base, "--version", "v1", "--snapshot-time", "2026-11-02"]
    killed = run(*args, env={pub.FAILPOINT_ENV: step})
    assert killed.returncode == -9, killed.stderr[-2000:]
    local_out = str(root / "bucket" / "index")
    assert check_complete(local_out)[0] == "v0"
    again = run(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert check_complete(local_out)[0] == "v1"
    assert run("verify", "--index", out).returncode == 0


# --------------------------------------------------------------------------- the lease when the launcher only submits


def test_a_job_whose_launcher_holds_no_lease_takes_it_to_publish_and_gives_it_back(output, small_catalog,
                                                                                     tiny_encoders, monkeypatch):
    """What a Flex Template launch leaves to the job: here the whole job runs on the local runner, as if the
    launcher had only submitted it (preflight.is_template_launch answers True), so nobody holds the lease
    until PublishIndex takes it; afterwards LATEST names the new complete version and no lease is left."""
    from pipelines import preflight

    monkeypatch.setattr(preflight, "is_template_launch", lambda options: True)
    taken = []
    real_acquire = lease.Lease.acquire
    monkeypatch.setattr(lease.Lease, "acquire", lambda self: (taken.append(self.owner), real_acquire(self))[1])
    result = index_pipeline.run(index_args(small_catalog["catalog_glob"], output, tiny_encoders, "--version", "v1",
                                           "--snapshot-time", "2026-11-02", "--shards", "2"))
    assert result.manifest is None and "job graph written for version v1" in result.summary()
    assert len(taken) == 1, taken  # by the publication step, once
    assert check_complete(output)[0] == "v1"
    assert not os.path.exists(os.path.join(output, layout.LEASE_FILE))


def test_a_job_that_finds_the_lease_taken_at_publication_moves_no_pointer(output, small_catalog, tiny_encoders,
                                                                          monkeypatch):
    """Another run takes the lease while the submitted job runs: the job's publication fails with the holder's
    name and LATEST stays on the last complete version."""
    from pipelines import preflight
    from schemas.errors import LeaseHeldError

    monkeypatch.setattr(preflight, "is_template_launch", lambda options: True)
    before = check_complete(output)
    real_failpoint = pub.failpoint

    def another_run_starts(name):
        if name == "after_manifest":
            lease.Lease(output, "r20261130T000000Z-0therrun", "v9", seconds=600).acquire()
        real_failpoint(name)

    monkeypatch.setattr(pub, "failpoint", another_run_starts)
    with pytest.raises(LeaseHeldError, match="r20261130T000000Z-0therrun"):
        index_pipeline.run(index_args(small_catalog["catalog_glob"], output, tiny_encoders, "--version", "v1",
                                      "--snapshot-time", "2026-11-02", "--shards", "2"))
    assert check_complete(output) == before
    assert not os.path.exists(os.path.join(output, "v1", layout.CURRENT_FILE))
