"""The images in deploy/ agree with the constraints file, setup.py and the installed packages.

`docker build` is not possible on these machines, so this reads the Dockerfiles as text: every
base image pinned, the Beam SDK image's tag = the pinned Beam = the installed Beam, every pip
install constrained, the constraints = what the tests run with, the serve image without Beam.
"""

import ast
import importlib.metadata as md
import os
import re
import shlex
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
CONSTRAINTS = os.path.join(DEPLOY, "constraints.txt")
CONSTRAINTS_IN_IMAGE = "/tmp/constraints.txt"  # where every Dockerfile copies deploy/constraints.txt
GPU_MARKER = "# --- GPU only"
SERVE = os.path.join(DEPLOY, "serve", "Dockerfile")
SERVE_REQUIREMENTS = os.path.join(DEPLOY, "serve", "requirements.txt")
WORKER = os.path.join(DEPLOY, "dataflow", "Dockerfile")
LAUNCHER = os.path.join(DEPLOY, "dataflow", "launcher.Dockerfile")


def _dockerfiles():
    found = []
    for base, _, names in os.walk(DEPLOY):
        found += [os.path.join(base, n) for n in names if n == "Dockerfile" or n.endswith(".Dockerfile")]
    return sorted(found)


def _instructions(path):
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in open(path, encoding="utf-8").read().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, f"{path}: dangling line continuation"
    return out


def _pins(path=CONSTRAINTS):
    """({name: version} from pip freeze, {name: version} of the GPU-only section)."""
    venv, gpu, section = {}, {}, None
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if line.startswith(GPU_MARKER):
            section = gpu
            continue
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version and not re.search(r"[<>!~;@ ]", version), f"not an exact pin: {line!r}"
        target = venv if section is None else section
        key = canonicalize_name(name)
        assert key not in venv and key not in gpu, f"pinned twice: {name}"
        target[key] = version
    return venv, gpu


def _install_requires():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return [ast.literal_eval(elt) for elt in node.value.elts]
    raise AssertionError("setup.py has no install_requires")


def _beam_version():
    return _pins()[0][canonicalize_name("apache-beam")]


# ------------------------------------------------------------------------ base images


def test_there_are_the_three_images():
    assert set(_dockerfiles()) >= {WORKER, LAUNCHER, SERVE}


