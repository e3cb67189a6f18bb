"""deploy/terraform/: the Cloud Scheduler module that launches the index Flex Template nightly.

Without the google provider (no network here), `terraform validate` cannot run. What is checked:
the .tf text (every var.X and local.X is declared, every variable is used, outputs name declared
resources); and, where the `terraform` binary exists, the request body itself, rendered by
terraform from the module's own locals (the resource block left out, so no provider is needed):
its parameter names are the ones the index template declares, its values pass the template's
regexes and parse as `catalog-index index` flags.
"""

import argparse
import json
import pathlib
import re
import shutil
import subprocess

import pytest

from pipelines.options import IndexOptions

ROOT = pathlib.Path(__file__).resolve().parents[2]
TF_DIR = ROOT / "deploy" / "terraform"
INDEX_METADATA = ROOT / "deploy" / "dataflow" / "index" / "metadata.json"


def _tf_text() -> str:
    return "\n".join(p.read_text() for p in sorted(TF_DIR.glob("*.tf")))


def _strip_comments(text: str) -> str:
    return re.sub(r"(?m)#.*$", "", text)


def _index_flags() -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    IndexOptions._add_argparse_args(parser)  # pylint: disable=protected-access
    return {s[2:].replace("-", "_"): a for a in parser._actions for s in a.option_strings}  # pylint: disable=protected-access


def _declared_parameters() -> dict:
    """name -> regexes: from the checked-in template when it exists, else from the index options."""
    if INDEX_METADATA.exists():
        return {p["name"]: p.get("regexes", []) for p in json.loads(INDEX_METADATA.read_text())["parameters"]}
    return {name: [] for name in _index_flags()}


def test_every_variable_reference_is_declared_and_every_variable_used():
    text = _strip_comments(_tf_text())
    declared = set(re.findall(r'(?m)^variable\s+"(\w+)"', text))
    used = set(re.findall(r"\bvar\.(\w+)", text))
    assert used <= declared, f"undeclared: {sorted(used - declared)}"
    assert declared <= used, f"unused variables: {sorted(declared - used)}"
    for required in ("project", "region", "bucket", "template_path", "schedule", "service_account"):
        assert required in declared


def test_every_local_is_defined_and_outputs_name_declared_resources():
    text = _strip_comments(_tf_text())
    defined = set()
    for block in re.findall(r"(?ms)^locals\s*\{(.*?)^\}", text):
        defined |= set(re.findall(r"(?m)^  (\w+)\s*=", block))
    used = set(re.findall(r"\blocal\.(\w+)", text))
    assert used <= defined, f"undefined locals: {sorted(used - defined)}"
    resources = set(re.findall(r'(?m)^resource\s+"(\w+)"\s+"(\w+)"', text))
    assert ("google_cloud_scheduler_job", "index_nightly") in resources
    for kind, name in re.findall(r"\b(google_\w+)\.(\w+)\.", text):
        assert (kind, name) in resources, f"{kind}.{name} is not declared"
    outputs = set(re.findall(r'(?m)^output\s+"(\w+)"', text))
    assert {"scheduler_job_id", "scheduler_job_name", "launch_uri", "launch_body"} <= outputs


def test_scheduler_calls_flex_template_launch_with_an_oauth_token():
    text = (TF_DIR / "main.tf").read_text()
    assert re.search(r'launch_uri\s*=\s*"https://dataflow\.googleapis\.com/v1b3/projects/\$\{var\.project\}/'
                     r'locations/\$\{var\.region\}/flexTemplates:launch"', text)
    assert re.search(r'http_method\s*=\s*"POST"', text)
    assert re.search(r"oauth_token\s*\{\s*service_account_email\s*=\s*var\.service_account", text)
    assert 'scope                 = "https://www.googleapis.com/auth/cloud-platform"' in text
    assert "/templates/index.json" in text, "template path convention gs://BUCKET/templates/index.json"


def test_literal_parameter_names_are_declared_by_the_template():
    text = _strip_comments((TF_DIR / "main.tf").read_text())
    declared = _declared_parameters()
    names = set()
    for local in ("base_parameters", "fusion_parameters", "gpu_parameters"):
        block = re.search(local + r"\s*=\s*[^{]*\{(.*?)\n  \}", text, re.S)
        assert block, local
        names |= set(re.findall(r"(?m)^\s*(\w+)\s*=", block.group(1)))
    assert names and names <= set(declared), sorted(names - set(declared))


def test_extra_parameters_validation_lists_exactly_the_template_parameters():
    text = (TF_DIR / "variables.tf").read_text()
    block = re.search(r'variable "extra_parameters".*?contains\(\[(.*?)\]', text, re.S)
    listed = re.findall(r'"(\w+)"', block.group(1))
    assert sorted(listed) == sorted(_declared_parameters())


def _render(tmp_path, *args) -> subprocess.CompletedProcess:
    """terraform apply of the module's variables and locals alone (no resource, no provider needed)."""
    work = tmp_path / "tf"
    work.mkdir(exist_ok=True)
    shutil.copy(TF_DIR / "variables.tf", work / "variables.tf")
    main = (TF_DIR / "main.tf").read_text()
    main = main[:main.index('resource "google_cloud_scheduler_job"')]
    (work / "main.tf").write_text(main + 'output "launch_body" {\n  value = jsonencode(local.launch_body)\n}\n'
                                  'output "launch_uri" {\n  value = local.launch_uri\n}\n')
    env = {"TF_IN_AUTOMATION": "1", "PATH": "/usr/local/bin:/usr/bin:/bin", "TF_CLI_CONFIG_FILE": "/dev/null",
           "HOME": str(tmp_path)}
    subprocess.run(["terraform", "init", "-input=false"], cwd=work, env=env, check=True, capture_output=True,
                   timeout=120)
    return subprocess.run(["terraform", "apply", "-auto-approve", "-input=false", "-no-color",
                           f"-var-file={TF_DIR / 'example.tfvars'}", *args] ,
                          cwd=work, env=env, capture_output=True, text=True, timeout=120)


