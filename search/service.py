"""``catalog-index serve``: an HTTP search service over a published index.

    catalog-index serve --index DIR [--host 127.0.0.1] [--port 8080] [--workers N]
                        [--poll-seconds 30] [--cache-dir D] [--version V]

FastAPI on uvicorn. The app holds a :class:`search.Watcher`; each request takes
``watcher.current()`` once, so the version in a response is the one that
answered it even while the watcher swaps in a new LATEST. Searches (encoding
the query, Annoy lookups) are CPU-bound and run in a bounded thread pool, never
on the event loop. The HTTP contract (limits, models, 4xx errors) is
search.http_api; the Prometheus metrics (``GET /metrics``) search.http_metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from typing import Optional

import anyio
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from search.http_api import (DEFAULT_K, IMAGE_FORMATS, K_DESCRIPTION, MAX_K, MAX_TEXT_CHARS, MAX_UPLOAD_BYTES, MIN_K,
                             TEXT_DESCRIPTION, BodyLimitMiddleware, HealthResponse, SearchRequest, SearchResponse,
                             VersionResponse, check_upload, decode_base64, doc, error_response, max_pixels_of,
                             status_of, validation_message)
from search.http_metrics import MULTIPROC_ENV, Metrics, MetricsMiddleware

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the app


def create_app(watcher, *, search_threads: Optional[int] = None) -> FastAPI:
    """The search service over ``watcher`` (a search.Watcher or anything with its interface).

    The app starts the watcher's background polling when it starts and stops it when it stops.
    ``search_threads`` bounds concurrent searches (default: the CPU count).
    """
    threads = search_threads or os.cpu_count() or 2
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        state["limiter"] = anyio.CapacityLimiter(threads)
        watcher.start()
        try:
            yield
        finally:
            watcher.stop()

    app = FastAPI(
        title="catalog-index search",
        summary="Nearest-neighbour search over a published catalog index",
        description=(
            "Text, image or fused text+image queries against the version the server has loaded; "
            "new versions are picked up from LATEST while serving.\n\n"
            f"Limits: k from {MIN_K} to {MAX_K}; query text not blank and at most {MAX_TEXT_CHARS} "
            f"characters; images at most {MAX_UPLOAD_BYTES // (1024 * 1024)} MB ({IMAGE_FORMATS}) and at "
            "most the index's max_image_pixels pixels. Errors are JSON {\"error\": \"...\"}."),
        version="1",
        lifespan=lifespan,
    )
    metrics = Metrics(watcher)
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        status, message = validation_message(exc.errors())
        return error_response(status, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        _log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log")

    def current():
        try:
            searcher = watcher.current()
        except Exception as exc:  # pylint: disable=broad-except
            _log.warning("no index to serve: %s", exc)
            raise HTTPException(503, f"no index loaded: {exc}") from None
        if searcher is None:
            raise HTTPException(503, "no index loaded yet")
        return searcher

    @contextlib.contextmanager
    def held():
        """The current searcher, held against a swap closing it until the request is done
        (Watcher.acquire where the watcher has it; a bare current() otherwise)."""
        acquire = getattr(watcher, "acquire", None)
        if acquire is None:
            yield current()
            return
        stack = contextlib.ExitStack()
        try:
            searcher = stack.enter_context(acquire())
        except Exception as exc:  # pylint: disable=broad-except
            _log.warning("no index to serve: %s", exc)
            raise HTTPException(503, f"no index loaded: {exc}") from None
        with stack:
            yield searcher

    async def run_search(searcher, *, texts=None, images=None, k):
        def work():
            return searcher.search(texts=texts, images=images, k=k)

        try:
            hits = await anyio.to_thread.run_sync(work, limiter=state.get("limiter"))
        except HTTPException:
            raise
        except Exception as exc:
            from schemas.errors import DataError

            if isinstance(exc, DataError):  # the query could not be embedded (an image truncated past its header)
                raise HTTPException(status_of(exc), str(exc)) from None
            raise
        return {"version": searcher.version, "release": searcher.release,
                "results": [{"item_id": h.item_id, "score": float(h.score), "shard": int(h.shard),
                             "title": h.title} for h in hits[0]]}

    @app.get("/search", response_model=SearchResponse, responses=doc(422, 503), tags=["search"],
             summary="Search by text")
    async def search_text(
            q: str = Query(..., min_length=1, max_length=MAX_TEXT_CHARS, description=TEXT_DESCRIPTION),
            k: int = Query(DEFAULT_K, ge=MIN_K, le=MAX_K, description=K_DESCRIPTION)):
        if not q.strip():
            raise HTTPException(422, "query parameter q: text is blank")
        with held() as searcher:
            return await run_search(searcher, texts=[q], k=k)

    @app.post("/search", response_model=SearchResponse, responses=doc(400, 413, 415, 422, 503), tags=["search"],
              summary="Search by text, image (base64) or both")
    async def search_json(body: SearchRequest):
        data = None if body.image is None else decode_base64(body.image)
        with held() as searcher:
            if data is not None:
                check_upload(data, max_pixels_of(searcher))
            return await run_search(searcher, texts=None if body.text is None else [body.text],
                                    images=None if data is None else [data], k=body.k)

    @app.post("/search/image", response_model=SearchResponse, responses=doc(413, 415, 422, 503),
              tags=["search"], summary="Search by an uploaded image (multipart/form-data)")
    async def search_image(
            file: UploadFile = File(..., description=f"the image: {IMAGE_FORMATS}, at most "
                                                     f"{MAX_UPLOAD_BYTES // (1024 * 1024)} MB and at most the "
                                                     "index's max_image_pixels pixels"),
            k_form: Optional[int] = Form(None, alias="k", ge=MIN_K, le=MAX_K,
                                         description=K_DESCRIPTION + "; as a form field"),
            k: Optional[int] = Query(None, ge=MIN_K, le=MAX_K, description=K_DESCRIPTION + "; or in the query")):
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        chosen = k_form if k_form is not None else k if k is not None else DEFAULT_K
        with held() as searcher:
            check_upload(data, max_pixels_of(searcher))
            return await run_search(searcher, images=[data], k=chosen)

    @app.get("/healthz", response_model=HealthResponse, responses=doc(503), tags=["operations"],
             summary="Liveness and readiness: 200 once an index is loaded")
    async def healthz():
        searcher = current()
        return {"status": "ok", "version": searcher.version, "release": searcher.release}

    @app.get("/version", response_model=VersionResponse, responses=doc(503), tags=["operations"],
             summary="The version being served, its counts and when it was loaded")
    async def version():
        searcher = current()
        manifest = searcher.manifest or {}
        return {"version": searcher.version, "release": searcher.release, "snapshot": manifest.get("snapshot"),
                "created_at": manifest.get("created_at"), "counts": manifest.get("counts", {}),
                "loaded_at": str(searcher.loaded_at)}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics (text exposition format)",
             response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}},
                              "description": "requests by endpoint/method/status, latency histogram, errors, "
                                             "loaded version"}})
    async def metrics_endpoint():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


# --------------------------------------------------------------------------- the command

_CONFIG_ENV = "CATALOG_INDEX_SERVE_CONFIG"


DESCRIPTION = ("Serve searches over a published index over HTTP (FastAPI on uvicorn), following LATEST. "
               "Endpoints: GET /search?q=&k=, POST /search (JSON), POST /search/image (upload), "
               "GET /healthz, /version, /metrics; OpenAPI at /docs.")


def add_arguments(parser):
    """The flags of ``catalog-index serve``, on ``parser`` (the CLI passes its strict ArgumentParser)."""
    parser.add_argument("--index", required=True,
                        help="[required] output root of `catalog-index index` (local or gs://)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes; each loads the index and polls on its own (default: %(default)s)")
    parser.add_argument("--poll-seconds", "--poll_seconds", dest="poll_seconds", type=float, default=30.0,
                        help="how often to check LATEST (or --version's CURRENT) for a new release "
                             "(default: %(default)g)")
    parser.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=None,
                        help="local folder for copies of a gs:// index; a local index is read in place "
                             "(default: ~/.cache/catalog-index/releases)")
    parser.add_argument("--version", default=None,
                        help="serve this version and do not follow LATEST (default: the one LATEST names)")
    return parser


def _check_args(args):
    from schemas.errors import UsageError

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if not args.poll_seconds > 0:
        raise UsageError(f"--poll-seconds must be positive, got {args.poll_seconds}")


def _watcher(config: dict):
    """The Watcher over config's index, with its query encoders loaded (not in the first request; a
    watcher whose current searcher is warm also warms the next one before swapping)."""
    from search import Watcher

    watcher = Watcher(config["index"], cache_dir=config["cache_dir"], poll_seconds=config["poll_seconds"],
                      version=config["version"])
    searcher = watcher.current()
    if hasattr(searcher, "embedder"):
        searcher.embedder()
    return watcher


def _worker_app():
    """uvicorn's app factory in each worker process of --workers N (configuration from the parent)."""
    config = json.loads(os.environ[_CONFIG_ENV])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return create_app(_watcher(config))


