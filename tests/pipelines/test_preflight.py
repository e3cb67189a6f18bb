"""Up-front checks (pipelines/preflight.py, issue 11): each failure ends in one line and exit 2, before any
encoder loads; file:// paths work; a Dataflow dry run says it submitted nothing.

Real local filesystem throughout; the object store is tests/fake_gcs.py and Google's credentials are
monkeypatched (``google.auth.default``), never the network.
"""

import json
import logging
import os
import time

import pytest

from catalog_index import cli
from embedding import encoders as enc
from pipelines import files
from pipelines import preflight
from schemas.errors import ConfigError
from tests import fake_gcs


# --------------------------------------------------------------------------- helpers


def _index_argv(catalog, output, encoders, *extra):
    return ["index", "--catalog", catalog, "--output", str(output), "--text-encoder", encoders[0],
            "--image-encoder", encoders[1], *extra]


def _main(capsys, argv):
    """(exit status, stdout, the last stderr line, every stderr line) of cli.main."""
    status = cli.main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    return status, out, (lines[-1] if lines else ""), lines


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails the test (status 1, 'unexpected AssertionError') if any encoder is loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("an encoder was loaded before the up-front checks failed")

    monkeypatch.setattr(enc, "inspect_encoder", refuse)


class _Credentials:
    """Stands in for google.auth credentials: refresh() does what the test says."""

    def __init__(self, refresh=None):
        self._refresh = refresh
        self.token = None
        self.expired = False
        self.valid = True

    def refresh(self, request):
        if self._refresh is not None:
            self._refresh()
        self.token = "fake-token"

    def before_request(self, request, method, url, headers):
        headers["authorization"] = "Bearer fake-token"

    def apply(self, headers, token=None):
        headers["authorization"] = "Bearer fake-token"


def _google_auth(monkeypatch, credentials=None, error=None, project="proj-123"):
    import google.auth

    def default(*args, **kwargs):
        if error is not None:
            raise error
        return credentials or _Credentials(), project

    monkeypatch.setattr(google.auth, "default", default)


def _no_credentials(monkeypatch):
    from google.auth import exceptions

    _google_auth(monkeypatch, error=exceptions.DefaultCredentialsError("Your default credentials were not found."))


DATAFLOW = ["--runner", "DataflowRunner", "--project", "proj-123", "--region", "us-central1",
            "--temp_location", "gs://bucket-x/tmp"]


# --------------------------------------------------------------------------- file:// URIs


