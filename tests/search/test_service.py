"""The HTTP service (search/service.py) on a real uvicorn server on 127.0.0.1, requests over http.client.

Most tests serve a small fake watcher (the search library's Watcher/Searcher contract), so they test
the HTTP layer: limits, errors, metrics, swaps, the thread pool. One end-to-end test serves a real
published version through the real Watcher.
"""

import base64
import contextlib
import http.client
import io
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from typing import NamedTuple, Optional

import pytest
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from search import service

MB = 1024 * 1024


class Hit(NamedTuple):
    item_id: str
    score: float
    shard: int
    title: Optional[str]


class FakeSearcher:
    def __init__(self, version="v1", release="r1", max_image_pixels=1_000_000, delay=0.0):
        self.version, self.release = version, release
        self.manifest = {"version": version, "release": release, "snapshot": "2026-11-01T00:00:00Z",
                         "created_at": "2026-11-01T01:00:00Z",
                         "counts": {"read": 5, "indexed": 4, "rejected": 1, "rejected_by_reason": {},
                                    "degraded": 0, "degraded_by_reason": {}},
                         "options": {"max_image_pixels": max_image_pixels}}
        self.loaded_at = "2026-11-01T02:00:00Z"
        self.default_search_k = 100
        self.delay = delay
        self.calls = []

    def search(self, texts=None, images=None, vectors=None, k=10, search_k=None):
        self.calls.append({"texts": texts, "images": images, "k": k, "thread": threading.get_ident()})
        if self.delay:
            time.sleep(self.delay)
        kind = "+".join(name for name, v in (("text", texts), ("image", images)) if v)
        return [[Hit(f"{self.version}-{i}", 1.0 - i / 100, i % 2, f"{kind} {i}" if i else None) for i in range(k)]]


class FakeWatcher:
    def __init__(self, searcher):
        self.searcher = searcher
        self.started = self.stopped = 0

    def current(self):
        if self.searcher is None:
            raise RuntimeError("no version published under /nowhere")
        return self.searcher

    def check_now(self):
        return False

    def start(self):
        self.started += 1

    def stop(self):
        self.stopped += 1


