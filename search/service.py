"""``catalog-index serve``: an HTTP search service over a published index.

    catalog-index serve --index DIR [--host 127.0.0.1] [--port 8080] [--workers N]
                        [--poll-seconds 30] [--cache-dir D] [--version V]

FastAPI on uvicorn. The app holds a :class:`search.Watcher`; each request takes
``watcher.current()`` once, so the version in a response is the one that
answered it even while the watcher swaps in a new LATEST. Searches (encoding
the query, Annoy lookups) are CPU-bound and run in a bounded thread pool, never
on the event loop. Every bad request is a 4xx with ``{"error": "..."}``:

    400  malformed JSON, a body that is not a JSON object
    413  request body or uploaded image over 10 MB, image over the index's pixel limit
    415  an upload that is not a JPEG, PNG, GIF, BMP or WebP image
    422  a wrong type, k outside 1..1000, blank or over-long text, bad base64
    503  no index loaded

Metrics (``GET /metrics``, Prometheus text): requests by endpoint, method and
status, a latency histogram by endpoint, client and server errors, and the
loaded version as a labelled gauge. With ``--workers N`` the workers share one set of metrics
through prometheus_client's multiprocess mode, so any worker's scrape counts every request.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Optional

import anyio
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

_log = logging.getLogger(__name__)

MIN_K, MAX_K, DEFAULT_K = 1, 1000, 10
MAX_TEXT_CHARS = 2000
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Bodies are bounded before they are read whole: a base64 image is 4/3 of its bytes, and multipart
# framing plus a small form field fit in the slack. Anything else (GET, health) needs no body at all.
_SLACK = 64 * 1024
_BODY_LIMITS = {"/search": (MAX_UPLOAD_BYTES + 2) // 3 * 4 + _SLACK, "/search/image": MAX_UPLOAD_BYTES + _SLACK}
_DEFAULT_BODY_LIMIT = _SLACK
# Endpoints get their own metric label; any other path is "other" (no label per scanned URL).
_ENDPOINTS = frozenset({"/search", "/search/image", "/healthz", "/version", "/metrics", "/docs", "/redoc",
                        "/openapi.json", "/docs/oauth2-redirect"})
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_IMAGE_FORMATS = "JPEG, PNG, GIF, BMP or WebP"

K_DESCRIPTION = f"number of results, {MIN_K} to {MAX_K} (default {DEFAULT_K})"
TEXT_DESCRIPTION = f"query text, not blank, at most {MAX_TEXT_CHARS} characters"


# --------------------------------------------------------------------------- models (the OpenAPI schema)

class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong with the request, in one line")


class Result(BaseModel):
    item_id: str
    score: float = Field(description="similarity (higher is closer)")
    shard: int = Field(description="the shard the item lives in")
    title: Optional[str] = None


class SearchResponse(BaseModel):
    version: str = Field(description="the index version that answered")
    release: str = Field(description="the release of that version that answered")
    results: list[Result]


class SearchRequest(BaseModel):
    """A text query, an image query, or both fused. At least one of ``text`` and ``image``."""

    model_config = ConfigDict(extra="forbid")

    text: Optional[StrictStr] = Field(None, max_length=MAX_TEXT_CHARS, description=TEXT_DESCRIPTION)
    image: Optional[StrictStr] = Field(
        None, description=f"base64 of a {_IMAGE_FORMATS} file (a data: URL prefix is allowed), at most "
                          f"{MAX_UPLOAD_BYTES // (1024 * 1024)} MB decoded and at most the index's "
                          f"max_image_pixels pixels")
    k: StrictInt = Field(DEFAULT_K, ge=MIN_K, le=MAX_K, description=K_DESCRIPTION)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value):
        if value is not None and not value.strip():
            raise ValueError("text is blank")
        return value

    @model_validator(mode="after")
    def _one_query(self):
        if self.text is None and self.image is None:
            raise ValueError('give "text", "image" or both')
        return self


class VersionResponse(BaseModel):
    version: str
    release: str
    snapshot: Optional[str] = None
    created_at: Optional[str] = None
    counts: dict[str, Any] = Field(description="the manifest's counts (read, indexed, rejected, degraded...)")
    loaded_at: str = Field(description="when this process loaded the release")


class HealthResponse(BaseModel):
    status: str
    version: str
    release: str


_ERRORS_DOC = {
    400: {"model": ErrorBody, "description": "malformed JSON or a body that is not a JSON object"},
    413: {"model": ErrorBody, "description": "request or image over 10 MB, or image over the pixel limit"},
    415: {"model": ErrorBody, "description": f"the upload is not a {_IMAGE_FORMATS} image"},
    422: {"model": ErrorBody, "description": "a wrong type or a value out of its limits (k, text, base64)"},
    503: {"model": ErrorBody, "description": "no index is loaded"},
}


def _doc(*codes):
    return {code: _ERRORS_DOC[code] for code in codes}


# --------------------------------------------------------------------------- metrics


def _version_of(watcher):
    try:
        return watcher.current()
    except Exception:  # pylint: disable=broad-except - nothing loaded: no sample, the scrape still works
        return None


class _VersionCollector:
    """The loaded version as a labelled gauge, read from the watcher at scrape time (never stale)."""

    def __init__(self, watcher):
        self.watcher = watcher

    def collect(self):
        gauge = GaugeMetricFamily("catalog_index_loaded_version", "the index version and release being served "
                                  "(value 1)", labels=["version", "release"])
        items = GaugeMetricFamily("catalog_index_loaded_items", "items indexed in the version being served")
        searcher = _version_of(self.watcher)
        if searcher is not None:
            gauge.add_metric([str(searcher.version), str(searcher.release)], 1)
            indexed = (searcher.manifest or {}).get("counts", {}).get("indexed")
            if isinstance(indexed, int):
                items.add_metric([], indexed)
        yield gauge
        yield items


def _multiprocess() -> bool:
    """Whether the server runs as several processes (--workers N) that share their metrics through files."""
    return bool(os.environ.get(MULTIPROC_ENV))


class _Metrics:
    """The service's Prometheus metrics.

    One process: a private registry, the loaded version read at scrape time. ``--workers N``: every
    worker writes its counts to files in $PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess
    mode) and a scrape, whichever worker answers it, adds up all of them; the loaded version is then a
    gauge per worker process (label ``pid``), set whenever that worker answers a request.
    """

    def __init__(self, watcher):
        from prometheus_client import Gauge, multiprocess

        self.watcher = watcher
        self.registry = CollectorRegistry(auto_describe=True)
        # In multiprocess mode the values live in files; the metrics are registered nowhere and the
        # scrape registry reads the files instead (registering both would count each sample twice).
        own = None if _multiprocess() else self.registry
        self.requests = Counter("catalog_index_http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=own)
        self.latency = Histogram("catalog_index_http_request_duration_seconds",
                                 "time from request to the end of the response, by endpoint",
                                 ["endpoint", "method"], buckets=_LATENCY_BUCKETS, registry=own)
        self.errors = Counter("catalog_index_http_errors", "error responses: kind=client (4xx) or server (5xx "
                              "and unhandled exceptions)", ["endpoint", "kind"], registry=own)
        self.version_gauge = None
        self._shown = None
        if _multiprocess():
            multiprocess.MultiProcessCollector(self.registry)
            self.version_gauge = Gauge("catalog_index_loaded_version", "the index version and release each "
                                       "worker process serves (value 1)", ["version", "release"], registry=None,
                                       multiprocess_mode="liveall")
            self.note_version()
        else:
            self.registry.register(_VersionCollector(watcher))

    def note_version(self):
        """Multiprocess mode: this worker's loaded version in its gauge (the previous one set to 0)."""
        searcher = _version_of(self.watcher)
        shown = None if searcher is None else (str(searcher.version), str(searcher.release))
        if self.version_gauge is None or shown == self._shown:
            return
        if self._shown is not None:
            self.version_gauge.labels(*self._shown).set(0)
        if shown is not None:
            self.version_gauge.labels(*shown).set(1)
        self._shown = shown

    def observe(self, endpoint, method, status, seconds):
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint, method).observe(seconds)
        if status >= 500:
            self.errors.labels(endpoint, "server").inc()
        elif status >= 400:
            self.errors.labels(endpoint, "client").inc()
        self.note_version()


