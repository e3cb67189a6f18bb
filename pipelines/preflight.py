"""Up-front checks: what can be known before any encoder loads fails here, in one line (issue 11).

Called by ``IndexOptions.validate`` (pipelines/options.py) and ``TrainOptions.validate``
(pipelines/train_options.py), after the I/O-free option checks and before the catalog
is hashed or a model is loaded. One function owns each rule:

- ``normalise_paths``: ``file://`` path flags become plain local paths (the rule itself is
  ``files.local_path``), so nothing downstream (Beam IO, TensorFlow, manifests, workers)
  ever sees a ``file://`` URI.
- ``is_local_runner`` / ``workers_share_disk``: which runners run the pipeline on this
  machine (Beam's local runners), so that local paths mean the same to the workers.
- ``check_dry_run``: ``--dry_run`` is a Dataflow option; elsewhere it would run for real.
- ``check_worker_paths``: on any other runner the catalog, output, encoders, fusion model,
  image root and reuse source must not be on this machine's disk.
- ``check_dataflow``: ``--project``, ``--region`` and a gs:// ``--temp_location``.
- ``check_credentials``: one token refresh with a deadline, on a daemon thread.
- ``check_output``: a probe write and delete in the output root (for a missing local folder: that
  it can be created); ``create_output`` creates it once every check passed, and logs that it did.
- ``check_readable_root``: an image root that exists and can be read.

Beam is imported only where its own rules are reused (runner names, gs:// path syntax).
"""

import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from typing import Callable, Iterable, Optional, Sequence, Tuple

from pipelines import files
from schemas.errors import ConfigError, brief

_log = logging.getLogger(__name__)

CREDENTIALS_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 60.0  # an object-store probe write and delete
PROBE_PREFIX = ".catalog-index-probe-"
_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
_DATAFLOW = frozenset({"dataflowrunner", "testdataflowrunner"})
# Not among Beam's LOCAL_RUNNERS, but it runs on one of them (DirectRunner unless told otherwise).
_ALSO_LOCAL = frozenset({"interactiverunner"})
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})

# Path flags per command: (attribute, flag). normalise_paths rewrites them; the worker check reads them.
INDEX_PATHS = (("catalog", "--catalog"), ("output", "--output"), ("text_encoder", "--text-encoder"),
               ("image_encoder", "--image-encoder"), ("fusion_model", "--fusion-model"),
               ("model_cache", "--model-cache"), ("image_root", "--image-root"), ("reuse_from", "--reuse-from"))
TRAIN_PATHS = (("clicks", "--clicks"), ("index", "--index"), ("output", "--output"),
               ("image_root", "--image-root"), ("cache_dir", "--cache-dir"))


# --------------------------------------------------------------------------- paths


def normalise_paths(opts, paths: Sequence[Tuple[str, str]]) -> None:
    """Rewrites each ``file://`` path flag of ``opts`` (a PipelineOptions view) as a plain local path."""
    for attr, _ in paths:
        value = getattr(opts, attr, None)
        local = files.local_path(value)
        if local != value:
            setattr(opts, attr, local)


# --------------------------------------------------------------------------- runners


def runner_name(options) -> str:
    """The runner's class name as given (``DirectRunner`` when none is), for messages."""
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner
    if runner is None:
        return "DirectRunner"
    name = runner if isinstance(runner, str) else type(runner).__name__
    return name.rsplit(".", 1)[-1]


def _key(name: str) -> str:
    # Beam's create_runner: "direct", "DirectRunner" and "apache_beam...DirectRunner" are one runner.
    name = name.rsplit(".", 1)[-1].lower()
    return name if name.endswith("runner") else name + "runner"


def is_local_runner(runner) -> bool:
    """Whether ``runner`` (a name, an instance or None) is one of Beam's in-process runners."""
    from apache_beam.options.pipeline_options import StandardOptions

    if runner is None:
        return True
    name = runner if isinstance(runner, str) else type(runner).__name__
    return _key(name) in {_key(n) for n in StandardOptions.LOCAL_RUNNERS} | _ALSO_LOCAL


def is_dataflow(options) -> bool:
    return _key(runner_name(options)) in _DATAFLOW


