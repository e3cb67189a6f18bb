"""Flex Template metadata is generated from the CLI's options and cannot drift (issue 12).

The checked-in deploy/dataflow/{index,train}/metadata.json are regenerated through the real command
(`catalog-index deploy template`) and compared byte for byte; both validate against the JSON Schema written
down from Dataflow's TemplateMetadata/ParameterMetadata reference; required flags, defaults and the set of
flags agree with the options classes. Then the index graph is built with Dataflow options and a dry run
(fake GCS from tests/pipelines/test_preflight.py, no cloud), through the template launcher's main.py too.
"""

import argparse
import importlib.util
import json
import os
import re

import pytest

from catalog_index import cli
from pipelines import files
from pipelines import templates
from schemas.errors import UsageError
# Credentials and dry-run helpers of the preflight tests (fixtures included; fake_gcs_root is in conftest).
from tests.pipelines.test_preflight import (DATAFLOW, _google_auth, _index_argv, _main, _to_ram,  # noqa: F401
                                            no_model_loads)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATAFLOW_DIR = os.path.join(ROOT, "deploy", "dataflow")
SCHEMA = os.path.join(DATAFLOW_DIR, "flex_template_metadata.schema.json")
REQUIRED = {"index": {"catalog", "output"}, "train": {"clicks", "index", "output"}}


def _checked_in(pipeline):
    with open(os.path.join(DATAFLOW_DIR, pipeline, "metadata.json"), "rb") as f:
        return f.read()


def _load(pipeline):
    return json.loads(_checked_in(pipeline))


def _params(pipeline):
    return {p["name"]: p for p in _load(pipeline)["parameters"]}


