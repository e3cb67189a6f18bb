"""The ``catalog-index`` command: a thin layer over the pipeline modules.

    catalog-index index    --catalog GLOB --output DIR [...] [Beam flags]
    catalog-index backfill --catalog-pattern P --from D --to D --output DIR [...]
    catalog-index train    --clicks GLOB --index DIR --output MODELS_DIR [...] [Beam flags]
    catalog-index models   {list,build,export --to DIR_OR_GS}
    catalog-index verify   --index DIR [--version V]
    catalog-index rollback --index DIR --to V
    catalog-index gc       --output DIR [--keep N] [--older-than DAYS] [--dry-run]
    catalog-index sample   --output DIR   (a generated catalog and tiny encoders)
    catalog-index query    --index DIR (--text Q | --image PATH | --queries FILE) [--k 10]
    catalog-index serve    --index DIR [--host H] [--port P] [--workers N] [--poll-seconds S]

Exit status: 0 done, 1 a data or run failure (the input, a check, another run holding
the output, or an unexpected error), 2 a usage or configuration error, 130 interrupted;
a failure ends with one line on stderr, ``catalog-index CMD: error: ...``. Tracebacks go
to the run's log file (every log line of the run, kept under the user cache's ``logs/``,
or ``$CATALOG_INDEX_LOG_DIR``; the last LOG_FILES_KEPT runs), or to stderr with --verbose.
"""

import logging
import os
import re
import sys

USAGE = """usage: catalog-index {index,backfill,train,verify,rollback,gc,models,sample,query,serve,deploy} [options]

  index      build and publish one index version from a catalog
  backfill   build one version per date from a dated catalog pattern
  train      refit the fusion on logged clicks (text and photo searches); index with --fusion-model
  verify     check a published version against its manifest (every file's sha256)
  rollback   point LATEST back at an earlier published version (verified first)
  gc         remove abandoned and replaced releases, and old versions
  models     list, build or export the built-in pretrained encoders
  sample     write a generated sample catalog and tiny encoders (no network)
  query      search a published index (text, image or both; JSON lines out)
  serve      serve searches over HTTP (text, image upload), following LATEST
  deploy     generate deployment files (Dataflow Flex Template metadata) from the CLI's own flags

Run `catalog-index COMMAND --help` for the options of a command, with their defaults and which
are required. `--verbose` anywhere keeps TensorFlow's native start-up messages and prints
tracebacks of errors."""


def _quiet_tensorflow():
    # TensorFlow's C++ start-up chatter drowns the progress lines; errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


LOG_DIR_ENV = "CATALOG_INDEX_LOG_DIR"
LOG_FILES_KEPT = 20


class _DropKnownNoise(logging.Filter):
    # Beam's RunInference warns on every batch when its optional torch-based model
    # manager is not installed ("Resource module is not available ..."): not ours to act on.
    def filter(self, record):
        return "memory usage cannot be fetched" not in record.getMessage()


class _NoBeamErrors(logging.Filter):
    # On stderr (without --verbose) a failure is told once, by the one line at the end: Beam logs the
    # error a DoFn raised, its stack embedded in the text, before re-raising it; that stays in the log file.
    def filter(self, record):
        return not (record.levelno >= logging.ERROR and record.name.startswith("apache_beam"))


class _NoTracebackFormatter(logging.Formatter):
    """Formats a record's message without its traceback (stderr without --verbose; the log file keeps it)."""

    def format(self, record):
        if record.exc_info or record.exc_text or record.stack_info:
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None,
                                            "stack_info": None})
        return super().format(record)


def _one_line(error: BaseException) -> str:
    # Beam appends "[while running 'Step']" to errors raised in a DoFn: the step is not the user's business.
    return re.sub(r"\s*\[while running '[^']*'\]", "", " ".join(str(error).split()))