def serve(argv, parser=None) -> int:
    """The ``catalog-index serve`` command. Loads the index first: a bad one fails before listening (exit 1).

    ``parser``: an empty argparse parser to add the flags to (the CLI's refuses unknown flags with one line).
    """
    import argparse

    import uvicorn

    if parser is None:
        parser = argparse.ArgumentParser(prog="python -m search.service", description=DESCRIPTION,
                                         allow_abbrev=False)
    args = add_arguments(parser).parse_args(argv)
    _check_args(args)
    config = {"index": args.index, "cache_dir": args.cache_dir, "poll_seconds": args.poll_seconds,
              "version": args.version}
    watcher = _watcher(config)  # loads the index: a bad one fails here (a CatalogIndexError: one line, exit 1)
    searcher = watcher.current()
    _log.info("serving %s/%s (%s items) on http://%s:%d (docs at /docs)", searcher.version, searcher.release,
              (searcher.manifest or {}).get("counts", {}).get("indexed", "?"), args.host, args.port)
    common = {"host": args.host, "port": args.port, "log_config": None, "timeout_graceful_shutdown": 10}
    if args.workers == 1:
        try:
            uvicorn.Server(uvicorn.Config(create_app(watcher), **common)).run()
        finally:
            getattr(watcher, "close", watcher.stop)()
        return 0
    # Worker processes are spawned: each builds its own watcher from the configuration. The parent's
    # copy only proved the index loads; drop it before they start.
    getattr(watcher, "close", watcher.stop)()
    del watcher, searcher
    os.environ[_CONFIG_ENV] = json.dumps(config)
    # One set of metrics for all the workers: each writes its own files here, a scrape adds them up.
    # Set before the workers start: prometheus_client picks its storage when a process imports it.
    metrics_dir = None
    if not os.environ.get(MULTIPROC_ENV):
        metrics_dir = tempfile.mkdtemp(prefix="catalog-index-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        uvicorn.run(f"{__name__}:_worker_app", factory=True, workers=args.workers, **common)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            os.environ.pop(MULTIPROC_ENV, None)
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    raise SystemExit(serve(sys.argv[1:]))