def is_template_launch(options) -> bool:
    """Whether ``run()`` only writes the job graph (``--template_location``: what a Flex Template launcher
    passes, and how classic templates are staged): the job starts after this process has exited, so nothing
    here may wait for it, hold a lease for it or read what it writes."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    return is_dataflow(options) and bool(options.view_as(GoogleCloudOptions).template_location)


def workers_share_disk(options) -> bool:
    """Whether the pipeline's workers see this machine's files: a local runner, or a portable runner whose
    SDK workers run in this process (``--environment_type LOOPBACK``)."""
    from apache_beam.options.pipeline_options import PortableOptions, StandardOptions

    if is_local_runner(options.view_as(StandardOptions).runner):
        return True
    return (options.view_as(PortableOptions).environment_type or "").upper() == "LOOPBACK"


def check_dry_run(options) -> bool:
    """Whether this is a Dataflow dry run. ``--dry_run`` is parsed as a real boolean and written back (Beam
    takes any non-empty string, "False" too, as true); on a runner that ignores it, a ConfigError."""
    from apache_beam.options.pipeline_options import TestOptions

    test = options.view_as(TestOptions)
    value = test.dry_run
    if isinstance(value, str):
        if value.strip().lower() not in _TRUE | _FALSE:
            raise ConfigError(f"--dry_run takes True or False, got {value!r}")
        value = value.strip().lower() in _TRUE
        test.dry_run = value
    value = bool(value)
    if value and not is_dataflow(options):
        raise ConfigError(f"--dry_run is a DataflowRunner option; {runner_name(options)} would run the pipeline "
                          f"and publish for real. Remove --dry_run, or add --runner DataflowRunner")
    return value


# --------------------------------------------------------------------------- remote runners


def _model_problem(flag: str, value: Optional[str], runner: str, model_cache: Optional[str]) -> Optional[str]:
    """Why workers cannot load an encoder or fusion model, and what to do; None when they can."""
    from embedding import builtin
    from embedding import languages

    if not value:
        return None
    if value == "auto" or builtin.is_builtin(value):
        cache = builtin.cache_dir(model_cache)
        if not files.is_local(cache) or builtin.in_worker_image(model_cache):
            return None  # a remote cache, or the one the worker image carries at the same path
        if value == "auto":
            names = " or ".join(h[len(builtin.PREFIX):] for h in (languages.ENGLISH_ENCODER,
                                                                  languages.MULTILINGUAL_ENCODER))
            return (f"{flag} auto picks a built-in model from this machine's model cache ({cache}), which "
                    f"{runner} workers cannot see; copy the built-in models to a bucket with `catalog-index models "
                    f"export --to gs://BUCKET/models` and pass {flag} gs://BUCKET/models/NAME ({names}), or launch "
                    f"from the launcher or worker image, whose model cache the workers carry ({builtin.IMAGE_CACHE_ENV})")
        name = value[len(builtin.PREFIX):]
        return (f"{flag} {value} is converted into this machine's model cache ({cache}), which {runner} workers "
                f"cannot see; copy it to a bucket with `catalog-index models export --to gs://BUCKET/models "
                f"{name}` and pass {flag} gs://BUCKET/models/{name}, or launch from the launcher or worker image, "
                f"whose model cache the workers carry ({builtin.IMAGE_CACHE_ENV})")
    if files.is_local(value):
        return (f"{flag} {value!r} is a folder on this machine, which {runner} workers cannot see; copy it to a "
                f"bucket (`gcloud storage cp -r {value} gs://BUCKET/models/`) and pass its gs:// path")
    return None


MODEL = "model"  # check_worker_paths: an encoder or fusion handle, not a plain path


def check_worker_paths(options, paths: Iterable[tuple], model_cache: Optional[str] = None) -> None:
    """On a runner whose workers do not share this machine's disk, every path they read or write must be
    remote. ``paths``: (flag, value) pairs, or (flag, value, MODEL) for encoders and fusion models, in the
    order they are reported."""
    if workers_share_disk(options):
        return
    runner = runner_name(options)
    for flag, value, *kind in paths:
        if kind == [MODEL]:
            problem = _model_problem(flag, value, runner, model_cache)
        elif value and files.is_local(value):
            problem = (f"{flag} {value!r} is on this machine's disk, which {runner} workers cannot see; put it in "
                       f"a bucket and pass its gs:// path")
        else:
            problem = None
        if problem:
            raise ConfigError(problem)


def check_dataflow(options) -> None:
    """--project, --region and a gs:// --temp_location (Beam's own path rule): Beam would otherwise fail
    late, or try to create a default bucket and retry for minutes."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator

    gcp = options.view_as(GoogleCloudOptions)
    if not gcp.project:
        raise ConfigError("DataflowRunner needs --project (the Google Cloud project that runs the job)")
    if not re.fullmatch(PipelineOptionsValidator.PROJECT_ID_PATTERN, gcp.project):
        raise ConfigError(f"--project {gcp.project!r} is not a project ID (lowercase letters, digits and dashes, "
                          f"e.g. my-project-123; not the project number)")
    if not gcp.region and not os.environ.get("CLOUDSDK_COMPUTE_REGION") and not shutil.which("gcloud"):
        raise ConfigError("DataflowRunner needs --region (e.g. --region us-central1)")
    validator = PipelineOptionsValidator(options, None)
    if not gcp.temp_location:
        raise ConfigError("DataflowRunner needs --temp_location, a gs:// folder for the job's temporary files "
                          "(e.g. --temp_location gs://BUCKET/tmp); --staging_location defaults to it")
    for flag in ("temp_location", "staging_location"):
        if getattr(gcp, flag) and validator.validate_gcs_path(gcp, flag):
            raise ConfigError(f"--{flag} {getattr(gcp, flag)!r} is not a gs://BUCKET/FOLDER path (a valid bucket "
                              f"name, 3 to 63 lowercase letters, digits, '-', '_' or '.')")