@contextlib.contextmanager
def serving(app):
    """A real uvicorn server on a free 127.0.0.1 port in a thread; yields (host, port, server thread id)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[:2] + (thread.ident,)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "server did not stop"


class Client:
    def __init__(self, host, port):
        self.host, self.port = host, port

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        ctype = resp.getheader("content-type", "")
        return resp.status, (json.loads(data) if ctype.startswith("application/json") else data.decode())

    def get(self, path):
        return self.request("GET", path)

    def post_json(self, path, payload):
        body = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        return self.request("POST", path, body, {"Content-Type": "application/json"})

    def upload(self, path, data, filename="photo.png", fields=None):
        boundary = uuid.uuid4().hex
        parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                 for k, v in (fields or {}).items()]
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request("POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def png(width=8, height=8):
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def served():
    watcher = FakeWatcher(FakeSearcher())
    with serving(service.create_app(watcher, search_threads=2)) as (host, port, loop_thread):
        yield Client(host, port), watcher, loop_thread


@pytest.fixture
def client(served):
    client, watcher, _ = served
    watcher.searcher = FakeSearcher()  # each test starts from v1, whatever the one before swapped in
    return client


def check_results(body, version, k, kind=None):
    assert (body["version"], body["release"]) == (version, "r1") and len(body["results"]) == k, body
    first, second = body["results"][:2] if k > 1 else (body["results"][0], None)
    assert first == {"item_id": f"{version}-0", "score": 1.0, "shard": 0, "title": None}
    if second is not None and kind is not None:
        assert second["title"] == f"{kind} 1"


# --------------------------------------------------------------------------- endpoints


def test_text_search_runs_in_the_thread_pool(served, client):
    _, watcher, loop_thread = served
    status, body = client.get("/search?q=red%20shoes&k=3")
    assert status == 200
    check_results(body, "v1", 3, "text")
    call = watcher.searcher.calls[-1]
    assert call["texts"] == ["red shoes"] and call["images"] is None and call["k"] == 3
    assert call["thread"] != loop_thread  # not on the event loop
    assert client.get("/search?q=shoes")[1]["results"].__len__() == 10  # default k


def test_json_search_by_text_image_or_both(served, client):
    _, watcher, _ = served
    image = png()
    status, body = client.post_json("/search", {"text": "red shoes", "k": 2})
    assert status == 200
    check_results(body, "v1", 2, "text")
    status, body = client.post_json("/search", {"image": base64.b64encode(image).decode()})
    assert status == 200
    check_results(body, "v1", 10, "image")
    assert watcher.searcher.calls[-1]["images"] == [image] and watcher.searcher.calls[-1]["texts"] is None
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    status, body = client.post_json("/search", {"text": "red", "image": data_url, "k": 1000})
    assert status == 200 and len(body["results"]) == 1000 and body["results"][1]["title"] == "text+image 1"


def test_image_upload_with_k_in_the_form_or_the_query(served, client):
    _, watcher, _ = served
    image = png()
    status, body = client.upload("/search/image", image, fields={"k": "4"})
    assert status == 200
    check_results(body, "v1", 4, "image")
    assert watcher.searcher.calls[-1]["images"] == [image]
    assert client.upload("/search/image?k=2", image)[1]["results"].__len__() == 2
    assert client.upload("/search/image", image)[1]["results"].__len__() == 10


def test_healthz_and_version(client):
    assert client.get("/healthz") == (200, {"status": "ok", "version": "v1", "release": "r1"})
    status, body = client.get("/version")
    assert status == 200
    assert body == {"version": "v1", "release": "r1", "snapshot": "2026-11-01T00:00:00Z",
                    "created_at": "2026-11-01T01:00:00Z", "loaded_at": "2026-11-01T02:00:00Z",
                    "counts": FakeSearcher().manifest["counts"]}


def test_version_and_results_follow_the_watcher_swap(served, client):
    _, watcher, _ = served
    assert client.get("/version")[1]["version"] == "v1"
    watcher.searcher = FakeSearcher("v2")
    assert client.get("/version")[1]["version"] == "v2"
    assert client.get("/search?q=x&k=1")[1]["results"][0]["item_id"] == "v2-0"
    gauge = metrics(client)["catalog_index_loaded_version"]
    assert gauge == {(("release", "r1"), ("version", "v2")): 1.0}


def test_no_index_loaded_is_503(served, client):
    _, watcher, _ = served
    watcher.searcher = None
    for path in ("/healthz", "/version", "/search?q=x"):
        status, body = client.get(path)
        assert status == 503 and "no index loaded" in body["error"], (path, body)


def test_lifespan_starts_and_stops_the_watcher():
    watcher = FakeWatcher(FakeSearcher())
    with serving(service.create_app(watcher)) as (host, port, _):
        assert (watcher.started, watcher.stopped) == (1, 0)
        assert Client(host, port).get("/healthz")[0] == 200
    assert (watcher.started, watcher.stopped) == (1, 1)


def test_slow_searches_run_in_parallel_and_leave_the_loop_free():
    # 2 s per search: a blocked event loop would hold /healthz ~1.9 s, serial searches would take 8 s,
    # so the bounds below keep a wide margin for a loaded CI machine and still catch both.
    watcher = FakeWatcher(FakeSearcher(delay=2.0))
    with serving(service.create_app(watcher, search_threads=4)) as (host, port, _):
        client = Client(host, port)
        results = []
        start = time.monotonic()
        threads = [threading.Thread(target=lambda: results.append(client.get("/search?q=x&k=1")[0]))
                   for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.1)
        health_start = time.monotonic()
        assert client.get("/healthz")[0] == 200
        assert time.monotonic() - health_start < 1.2  # the event loop is not blocked by searches
        for t in threads:
            t.join(10)
        assert results == [200] * 4 and time.monotonic() - start < 6.0  # 4 x 2 s at once, not one by one


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("payload,status,words", [
    (b'{"text": "red', 400, "malformed JSON"),
    (b"not json", 400, "malformed JSON"),
    (b'["red shoes"]', 400, "JSON object"),
    (b'"red shoes"', 400, "JSON object"),
    ({"text": 5}, 422, "field text"),
    ({"text": "red", "k": "3"}, 422, "field k"),
    ({"text": "red", "k": True}, 422, "field k"),
    ({"text": "red", "k": 2.5}, 422, "field k"),
    ({"text": "red", "k": None}, 422, "field k"),
    ({"image": 12}, 422, "field image"),
    ({"image": "not base64!"}, 422, "not valid base64"),
    ({"txt": "red"}, 422, "txt"),
    ({}, 422, 'give "text", "image" or both'),
    ({"k": 3}, 422, 'give "text", "image" or both'),
])
def test_malformed_or_mistyped_json_is_a_clear_4xx(client, payload, status, words):
    got, body = client.post_json("/search", payload)
    assert got == status and words in body["error"], body
    assert set(body) == {"error"}


@pytest.mark.parametrize("path", ["/search?q=x&k=0", "/search?q=x&k=1001", "/search?q=x&k=-1", "/search?q=x&k=ten"])
def test_k_out_of_range_in_the_query(client, path):
    status, body = client.get(path)
    assert status == 422 and body["error"].startswith("query parameter k:"), body


@pytest.mark.parametrize("k", [0, 1001])
def test_k_out_of_range_in_json_and_upload(client, k):
    status, body = client.post_json("/search", {"text": "red", "k": k})
    assert status == 422 and body["error"].startswith("field k:"), body
    status, body = client.upload("/search/image", png(), fields={"k": str(k)})
    assert status == 422 and "k" in body["error"], body
    status, body = client.upload(f"/search/image?k={k}", png())
    assert status == 422 and "k" in body["error"], body


def test_blank_missing_and_too_long_text(client):
    assert client.get("/search")[0] == 422
    assert "q" in client.get("/search")[1]["error"]
    for q in ("", "%20%20%20", "%09%0A"):
        status, body = client.get(f"/search?q={q}")
        assert status == 422 and "query parameter q" in body["error"], (q, body)
    status, body = client.post_json("/search", {"text": "   "})
    assert status == 422 and "blank" in body["error"]
    status, body = client.get("/search?q=" + "a" * 2001)
    assert status == 422 and "2000" in body["error"], body
    status, body = client.post_json("/search", {"text": "a" * 2001})
    assert status == 422 and "2000" in body["error"], body
    assert client.get("/search?q=" + "a" * 2000)[0] == 200
    assert client.post_json("/search", {"text": "é" * 2000})[0] == 200  # characters, not bytes


def test_oversized_uploads_are_413(client):
    status, body = client.upload("/search/image", b"\0" * (10 * MB + 1))
    assert status == 413 and "10485760" in body["error"], body
    status, body = client.post_json("/search", {"image": base64.b64encode(b"\0" * (10 * MB + 1)).decode()})
    assert status == 413 and "10485760" in body["error"], body


def test_an_oversized_body_is_refused_before_it_is_read(served, client):
    # A declared Content-Length over the limit: answered at once, without sending the body.
    with socket.create_connection((client.host, client.port), timeout=10) as s:
        s.sendall(b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 1000000000\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):  # the server closes after its answer
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and '"error"' in reply, reply
    # A chunked body (no Content-Length): counted while it streams in.
    conn = http.client.HTTPConnection(client.host, client.port, timeout=30)
    chunks = (b"x" * MB for _ in range(16))  # over the 14 MB a base64 10 MB image needs
    try:
        conn.request("POST", "/search", body=chunks, headers={"Content-Type": "application/json"},
                     encode_chunked=True)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may answer and close before the client is done sending
    resp = conn.getresponse()
    assert resp.status == 413 and "error" in json.loads(resp.read())
    conn.close()
    assert client.get("/healthz")[0] == 200


@pytest.mark.parametrize("data,filename", [(b"%PDF-1.4 not an image", "a.pdf"), (b"", "empty.png"),
                                           (b"\x89PNG\r\n\x1a\n" + b"\0" * 10, "truncated.png")])
def test_non_image_upload_is_415(served, client, data, filename):
    _, watcher, _ = served
    status, body = client.upload("/search/image", data, filename=filename)
    assert status == 415 and "JPEG, PNG, GIF, BMP or WebP" in body["error"], body
    status, body = client.post_json("/search", {"image": base64.b64encode(data).decode()})
    assert status == 415, body
    assert watcher.searcher.calls == []


def test_image_over_the_index_pixel_limit_is_413_before_decoding(served, client):
    _, watcher, _ = served
    watcher.searcher = FakeSearcher(max_image_pixels=10_000)
    assert client.upload("/search/image", png(100, 100))[0] == 200
    status, body = client.upload("/search/image", png(101, 100))
    assert status == 413 and "10100 pixels" in body["error"] and "10000" in body["error"], body
    status, body = client.post_json("/search", {"image": base64.b64encode(png(101, 100)).decode()})
    assert status == 413, body
    assert len(watcher.searcher.calls) == 1


def test_unknown_path_and_method_are_json(client):
    assert client.get("/nope") == (404, {"error": "Not Found"})
    assert client.request("DELETE", "/search") == (405, {"error": "Method Not Allowed"})


# --------------------------------------------------------------------------- metrics and docs


def metrics(client):
    status, text = client.get("/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_count_the_requests_made(client):
    def count(m, name, **labels):
        return m.get(name, {}).get(tuple(sorted(labels.items())), 0)

    before = metrics(client)
    for _ in range(3):
        client.get("/search?q=shoes&k=1")
    client.get("/search?q=shoes&k=0")
    client.post_json("/search", b"{")
    client.upload("/search/image", png(), fields={"k": "1"})
    client.get("/no/such/path")
    after = metrics(client)

    def delta(name, **labels):
        return count(after, name, **labels) - count(before, name, **labels)

    assert delta("catalog_index_http_requests_total", endpoint="/search", method="GET", status="200") == 3
    assert delta("catalog_index_http_requests_total", endpoint="/search", method="GET", status="422") == 1
    assert delta("catalog_index_http_requests_total", endpoint="/search", method="POST", status="400") == 1
    assert delta("catalog_index_http_requests_total", endpoint="/search/image", method="POST", status="200") == 1
    assert delta("catalog_index_http_requests_total", endpoint="other", method="GET", status="404") == 1
    assert delta("catalog_index_http_requests_total", endpoint="/metrics", method="GET", status="200") == 1
    assert delta("catalog_index_http_request_duration_seconds_count", endpoint="/search", method="GET") == 4
    assert delta("catalog_index_http_request_duration_seconds_bucket", endpoint="/search", method="GET",
                 le="+Inf") == 4
    assert delta("catalog_index_http_errors_total", endpoint="/search", kind="client") == 2
    assert after["catalog_index_loaded_version"] == {(("release", "r1"), ("version", "v1")): 1.0}
    assert after["catalog_index_loaded_items"] == {(): 4.0}


def test_a_crashing_search_is_a_500_counted_as_a_server_error(served, client):
    _, watcher, _ = served

    class Broken(FakeSearcher):
        def search(self, *args, **kwargs):
            raise RuntimeError("boom")

    watcher.searcher = Broken()
    before = metrics(client)["catalog_index_http_errors_total"].get((("endpoint", "/search"), ("kind", "server")), 0)
    status, body = client.get("/search?q=x")
    assert status == 500 and "RuntimeError" in body["error"], body
    after = metrics(client)["catalog_index_http_errors_total"][(("endpoint", "/search"), ("kind", "server"))]
    assert after - before == 1


def test_openapi_documents_every_endpoint_parameter_and_limit(client):
    status, spec = client.get("/openapi.json")
    assert status == 200
    paths = spec["paths"]
    assert {(p, m) for p, ops in paths.items() for m in ops} == {
        ("/search", "get"), ("/search", "post"), ("/search/image", "post"), ("/healthz", "get"),
        ("/version", "get"), ("/metrics", "get")}
    params = {p["name"]: p for p in paths["/search"]["get"]["parameters"]}
    assert params["q"]["schema"]["maxLength"] == 2000 and params["q"]["required"]
    assert (params["k"]["schema"]["minimum"], params["k"]["schema"]["maximum"]) == (1, 1000)
    body = spec["components"]["schemas"]["SearchRequest"]["properties"]
    assert set(body) == {"text", "image", "k"} and body["k"]["maximum"] == 1000
    assert "10 MB" in body["image"]["description"]
    upload = paths["/search/image"]["post"]
    assert "multipart/form-data" in upload["requestBody"]["content"]
    assert {"413", "415", "422"} <= set(upload["responses"])
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # our {"error"} body is what is documented
    for p, ops in paths.items():
        for op in ops.values():
            assert op.get("summary"), p
    assert client.get("/docs")[0] == 200


# --------------------------------------------------------------------------- the command


@pytest.mark.parametrize("argv,words", [
    (["serve", "--index", "o", "--pört", "1"], "unknown flag"),
    (["serve", "--index", "o", "--poll-second", "1"], "unknown flag"),  # no abbreviations
    (["serve", "--index", "o", "--verison", "v"], "did you mean --version"),
    (["serve"], "--index"),
    (["serve", "--index", "o", "--port", "70000"], "--port"),
    (["serve", "--index", "o", "--workers", "0"], "--workers"),
    (["serve", "--index", "o", "--poll-seconds", "0"], "--poll-seconds"),
])
def test_serve_refuses_bad_flags_with_exit_2(argv, words, capsys):
    from catalog_index import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


# --------------------------------------------------------------------------- end to end


def _write_latest(root, data):
    tmp = os.path.join(root, "LATEST.tmp-test")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(root, "LATEST"))


def _wait_for(client, version, seconds=30):
    deadline = time.monotonic() + seconds
    while (got := client.get("/version")[1]["version"]) != version:
        assert time.monotonic() < deadline, f"still serving {got}, not {version}"
        time.sleep(0.1)


def test_a_real_published_version_served_through_the_real_watcher(published_v1, published_v2, tmp_path, caplog):
    """Publish (pipeline + tiny encoders), serve through search.Watcher polling LATEST: searches, a swap
    to v2 picked up by polling, then a damaged release refused while v2 keeps serving."""
    from search import Watcher
    from tests.search.conftest import flip_byte, shard_file

    root = str(tmp_path / "out")
    shutil.copytree(published_v1, root)
    with open(os.path.join(root, "LATEST"), "rb") as f:
        v1_latest = f.read()
    watcher = Watcher(root, poll_seconds=0.2, grace_seconds=0.05)
    try:
        with serving(service.create_app(watcher, search_threads=2)) as (host, port, _):
            client = Client(host, port)
            status, body = client.get("/version")
            assert status == 200 and body["version"] == "v1" and body["counts"]["indexed"] > 0, body
            status, body = client.get("/search?q=organic%20coffee&k=5")
            assert status == 200 and body["version"] == "v1" and len(body["results"]) == 5, body
            scores = [r["score"] for r in body["results"]]
            assert scores == sorted(scores, reverse=True) and all(isinstance(r["item_id"], str) for r in body["results"])
            status, body = client.upload("/search/image", png(40, 30), fields={"k": "3"})
            assert status == 200 and len(body["results"]) == 3, body
            status, body = client.post_json("/search", {"text": "coffee", "image": base64.b64encode(png()).decode(),
                                                        "k": 4})
            assert status == 200 and len(body["results"]) == 4, body
            assert client.upload("/search/image", b"GIF89a not really")[0] == 415

            # v2 appears as a publisher leaves it: its version folder, then LATEST; polling picks it up
            shutil.copytree(os.path.join(published_v2, "v2"), os.path.join(root, "v2"))
            with open(os.path.join(published_v2, "LATEST"), "rb") as f:
                _write_latest(root, f.read())
            _wait_for(client, "v2")
            assert client.get("/search?q=coffee&k=2")[1]["version"] == "v2"
            assert metrics(client)["catalog_index_loaded_version"] == {
                (("release", client.get("/version")[1]["release"]), ("version", "v2")): 1.0}

            # LATEST moved to a release whose shard no longer matches its manifest: refused, v2 serves on
            time.sleep(0.3)  # past the grace period: v1's searcher is closed before its file changes
            flip_byte(shard_file(root, "v1"))
            with caplog.at_level(logging.WARNING, logger="search.watcher"):
                _write_latest(root, v1_latest)
                deadline = time.monotonic() + 30
                while not any("refused" in r.getMessage() for r in caplog.records):
                    assert time.monotonic() < deadline, "the damaged release was never checked"
                    time.sleep(0.1)
            assert client.get("/version")[1]["version"] == "v2"
            assert client.get("/healthz")[0] == 200
            assert client.get("/search?q=coffee&k=2")[1]["version"] == "v2"
    finally:
        watcher.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_workers_share_one_set_of_metrics(published_v1, tmp_path):
    """`serve --workers 2` (real processes): whichever worker answers a scrape, it reports the requests
    all workers served, and each live worker's loaded version (per-process registries would show a part)."""
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "catalog-index")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != service.MULTIPROC_ENV}
    proc = subprocess.Popen([exe, "serve", "--index", published_v1, "--port", str(port), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=str(tmp_path))
    client = Client("127.0.0.1", port)
    answered = 0
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "serve --workers 2 never answered"
            try:
                client.get("/healthz")
                answered += 1
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(5)  # the second worker loads its own index
        for _ in range(40):  # a connection each: the kernel spreads them over both workers
            assert client.get("/healthz")[0] == 200
            answered += 1
        for _ in range(4):
            m = metrics(client)
            served = sum(v for labels, v in m["catalog_index_http_requests_total"].items()
                         if dict(labels)["endpoint"] == "/healthz")
            assert served == answered, m["catalog_index_http_requests_total"]
            loaded = m["catalog_index_loaded_version"]
            assert loaded and all(dict(labels)["version"] == "v1" and value == 1 for labels, value in loaded.items())
            assert {dict(labels)["pid"] for labels in loaded} <= {str(p) for p in _children(proc.pid)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _children(pid):
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out