def _output(tmp_path, name):
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "TF_CLI_CONFIG_FILE": "/dev/null", "HOME": str(tmp_path)}
    return subprocess.run(["terraform", "output", "-raw", name], cwd=tmp_path / "tf", env=env, check=True,
                          capture_output=True, text=True, timeout=60).stdout


needs_terraform = pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform is not installed")


@needs_terraform
@pytest.mark.parametrize("gpu", ["false", "true"])
def test_rendered_request_body_names_only_template_parameters(tmp_path, gpu):
    done = _render(tmp_path, "-var", f"gpu={gpu}", "-var", 'extra_parameters={"trees":"100"}')
    assert done.returncode == 0, done.stderr
    body = json.loads(_output(tmp_path, "launch_body"))["launchParameter"]
    assert _output(tmp_path, "launch_uri") == ("https://dataflow.googleapis.com/v1b3/projects/my-project/"
                                              "locations/europe-west4/flexTemplates:launch")
    assert body["containerSpecGcsPath"] == "gs://my-catalog-bucket/templates/index.json"
    params = body["parameters"]
    declared = _declared_parameters()
    assert set(params) <= set(declared), sorted(set(params) - set(declared))
    flags = _index_flags()
    argv = []
    for name, value in params.items():
        assert isinstance(value, str), f"{name}: template parameters are strings"
        for regex in declared[name]:
            assert re.search(regex, value), f"{name}={value!r} does not match {regex}"
        if flags[name].nargs == 0:  # a switch: --x=true is the bare flag (deploy/dataflow/main.py)
            argv += [f"--{name}"] if value == "true" else []
        else:
            argv += [f"--{name}", value]
    parser = argparse.ArgumentParser()
    IndexOptions._add_argparse_args(parser)  # pylint: disable=protected-access
    args, unknown = parser.parse_known_args(argv)
    assert unknown == [] and args.catalog and args.output and args.trees == 100
    env = body["environment"]
    assert "use_runner_v2" in env["additionalExperiments"]
    assert env["sdkContainerImage"].endswith("/catalog-index-worker:0.1.0"), "workers run the pinned image"
    assert env["tempLocation"].startswith("gs://")
    gpu_option = "dataflow_service_options=worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"
    assert (gpu_option in env.get("additionalPipelineOptions", [])) == (gpu == "true")
    assert args.large_model == (gpu == "true")


@needs_terraform
def test_encoders_are_the_images_built_ins_unless_given(tmp_path):
    """No encoder parameter by default: the launcher and worker images carry the built-in encoders."""
    assert _render(tmp_path).returncode == 0
    params = json.loads(_output(tmp_path, "launch_body"))["launchParameter"]["parameters"]
    assert "text_encoder" not in params and "image_encoder" not in params
    given = tmp_path / "given"
    given.mkdir()
    assert _render(given, "-var", "text_encoder=gs://b/models/minilm-l6-v2").returncode == 0
    params = json.loads(_output(given, "launch_body"))["launchParameter"]["parameters"]
    assert params["text_encoder"] == "gs://b/models/minilm-l6-v2" and "image_encoder" not in params


@needs_terraform
def test_an_undeclared_extra_parameter_is_refused(tmp_path):
    done = _render(tmp_path, "-var", 'extra_parameters={"treez":"100"}')
    assert done.returncode != 0 and "every key must be a parameter of the index template" in done.stderr


def test_gcloud_script_body_names_only_template_parameters():
    """deploy/scheduler/create_nightly_job.sh, DRY_RUN=1: the same request as the Terraform module."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PROJECT": "my-project", "REGION": "europe-west4",
           "BUCKET": "b", "LAUNCHER_SA": "l@my-project.iam.gserviceaccount.com",
           "WORKER_SA": "w@my-project.iam.gserviceaccount.com", "CATALOG": "gs://b/catalog/current/*.parquet",
           "WORKER_IMAGE": "r-docker.pkg.dev/p/r/catalog-index-worker:1",
           "DRY_RUN": "1"}
    done = subprocess.run(["bash", str(ROOT / "deploy" / "scheduler" / "create_nightly_job.sh")], env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    text, command = done.stdout.rsplit("}\n", 1)
    body = json.loads(text + "}")["launchParameter"]
    assert set(body["parameters"]) <= set(_declared_parameters())
    assert "text_encoder" not in body["parameters"], "the images' built-in encoders unless TEXT_ENCODER is set"
    env["IMAGE_ENCODER"] = "gs://b/models/efficientnet-lite0"
    done = subprocess.run(["bash", str(ROOT / "deploy" / "scheduler" / "create_nightly_job.sh")], env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    given = json.loads(done.stdout.rsplit("}\n", 1)[0] + "}")["launchParameter"]["parameters"]
    assert given["image_encoder"] == "gs://b/models/efficientnet-lite0" and "text_encoder" not in given
    assert body["parameters"]["fusion_model"] == "gs://b/fusion"
    assert body["containerSpecGcsPath"] == "gs://b/templates/index.json"
    assert body["environment"]["sdkContainerImage"] == "r-docker.pkg.dev/p/r/catalog-index-worker:1"
    assert "flexTemplates:launch" in command and "--oauth-service-account-email=l@my-project" in command