def test_file_uris_work_for_catalog_output_and_encoders(sample_catalog, tiny_encoders, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _index_argv("file://" + sample_catalog["catalog_glob"], "file://" + str(out),
                       ["file://" + p for p in tiny_encoders], "--max-rejected-fraction", "0.5",
                       "--image-root", "file://" + sample_catalog["images_dir"])
    status, stdout, last, _ = _main(capsys, argv)
    assert status == 0, last
    assert "published " + str(out) in stdout
    manifest_path = next(out.glob("*/*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    # Everything recorded and handed on is a plain local path.
    assert manifest["catalog"]["pattern"] == sample_catalog["catalog_glob"]
    assert all(not f.startswith("file:") for f in manifest["catalog"]["files"])
    assert manifest["encoders"]["text"]["handle"] == tiny_encoders[0]
    assert manifest["encoders"]["image"]["handle"] == tiny_encoders[1]
    assert not any(p.name.startswith(preflight.PROBE_PREFIX) for p in out.iterdir())
    # The readers take file:// too.
    assert cli.main(["verify", "--index", "file://" + str(out)]) == 0
    assert cli.main(["query", "--index", "file://" + str(out), "--text", "mug", "--k", "1"]) == 0
    assert cli.main(["gc", "--output", "file://" + str(out), "--dry-run"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-2])
    assert answer["results"]


def test_index_and_train_options_normalise_every_path_flag():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.options import IndexOptions
    from pipelines.train_options import TrainOptions

    opts = PipelineOptions(["--catalog", "file:///c/*.parquet", "--output", "FILE:///o", "--text-encoder",
                            "file:///m/t", "--image-encoder", "gs://b/m/i", "--fusion-model", "file:///f",
                            "--model-cache", "file:///cache", "--image-root", "file:///img/",
                            "--reuse-from", "file:///o/v1"]).view_as(IndexOptions)
    assert opts.check() == "/o"
    assert [getattr(opts, a) for a, _ in preflight.INDEX_PATHS] == [
        "/c/*.parquet", "/o", "/m/t", "gs://b/m/i", "/f", "/cache", "/img/", "/o/v1"]
    train = PipelineOptions(["--clicks", "file:///k/*.parquet", "--index", "file:///i", "--output", "file:///m/",
                             "--image-root", "file:///img", "--cache-dir", "file:///cache"]).view_as(TrainOptions)
    assert train.check() == "/m"
    assert [getattr(train, a) for a, _ in preflight.TRAIN_PATHS] == ["/k/*.parquet", "/i", "/m/", "/img", "/cache"]


# --------------------------------------------------------------------------- the output root


def test_output_under_proc_fails_before_any_encoder_loads(sample_catalog, tiny_encoders, no_model_loads, capsys):
    start = time.perf_counter()
    status, _, last, lines = _main(capsys, _index_argv(sample_catalog["catalog_glob"], "/proc/catalog-index-x",
                                                       tiny_encoders))
    assert status == 2, lines
    assert last == ("catalog-index index: error: --output '/proc/catalog-index-x': cannot create the folder in /proc "
                    "(No such file or directory); pass a folder this user can create and write")
    assert not any("Traceback" in line for line in lines)
    assert time.perf_counter() - start < 30


def test_output_that_is_a_file_fails_with_one_line(sample_catalog, tiny_encoders, tmp_path, no_model_loads, capsys):
    existing = tmp_path / "hostname"
    existing.write_text("x\n")
    status, _, last, _ = _main(capsys, _index_argv(sample_catalog["catalog_glob"], existing, tiny_encoders))
    assert status == 2
    assert last == (f"catalog-index index: error: --output '{existing}' is a file, not a folder; pass a folder "
                    f"(it is created when missing)")
    assert existing.read_text() == "x\n"


def test_output_below_a_file_cannot_be_created(sample_catalog, tiny_encoders, tmp_path, no_model_loads, capsys):
    (tmp_path / "f").write_text("x")
    status, _, last, _ = _main(capsys, _index_argv(sample_catalog["catalog_glob"], tmp_path / "f" / "out",
                                                   tiny_encoders))
    assert status == 2
    assert last == (f"catalog-index index: error: --output '{tmp_path / 'f' / 'out'}': cannot create the folder, "
                    f"{tmp_path / 'f'} is a file; pass a folder path")


def test_a_missing_output_folder_is_checked_then_created_and_logged(tmp_path, caplog):
    out = tmp_path / "a" / "b" / "out"
    preflight.check_output(str(out))  # can be created: nothing is made yet
    assert list(tmp_path.iterdir()) == []
    with caplog.at_level(logging.INFO, logger="pipelines.preflight"):
        preflight.create_output("file://" + str(out))
    assert out.is_dir() and list(out.iterdir()) == []
    assert [r.getMessage() for r in caplog.records] == [f"created the output folder {out} (--output did not exist)"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines.preflight"):
        preflight.check_output(str(out))
        preflight.create_output(str(out))  # exists now: nothing to say
    assert not caplog.records and list(out.iterdir()) == []


def test_a_run_refused_later_leaves_no_output_folder(sample_catalog, tiny_encoders, tmp_path, capsys):
    out = tmp_path / "new" / "out"
    status, _, last, _ = _main(capsys, _index_argv(sample_catalog["catalog_glob"], out,
                                                   (str(tmp_path / "no-model"), tiny_encoders[1])))
    assert status == 2 and "no-model" in last
    assert not (tmp_path / "new").exists()


def test_output_on_an_object_store_is_probed_and_left_clean(fake_gcs_root):
    preflight.check_output("fakegs://bucket/index")
    assert files.list_files("fakegs://bucket") == []


def test_an_object_store_output_that_cannot_be_written(fake_gcs_root):
    with open(os.path.join(fake_gcs_root, "bucket"), "w") as f:  # "bucket" is an object: nothing fits below it
        f.write("x")
    with pytest.raises(ConfigError, match=r"^--output 'fakegs://bucket/index' is not writable \(Not a directory\); "
                                          r"pass a folder or bucket path this account can write"):
        preflight.check_output("fakegs://bucket/index")


def test_an_object_store_output_that_cannot_delete(fake_gcs_root, monkeypatch):
    def refuse(self, paths):
        raise PermissionError("403 storage.objects.delete denied")

    monkeypatch.setattr(fake_gcs.FakeGcsFileSystem, "delete", refuse)
    with pytest.raises(ConfigError, match="could be written but not deleted .*needs delete permission"):
        preflight.check_output("fakegs://bucket/index")


def test_an_object_store_probe_that_hangs_times_out(fake_gcs_root, monkeypatch):
    def hang(self, *args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(fake_gcs.FakeGcsFileSystem, "create", hang)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="did not finish within 0.3 s"):
        preflight.check_output("fakegs://bucket/index", timeout=0.3)
    assert time.perf_counter() - start < 5


def test_an_output_filesystem_without_compare_and_swap_is_refused_up_front():
    with pytest.raises(ConfigError, match="hdfs:// is not supported"):
        preflight.check_output("hdfs://cluster/index")


def test_train_checks_its_models_folder_before_reading_the_index(tmp_path, capsys):
    status, _, last, _ = _main(capsys, ["train", "--clicks", str(tmp_path / "none-*.parquet"), "--index",
                                        str(tmp_path / "no-index"), "--output", "/proc/catalog-index-models"])
    assert status == 2
    assert last.startswith("catalog-index train: error: --output '/proc/catalog-index-models': cannot create the "
                           "folder in /proc")


# --------------------------------------------------------------------------- inputs


def test_a_missing_image_root_fails_before_any_encoder_loads(sample_catalog, tiny_encoders, tmp_path,
                                                            no_model_loads, capsys):
    status, _, last, _ = _main(capsys, _index_argv(sample_catalog["catalog_glob"], tmp_path / "o", tiny_encoders,
                                                   "--image-root", str(tmp_path / "no-images")))
    assert status == 2
    assert last == (f"catalog-index index: error: --image-root '{tmp_path / 'no-images'}' does not exist; pass the "
                    f"folder the images are below")


def test_an_image_root_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"):
        preflight.check_readable_root(str(tmp_path / "f"))
    preflight.check_readable_root("file://" + str(tmp_path))


def test_an_empty_object_store_image_root_is_a_warning(fake_gcs_root, caplog):
    with caplog.at_level(logging.WARNING, logger="pipelines.preflight"):
        preflight.check_readable_root("fakegs://bucket/images/")
    assert "holds no object" in caplog.text
    files.write_bytes("fakegs://bucket/images/a.png", b"x")
    preflight.check_readable_root("fakegs://bucket/images/")


def test_a_catalog_folder_names_the_glob_to_pass(sample_catalog, tiny_encoders, tmp_path, no_model_loads, capsys):
    folder = os.path.dirname(sample_catalog["catalog_glob"])
    status, _, last, _ = _main(capsys, _index_argv(folder, tmp_path / "o", tiny_encoders))
    assert status == 2
    assert last == (f"catalog-index index: error: --catalog {folder!r}: {folder} is a folder; pass its files, "
                    f"e.g. '{folder}/*.parquet'")


# --------------------------------------------------------------------------- runners


@pytest.mark.parametrize("runner, local", [
    (None, True), ("DirectRunner", True), ("direct", True), ("PrismRunner", True), ("prism", True),
    ("SwitchingDirectRunner", True), ("BundleBasedDirectRunner", True), ("FnApiRunner", True),
    ("apache_beam.runners.direct.direct_runner.DirectRunner", True), ("InteractiveRunner", True),
    ("DataflowRunner", False), ("dataflow", False), ("FlinkRunner", False), ("PortableRunner", False),
])
def test_local_runners_are_beams(runner, local):
    assert preflight.is_local_runner(runner) is local


def _opts(*argv):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.options import IndexOptions

    return PipelineOptions(list(argv)).view_as(IndexOptions)


def test_a_loopback_portable_runner_shares_this_disk():
    assert preflight.workers_share_disk(_opts("--runner", "FlinkRunner", "--environment_type", "LOOPBACK"))
    assert not preflight.workers_share_disk(_opts("--runner", "FlinkRunner"))


@pytest.mark.parametrize("flag, value, words", [
    ("--catalog", "/data/c/*.parquet", ["--catalog '/data/c/*.parquet' is on this machine's disk",
                                        "DataflowRunner workers cannot see", "gs://"]),
    ("--output", "file:///data/out", ["--output '/data/out' is on this machine's disk"]),
    ("--text-encoder", "builtin:minilm-l6-v2", [
        "--text-encoder builtin:minilm-l6-v2 is converted into this machine's model cache",
        "`catalog-index models export --to gs://BUCKET/models minilm-l6-v2`",
        "--text-encoder gs://BUCKET/models/minilm-l6-v2"]),
    ("--text-encoder", "auto", ["--text-encoder auto picks a built-in model",
                                "`catalog-index models export --to gs://BUCKET/models`",
                                "minilm-l6-v2 or use-multilingual-v3"]),
    ("--image-encoder", "/models/image", ["--image-encoder '/models/image' is a folder on this machine",
                                          "gs://BUCKET/models/"]),
    ("--fusion-model", "/models/fusion", ["--fusion-model '/models/fusion' is a folder on this machine"]),
    ("--image-root", "/data/images/", ["--image-root '/data/images/' is on this machine's disk"]),
    ("--reuse-from", "/data/out/v1", ["--reuse-from '/data/out/v1' is on this machine's disk"]),
])
def test_a_remote_runner_refuses_local_paths_naming_the_flag(flag, value, words, tmp_path, no_model_loads,
                                                              monkeypatch, capsys):
    monkeypatch.setenv("CATALOG_INDEX_MODEL_CACHE", str(tmp_path / "cache"))
    remote = {"--catalog": "gs://bucket-x/c/*.parquet", "--output": "gs://bucket-x/out",
              "--text-encoder": "gs://bucket-x/m/text", "--image-encoder": "gs://bucket-x/m/image"}
    remote[flag] = value
    argv = ["index"] + [a for kv in remote.items() for a in kv] + DATAFLOW
    status, _, last, _ = _main(capsys, argv)
    assert status == 2, last
    assert last.startswith("catalog-index index: error: ")
    for word in words:
        assert word in last, (word, last)


def test_builtin_encoders_from_a_bucket_cache_are_not_local(monkeypatch):
    opts = _opts(*DATAFLOW)
    preflight.check_worker_paths(opts, [("--text-encoder", "builtin:minilm-l6-v2", preflight.MODEL)],
                                 model_cache="gs://bucket-x/cache")
    preflight.check_worker_paths(opts, [("--text-encoder", "https://tfhub.dev/x/1", preflight.MODEL)])


def test_builtin_encoders_are_accepted_from_the_model_cache_the_worker_image_carries(tmp_path, monkeypatch):
    """The launcher and worker images set CATALOG_INDEX_IMAGE_MODEL_CACHE to their (shared) cache: built-in
    handles and auto resolve there on the workers too. Any other cache is still this machine's."""
    from embedding import builtin
    from schemas.errors import ConfigError

    baked = str(tmp_path / "opt-models")
    opts = _opts(*DATAFLOW)
    handles = [("--text-encoder", "builtin:minilm-l6-v2", preflight.MODEL), ("--text-encoder", "auto", preflight.MODEL)]
    monkeypatch.setenv(builtin.CACHE_ENV, baked)
    with pytest.raises(ConfigError, match=f"or launch from the launcher or worker image.*{builtin.IMAGE_CACHE_ENV}"):
        preflight.check_worker_paths(opts, handles[:1])  # no image says so: refused
    monkeypatch.setenv(builtin.IMAGE_CACHE_ENV, baked + "/")
    preflight.check_worker_paths(opts, handles)  # the image's cache: accepted
    for other in (str(tmp_path / "elsewhere"),):  # --model-cache pointing elsewhere: this machine's again
        with pytest.raises(ConfigError, match="is converted into this machine's model cache"):
            preflight.check_worker_paths(opts, handles[:1], model_cache=other)


@pytest.mark.parametrize("drop, add, words", [
    ("--project", [], ["DataflowRunner needs --project"]),
    (None, ["--project", "123456"], ["--project '123456' is not a project ID"]),
    ("--temp_location", [], ["DataflowRunner needs --temp_location", "gs://BUCKET/tmp"]),
    (None, ["--temp_location", "/tmp/x"], ["--temp_location '/tmp/x' is not a gs://BUCKET/FOLDER path"]),
    (None, ["--temp_location", "gs://b/tmp"], ["--temp_location 'gs://b/tmp' is not a gs://BUCKET/FOLDER path"]),
    (None, ["--staging_location", "staging"], ["--staging_location 'staging' is not a gs://BUCKET/FOLDER path"]),
])
def test_dataflow_needs_project_and_temp_location(drop, add, words):
    argv = list(DATAFLOW)
    if drop:
        i = argv.index(drop)
        del argv[i:i + 2]
    if "--project" in add or "--temp_location" in add:
        flag = add[0]
        i = argv.index(flag)
        del argv[i:i + 2]
    with pytest.raises(ConfigError) as caught:
        preflight.check_dataflow(_opts(*argv, *add))
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_dataflow_needs_a_region_when_nothing_supplies_one(monkeypatch, tmp_path):
    monkeypatch.delenv("CLOUDSDK_COMPUTE_REGION", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcloud to ask
    argv = [a for a in DATAFLOW if a not in ("--region", "us-central1")]
    with pytest.raises(ConfigError, match=r"needs --region \(e.g. --region us-central1\)"):
        preflight.check_dataflow(_opts(*argv))
    monkeypatch.setenv("CLOUDSDK_COMPUTE_REGION", "europe-west1")
    preflight.check_dataflow(_opts(*argv))


# --------------------------------------------------------------------------- credentials


def test_dataflow_without_credentials_is_one_line_not_minutes_of_retries(no_model_loads, monkeypatch, capsys):
    _no_credentials(monkeypatch)
    argv = ["index", "--catalog", "gs://bucket-x/c/*.parquet", "--output", "gs://bucket-x/out", "--text-encoder",
            "gs://bucket-x/m/text", "--image-encoder", "gs://bucket-x/m/image", *DATAFLOW]
    start = time.perf_counter()
    status, _, last, _ = _main(capsys, argv)
    assert status == 2
    assert last == ("catalog-index index: error: DataflowRunner needs Google Cloud credentials and none were found; "
                    "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a "
                    "service account key file")
    assert time.perf_counter() - start < 30


def test_a_gs_output_on_the_local_runner_needs_credentials_too(sample_catalog, tiny_encoders, no_model_loads,
                                                              monkeypatch, capsys):
    _no_credentials(monkeypatch)
    status, _, last, _ = _main(capsys, _index_argv(sample_catalog["catalog_glob"], "gs://bucket-x/out",
                                                   tiny_encoders))
    assert status == 2
    assert "error: --output 'gs://bucket-x/out' needs Google Cloud credentials and none were found; run" in last


def test_credentials_that_do_not_refresh(monkeypatch):
    from google.auth import exceptions

    def refuse():
        raise exceptions.RefreshError("invalid_grant: Token has been expired or revoked.")

    _google_auth(monkeypatch, credentials=_Credentials(refresh=refuse))
    with pytest.raises(ConfigError, match=r"DataflowRunner needs Google Cloud credentials, and they do not work "
                                          r"\(RefreshError: invalid_grant"):
        preflight.check_credentials("DataflowRunner")


def test_a_token_refresh_that_hangs_ends_at_the_deadline(monkeypatch):
    _google_auth(monkeypatch, credentials=_Credentials(refresh=lambda: time.sleep(60)))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="no access token came within 0.2 s"):
        preflight.check_credentials("DataflowRunner", timeout=0.2)
    assert time.perf_counter() - start < 5


def test_working_credentials_name_their_project(monkeypatch):
    _google_auth(monkeypatch, project="proj-9")
    assert preflight.check_credentials("DataflowRunner") == "proj-9"


# --------------------------------------------------------------------------- dry runs


def test_dry_run_on_a_local_runner_is_refused(sample_catalog, tiny_encoders, tmp_path, no_model_loads, capsys):
    status, _, last, _ = _main(capsys, _index_argv(sample_catalog["catalog_glob"], tmp_path / "o", tiny_encoders,
                                                   "--dry_run=True"))
    assert status == 2
    assert last == ("catalog-index index: error: --dry_run is a DataflowRunner option; DirectRunner would run the "
                    "pipeline and publish for real. Remove --dry_run, or add --runner DataflowRunner")
    status, _, last, _ = _main(capsys, _index_argv(sample_catalog["catalog_glob"], tmp_path / "o", tiny_encoders,
                                                   "--dry_run=maybe"))
    assert status == 2 and "--dry_run takes True or False, got 'maybe'" in last


def test_dry_run_false_means_false():
    from apache_beam.options.pipeline_options import TestOptions

    opts = _opts("--dry_run=False", *DATAFLOW)
    assert preflight.check_dry_run(opts) is False
    assert opts.view_as(TestOptions).dry_run is False  # Beam itself would take the string "False" as true
    assert preflight.check_dry_run(_opts("--dry_run=True", *DATAFLOW)) is True


def test_train_on_a_remote_runner_refuses_local_paths_and_a_local_dry_run(tmp_path, capsys):
    base = ["train", "--clicks", str(tmp_path / "c-*.parquet"), "--index", str(tmp_path / "i"), "--output",
            str(tmp_path / "m")]
    status, _, last, _ = _main(capsys, base + DATAFLOW)
    assert status == 2
    assert last == (f"catalog-index train: error: --clicks {str(tmp_path / 'c-*.parquet')!r} is on this machine's "
                    f"disk, which DataflowRunner workers cannot see; put it in a bucket and pass its gs:// path")
    status, _, last, _ = _main(capsys, base + ["--dry_run=True"])
    assert status == 2 and "--dry_run is a DataflowRunner option" in last
    assert not (tmp_path / "m").exists()


def _to_ram(local_dir: str, ram_dir: str) -> str:
    """Copies a SavedModel folder into TensorFlow's in-memory filesystem: a model path that is not local."""
    import tensorflow as tf

    for root, _, names in tf.io.gfile.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        target = ram_dir if rel == "." else ram_dir + "/" + rel.replace(os.sep, "/")
        tf.io.gfile.makedirs(target)
        for name in names:
            tf.io.gfile.copy(os.path.join(root, name), target + "/" + name, overwrite=True)
    return ram_dir


def test_a_dataflow_dry_run_says_nothing_was_submitted(sample_catalog, tiny_encoders, fake_gcs_root, monkeypatch,
                                                       capsys):
    import uuid

    _google_auth(monkeypatch)  # Beam's launcher asks google.auth too
    for src in sorted(files.match_paths(sample_catalog["catalog_glob"], "--catalog")):
        with open(src, "rb") as f:
            files.write_bytes(f"fakegs://bucket/catalog/{os.path.basename(src)}", f.read())
    ram = f"ram://preflight-{uuid.uuid4().hex}"
    encoders = (_to_ram(tiny_encoders[0], ram + "/text"), _to_ram(tiny_encoders[1], ram + "/image"))
    argv = _index_argv("fakegs://bucket/catalog/*.parquet", "fakegs://bucket/index", encoders, *DATAFLOW,
                       "--dry_run=True")
    status, stdout, last, _ = _main(capsys, argv)
    assert status == 0, last
    assert stdout.strip().splitlines()[-1].startswith("dry run: nothing submitted")
    assert "pipeline submitted" not in stdout
    assert files.list_files("fakegs://bucket/index") == []  # no pointer, no release, no probe, no lease


def test_train_with_a_gs_index_needs_credentials_before_reading_it(tmp_path, monkeypatch, capsys):
    _no_credentials(monkeypatch)
    status, _, last, _ = _main(capsys, ["train", "--clicks", str(tmp_path / "c-*.parquet"), "--index",
                                        "gs://bucket-x/index", "--output", str(tmp_path / "m")])
    assert status == 2
    assert last.startswith("catalog-index train: error: --index 'gs://bucket-x/index' needs Google Cloud "
                           "credentials and none were found")
