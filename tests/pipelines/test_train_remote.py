"""`catalog-index train` for workers that do not share this disk (Dataflow): every path remote, the examples in
MODELS_DIR/_work/<version>/, training in the job's fit step, the lease taken by that step when the launcher
holds none (a Flex Template launch).

Fake GCS (tests/fake_gcs.py, scheme fakegs://) and TensorFlow's ram:// filesystem stand in for the buckets.
The job itself runs on the local runner with ``preflight.workers_share_disk`` answering False, so the plan
that runs is the remote one: the release read from the bucket, the work folder on the bucket.
"""

import hashlib
import io
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import files, preflight
from schemas import layout
from tests.pipelines.test_preflight import _to_ram
from tests.pipelines.test_train_pipeline import _clicks
from tests.search.conftest import publish


class _BeamGfile:
    """search.release reads remote roots through tensorflow.io.gfile; fakegs:// is a Beam filesystem only, so
    this answers the three calls it makes through Beam's FileSystems (the same fake bucket)."""

    @staticmethod
    def exists(path):
        return files.exists(path)

    @staticmethod
    def GFile(path, mode="rb"):
        assert mode == "rb", mode
        return io.BytesIO(files.read_bytes(path))

    @staticmethod
    def copy(source, dest, overwrite=False):
        with open(dest, "wb") as f:
            f.write(files.read_bytes(source))


@pytest.fixture
def remote_shop(tiny_encoders, fake_gcs_root, tmp_path, monkeypatch):
    """A 120-item index published to fakegs://bucket/index with ram:// encoders, and a text-only click log in
    fakegs://bucket/clicks/ (photo queries would name this machine's image files)."""
    from catalog_index import sample

    catalog = sample.generate_catalog(str(tmp_path / "catalog"), n_items=120, seed=31, bad_rows=False)
    ram = f"ram://train-remote-{uuid.uuid4().hex}"
    encoders = (_to_ram(tiny_encoders[0], ram + "/text"), _to_ram(tiny_encoders[1], ram + "/image"))
    publish(catalog["catalog_glob"], "fakegs://bucket/index", encoders, "v1", "2026-11-01", "--dimension", "32",
            "--shards", "1")
    table = pa.concat_tables([pq.read_table(f) for f in catalog["files"]])
    items = [r for r in table.to_pylist() if r.get("image_uri")]
    local = tmp_path / "clicks.parquet"
    _clicks({"items": items}, local)
    text_only = pq.read_table(local).filter(pa.compute.is_valid(pq.read_table(local).column("query")))
    pq.write_table(text_only, local)
    files.write_bytes("fakegs://bucket/clicks/part-0.parquet", local.read_bytes())
    from search import release

    monkeypatch.setattr(release, "_remote_fs", lambda: _BeamGfile)
    return {"rows": text_only.num_rows}


def test_train_with_remote_workers_reads_and_writes_only_the_buckets(remote_shop, tmp_path, monkeypatch):
    from pipelines import train_fit, train_pipeline

    monkeypatch.setattr(preflight, "workers_share_disk", lambda options: False)
    seen = {}
    real_fit = train_fit.fit_and_publish

    def fit(plan, summary):  # what the fit step was given: the remote plan
        seen.update(release_dir=plan.release_dir, work_dir=plan.work_dir, examples=list(summary.paths["examples"]))
        assert files.list_files(plan.work_dir), "the examples are in the work folder while the fit step runs"
        return real_fit(plan, summary)

    monkeypatch.setattr(train_fit, "fit_and_publish", fit)
    result = train_pipeline.run(["--clicks", "fakegs://bucket/clicks/*.parquet", "--index", "fakegs://bucket/index",
                                 "--output", "fakegs://bucket/models", "--epochs", "3", "--batch-size", "16",
                                 "--models-version", "m1", "--cache-dir", str(tmp_path / "cache")])
    assert seen["release_dir"].startswith("fakegs://bucket/index/v1/"), seen
    assert seen["work_dir"] == "fakegs://bucket/models/_work/m1", seen
    assert seen["examples"] and all(p.startswith("fakegs://bucket/models/_work/m1/examples-") for p in seen["examples"])
    # The job read the clicks, trained, sealed and promoted; the driver read that back.
    assert result.promoted and result.training["data"]["read"] == remote_shop["rows"]
    assert result.training["index"]["root"] == "fakegs://bucket/index"
    training = files.read_bytes("fakegs://bucket/models/m1/" + layout.TRAINING_FILE)
    pointer = layout.ModelsPointer.loads(files.read_bytes("fakegs://bucket/models/LATEST"), where="LATEST")
    assert pointer.version == "m1"
    assert pointer.training_sha256 == hashlib.sha256(training).hexdigest()
    # The work folder is gone and the lease given back: the bucket holds LATEST and the version only.
    left = {files.relative(p, "fakegs://bucket/models").split("/")[0] for p in files.list_files("fakegs://bucket/models")}
    assert left == {"LATEST", "m1"}, left