# --------------------------------------------------------------------------- credentials


def _within(seconds: float, fn: Callable, name: str):
    """fn()'s result, or TimeoutError after ``seconds``; fn runs on a daemon thread, so a call stuck in
    the network cannot keep the process alive."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # pylint: disable=broad-except
            box["error"] = e

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _refresh_token():
    import google.auth
    import google.auth.transport.requests

    credentials, project = google.auth.default(scopes=list(_SCOPES))
    credentials.refresh(google.auth.transport.requests.Request())
    return project


def check_credentials(why: str, timeout: float = CREDENTIALS_TIMEOUT_S) -> Optional[str]:
    """Google's application default credentials, refreshed once within ``timeout``; returns the project they
    name (or None). ``why``: what needs them, for the message."""
    try:
        from google.auth import exceptions as auth_errors
    except ImportError as e:
        raise ConfigError(f"{why} needs google-auth, which is not installed: pip install 'apache-beam[gcp]'") from e
    fix = ("run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service "
           "account key file")
    try:
        return _within(timeout, _refresh_token, "catalog-index-credentials")
    except auth_errors.DefaultCredentialsError as e:
        raise ConfigError(f"{why} needs Google Cloud credentials and none were found; {fix}") from e
    except TimeoutError:
        raise ConfigError(f"{why} needs Google Cloud credentials, and no access token came within {timeout:g} s "
                          f"(no network, or no answer from the token service); check the connection, or "
                          f"{fix}") from None
    except Exception as e:  # RefreshError, TransportError, a malformed key file...
        raise ConfigError(f"{why} needs Google Cloud credentials, and they do not work ({brief(e)}); {fix}") from e


# --------------------------------------------------------------------------- output and input roots


def _why(e: BaseException) -> str:
    """An OS error's own words ("Permission denied"), else the exception in brief."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return brief(e)


