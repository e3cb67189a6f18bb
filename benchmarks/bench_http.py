"""The HTTP service (`catalog-index serve`) under a bounded loopback load: latency and throughput.

The server: `catalog-index serve --index OUT --host 127.0.0.1 --port P` as a
subprocess (defaults otherwise: 1 worker process, searches in a thread pool of
the CPU count), over the Grocery index of bench_query_quality.py (built here
first if missing) or, when the Grocery data is absent, over the tiny sample
index (`catalog-index sample` + `catalog-index index` with its tiny encoders).
--index serves any other published index.

The load: once /healthz answers, a client in a separate process (this script
with --client) runs C threads, each with its own keep-alive http.client
connection, each sending a fixed number of requests one after another (bounded
also in time: no new request after --max-seconds). Two kinds:

* text: GET /search?q=NAME&k=10, NAME cycling through the product names (the
  sample's titles);
* image: POST /search/image, multipart field `file`, cycling through a few real
  photos (8 Grocery val photos; the sample's images).

Per run: p50 / p99 latency of every request, requests/s = answered requests /
wall (first request sent to last answer), errors (a status other than 200, a
body without "results", or a connection error). Each configuration (kind x
concurrency) runs --repeats times, interleaved (repeat 1 of every
configuration, then repeat 2, ...), and the table shows medians of the
repeats. Client and server share the machine's cores.

    .venv/bin/python benchmarks/bench_http.py [--index OUT] [--concurrency 1 8 32] [--requests 30]
        [--repeats 3] [--max-seconds 120] [--json OUT]
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

CLI = os.path.join(ROOT, ".venv", "bin", "catalog-index")
HOST = "127.0.0.1"


# --------------------------------------------------------------------------- the client (a separate process)

def _multipart(data: bytes, filename: str):
    boundary = uuid.uuid4().hex
    ctype = "image/png" if filename.lower().endswith(".png") else "image/jpeg"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {ctype}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def client(args):
    import http.client

    with open(args.payload, encoding="utf-8") as f:
        payload = json.load(f)
    if args.kind == "text":
        requests = [("GET", "/search?" + urllib.parse.urlencode({"q": q, "k": 10}), None, {})
                    for q in payload["texts"]]
    else:
        requests = []
        for path in payload["images"]:
            with open(path, "rb") as f:
                body, ctype = _multipart(f.read(), os.path.basename(path))
            requests.append(("POST", "/search/image?k=10", body, {"Content-Type": ctype}))

    latencies = [[] for _ in range(args.concurrency)]
    errors = [[] for _ in range(args.concurrency)]
    finished = [0.0] * args.concurrency
    barrier = threading.Barrier(args.concurrency + 1)
    state = {}

    def worker(i):
        conn = http.client.HTTPConnection(HOST, args.port, timeout=60)
        conn.connect()
        barrier.wait()
        deadline = state["start"] + args.max_seconds
        for j in range(args.requests):
            if time.perf_counter() > deadline:
                errors[i].append("not sent: --max-seconds reached")
                continue
            method, url, body, headers = requests[(i * args.requests + j) % len(requests)]
            t0 = time.perf_counter()
            try:
                conn.request(method, url, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                dt = time.perf_counter() - t0
                if resp.status != 200:
                    errors[i].append(f"HTTP {resp.status}: {data[:200]!r}")
                elif "results" not in json.loads(data):
                    errors[i].append(f"no results: {data[:200]!r}")
                else:
                    latencies[i].append(dt)
            except Exception as e:  # pylint: disable=broad-except - counted and reported, the run goes on
                errors[i].append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection(HOST, args.port, timeout=60)
        finished[i] = time.perf_counter()
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    state["start"] = time.perf_counter()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = max(finished) - start
    lat = sorted(x for part in latencies for x in part)
    errs = [e for part in errors for e in part]
    print(json.dumps({"kind": args.kind, "concurrency": args.concurrency, "requests_per_client": args.requests,
                      "answered": len(lat), "errors": len(errs), "error_samples": sorted(set(errs))[:5],
                      "wall_s": wall, "latencies_s": lat}))
    return 0


# --------------------------------------------------------------------------- the orchestrator

def _percentile(sorted_values, q):
    import numpy as np

    return float(np.percentile(sorted_values, q)) if sorted_values else float("nan")


def _free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _get(port, path, timeout=5):
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _rss_mib(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return out


def grocery_setup():
    import _grocery

    if not os.path.isdir(_grocery.DATASET):
        return None
    import bench_query_quality as bq

    os.makedirs(bq.DEFAULT_WORKDIR, exist_ok=True)
    out, _ = bq.build_index(bq.DEFAULT_WORKDIR, 1, False)
    classes = _grocery.classes()
    val = _grocery.split("val")
    step = max(1, len(val) // 8)
    return {"source": "grocery", "index": out, "texts": [classes[c][0] for c in sorted(classes)],
            "images": [r["image_uri"] for r in val[::step][:8]]}


def sample_setup(workdir):
    import pyarrow.parquet as pq

    print("serving the tiny sample index (no Grocery Store data, or --sample)", flush=True)
    sample = os.path.join(workdir, "sample")
    for cmd in ([CLI, "sample", "--output", sample, "--no-bad-rows"],
                [CLI, "index", "--catalog", os.path.join(sample, "catalog", "*.parquet"),
                 "--output", os.path.join(sample, "index"), "--text-encoder", os.path.join(sample, "encoders", "text"),
                 "--image-encoder", os.path.join(sample, "encoders", "image")]):
        print("$ " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd[:2])} failed:\n{proc.stdout.decode()[-2000:]}{proc.stderr.decode()[-2000:]}")
    titles = []
    for name in sorted(os.listdir(os.path.join(sample, "catalog"))):
        if name.endswith(".parquet"):
            table = pq.read_table(os.path.join(sample, "catalog", name), columns=["title"])
            titles.extend(t for t in table.column("title").to_pylist() if isinstance(t, str) and t.strip())
    images = sorted(os.path.join(sample, "images", n) for n in os.listdir(os.path.join(sample, "images"))
                    if n.lower().endswith((".jpg", ".jpeg", ".png")))
    return {"source": "sample", "index": os.path.join(sample, "index"), "texts": titles[:100], "images": images[:8]}


class ServerFailed(Exception):
    pass


def start_server(index, port, log_path, prefix):
    cmd = prefix + ["serve", "--index", index, "--host", HOST, "--port", str(port), "--poll-seconds", "3600"]
    print("$ " + " ".join(cmd), flush=True)
    log = open(log_path, "wb")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    while True:
        if proc.poll() is not None:
            log.close()
            with open(log_path, encoding="utf-8", errors="replace") as f:
                raise ServerFailed(f"the server exited with {proc.returncode}:\n{f.read()[-3000:]}")
        try:
            status, _ = _get(port, "/healthz", timeout=2)
            if status == 200:
                break
        except OSError:
            pass
        if time.perf_counter() - start > 300:
            stop_server(proc)
            sys.exit("the server did not answer /healthz within 300 s")
        time.sleep(0.25)
    return proc, log, time.perf_counter() - start, cmd


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", help="serve this published index (default: Grocery, else the tiny sample)")
    parser.add_argument("--sample", action="store_true", help="serve the tiny sample index even when the Grocery "
                        "data is there")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--kinds", nargs="+", default=["text", "image"], choices=["text", "image"])
    parser.add_argument("--requests", type=int, default=30, help="requests per client per run (default 30)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="no new request after this, per run")
    parser.add_argument("--json")
    # The client side (a separate process started by the orchestrator).
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--payload", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        args.concurrency = args.concurrency[0]
        return client(args)

    import _measure

    workdir = tempfile.mkdtemp(prefix="bench_http-")
    if args.index:
        setup = {"source": "given", "index": args.index, "texts": None, "images": None}
        grocery = grocery_setup()
        if grocery is None:
            sys.exit("--index needs the Grocery data for its queries (not found)")
        setup["texts"], setup["images"] = grocery["texts"], grocery["images"]
    else:
        setup = (None if args.sample else grocery_setup()) or sample_setup(workdir)
    payload = os.path.join(workdir, "payload.json")
    with open(payload, "w", encoding="utf-8") as f:
        json.dump({"texts": setup["texts"], "images": setup["images"]}, f)

    port = _free_port()
    log_path = os.path.join(workdir, "server.log")
    try:
        proc, log, ready_s, serve_cmd = start_server(setup["index"], port, log_path, [CLI])
        workaround = None
    except ServerFailed as e:
        import bench_query_quality as bq

        if not bq.missing_text_ops(str(e)):
            sys.exit(str(e))
        workaround = [l for l in str(e).splitlines() if "Op type not registered" in l][-1][:600]
        print(f"the plain command failed, missing tensorflow-text ops:\n  {workaround}\n"
              "  restarting it with tensorflow_text imported first (reported in the results)", flush=True)
        port = _free_port()
        proc, log, ready_s, serve_cmd = start_server(setup["index"], port, log_path, bq.TF_TEXT_CLI)
    print(f"server ready in {ready_s:.1f} s (pid {proc.pid}); RSS {_rss_mib(proc.pid)}", flush=True)
    runs = []
    try:
        status, body = _get(port, "/version")
        version = json.loads(body) if status == 200 else None
        # Warm-up: a few requests of each kind, not measured.
        for kind in args.kinds:
            _run_client(args, port, kind, 2, 4, payload)
        for repeat in range(args.repeats):
            for kind in args.kinds:
                for c in args.concurrency:
                    result = _run_client(args, port, kind, c, args.requests, payload)
                    lat = result.pop("latencies_s")
                    result.update(repeat=repeat, p50_ms=1000 * _percentile(lat, 50), p99_ms=1000 * _percentile(lat, 99),
                                  mean_ms=1000 * sum(lat) / len(lat) if lat else float("nan"),
                                  rps=result["answered"] / result["wall_s"] if result["wall_s"] > 0 else 0.0,
                                  server_rss_mib=_rss_mib(proc.pid))
                    runs.append(result)
                    print(f"repeat {repeat + 1} {kind:5s} c={c:2d}: {result['answered']:4d} ok, {result['errors']} "
                          f"errors, p50 {result['p50_ms']:7.1f} ms, p99 {result['p99_ms']:7.1f} ms, "
                          f"{result['rps']:6.1f} req/s", flush=True)
                    if result["errors"]:
                        print(f"  errors: {result['error_samples']}", flush=True)
        final_rss = _rss_mib(proc.pid)
        alive = proc.poll() is None
    finally:
        stop_server(proc)
        log.close()
        if proc.returncode not in (0, -signal.SIGINT):
            with open(log_path, encoding="utf-8", errors="replace") as f:
                print(f"server exit status {proc.returncode}; log tail:\n{f.read()[-2000:]}", flush=True)
        shutil.rmtree(workdir, ignore_errors=True)

    summary = []
    print(f"\n{'kind':5s} {'clients':>7s} {'requests':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>7s} {'errors':>6s}")
    for kind in args.kinds:
        for c in args.concurrency:
            rs = [r for r in runs if r["kind"] == kind and r["concurrency"] == c]
            row = {"kind": kind, "concurrency": c, "requests_per_run": c * args.requests,
                   "p50_ms": _measure.median([r["p50_ms"] for r in rs]),
                   "p99_ms": _measure.median([r["p99_ms"] for r in rs]),
                   "rps": _measure.median([r["rps"] for r in rs]),
                   "errors_total": sum(r["errors"] for r in rs),
                   "p50_ms_runs": [round(r["p50_ms"], 1) for r in rs],
                   "rps_runs": [round(r["rps"], 1) for r in rs]}
            summary.append(row)
            print(f"{kind:5s} {c:7d} {row['requests_per_run']:8d} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f} "
                  f"{row['rps']:7.1f} {row['errors_total']:6d}")
    print(f"server RSS at the end: {final_rss} MiB; server alive through the runs: {alive}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "machine": _measure.machine_facts(),
                       "source": setup["source"], "index": setup["index"], "serve_cmd": serve_cmd,
                       "version": version, "plain_serve_failed": workaround, "server_ready_s": round(ready_s, 1), "texts": len(setup["texts"]),
                       "images": setup["images"], "requests_per_client": args.requests, "repeats": args.repeats,
                       "max_seconds": args.max_seconds, "server_rss_mib_end": final_rss, "summary": summary,
                       "runs": runs}, f, indent=2)
    return 0


def _run_client(args, port, kind, concurrency, requests, payload):
    cmd = [sys.executable, os.path.abspath(__file__), "--client", "--port", str(port), "--kind", kind,
           "--concurrency", str(concurrency), "--requests", str(requests), "--max-seconds", str(args.max_seconds),
           "--payload", payload]
    proc = subprocess.run(cmd, capture_output=True, check=False, timeout=args.max_seconds + 120)
    if proc.returncode != 0:
        sys.exit(f"the client failed:\n{proc.stderr.decode()[-3000:]}")
    return json.loads(proc.stdout)


if __name__ == "__main__":
    sys.exit(main())