class _MetricsMiddleware:
    """Outermost ASGI layer: counts every response, including those of the layers inside it."""

    def __init__(self, app, metrics: _Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
            self.metrics.observe(endpoint, scope["method"], status, time.perf_counter() - start)


class _BodyLimitMiddleware:
    """Refuses a body over its endpoint's limit with 413: by Content-Length before reading, and by
    counting while it streams in (chunked uploads), so an oversized body is never held whole."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = _BODY_LIMITS.get(scope["path"], _DEFAULT_BODY_LIMIT)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _too_large(limit)(scope, receive, send)
            return
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # FastAPI re-raises an HTTPException met while reading the body; the app's
                    # handler turns it into the JSON 413.
                    raise HTTPException(413, _too_large_message(limit))
            return message

        await self.app(scope, bounded_receive, send)


def _too_large_message(limit):
    return f"request body over the {limit} byte limit of this endpoint (images: at most {MAX_UPLOAD_BYTES} bytes)"


def _too_large(limit):
    return JSONResponse({"error": _too_large_message(limit)}, status_code=413, headers={"Connection": "close"})


# --------------------------------------------------------------------------- errors


def _where(loc) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("query", "body", "path", "header"):
        kind, rest = parts[0], parts[1:]
        if kind == "body" and not rest:
            return "request body"
        return f"{'query parameter' if kind == 'query' else 'field'} {'.'.join(rest)}" if rest else kind
    return ".".join(parts) or "request"


def _validation_message(errors) -> tuple[int, str]:
    for e in errors:
        if e.get("type") == "json_invalid":
            detail = (e.get("ctx") or {}).get("error", "")
            return 400, f"malformed JSON body: {detail} at position {e['loc'][-1]}" if detail else "malformed JSON"
    for e in errors:
        if e.get("type") == "model_attributes_type" or (e.get("type") == "dict_type" and tuple(e["loc"]) == ("body",)):
            return 400, "the request body must be a JSON object such as {\"text\": \"red shoes\", \"k\": 10}"
    messages = []
    for e in errors[:3]:
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        messages.append(f"{_where(e.get('loc', ()))}: {msg}")
    return 422, "; ".join(messages)


def _error(status, message):
    return JSONResponse({"error": message}, status_code=status)


# --------------------------------------------------------------------------- images


def _check_image(data: bytes, max_pixels: int) -> None:
    """Size, format and declared canvas from the header only (the pipeline's own check), before decoding."""
    from embedding import images

    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"image is {len(data)} bytes, over the {MAX_UPLOAD_BYTES}-byte limit")
    if not data:
        raise HTTPException(415, f"the upload is empty, not a {_IMAGE_FORMATS} image")
    try:
        images.check_image(data, max_pixels)
    except images.ImageTooLargeError as exc:
        raise HTTPException(413, f"{exc} of this index") from None
    except images.ImageDecodeError as exc:
        raise HTTPException(415, f"the upload is not a readable {_IMAGE_FORMATS} image ({exc})") from None


def _status_of(exc) -> int:
    """The HTTP status of a query that could not be embedded, by the kind of error (never its wording)."""
    from embedding import images

    if isinstance(exc, images.ImageTooLargeError):
        return 413
    if isinstance(exc, images.ImageDecodeError):
        return 415
    return 422


def _max_pixels(searcher) -> int:
    from embedding import images

    value = ((searcher.manifest or {}).get("options") or {}).get("max_image_pixels")
    return value if isinstance(value, int) and value > 0 else images.DEFAULT_MAX_PIXELS


def _decode_base64(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) > _BODY_LIMITS["/search"]:
        raise HTTPException(413, f"image is over the {MAX_UPLOAD_BYTES}-byte limit")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, "field image: not valid base64") from None


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
            f"characters; images at most {MAX_UPLOAD_BYTES // (1024 * 1024)} MB ({_IMAGE_FORMATS}) and at "
            "most the index's max_image_pixels pixels. Errors are JSON {\"error\": \"...\"}."),
        version="1",
        lifespan=lifespan,
    )
    metrics = _Metrics(watcher)
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        status, message = _validation_message(exc.errors())
        return _error(status, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        _log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

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
                raise HTTPException(_status_of(exc), str(exc)) from None
            raise
        return {"version": searcher.version, "release": searcher.release,
                "results": [{"item_id": h.item_id, "score": float(h.score), "shard": int(h.shard),
                             "title": h.title} for h in hits[0]]}

    @app.get("/search", response_model=SearchResponse, responses=_doc(422, 503), tags=["search"],
             summary="Search by text")
    async def search_text(
            q: str = Query(..., min_length=1, max_length=MAX_TEXT_CHARS, description=TEXT_DESCRIPTION),
            k: int = Query(DEFAULT_K, ge=MIN_K, le=MAX_K, description=K_DESCRIPTION)):
        if not q.strip():
            raise HTTPException(422, "query parameter q: text is blank")
        with held() as searcher:
            return await run_search(searcher, texts=[q], k=k)

    @app.post("/search", response_model=SearchResponse, responses=_doc(400, 413, 415, 422, 503), tags=["search"],
              summary="Search by text, image (base64) or both")
    async def search_json(body: SearchRequest):
        data = None if body.image is None else _decode_base64(body.image)
        with held() as searcher:
            if data is not None:
                _check_image(data, _max_pixels(searcher))
            return await run_search(searcher, texts=None if body.text is None else [body.text],
                                    images=None if data is None else [data], k=body.k)

    @app.post("/search/image", response_model=SearchResponse, responses=_doc(413, 415, 422, 503),
              tags=["search"], summary="Search by an uploaded image (multipart/form-data)")
    async def search_image(
            file: UploadFile = File(..., description=f"the image: {_IMAGE_FORMATS}, at most "
                                                     f"{MAX_UPLOAD_BYTES // (1024 * 1024)} MB and at most the "
                                                     "index's max_image_pixels pixels"),
            k_form: Optional[int] = Form(None, alias="k", ge=MIN_K, le=MAX_K,
                                         description=K_DESCRIPTION + "; as a form field"),
            k: Optional[int] = Query(None, ge=MIN_K, le=MAX_K, description=K_DESCRIPTION + "; or in the query")):
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        chosen = k_form if k_form is not None else k if k is not None else DEFAULT_K
        with held() as searcher:
            _check_image(data, _max_pixels(searcher))
            return await run_search(searcher, images=[data], k=chosen)

    @app.get("/healthz", response_model=HealthResponse, responses=_doc(503), tags=["operations"],
             summary="Liveness and readiness: 200 once an index is loaded")
    async def healthz():
        searcher = current()
        return {"status": "ok", "version": searcher.version, "release": searcher.release}

    @app.get("/version", response_model=VersionResponse, responses=_doc(503), tags=["operations"],
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

    app.add_middleware(_BodyLimitMiddleware)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    return app


# --------------------------------------------------------------------------- the command

_CONFIG_ENV = "CATALOG_INDEX_SERVE_CONFIG"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


DESCRIPTION = ("Serve searches over a published index over HTTP (FastAPI on uvicorn), following LATEST. "
               "Endpoints: GET /search?q=&k=, POST /search (JSON), POST /search/image (upload), "
               "GET /healthz, /version, /metrics; OpenAPI at /docs.")


def add_arguments(parser):
    """The flags of ``catalog-index serve``, on ``parser`` (the CLI passes its strict ArgumentParser)."""
    parser.add_argument("--index", required=True, help="output root of `catalog-index index` (local or gs://)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes (default 1); each loads the index and polls on its own")
    parser.add_argument("--poll-seconds", "--poll_seconds", dest="poll_seconds", type=float, default=30.0,
                        help="how often to check LATEST for a new version (default 30)")
    parser.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=None,
                        help="local folder for copies of a remote index (default: a temporary folder)")
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