def _nearest_existing(local: str) -> str:
    path = os.path.abspath(local)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_output(path: str, flag: str = "--output", timeout: float = PROBE_TIMEOUT_S) -> None:
    """The output root can be written: a probe file is written and deleted in it (local disk and object
    stores alike); a missing local folder must be creatable (a probe folder is made and removed in its nearest
    existing parent). Creates nothing that stays: ``create_output`` does, once every check has passed."""
    from pipelines import cas

    # A filesystem without compare-and-swap for the lease and pointers: ConfigError, no I/O (as Lease names it).
    cas.store_for(path.rstrip("/") + "/_lease.json")
    local = files.local_path(path) if files.is_local(path) else None
    if local is not None and not os.path.isdir(local):
        if os.path.exists(local):
            raise ConfigError(f"{flag} {path!r} is a file, not a folder; pass a folder (it is created when missing)")
        base = _nearest_existing(local)
        if not os.path.isdir(base):
            raise ConfigError(f"{flag} {path!r}: cannot create the folder, {base} is a file; pass a folder path")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=base))
        except OSError as e:
            raise ConfigError(f"{flag} {path!r}: cannot create the folder in {base} ({_why(e)}); pass a folder this "
                              f"user can create and write") from None
        return
    probe = files.join(path, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    state = {"written": False}

    def write_and_delete():
        files.write_bytes(probe, b"catalog-index write probe\n")
        state["written"] = True
        files.delete_file(probe)

    try:
        if local is not None:
            write_and_delete()
        else:
            _within(timeout, write_and_delete, "catalog-index-output-probe")
    except TimeoutError:
        raise ConfigError(f"{flag} {path!r}: a probe write and delete did not finish within {timeout:g} s; check "
                          f"the network and the bucket") from None
    except Exception as e:  # pylint: disable=broad-except
        if state["written"]:
            raise ConfigError(f"{flag} {path!r}: a probe file could be written but not deleted ({_why(e)}); "
                              f"publishing replaces files, so this account needs delete permission too. Remove "
                              f"{probe}") from None
        raise ConfigError(f"{flag} {path!r} is not writable ({_why(e)}); pass a folder or bucket path this "
                          f"account can write, or fix its permissions") from None


def create_output(path: str, flag: str = "--output") -> None:
    """Creates a missing local output folder (and its parents) once the run's checks have passed, and says so
    in the log; object stores have no folders to create."""
    if not files.is_local(path):
        return
    local = files.local_path(path)
    if os.path.isdir(local):
        return
    try:
        os.makedirs(local, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{flag} {path!r}: cannot create the folder ({_why(e)}); pass a folder this user can "
                          f"create and write") from None
    _log.info("created the output folder %s (%s did not exist)", os.path.abspath(local), flag)


def check_readable_root(path: str, flag: str = "--image-root") -> None:
    """A folder (or object-store prefix) that inputs are read from exists and can be read."""
    if files.is_local(path):
        local = files.local_path(path)
        if not os.path.isdir(local):
            what = "is not a folder" if os.path.exists(local) else "does not exist"
            raise ConfigError(f"{flag} {path!r} {what}; pass the folder the images are below")
        if not os.access(local, os.R_OK | os.X_OK):
            raise ConfigError(f"{flag} {path!r} cannot be read by this user; fix its permissions")
        return
    try:
        found = files.any_file_below(path)
    except Exception as e:  # pylint: disable=broad-except
        raise ConfigError(f"{flag} {path!r}: cannot list it ({brief(e)}); check the bucket name and that this "
                          f"account may read it") from None
    if not found:
        _log.warning("%s %s holds no object: every image outside it is refused", flag, path)


# --------------------------------------------------------------------------- per command


def _needs_google(options, paths: Iterable[Tuple[str, Optional[str]]]) -> Optional[str]:
    """What needs Google credentials (for the message: the runner, or the first gs:// flag), or None."""
    if is_dataflow(options):
        return "DataflowRunner"
    gs = [(flag, value) for flag, value in paths if value and files.scheme(value) == "gs"]
    return f"{gs[0][0]} {gs[0][1]!r}" if gs else None


def check_index(opts) -> bool:
    """Everything ``catalog-index index`` can check before any model loads; ``opts``: its IndexOptions view
    (path flags already normalised). Returns whether this is a Dataflow dry run."""
    dry_run = check_dry_run(opts)
    check_worker_paths(opts, [("--catalog", opts.catalog), ("--output", opts.output),
                              ("--text-encoder", opts.text_encoder, MODEL),
                              ("--image-encoder", opts.image_encoder, MODEL),
                              ("--fusion-model", opts.fusion_model, MODEL),
                              ("--image-root", opts.image_root), ("--reuse-from", opts.reuse_from)],
                       model_cache=opts.model_cache)
    if is_dataflow(opts):
        check_dataflow(opts)
    _check_storage(opts, INDEX_PATHS)
    return dry_run


def _check_storage(opts, paths) -> None:
    """The checks index and train share, in this order: credentials when a path flag needs Google, the
    output root's probe, the image root. ``paths``: (option attribute, flag) pairs."""
    why = _needs_google(opts, [(flag, getattr(opts, attr)) for attr, flag in paths])
    if why:
        check_credentials(why)
    check_output(opts.output)
    if opts.image_root:
        check_readable_root(opts.image_root)


def check_train(opts) -> None:
    """Everything ``catalog-index train`` can check before the index is read or a model loads. On a runner
    whose workers do not share this disk every path must be remote (the index's encoders are checked once
    the index is open: pipelines/train_pipeline.py)."""
    check_dry_run(opts)
    check_worker_paths(opts, [("--clicks", opts.clicks), ("--index", opts.index), ("--output", opts.output),
                              ("--image-root", opts.image_root)])
    if is_dataflow(opts):
        check_dataflow(opts)
    # --clicks is matched by the preprocessing's plan, after the index is opened and before any model loads.
    _check_storage(opts, TRAIN_PATHS)