def _main_py():
    spec = importlib.util.spec_from_file_location("flex_template_main", os.path.join(DATAFLOW_DIR, "main.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- no drift


@pytest.mark.parametrize("pipeline", templates.PIPELINES)
def test_the_checked_in_metadata_is_what_the_command_generates(pipeline, tmp_path, capsys):
    out = tmp_path / "out" / pipeline
    assert cli.main(["deploy", "template", "--pipeline", pipeline, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "metadata.json")
    generated = (out / "metadata.json").read_bytes()
    assert generated == _checked_in(pipeline), (
        f"deploy/dataflow/{pipeline}/metadata.json is stale: run `catalog-index deploy template --pipeline "
        f"{pipeline} --out deploy/dataflow/{pipeline}`")
    assert generated.endswith(b"}\n") and b"\r" not in generated
    assert generated.decode() == json.dumps(json.loads(generated), indent=2, sort_keys=True,
                                            ensure_ascii=False) + "\n"  # sorted and stable
    assert templates.render(pipeline) == templates.render(pipeline)


def test_the_hand_written_metadata_is_gone():
    assert not os.path.exists(os.path.join(DATAFLOW_DIR, "metadata.json"))


def test_deploy_refuses_an_unknown_pipeline_with_one_line(tmp_path, capsys):
    status, _, last, _ = _main(capsys, ["deploy", "template", "--pipeline", "backfill", "--out", str(tmp_path)])
    assert status == 2
    assert last.startswith("catalog-index deploy: error: argument --pipeline: invalid choice: 'backfill'")
    status, _, last, _ = _main(capsys, ["deploy", "template", "--pipeline", "index"])
    assert status == 2 and "--out" in last
    assert not os.listdir(tmp_path)
    (tmp_path / "a-file").write_text("x")
    status, _, last, _ = _main(capsys, ["deploy", "template", "--pipeline", "index", "--out", str(tmp_path / "a-file")])
    assert status == 2
    assert last == f"catalog-index deploy: error: --out {str(tmp_path / 'a-file')!r} is a file, not a folder; pass " \
                   f"a folder (it is created when missing)"


def test_deploy_writes_to_file_uris_and_object_stores(tmp_path, fake_gcs_root, capsys):
    assert cli.main(["deploy", "template", "--pipeline", "train", "--out", "file://" + str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "metadata.json").read_bytes() == _checked_in("train")
    assert cli.main(["deploy", "template", "--pipeline", "index", "--out", "fakegs://bucket/templates/index"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "fakegs://bucket/templates/index/metadata.json"
    with open(os.path.join(fake_gcs_root, "bucket", "templates", "index", "metadata.json"), "rb") as f:
        assert f.read() == _checked_in("index")


# --------------------------------------------------------------------------- the format


@pytest.mark.parametrize("pipeline", templates.PIPELINES)
def test_the_metadata_validates_against_the_flex_template_schema(pipeline):
    import jsonschema

    with open(SCHEMA, encoding="utf-8") as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(_load(pipeline)), key=str)
    assert not errors, "\n".join(e.message for e in errors)


def test_the_schema_refuses_what_dataflow_would_not_take():
    import jsonschema

    with open(SCHEMA, encoding="utf-8") as f:
        validator = jsonschema.Draft202012Validator(json.load(f))
    good = {"name": "t", "parameters": [{"name": "a_b", "label": "A", "helpText": "h"}]}
    assert validator.is_valid(good)
    for bad in ({"name": "t", "parameters": [{"name": "a-b", "label": "A", "helpText": "h"}]},  # a dash
                {"name": "t", "parameters": [{"name": "a", "label": "A"}]},  # no helpText
                {"name": "t", "parameters": [{"name": "a", "label": "A", "helpText": "h", "isOptional": "yes"}]},
                {"name": "t", "parameters": [{"name": "a", "label": "A", "helpText": "h", "defaultValue": 1}]},
                {"name": "t", "parameters": [{"name": "a", "label": "A", "helpText": "h", "optional": True}]},
                {"name": "t", "parameters": [{"name": "a", "label": "A", "helpText": "h", "paramType": "INT"}]}):
        assert not validator.is_valid(bad), bad


# --------------------------------------------------------------------------- agreement with the options


@pytest.mark.parametrize("pipeline", templates.PIPELINES)
def test_every_app_flag_is_a_parameter_under_a_spelling_the_options_accept(pipeline):
    from pipelines import flags

    parser, actions = templates.app_actions(pipeline)
    params = _params(pipeline)
    assert [p["name"] for p in _load(pipeline)["parameters"]] == [templates.parameter_name(a) for a in actions]
    for action in actions:
        name = templates.parameter_name(action)
        assert "-" not in name and "--" + name in action.option_strings, action.option_strings
    app = templates.options_class(pipeline)
    prog = f"catalog-index {pipeline}"
    for name, p in params.items():
        value = "true" if p["paramType"] == "BOOLEAN" else p.get("defaultValue", "1" if p["paramType"] == "NUMBER" else "x")
        # The launcher's --name=value, as main.py hands it on, is a flag the command knows.
        flags.check_pipeline_flags(templates.cli_argv(pipeline, [f"--{name}={value}"]), prog, app=app)


@pytest.mark.parametrize("pipeline", templates.PIPELINES)
def test_exactly_the_required_flags_are_not_optional(pipeline):
    params = _params(pipeline)
    assert {n for n, p in params.items() if not p["isOptional"]} == REQUIRED[pipeline]
    for name in REQUIRED[pipeline]:
        assert "defaultValue" not in params[name]
        assert not params[name]["helpText"].startswith("[required]")


@pytest.mark.parametrize("pipeline", templates.PIPELINES)
def test_defaults_are_the_options_defaults(pipeline):
    from apache_beam.options.pipeline_options import PipelineOptions

    _, actions = templates.app_actions(pipeline)
    defaults = PipelineOptions([]).view_as(templates.options_class(pipeline))
    for action in actions:
        p = _params(pipeline)[templates.parameter_name(action)]
        default = getattr(defaults, action.dest)
        if templates.is_switch(action):
            assert p["defaultValue"] == "false" and default is False, action.dest
        elif default is None:
            assert "defaultValue" not in p, action.dest
        else:
            assert p["defaultValue"] == str(default), action.dest
            # The stated default, given back as a parameter, parses to the same value.
            given = PipelineOptions([f"--{p['name']}={p['defaultValue']}"]).view_as(templates.options_class(pipeline))
            assert getattr(given, action.dest) == default, action.dest


def test_the_index_template_has_what_the_issue_found_missing():
    params = _params("index")
    for name in ("model_cache", "image_size", "text_weight", "image_weight", "trees", "seed",
                 "reject_on_image_error", "max_image_pixels", "large_model", "force"):
        assert name in params, name
    assert params["text_encoder"]["isOptional"] and params["text_encoder"]["defaultValue"] == "auto"
    assert params["image_encoder"]["isOptional"]
    assert params["shards"]["defaultValue"] == "1" and params["trees"]["defaultValue"] == "50"


@pytest.mark.parametrize("pipeline", templates.PIPELINES)
def test_regexes_take_the_defaults_and_refuse_the_wrong_form(pipeline):
    for name, p in _params(pipeline).items():
        for regex in p.get("regexes", []):
            if "defaultValue" in p:
                assert re.fullmatch(regex, p["defaultValue"]), (name, regex)
    index = _params("index")
    fits = lambda name, value: all(re.fullmatch(r, value) for r in index[name]["regexes"])  # noqa: E731
    assert fits("shards", "16") and not fits("shards", "1.5") and not fits("shards", "x")
    assert fits("min_recall", "0.9") and fits("min_recall", "1") and fits("text_weight", "1e-3")
    assert not fits("min_recall", "high")
    assert fits("force", "true") and fits("force", "false") and not fits("force", "yes")
    assert fits("catalog", "gs://bucket-x/catalog/dt=2026-11-28/*.parquet") and fits("output", "gs://b-1/index")
    for local in ("/data/catalog/*.parquet", "file:///data/out", "data/out", "gs:/b/x"):
        assert not fits("output", local), local
    assert "regexes" not in index["text_encoder"]  # auto, builtin:NAME, a TF Hub URL or gs://


# --------------------------------------------------------------------------- the launcher's argv


def test_switch_parameters_become_bare_flags_or_nothing():
    argv = ["--catalog=gs://b/c/*.parquet", "--force=true", "--large_model=False", "--no_reuse=TRUE",
            "--dry_run=True", "--runner=DataflowRunner", "--shards=4"]
    assert templates.cli_argv("index", argv) == ["--catalog=gs://b/c/*.parquet", "--force", "--no_reuse",
                                                 "--dry_run=True", "--runner=DataflowRunner", "--shards=4"]
    assert templates.cli_argv("train", ["--promote_if_better=true", "--no_logq=false"]) == ["--promote_if_better"]
    with pytest.raises(UsageError, match="--force takes true or false as a template parameter, got 'yes'"):
        templates.cli_argv("index", ["--force=yes"])


def test_main_py_runs_the_pipeline_named_by_the_environment(monkeypatch):
    main = _main_py()
    monkeypatch.delenv(main.PIPELINE_ENV, raising=False)
    assert main.argv(["--catalog=gs://b/c", "--force=false"]) == ["index", "--catalog=gs://b/c"]
    monkeypatch.setenv(main.PIPELINE_ENV, "train")
    assert main.argv(["--promote_if_better=true"]) == ["train", "--promote_if_better"]


def test_main_py_runs_train_for_the_train_templates_parameters(monkeypatch):
    """`flex-template build --image` sets no environment: one launcher image, the command from the parameters."""
    main = _main_py()
    monkeypatch.delenv(main.PIPELINE_ENV, raising=False)
    assert main.argv(["--clicks=gs://b/c/*.parquet", "--index=gs://b/i", "--promote_if_better=true"]) == [
        "train", "--clicks=gs://b/c/*.parquet", "--index=gs://b/i", "--promote_if_better"]
    assert main.argv(["--catalog=gs://b/c", "--output=gs://b/i"])[0] == "index"
    monkeypatch.setenv(main.PIPELINE_ENV, "index")  # the variable still wins
    assert main.argv(["--clicks=gs://b/c"])[0] == "index"


# --------------------------------------------------------------------------- --help and the README


def test_deploy_help_and_the_readme_table_agree(capsys):
    from tests.catalog_index import test_help

    recorded = []
    original = argparse.ArgumentParser.print_help

    def record(self, file=None):
        recorded.append(self)
        return original(self, file)

    monkey = pytest.MonkeyPatch()
    monkey.setattr(argparse.ArgumentParser, "print_help", record)
    try:
        for argv in (["deploy", "--help"], ["deploy", "template", "--help"]):
            with pytest.raises(SystemExit) as done:
                cli.main(argv)
            assert done.value.code == 0
    finally:
        monkey.undo()
    capsys.readouterr()
    helps = test_help.Help(recorded, "")
    rows = test_help.readme()["deploy"]["rows"]
    assert sorted(flag for flag, _, _ in rows) == sorted(helps.actions) == ["--out", "--pipeline"]
    for flag, cell, _ in rows:
        assert helps.required(flag) and cell == "required", flag
    assert "deploy" in cli.USAGE


# --------------------------------------------------------------------------- Dataflow dry runs


def _catalog_in_fake_gcs(sample_catalog, folder):
    for src in sorted(files.match_paths(sample_catalog["catalog_glob"], "--catalog")):
        with open(src, "rb") as f:
            files.write_bytes(f"{folder}/{os.path.basename(src)}", f.read())


def _remote_encoders(tiny_encoders):
    import uuid

    ram = f"ram://deploy-{uuid.uuid4().hex}"
    return _to_ram(tiny_encoders[0], ram + "/text"), _to_ram(tiny_encoders[1], ram + "/image")


def test_the_index_template_builds_the_dataflow_job_without_submitting(sample_catalog, tiny_encoders, fake_gcs_root,
                                                                       monkeypatch, capsys):
    """What the launcher runs: main.py's argv from template-style --name=value parameters."""
    _google_auth(monkeypatch)
    _catalog_in_fake_gcs(sample_catalog, "fakegs://bucket/catalog")
    text, image = _remote_encoders(tiny_encoders)
    main = _main_py()
    monkeypatch.delenv(main.PIPELINE_ENV, raising=False)
    params = ["--catalog=fakegs://bucket/catalog/*.parquet", "--output=fakegs://bucket/index",
              f"--text_encoder={text}", f"--image_encoder={image}", "--shards=2", "--force=false",
              "--large_model=true", "--runner=DataflowRunner", "--project=proj-123", "--region=us-central1",
              "--temp_location=gs://bucket-x/tmp", "--dry_run=True"]
    status, stdout, last, _ = _main(capsys, main.argv(params))
    assert status == 0, last
    assert stdout.strip().splitlines()[-1].startswith("dry run: nothing submitted")
    assert files.list_files("fakegs://bucket/index") == []  # no pointer, no release, no probe, no lease


@pytest.mark.parametrize("flag", ["--catalog", "--output"])
def test_the_index_template_refuses_local_paths(flag, sample_catalog, tmp_path, no_model_loads, monkeypatch,
                                                capsys):
    main = _main_py()
    monkeypatch.delenv(main.PIPELINE_ENV, raising=False)
    given = {"--catalog": "gs://bucket-x/c/*.parquet", "--output": "gs://bucket-x/out"}
    given[flag] = sample_catalog["catalog_glob"] if flag == "--catalog" else str(tmp_path / "out")
    params = [f"{k}={v}" for k, v in given.items()] + [
        "--text_encoder=gs://bucket-x/m/text", "--image_encoder=gs://bucket-x/m/image", "--dry_run=True"]
    status, _, last, _ = _main(capsys, main.argv(params + DATAFLOW))
    assert status == 2, last
    assert f"{flag} " in last and "is on this machine's disk" in last
    assert not (tmp_path / "out").exists()


def test_a_backfill_dry_run_builds_each_date_and_submits_nothing(sample_catalog, tiny_encoders, fake_gcs_root,
                                                                monkeypatch, capsys):
    _google_auth(monkeypatch)
    for date in ("2026-11-27", "2026-11-28"):
        _catalog_in_fake_gcs(sample_catalog, f"fakegs://bucket/catalog/dt={date}")
    text, image = _remote_encoders(tiny_encoders)
    argv = ["backfill", "--catalog-pattern", "fakegs://bucket/catalog/dt={date}/*.parquet", "--from", "2026-11-27",
            "--to", "2026-11-28", "--output", "fakegs://bucket/index", "--text-encoder", text, "--image-encoder",
            image, *DATAFLOW, "--dry_run=True"]
    status, stdout, last, _ = _main(capsys, argv)
    assert status == 0, last
    lines = stdout.strip().splitlines()
    for date in ("2026-11-27", "2026-11-28"):
        line = next(x for x in lines if x.startswith(date))
        assert line.startswith(f"{date}  dry run "), line  # not "published"
        assert "dry run: nothing submitted" in line and f"version {date}" in line, line
    assert files.list_files("fakegs://bucket/index") == []


def test_a_backfill_on_dataflow_refuses_a_local_catalog(sample_catalog, fake_gcs_root, no_model_loads, monkeypatch,
                                                        capsys):
    _google_auth(monkeypatch)
    argv = ["backfill", "--catalog-pattern", os.path.dirname(sample_catalog["catalog_glob"]) + "/{date}*.parquet",
            "--from", "2026-11-28", "--to", "2026-11-28", "--output", "fakegs://bucket/index", "--text-encoder",
            "gs://bucket-x/m/text", "--image-encoder", "gs://bucket-x/m/image", *DATAFLOW, "--dry_run=True"]
    status, stdout, _, _ = _main(capsys, argv)
    assert status == 1, stdout
    assert "2026-11-28  failed" in stdout and "--catalog" in stdout and "is on this machine's disk" in stdout, stdout


@pytest.mark.parametrize("flag", ["clicks", "index", "output", "image_root"])
def test_the_train_template_refuses_local_paths_on_dataflow(flag, tmp_path, monkeypatch, capsys):
    """Train runs on Dataflow (its fit is a step of the job): like the index, every path must be remote."""
    main = _main_py()
    monkeypatch.delenv(main.PIPELINE_ENV, raising=False)  # --clicks names the train command (main.py)
    given = {"clicks": "gs://bucket-x/clicks/*.parquet", "index": "gs://bucket-x/index",
             "output": "gs://bucket-x/models", "image_root": "gs://bucket-x/images/"}
    given[flag] = str(tmp_path / flag)
    params = [f"--{k}={v}" for k, v in given.items()] + ["--promote_if_better=true", "--no_logq=false"]
    status, _, last, _ = _main(capsys, main.argv(params) + DATAFLOW)
    assert status == 2, last
    assert last.startswith("catalog-index train: error: --" + flag.replace("_", "-") + " "), last
    assert "is on this machine's disk" in last and "DataflowRunner workers cannot see" in last, last
    assert not (tmp_path / flag).exists()


@pytest.fixture
def staged_uploads(tmp_path, monkeypatch):
    """Beam's Dataflow client uploads the job graph and its artifacts to gs:// with stage_file; here they go to a
    local folder (the fake stands in for GCS only: the graph is built and serialised by Beam itself)."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions
    from apache_beam.runners.dataflow.internal import apiclient

    root = tmp_path / "uploads"

    def stage_file(self, gcs_or_local_path, file_name, stream, mime_type=None, total_size=None):
        target = root / gcs_or_local_path.replace("gs://", "").strip("/") / file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(stream.read())

    monkeypatch.setattr(apiclient.DataflowApplicationClient, "stage_file", stage_file)
    # Beam's clients take only google-auth's own credential classes; anonymous ones that refresh without a network.
    from google.auth.credentials import AnonymousCredentials

    class Anonymous(AnonymousCredentials):
        def refresh(self, request):
            pass

    _google_auth(monkeypatch, credentials=Anonymous())
    # Beam asks GCS for the bucket's soft-delete policy (a warning only); with no network that takes minutes.
    monkeypatch.setattr(GoogleCloudOptions, "_warn_if_soft_delete_policy_enabled", lambda self, arg_name: None)
    return root


def test_a_template_launch_writes_the_job_graph_and_leaves_the_lease_to_the_job(
        sample_catalog, tiny_encoders, fake_gcs_root, staged_uploads, monkeypatch, capsys):
    """What a Flex Template launcher runs: main.py with --template_location. Beam writes the job graph there and
    returns before the job exists, so the launcher must neither hold the lease for the job (it exits now) nor
    wait: nothing but the graph is written, and the summary says the job publishes."""
    _catalog_in_fake_gcs(sample_catalog, "fakegs://bucket/catalog")
    text, image = _remote_encoders(tiny_encoders)
    from pipelines import lease

    def refuse(self):
        raise AssertionError("the launcher took the lease: it would be given back before the job even starts")

    monkeypatch.setattr(lease.Lease, "acquire", refuse)
    main = _main_py()
    monkeypatch.delenv(main.PIPELINE_ENV, raising=False)
    params = ["--catalog=fakegs://bucket/catalog/*.parquet", "--output=fakegs://bucket/index",
              f"--text_encoder={text}", f"--image_encoder={image}", "--shards=2", "--version=2026-11-30",
              "--runner=DataflowRunner", "--project=proj-123", "--region=us-central1",
              "--temp_location=gs://bucket-x/tmp", "--template_location=gs://bucket-x/launch/job_object"]
    status, stdout, last, _ = _main(capsys, main.argv(params))
    assert status == 0, last
    assert "job graph written for version 2026-11-30" in stdout, stdout
    from apache_beam.portability.api import beam_runner_api_pb2

    job = json.loads((staged_uploads / "bucket-x" / "launch" / "job_object").read_bytes())
    assert job["type"] == "JOB_TYPE_BATCH" and "use_runner_v2" in job["environment"]["experiments"]
    staged = list((staged_uploads / "bucket-x" / "tmp").rglob("pipeline.pb"))  # runner v2: the graph itself
    assert len(staged) == 1, staged
    pipeline = beam_runner_api_pb2.Pipeline.FromString(staged[0].read_bytes())
    top = {t.unique_name for t in pipeline.components.transforms.values()}
    for step in ("ReadCatalog", "EncodeItems", "FuseEmbeddings", "WriteAnnoyShards", "PublishIndex"):
        assert step in top, sorted(top)
    assert files.list_files("fakegs://bucket/index") == []  # no lease left behind, no pointer, no probe


def test_a_template_launch_refuses_while_another_run_holds_the_lease(
        sample_catalog, tiny_encoders, fake_gcs_root, staged_uploads, monkeypatch, capsys):
    from pipelines import lease

    _google_auth(monkeypatch)
    _catalog_in_fake_gcs(sample_catalog, "fakegs://bucket/catalog")
    text, image = _remote_encoders(tiny_encoders)
    holder = lease.Lease("fakegs://bucket/index", "other-run", "2026-11-29").acquire()
    main = _main_py()
    monkeypatch.delenv(main.PIPELINE_ENV, raising=False)
    params = ["--catalog=fakegs://bucket/catalog/*.parquet", "--output=fakegs://bucket/index",
              f"--text_encoder={text}", f"--image_encoder={image}", "--runner=DataflowRunner",
              "--project=proj-123", "--region=us-central1", "--temp_location=gs://bucket-x/tmp",
              "--template_location=gs://bucket-x/launch/job_object"]
    status, _, last, _ = _main(capsys, main.argv(params))
    assert status != 0 and "another run is publishing" in last and "other-run" in last, last
    assert not (staged_uploads / "bucket-x" / "launch" / "job_object").exists()
    assert holder.holds()



def _train_params():
    return ["--clicks=fakegs://bucket/clicks/*.parquet", "--index=fakegs://bucket/index",
            "--output=fakegs://bucket/models", "--models_version=m1", "--promote_if_better=true", "--no_logq=false",
            "--runner=DataflowRunner", "--project=proj-123", "--region=us-central1", "--temp_location=gs://bucket-x/tmp"]


@pytest.fixture
def remote_index(fake_gcs_root, tiny_encoders, sample_catalog, tmp_path, monkeypatch):
    """An index on fake GCS with ram:// encoders, and a click log beside it (tests/pipelines/test_train_remote.py)."""
    import uuid

    import pyarrow as pa
    import pyarrow.parquet as pq

    from search import release
    from tests.pipelines.test_train_remote import _BeamGfile
    from tests.search.conftest import publish

    ram = f"ram://train-template-{uuid.uuid4().hex}"
    encoders = (_to_ram(tiny_encoders[0], ram + "/text"), _to_ram(tiny_encoders[1], ram + "/image"))
    publish(sample_catalog["catalog_glob"], "fakegs://bucket/index", encoders, "v1", "2026-11-01",
            "--max-rejected-fraction", "0.5")
    rows = [{"event_time": 1_795_000_000_000_000 + i * 86_400_000_000, "query": f"q{i}", "query_image_uri": None,
             "item_id": "item-00001", "event": "click"} for i in range(3)]
    schema = pa.schema([pa.field("event_time", pa.timestamp("us", tz="UTC")), pa.field("query", pa.string()),
                        pa.field("query_image_uri", pa.string()), pa.field("item_id", pa.string()),
                        pa.field("event", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "clicks.parquet")
    files.write_bytes("fakegs://bucket/clicks/part-0.parquet", (tmp_path / "clicks.parquet").read_bytes())
    monkeypatch.setattr(release, "_remote_fs", lambda: _BeamGfile)


def test_a_train_template_launch_writes_the_whole_job_graph(remote_index, staged_uploads, monkeypatch, capsys):
    """The launcher writes one job: the preprocessing and the fit step (training happens on a worker), takes no
    lease and writes nothing under the models directory."""
    from apache_beam.portability.api import beam_runner_api_pb2

    from pipelines import lease

    monkeypatch.setattr(lease.Lease, "acquire", lambda self: pytest.fail("the launcher took the lease"))
    main = _main_py()
    monkeypatch.setenv(main.PIPELINE_ENV, "train")
    argv = main.argv(_train_params() + ["--template_location=gs://bucket-x/launch/job_object"])
    status, stdout, last, _ = _main(capsys, argv)
    assert status == 0, last
    assert "job graph written for models version m1" in stdout, stdout
    staged = list((staged_uploads / "bucket-x" / "tmp").rglob("pipeline.pb"))
    pipeline = beam_runner_api_pb2.Pipeline.FromString(staged[0].read_bytes())
    top = {t.unique_name for t in pipeline.components.transforms.values()}
    for step in ("ReadClicks", "EncodeQueryTexts", "WriteExamples", "WriteSummary", "FitAndPublish"):
        assert step in top, sorted(top)
    assert files.list_files("fakegs://bucket/models") == []


def test_a_train_dry_run_on_dataflow_submits_nothing(remote_index, monkeypatch, capsys):
    _google_auth(monkeypatch)
    main = _main_py()
    monkeypatch.setenv(main.PIPELINE_ENV, "train")
    status, stdout, last, _ = _main(capsys, main.argv(_train_params() + ["--dry_run=True"]))
    assert status == 0, last
    assert stdout.strip().splitlines()[-1].startswith("dry run: nothing submitted (the job for models version m1")
    assert files.list_files("fakegs://bucket/models") == []


def test_a_template_launch_refuses_a_version_published_from_other_inputs(
        sample_catalog, tiny_encoders, fake_gcs_root, staged_uploads, monkeypatch, capsys):
    """The launcher cannot finish a publication (it exits before the job), but it still refuses, before any job,
    what the CLI would refuse: a version already published from other inputs without --force."""
    from tests.search.conftest import publish

    _catalog_in_fake_gcs(sample_catalog, "fakegs://bucket/catalog")
    text, image = _remote_encoders(tiny_encoders)
    publish("fakegs://bucket/catalog/*.parquet", "fakegs://bucket/index", (text, image), "2026-11-30",
            "2026-11-30T00:00:00Z", "--max-rejected-fraction", "0.5")
    main = _main_py()
    monkeypatch.delenv(main.PIPELINE_ENV, raising=False)
    params = ["--catalog=fakegs://bucket/catalog/*.parquet", "--output=fakegs://bucket/index",
              f"--text_encoder={text}", f"--image_encoder={image}", "--version=2026-11-30",
              "--snapshot_time=2026-11-30T00:00:00Z", "--max_rejected_fraction=0.5", "--shards=3",
              "--runner=DataflowRunner", "--project=proj-123", "--region=us-central1",
              "--temp_location=gs://bucket-x/tmp", "--template_location=gs://bucket-x/launch/job_object"]
    status, _, last, _ = _main(capsys, main.argv(params))
    assert status == 2, last
    assert "version '2026-11-30' is already published" in last and "from other inputs" in last, last
    assert not (staged_uploads / "bucket-x" / "launch" / "job_object").exists()
    status, _, last, _ = _main(capsys, main.argv(params + ["--force=true"]))  # a replacement: the job is built
    assert status == 0, last
    assert (staged_uploads / "bucket-x" / "launch" / "job_object").exists()