def _setup_logging(verbose: bool = False, log_path=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropKnownNoise())
        if not verbose and type(handler) is logging.StreamHandler:  # stderr (not pytest's capture handlers)
            handler.addFilter(_NoBeamErrors())
            handler.setFormatter(_NoTracebackFormatter(handler.formatter._fmt if handler.formatter else None,
                                                       "%H:%M:%S"))
    if log_path is not None:
        to_file = logging.FileHandler(log_path, encoding="utf-8", delay=True)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        to_file.addFilter(_DropKnownNoise())
        logging.getLogger().addHandler(to_file)
    for noisy in ("apache_beam", "absl", "tensorflow", "h5py", "urllib3", "google"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _log_file(command: str):
    """A new log file for this run (older ones beyond LOG_FILES_KEPT removed), or None when the folder
    cannot be written: a log file is a convenience, never a reason to fail."""
    import datetime

    from schemas import layout

    folder = os.environ.get(LOG_DIR_ENV) or layout.user_cache_dir("logs")
    try:
        os.makedirs(folder, exist_ok=True)
        old = sorted((n for n in os.listdir(folder) if n.startswith("catalog-index-") and n.endswith(".log")),
                     key=lambda n: os.path.getmtime(os.path.join(folder, n)))
        for name in old[:max(0, len(old) - LOG_FILES_KEPT + 1)]:
            os.remove(os.path.join(folder, name))
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = os.path.join(folder, f"catalog-index-{command}-{stamp}-{os.getpid()}.log")
        open(path, "a", encoding="utf-8").close()
        return path
    except OSError:
        return None


def _index(argv):
    from pipelines import flags
    from pipelines import index_pipeline
    from pipelines.options import IndexOptions

    if "-h" in argv or "--help" in argv:
        _print_options_help(
            IndexOptions, prog="catalog-index index",
            description="Build and publish one index version from a catalog.",
            epilog="Dashed flags also accept Beam's underscore spelling (--text_encoder). Any Beam pipeline flag "
                   "(--runner, --direct_num_workers, --direct_running_mode, Dataflow flags such as --project, "
                   "--region, --temp_location) passes through to PipelineOptions.")
        return 0
    flags.check_pipeline_flags(argv, "catalog-index index")
    result = index_pipeline.run(argv)
    print(result.summary())
    return 0


def _train(argv):
    from pipelines import flags
    from pipelines import train_pipeline
    from pipelines.train_options import TrainOptions

    if "-h" in argv or "--help" in argv:
        _print_options_help(
            TrainOptions, prog="catalog-index train",
            description="Refit the fusion on logged clicks, as one Beam job: a preprocessing (validate, encode each "
                        "distinct query once, split by time), then a fit step on one worker: an item tower and a "
                        "query tower trained with an in-batch softmax, evaluated on the held-out days against the "
                        "index's fusion, and published as OUTPUT/<version>/ (LATEST moves by compare-and-swap).",
            epilog="Any Beam pipeline flag (--runner, --direct_num_workers, Dataflow flags such as --project, "
                   "--region, --temp_location) passes through to the job. Then: catalog-index index ... "
                   "--fusion-model MODELS_DIR.")
        return 0
    flags.check_pipeline_flags(argv, "catalog-index train", app=TrainOptions)
    result = train_pipeline.run(argv)
    print(result.summary())
    return 0


def _print_options_help(options_class, **parser_args) -> None:
    """--help of a PipelineOptions command. Its required flags are checked by the options' check(), not by
    argparse (Beam's PipelineOptions parses the same flags, and `--help` must work without them): their help
    says "[required]", and here they are also shown as required in the usage line."""
    import argparse

    parser = argparse.ArgumentParser(**parser_args)
    options_class._add_argparse_args(parser)  # pylint: disable=protected-access
    for action in parser._actions:  # pylint: disable=protected-access
        if (action.help or "").startswith("[required]"):
            action.required = True  # this parser only prints help
    parser.print_help()


def _backfill(argv):
    from pipelines import backfill

    outcomes = backfill.run(argv)
    for o in outcomes:
        print(f"{o.date}  {o.status:9s}  {o.detail}")
    failed = [o for o in outcomes if o.status == "failed"]
    print(f"backfill: {len(outcomes) - len(failed)} of {len(outcomes)} date(s) ok, {len(failed)} failed")
    return 1 if failed else 0


def _models(argv):
    import argparse

    from embedding import builtin
    from pipelines import flags

    cache_help = (f"folder of the converted models, before or after the action (default: ${builtin.CACHE_ENV}, "
                  "else ~/.cache/catalog-index/models)")
    parser = flags.ArgumentParser(prog="catalog-index models", allow_abbrev=False,
                                  description="Built-in pretrained encoders (converted on first use, offline).",
                                  epilog="Run `catalog-index models ACTION --help` for an action's options.")
    parser.add_argument("--model-cache", "--model_cache", dest="model_cache", default=None, help=cache_help)
    sub = parser.add_subparsers(dest="action", required=True, metavar="{list,build,export}")

    def action(name, text):
        one = sub.add_parser(name, help=text, description=text[:1].upper() + text[1:] + ".", allow_abbrev=False)
        # SUPPRESS: when absent after the action, the value given before it (or the default) stays.
        one.add_argument("--model-cache", "--model_cache", dest="model_cache", default=argparse.SUPPRESS,
                         help=cache_help)
        return one

    action("list", "list the built-in models and whether they are built (reads the cache only)")
    build = action("build", "convert models into the cache now")
    build.add_argument("names", nargs="*", metavar="NAME", help="model names (default: all)")
    export = action("export", "copy built models (converting them first if needed) to a folder or bucket for workers")
    export.add_argument("--to", required=True, help="[required] destination folder, local or gs://")
    export.add_argument("names", nargs="*", metavar="NAME", help="model names (default: all)")
    args = parser.parse_args(argv)
    names = [n.removeprefix(builtin.PREFIX) for n in getattr(args, "names", [])] or list(builtin.MODELS)
    if args.action == "list":
        for m in builtin.MODELS.values():
            state = "built" if builtin.is_built(m.name, args.model_cache) else "not built"
            print(f"{builtin.PREFIX + m.name:30s} {m.kind:5s} {m.output_dim:5d}-d  {state:9s}  {m.description}")
    elif args.action == "build":
        for name in names:
            print(f"{builtin.PREFIX + name}: {builtin.ensure_built(name, args.model_cache)}")
    else:
        from pipelines import preflight

        preflight.check_output(args.to, "--to")  # writable (probe), before any model is built or copied
        for handle, path in builtin.export(names, args.to, args.model_cache).items():
            print(f"{handle}: {path}")
    return 0


def _verify(argv):
    from pipelines import flags
    from pipelines import publication

    parser = flags.ArgumentParser(
        prog="catalog-index verify",
        description="Check a published version: its manifest (schema, accounting) and the size and sha256 of "
                    "every file it lists. Exit 1 naming the first bad file.")
    parser.add_argument("--index", required=True,
                        help="[required] output root of `catalog-index index` (local or gs://)")
    parser.add_argument("--version", default=None, help="version to check (default: the one LATEST names)")
    args = parser.parse_args(argv)
    checked = publication.verify(args.index, args.version)
    print(f"ok: {checked.pointer.path} ({checked.files} files, {checked.bytes} bytes, "
          f"{checked.manifest['counts']['indexed']} items) matches its manifest")
    return 0


def _rollback(argv):
    import uuid

    from pipelines import flags
    from pipelines import lease
    from pipelines import publication

    parser = flags.ArgumentParser(
        prog="catalog-index rollback",
        description="Point LATEST back at an earlier published version, after verifying that version's live "
                    "release file by file; holds the output root's lease meanwhile, so no index run publishes "
                    "at the same time, and swaps LATEST only if it did not change since it was read. The next "
                    "publication with a later snapshot moves LATEST forward again: pause the schedule first.")
    parser.add_argument("--index", required=True,
                        help="[required] output root of `catalog-index index` (local or gs://)")
    parser.add_argument("--to", required=True, help="[required] the published version LATEST should name")
    args = parser.parse_args(argv)
    owner = lease.Lease(args.index, f"rollback-{uuid.uuid4().hex[:8]}", args.to, command="rollback").acquire()
    try:
        done = publication.roll_back(args.index, args.to, lease=owner)
    finally:
        owner.release()
    facts = (f"{done.checked.files} files, {done.checked.bytes} bytes, "
             f"{done.checked.manifest['counts']['indexed']} items, verified")
    if not done.moved:
        print(f"LATEST already names {done.after.path} ({facts}); nothing changed")
        return 0
    print(f"LATEST: {done.before.path if done.before else 'nothing'} -> {done.after.path} ({facts})")
    print("note: the next publication with a later snapshot moves LATEST forward again; pause the schedule "
          "until the cause is fixed")
    return 0


def _gc(argv):
    from pipelines import flags
    from pipelines import gc

    return gc.main(argv, flags.ArgumentParser(prog="catalog-index gc", description=gc.__doc__.split("\n\n")[0]))


def _sample(argv):
    from catalog_index import sample

    sample.main(argv)
    return 0


def _query(argv):
    import json

    from pipelines import flags
    from schemas.errors import UsageError

    parser = flags.ArgumentParser(
        prog="catalog-index query", allow_abbrev=False,
        description="Search a published index (verified first) with text, an image or both, or with a JSON-lines "
                    "file of queries ({\"id\", \"text\", \"image\": path}); prints one JSON object per query: "
                    "{\"id\", \"results\": [{\"item_id\", \"score\", \"shard\", \"title\"}]} or {\"id\", \"error\"}.")
    parser.add_argument("--index", required=True,
                        help="[required] output root of `catalog-index index` (local or gs://)")
    parser.add_argument("--text", default=None, help="query text (with --image: both, fused)")
    parser.add_argument("--image", default=None, help="query image file (JPEG, PNG, GIF, BMP, WebP)")
    parser.add_argument("--queries", default=None, help="JSON-lines file of queries (instead of --text/--image)")
    parser.add_argument("--k", type=int, default=10, help="results per query (default: %(default)s)")
    parser.add_argument("--search-k", "--search_k", dest="search_k", type=int, default=None,
                        help="Annoy search_k per shard; -1 searches every item (default: the one the recall gate "
                             "chose at publication, else -1)")
    parser.add_argument("--version", default=None, help="version to search (default: the one LATEST names)")
    parser.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=None,
                        help="local copy of a gs:// index (default: ~/.cache/catalog-index/releases)")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=64,
                        help="queries embedded and searched together (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.queries is not None and (args.text is not None or args.image is not None):
        raise UsageError("give --queries or --text/--image, not both")
    if args.queries is None and args.text is None and args.image is None:
        raise UsageError("give --text, --image (or both), or --queries FILE")
    if args.k < 1 or args.batch_size < 1 or args.search_k == 0 or (args.search_k or 0) < -1:
        raise UsageError("--k and --batch-size must be at least 1, --search-k positive or -1")
    if args.queries is not None and not os.path.isfile(args.queries):
        raise UsageError(f"--queries {args.queries!r}: no such file")

    from search import index as search_index
    from search import queries as search_queries

    searcher = search_index.open_index(args.index, args.version, args.cache_dir)
    try:
        if args.queries is not None:
            queries = search_queries.read_jsonl(args.queries)
        else:
            queries = [{"id": None, "text": args.text, "image": args.image}]
        for answer in search_queries.answer(searcher, queries, args.k, args.search_k, args.batch_size):
            print(json.dumps(answer, ensure_ascii=False), flush=True)
    finally:
        searcher.close()
    return 0