@pytest.mark.parametrize("dockerfile", _dockerfiles(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_base_image_is_pinned(dockerfile):
    instructions = _instructions(dockerfile)
    # Build args declared before the first FROM, with their defaults (None: no default, so the
    # build fails unless it is given: a required pin).
    global_args = {}
    for word, rest in instructions:
        if word == "FROM":
            break
        if word == "ARG":
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip() or None
    stages, bases = set(), []
    for word, rest in instructions:
        if word != "FROM":
            continue
        parts = [p for p in rest.split() if not p.startswith("--platform")]
        image = parts[0]
        if len(parts) >= 3 and parts[1].upper() == "AS":
            stages.add(parts[2].lower())
        if image.lower() in stages:
            continue  # FROM an earlier stage
        bases.append(image)
        reference = image.rsplit("/", 1)[-1]
        if "@" in reference:
            digest = reference.split("@", 1)[1]
            arg = re.fullmatch(r"\$\{?(\w+)\}?", digest)
            if arg:
                assert arg.group(1) in global_args, f"{image}: digest from an undeclared ARG"
                assert global_args[arg.group(1)] is None, \
                    f"{image}: the digest ARG must have no default (the build must be given the pin)"
            else:
                assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{image}: not a sha256 digest"
            continue
        assert ":" in reference, f"{os.path.relpath(dockerfile, ROOT)}: untagged base image {image}"
        tag = reference.split(":", 1)[1]
        assert "$" not in tag, f"{image}: tag from a build arg, not pinned in the file"
        assert tag.lower() != "latest" and not tag.lower().endswith("-latest"), f"{image}: floating tag"
        assert re.search(r"\d", tag), f"{image}: tag {tag!r} names no version"
    assert bases, f"{dockerfile}: no FROM"


def test_beam_sdk_image_tag_is_the_pinned_and_installed_beam():
    import apache_beam

    pinned = _beam_version()
    assert apache_beam.__version__ == pinned
    seen = 0
    for dockerfile in _dockerfiles():
        for word, rest in _instructions(dockerfile):
            image = rest.split()[0] if word == "FROM" else ""
            if image.startswith("apache/beam_python"):
                seen += 1
                assert image.startswith("apache/beam_python3.11_sdk:"), f"{image}: not the Python 3.11 SDK"
                assert image.split(":", 1)[1] == pinned, f"{dockerfile}: {image} but Beam {pinned} is pinned"
    worker_bases = [rest.split()[0] for word, rest in _instructions(WORKER) if word == "FROM"]
    assert worker_bases and all(b == f"apache/beam_python3.11_sdk:{pinned}" for b in worker_bases)
    assert seen >= 1


def test_launcher_runs_main_py():
    instructions = _instructions(LAUNCHER)
    bases = [rest.split()[0] for word, rest in instructions if word == "FROM"]
    assert bases[-1].startswith("gcr.io/dataflow-templates-base/python311-template-launcher-base")
    env = " ".join(rest for word, rest in instructions if word == "ENV")
    match = re.search(r"FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)", env)
    assert match, "FLEX_TEMPLATE_PYTHON_PY_FILE is not set"
    copies = [rest.split() for word, rest in instructions if word == "COPY"]
    assert ["deploy/dataflow/main.py", match.group(1)] in copies


# ------------------------------------------------------------------------ pip installs


def _pip_commands(dockerfile):
    """Each `pip install` / `pip wheel` command of the RUN lines, as a token list."""
    commands = []
    for word, rest in _instructions(dockerfile):
        if word != "RUN":
            continue
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        parts, current = [], []
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                parts.append(current)
                current = []
            else:
                current.append(token)
        parts.append(current)
        for tokens in parts:
            for i, token in enumerate(tokens):
                if token in ("pip", "pip3") or token.endswith("/pip") or \
                        (token == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "pip"):
                    j = i + 1 if token != "-m" else i + 2
                    if j < len(tokens) and tokens[j] in ("install", "wheel", "download"):
                        commands.append(tokens)
                    break
    return commands


@pytest.mark.parametrize("dockerfile", _dockerfiles(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_pip_install_uses_the_constraints(dockerfile):
    instructions = _instructions(dockerfile)
    copied = [rest.split() for word, rest in instructions if word == "COPY"]
    assert any(c[0] == "deploy/constraints.txt" and c[-1] in (CONSTRAINTS_IN_IMAGE, "/tmp/") for c in copied), \
        "deploy/constraints.txt is not copied to /tmp/constraints.txt"
    commands = _pip_commands(dockerfile)
    assert commands, "no pip install at all?"
    for tokens in commands:
        text = " ".join(tokens)
        assert any(t in ("--constraint", "-c") and tokens[k + 1] == CONSTRAINTS_IN_IMAGE
                   for k, t in enumerate(tokens[:-1])) or f"--constraint={CONSTRAINTS_IN_IMAGE}" in tokens, \
            f"unconstrained: {text}"
        assert "--upgrade" not in tokens and "-U" not in tokens, f"--upgrade defeats the pins: {text}"


def test_the_wheel_is_built_with_pyproject():
    for dockerfile in _dockerfiles():
        copied = " ".join(rest for word, rest in _instructions(dockerfile) if word == "COPY")
        if any("wheel" in t for t in map(" ".join, _pip_commands(dockerfile))):
            assert "pyproject.toml" in copied.split(), f"{dockerfile}: the wheel build loses setuptools<81"


def test_worker_exports_the_builtin_encoders_at_build_time():
    runs = " ".join(rest for word, rest in _instructions(WORKER) if word == "RUN")
    assert "catalog-index models build" in runs and "catalog-index models export --to" in runs
    assert "--no-deps" in runs and "requirements-models.txt" in runs
    assert "tensorflow[and-cuda]" in runs


# ------------------------------------------------------------------------ constraints


def test_every_pin_is_the_installed_version():
    venv, _ = _pins()
    assert len(venv) > 50
    wrong = {}
    for name, version in venv.items():
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert wrong == {}, "constraints (pinned, installed) differ; regenerate deploy/constraints.txt (see its header)"


def test_the_project_itself_is_not_pinned():
    venv, gpu = _pins()
    assert "catalog-index" not in venv and "catalog-index" not in gpu


def test_gpu_pins_satisfy_tensorflow_and_cuda():
    _, gpu = _pins()
    wanted = {}
    for spec in md.requires("tensorflow") or []:
        req = Requirement(spec)
        if req.marker is not None and req.marker.evaluate({"extra": "and-cuda"}) and \
                not req.marker.evaluate({"extra": ""}):
            wanted[canonicalize_name(req.name)] = req.specifier
    assert wanted, "tensorflow declares no and-cuda extra"
    assert set(gpu) == set(wanted)
    for name, spec in wanted.items():
        assert spec.contains(gpu[name], prereleases=True), f"{name}=={gpu[name]} outside {spec}"


@pytest.mark.parametrize("requirement", _install_requires())
def test_install_requires_is_satisfiable_by_the_pins(requirement):
    req = Requirement(requirement)
    venv, _ = _pins()
    name = canonicalize_name(req.name)
    assert name in venv, f"{req.name} is not pinned"
    assert req.specifier.contains(venv[name], prereleases=True), f"{req.name}=={venv[name]} not in {req.specifier}"
    for extra in req.extras:  # apache-beam[gcp]: the extra's own requirements are pinned too
        for spec in md.requires(req.name) or []:
            dep = Requirement(spec)
            if dep.marker is not None and dep.marker.evaluate({"extra": extra}) \
                    and not dep.marker.evaluate({"extra": ""}):
                assert canonicalize_name(dep.name) in venv, f"{req.name}[{extra}] needs {dep.name}, not pinned"


def test_requirements_models_are_pinned_and_not_install_requires():
    names = [Requirement(line.strip()).name for line in open(os.path.join(ROOT, "requirements-models.txt"))
             if line.strip() and not line.startswith("#")]
    venv, _ = _pins()
    for name in names:
        assert canonicalize_name(name) in venv
    required = {canonicalize_name(Requirement(r).name) for r in _install_requires()}
    assert not required & {canonicalize_name(n) for n in names}, "workers would install weight packages"


# ------------------------------------------------------------------------ serve without Beam


def _serve_requirements():
    return [line.strip() for line in open(SERVE_REQUIREMENTS, encoding="utf-8")
            if line.strip() and not line.startswith("#")]


def test_serve_requirements_are_install_requires_without_beam():
    beam = canonicalize_name("apache-beam")
    expected = sorted(str(Requirement(r)) for r in _install_requires() if canonicalize_name(Requirement(r).name) != beam)
    assert sorted(str(Requirement(r)) for r in _serve_requirements()) == expected


def test_serve_image_installs_no_beam():
    beam = canonicalize_name("apache-beam")
    assert all(canonicalize_name(Requirement(r).name) != beam for r in _serve_requirements())
    bases = [rest.split()[0] for word, rest in _instructions(SERVE) if word == "FROM"]
    assert not any("beam" in b or "dataflow" in b for b in bases)
    for tokens in _pip_commands(SERVE):
        text = " ".join(tokens)
        assert "beam" not in text.lower()
        if any(t.endswith(".whl") for t in tokens) or "." in tokens:
            # the project's wheel would bring install_requires, Beam included
            assert "--no-deps" in tokens, f"the project is installed with its dependencies: {text}"
        else:
            assert "-r" in tokens and "/tmp/requirements.txt" in tokens, f"unexpected install: {text}"


def test_serve_runs_without_beam():
    code = (
        "import sys, contextlib, io\n"
        "sys.modules['apache_beam'] = None\n"  # any `import apache_beam` raises ImportError
        "import search.service, search.embedder, search.index, search.release, search.watcher\n"
        "from catalog_index import cli\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        cli.main(['serve', '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), e.code\n"
        "assert '--index' in out.getvalue(), out.getvalue()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def test_worker_allocates_arrow_buffers_with_malloc():
    # pipelines/files.use_system_memory_pool's reason holds on Dataflow workers too (issue 9).
    from pipelines import files

    env = " ".join(rest for word, rest in _instructions(WORKER) if word == "ENV")
    assert f"{files.ARROW_POOL_ENV}=system" in env.split()


def _env(dockerfile):
    pairs = [p.partition("=") for word, rest in _instructions(dockerfile) if word == "ENV" for p in rest.split()]
    return {k: v for k, _, v in pairs}


def test_the_launcher_carries_the_worker_images_builtin_models_at_the_same_path():
    """The preflight accepts built-in handles on Dataflow only where CATALOG_INDEX_IMAGE_MODEL_CACHE says the
    model cache is the worker image's (embedding/builtin.in_worker_image): both images must set it to their
    cache, and the launcher's cache must be copied from the worker image, pinned by digest."""
    from embedding import builtin

    worker, launcher = _env(WORKER), _env(LAUNCHER)
    for env in (worker, launcher):
        assert env[builtin.IMAGE_CACHE_ENV] == env[builtin.CACHE_ENV] == worker[builtin.CACHE_ENV]
    froms = [rest.split() for word, rest in _instructions(LAUNCHER) if word == "FROM"]
    worker_stage = [f for f in froms if len(f) >= 3 and f[2].lower() == "worker"]
    assert worker_stage and re.fullmatch(r"\$\{WORKER_IMAGE\}@\$\{WORKER_IMAGE_DIGEST\}", worker_stage[0][0])
    copies = [rest for word, rest in _instructions(LAUNCHER) if word == "COPY"]
    assert f"--from=worker {worker[builtin.CACHE_ENV]} {launcher[builtin.CACHE_ENV]}" in copies, copies