def test_a_refused_remote_run_keeps_the_evidence_and_removes_the_work_folder(remote_shop, tmp_path, monkeypatch):
    from pipelines import train_pipeline
    from schemas.errors import DataError

    monkeypatch.setattr(preflight, "workers_share_disk", lambda options: False)
    with pytest.raises(DataError, match="no train rows") as caught:
        train_pipeline.run(["--clicks", "fakegs://bucket/clicks/*.parquet", "--index", "fakegs://bucket/index",
                            "--output", "fakegs://bucket/models", "--eval-days", "30", "--models-version", "m2",
                            "--cache-dir", str(tmp_path / "cache")])
    assert "rejected rows and summary in fakegs://bucket/models/m2" in str(caught.value)
    names = {p.rsplit("/", 1)[-1] for p in files.list_files("fakegs://bucket/models")}
    assert "summary.json" in names and layout.TRAINING_FILE not in names and "LATEST" not in names, names
    assert not files.exists("fakegs://bucket/models/_lease.json")
    # The examples stay for a retried attempt and the operator (deploy/README.md: a failed job leaves them).
    assert files.list_files("fakegs://bucket/models/_work/m2")


def test_train_on_remote_workers_refuses_an_index_whose_encoders_are_local_folders(tiny_encoders, fake_gcs_root,
                                                                                   tmp_path, monkeypatch):
    from search import release

    monkeypatch.setattr(release, "_remote_fs", lambda: _BeamGfile)
    """The index was published with encoders on this machine's disk: remote workers could not encode the queries."""
    from catalog_index import sample
    from pipelines import train_pipeline
    from schemas.errors import ConfigError

    catalog = sample.generate_catalog(str(tmp_path / "catalog"), n_items=20, seed=3, bad_rows=False)
    publish(catalog["catalog_glob"], "fakegs://bucket/index", tiny_encoders, "v1", "2026-11-01")
    files.write_bytes("fakegs://bucket/clicks/part-0.parquet", b"not read: the check comes first")
    monkeypatch.setattr(preflight, "workers_share_disk", lambda options: False)
    with pytest.raises(ConfigError, match="the index's text encoder .* is a folder on this machine"):
        train_pipeline.run(["--clicks", "fakegs://bucket/clicks/*.parquet", "--index", "fakegs://bucket/index",
                            "--output", "fakegs://bucket/models", "--cache-dir", str(tmp_path / "cache")])
    assert not files.exists("fakegs://bucket/models/_lease.json")


def test_a_retried_fit_step_never_rewrites_a_sealed_version(remote_shop, tmp_path, monkeypatch):
    """Dataflow retries a failed bundle: an attempt that sealed (and promoted) the version before failing must
    not train again and overwrite what LATEST's checksum names."""
    from pipelines import train_fit, train_pipeline
    from training import model as tm

    monkeypatch.setattr(preflight, "workers_share_disk", lambda options: False)
    calls = []
    real_fit = train_fit.fit_and_publish
    monkeypatch.setattr(train_fit, "fit_and_publish", lambda plan, summary: (calls.append((plan, summary)),
                                                                                  real_fit(plan, summary))[1])
    train_pipeline.run(["--clicks", "fakegs://bucket/clicks/*.parquet", "--index", "fakegs://bucket/index",
                        "--output", "fakegs://bucket/models", "--epochs", "2", "--batch-size", "16",
                        "--models-version", "m3", "--cache-dir", str(tmp_path / "cache")])
    before = {p: files.read_bytes(p) for p in files.list_files("fakegs://bucket/models")}
    monkeypatch.setattr(tm, "train", lambda *a, **k: pytest.fail("a sealed version was trained again"))
    real_fit(*calls[0])  # the retried attempt
    after = {p: files.read_bytes(p) for p in files.list_files("fakegs://bucket/models")}
    assert after == before


def test_a_train_job_whose_launcher_holds_no_lease_takes_it_for_its_publication(remote_shop, tmp_path,
                                                                                monkeypatch):
    """A Flex Template launch leaves the lease to the job: run here on the local runner as if only submitted."""
    from pipelines import lease, train_pipeline

    monkeypatch.setattr(preflight, "workers_share_disk", lambda options: False)
    monkeypatch.setattr(preflight, "is_template_launch", lambda options: True)
    taken = []
    real_acquire = lease.Lease.acquire
    monkeypatch.setattr(lease.Lease, "acquire", lambda self: (taken.append(self.owner), real_acquire(self))[1])
    result = train_pipeline.run(["--clicks", "fakegs://bucket/clicks/*.parquet", "--index", "fakegs://bucket/index",
                                 "--output", "fakegs://bucket/models", "--epochs", "2", "--batch-size", "16",
                                 "--models-version", "m4", "--cache-dir", str(tmp_path / "cache")])
    assert result.mode == train_pipeline.LAUNCHED and "job graph written for models version m4" in result.summary()
    assert taken == ["m4"]  # by the fit step, once
    pointer = layout.ModelsPointer.loads(files.read_bytes("fakegs://bucket/models/LATEST"), where="LATEST")
    assert pointer.version == "m4"
    assert not files.exists("fakegs://bucket/models/_lease.json")