def _serve(argv):
    from pipelines import flags
    from search import service

    return service.serve(argv, flags.ArgumentParser(prog="catalog-index serve", description=service.DESCRIPTION,
                                                    allow_abbrev=False))


def _deploy(argv):
    from pipelines import flags
    from pipelines import templates

    parser = flags.ArgumentParser(prog="catalog-index deploy", allow_abbrev=False,
                                  description="Deployment files generated from the CLI itself.",
                                  epilog="Run `catalog-index deploy ACTION --help` for an action's options.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="{template}")
    text = ("write a pipeline's Dataflow Flex Template metadata.json, generated from its options (names, help, "
            "required flags, defaults, regexes)")
    template = sub.add_parser("template", help=text, description=text[:1].upper() + text[1:] + ".",
                              allow_abbrev=False)
    template.add_argument("--pipeline", required=True, choices=templates.PIPELINES,
                          help="[required] the command the template runs: index or train")
    template.add_argument("--out", required=True,
                          help="[required] folder (local, file:// or gs://) that receives metadata.json; a local one "
                               "is created when missing")
    args = parser.parse_args(argv)
    print(templates.write(args.pipeline, args.out))
    return 0


COMMANDS = {"index": _index, "backfill": _backfill, "train": _train, "verify": _verify, "rollback": _rollback,
            "gc": _gc, "models": _models,
            "sample": _sample, "query": _query, "serve": _serve, "deploy": _deploy}


# What TensorFlow's C++ runtime prints at start-up on its own (absl's pre-init notice, oneDNN and
# CUDA notices, the "failed call to cuInit" error on machines without a GPU, CPU-feature hints).
# TF_CPP_MIN_LOG_LEVEL does not reach these, so they are filtered from the process's stderr.
_NATIVE_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IWEF]\d{4} [\d:.]+\s+\d+\s+[\w./-]+:\d+\] .*"
    r"|To enable the following instructions: .*)$")


def _filter_native_stderr():
    """Routes file descriptor 2 through a thread that drops TensorFlow's native start-up lines."""
    import atexit
    import threading

    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump():
        with os.fdopen(read_end, "rb") as src:
            for line in src:
                if not _NATIVE_NOISE.match(line.decode("utf-8", "replace").rstrip("\r\n")):
                    os.write(original, line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore():
        try:
            sys.stderr.flush()
        finally:
            os.dup2(original, 2)  # closes the pipe's last writer in this process: the pump drains and ends
            thread.join(timeout=2)

    atexit.register(restore)


def main(argv=None) -> int:
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    if as_program and not verbose:
        _filter_native_stderr()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"catalog-index: error: unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} "
              f"(catalog-index --help)", file=sys.stderr)
        return 2
    _quiet_tensorflow()
    # A log file only for the real program: tests call main() in-process many times.
    log_path = _log_file(argv[0]) if as_program else None
    _setup_logging(verbose, log_path)
    from schemas.errors import CatalogIndexError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except CatalogIndexError as e:
        # The message already says what to fix; the traceback is in the log file (or above, --verbose).
        status, message, failure = e.exit_status, _one_line(e), e
    except KeyboardInterrupt:
        print(f"catalog-index {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # not a failure the project names: an environment problem or a bug
        status, failure = 1, e
        message = f"unexpected {type(e).__name__}: {_one_line(e)}" + (
            f" (traceback in {log_path})" if log_path else " (rerun with --verbose for the traceback)")
    _log_failure(failure, verbose)
    print(f"catalog-index {argv[0]}: error: {message}", file=sys.stderr)
    return status


def _log_failure(failure: BaseException, verbose: bool) -> None:
    """The failure's traceback: into the log file, and on stderr with --verbose."""
    import traceback

    text = "".join(traceback.format_exception(failure))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logging.LogRecord("catalog_index.cli", logging.ERROR, __file__, 0, "%s", (text,), None))
            handler.flush()
    if verbose:
        sys.stderr.write(text)


if __name__ == "__main__":
    sys.exit(main())
