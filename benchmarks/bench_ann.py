"""ANN speed (issue 7): the product's sharded Annoy search against exact search, hnswlib and faiss HNSW.

For each dataset (see _ann_data.py): exact top 10 by float32 matmul in blocks (the ground truth), then

* ``annoy-<shards>-<trees>t`` (e.g. ``annoy-4-10t``): one method per combination of ``--shards`` and
  ``--trees`` (several tree counts compare side by side in one run). Shards built with
  ``pipelines.shards.write_shard`` exactly as the pipeline does (angular, seed 0, the pipeline's
  default is 10 trees, single-threaded build, items assigned with ``stable_shard``), in a fresh child
  process; searched with ``search.ann.ShardSet`` (the product's code path: normalisation, fan-out over
  shards in a thread pool, merge). ``search_k`` is per shard. Build time and Annoy file size are
  reported per combination.
* ``hnswlib``: ``hnswlib.Index("ip")`` on the L2-normalised vectors, M=16, ef_construction=200,
  built with all cores.
* ``faiss``: ``faiss.IndexHNSWFlat(dim, 16, METRIC_INNER_PRODUCT)``, efConstruction=200, all cores.
* ``annoy-bare-<trees>t`` (side by side only): the 1-shard Annoy file searched with
  ``get_nns_by_vector`` directly, without ShardSet, at annoy-1-<trees>t's setting (what the wrapper costs).

Query modes (1,000 held-out queries, k=10):

* ``batch-1t``: all queries in one call, one thread (ShardSet(threads=1); hnswlib num_threads=1;
  faiss omp 1).
* ``batch-all``: all queries in one call, all cores (ShardSet's default pool of min(shards, cores)
  threads; hnswlib num_threads=cores; faiss omp cores).
* ``single-1t``: one query per call, one after another, one thread.
* ``single-all``: one query per call from ``cores`` client threads at once (concurrent requests), each
  call single-threaded inside (ShardSet with its default pool).

A ladder of search_k / ef (factor sqrt 2) gives recall@10 and queries/s (batch modes, one measurement
per rung); at the smallest rung reaching recall@10 >= 0.95 every method is then timed in every mode,
interleaved, ``--repeats`` times; medians and the per-repeat ratio annoy / hnswlib (median) are reported.
The 1-minute load average is sampled every 10 s through the run (the machine may be shared) and
stored per phase in the JSON.

    .venv/bin/python benchmarks/bench_ann.py --json benchmarks/results/bench_ann-DATE.json
    .venv/bin/python benchmarks/bench_ann.py --datasets real --shards 4 --trees 10 50 100 --peers hnswlib
    .venv/bin/python benchmarks/bench_ann.py --quick      # 10k synthetic vectors, 2 tree counts, < 2 min
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import _ann_data  # noqa: E402
import _measure  # noqa: E402

K = 10
TARGET = 0.95
CORES = os.cpu_count() or 1
MODES = ("batch-1t", "batch-all", "single-1t", "single-all")


def log(*a):
    print(*a, flush=True)


class LoadSampler:
    """Samples the 1-minute load average every ``interval`` s in a daemon thread; ``phase`` marks spans."""

    def __init__(self, interval=10.0):
        self.t0 = time.perf_counter()
        self.samples, self.phases = [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval):
        while True:
            try:
                self.samples.append((round(time.perf_counter() - self.t0, 1), os.getloadavg()[0]))
            except OSError:
                return
            if self._stop.wait(interval):
                return

    def phase(self, name):
        self.phases.append((name, round(time.perf_counter() - self.t0, 1)))

    def summary(self):
        """Per phase: start/end seconds and min/median/max of the load samples taken in it."""
        out, bounds = [], self.phases + [("end", round(time.perf_counter() - self.t0, 1))]
        for (name, start), (_, end) in zip(bounds, bounds[1:]):
            vals = [v for t, v in self.samples if start <= t <= end]
            out.append({"phase": name, "start_s": start, "end_s": end,
                        "load1_min": min(vals) if vals else None,
                        "load1_median": _measure.median(vals) if vals else None,
                        "load1_max": max(vals) if vals else None})
        return out

    def stop(self):
        self._stop.set()


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int = K, block: int = 65536) -> np.ndarray:
    """Exact inner-product top k (rows unit length, so cosine), float32 matmul over blocks of rows."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for start in range(0, len(base), block):
        s = queries @ base[start:start + block].T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        cand_i = np.concatenate([best_i, part + start], 1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_i


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / truth.size


# ---------------------------------------------------------------- Annoy shards (child process)

def build_child(npy: str, skip: int, shards: int, trees: int, seed: int, out: str) -> None:
    """Runs in a fresh process: write_shard for every shard, sequentially (as the DirectRunner does)."""
    from pipelines import shards as shd

    x = np.load(npy, mmap_mode="r")[skip:]
    dim = x.shape[1]
    groups = [[] for _ in range(shards)]
    t0 = time.perf_counter()
    for i in range(len(x)):
        item_id = f"{i:09d}"
        groups[shd.stable_shard(item_id, shards)].append(shd.IndexedItem(item_id, None, None, None, x[i]))
    items_s = time.perf_counter() - t0
    infos, per_shard = [], []
    t0 = time.perf_counter()
    for s in range(shards):
        t1 = time.perf_counter()
        info = shd.write_shard(groups[s], s, shards, dim, trees, seed, out)
        per_shard.append(time.perf_counter() - t1)
        infos.append({"index": info.index, "path": info.path, "id_map": info.id_map, "count": info.count,
                      "size": info.size})
        groups[s] = None
    print("RESULT " + json.dumps({"items_s": items_s, "write_shard_s": time.perf_counter() - t0,
                                  "per_shard_s": per_shard, "shards": infos}), flush=True)


def annoy_name(shards, trees):
    return f"annoy-{shards}-{trees}t"


def build_annoy(npy, skip, shards, trees, seed, workdir):
    out = os.path.join(workdir, annoy_name(shards, trees))
    cmd = [sys.executable, os.path.abspath(__file__), "--_build", npy, str(skip), str(shards), str(trees),
           str(seed), out]
    m = _measure.run_measured(cmd, interval=0.5, cwd=ROOT)
    if m["rc"] != 0:
        raise SystemExit(f"Annoy build failed:\n{m['output'][-3000:]}")
    res = json.loads(next(l for l in m["output"].splitlines() if l.startswith("RESULT "))[7:])
    import pyarrow.parquet as pq

    paths, id_maps = [], []
    for info in res["shards"]:
        paths.append(os.path.join(out, info["path"]))
        id_maps.append(pq.read_table(os.path.join(out, info["id_map"])).column("item_id").to_pylist())
    published = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(out) for f in fs)
    # The embeddings Parquet parts are not read by the benchmark: drop them (several combinations of a
    # 1M dataset would otherwise hold several GiB of them in the temp dir at once).
    for dp, _, fs in os.walk(out):
        for f in fs:
            full = os.path.join(dp, f)
            if f.endswith(".parquet") and full not in info_paths(out, res["shards"]):
                os.remove(full)
    return {"shards": shards, "trees": trees, "paths": paths, "id_maps": id_maps, "build_s": res["write_shard_s"],
            "child_wall_s": m["wall_s"], "child_maxrss_mib": m["maxrss_mib"], "per_shard_s": res["per_shard_s"],
            "index_bytes": sum(i["size"] for i in res["shards"]), "published_bytes": published}


def info_paths(out, infos):
    """The files the benchmark keeps: Annoy files and id maps."""
    return {os.path.join(out, i[key]) for i in infos for key in ("path", "id_map")}


# ---------------------------------------------------------------- methods

class AnnoySharded:
    def __init__(self, name, built, dim):
        from search.ann import ShardSet

        self.name, self.built = name, built
        self.one_thread = ShardSet(built["paths"], dim, built["id_maps"], threads=1)
        self.default = ShardSet(built["paths"], dim, built["id_maps"])  # min(shards, cores) threads
        self.param = None

    def set(self, p):
        self.param = int(p)

    @staticmethod
    def _ids(results):
        out = np.full((len(results), K), -1, np.int64)
        for r, hits in enumerate(results):
            for c, hit in enumerate(hits):
                out[r, c] = int(hit[0])
        return out

    def batch(self, q, all_cores):
        return self._ids((self.default if all_cores else self.one_thread).search(q, K, self.param))

    def one(self, q, all_cores):
        return self._ids((self.default if all_cores else self.one_thread).search(q[None], K, self.param))[0]

    def close(self):
        self.one_thread.close()
        self.default.close()


class AnnoyBare:
    """The 1-shard file through AnnoyIndex directly (annoy id = position of the sorted item ids = row)."""

    def __init__(self, built, dim):
        from annoy import AnnoyIndex

        self.name = f"annoy-bare-{built['trees']}t"
        self.index = AnnoyIndex(dim, "angular")
        self.index.load(built["paths"][0])
        self.param = None

    def set(self, p):
        self.param = int(p)

    def one(self, q, all_cores):
        ids = self.index.get_nns_by_vector(q.tolist(), K, search_k=self.param)
        return np.array(ids + [-1] * (K - len(ids)), np.int64)

    def batch(self, q, all_cores):
        if not all_cores:
            return np.stack([self.one(v, False) for v in q])
        parts = np.array_split(np.arange(len(q)), CORES)
        with concurrent.futures.ThreadPoolExecutor(CORES) as pool:
            res = list(pool.map(lambda idx: [self.one(q[i], False) for i in idx], parts))
        return np.stack([r for part in res for r in part])

    def close(self):
        self.index.unload()


class Hnsw:
    def __init__(self, base, workdir, m=16, ef_construction=200, seed=0):
        import hnswlib

        self.name = "hnswlib"
        t0 = time.perf_counter()
        self.index = hnswlib.Index(space="ip", dim=base.shape[1])
        self.index.init_index(max_elements=len(base), M=m, ef_construction=ef_construction, random_seed=seed)
        self.index.add_items(base, np.arange(len(base)), num_threads=CORES)
        self.build_s = time.perf_counter() - t0
        path = os.path.join(workdir, "hnswlib.bin")
        self.index.save_index(path)
        self.index_bytes = os.path.getsize(path)
        os.remove(path)

    def set(self, ef):
        self.index.set_ef(max(int(ef), K))

    def batch(self, q, all_cores):
        return self.index.knn_query(q, k=K, num_threads=CORES if all_cores else 1)[0].astype(np.int64)

    def one(self, q, all_cores):
        return self.index.knn_query(q[None], k=K, num_threads=1)[0][0].astype(np.int64)

    def close(self):
        pass


class Faiss:
    def __init__(self, base, workdir, m=16, ef_construction=200):
        import faiss

        self.faiss = faiss
        self.name = "faiss"
        faiss.omp_set_num_threads(CORES)
        t0 = time.perf_counter()
        self.index = faiss.IndexHNSWFlat(base.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.index.add(np.ascontiguousarray(base))
        self.build_s = time.perf_counter() - t0
        path = os.path.join(workdir, "faiss.index")
        faiss.write_index(self.index, path)
        self.index_bytes = os.path.getsize(path)
        os.remove(path)

    def set(self, ef):
        self.index.hnsw.efSearch = max(int(ef), K)

    def batch(self, q, all_cores):
        self.faiss.omp_set_num_threads(CORES if all_cores else 1)
        return self.index.search(q, K)[1].astype(np.int64)

    def one(self, q, all_cores):
        self.faiss.omp_set_num_threads(1)  # per calling thread
        return self.index.search(q[None], K)[1][0].astype(np.int64)

    def close(self):
        pass


def timed(method, q, mode):
    """(seconds, ids [nq, K]) for all queries in one mode."""
    t0 = time.perf_counter()
    if mode == "batch-1t":
        ids = method.batch(q, False)
    elif mode == "batch-all":
        ids = method.batch(q, True)
    elif mode == "single-1t":
        ids = np.stack([method.one(v, False) for v in q])
    else:
        parts = np.array_split(np.arange(len(q)), CORES)
        with concurrent.futures.ThreadPoolExecutor(CORES) as pool:
            res = list(pool.map(lambda idx: [method.one(q[i], True) for i in idx], parts))
        ids = np.stack([r for part in res for r in part])
    return time.perf_counter() - t0, ids


def ladder_values(start, stop, steps_per_doubling=2):
    out, i = [], 0
    while True:
        v = int(round(start * 2 ** (i / steps_per_doubling)))
        if v > stop:
            return out
        if not out or v != out[-1]:
            out.append(v)
        i += 1


# ---------------------------------------------------------------- one dataset

def run_dataset(name, base, queries, info, args, workdir, sampler, checkpoint=lambda res: None):
    """One dataset; ``checkpoint(res)`` is called after every build and ladder with the partial result
    (``res["partial"]`` true until the end), so a run stopped early keeps what it measured."""
    n, dim = base.shape
    log(f"\n== {name}: {n} x {dim}, {len(queries)} queries")
    res = {"dataset": name, "info": info, "n": n, "dim": dim, "queries": len(queries), "partial": True,
           "builds": {}, "ladders": {}}
    npy = os.path.join(workdir, f"{name}.npy")
    np.save(npy, np.concatenate([queries, base]))  # the children read it memory-mapped

    sampler.phase("exact")
    t0 = time.perf_counter()
    truth = exact_topk(base, queries)
    exact_s = time.perf_counter() - t0
    res["exact"] = {"seconds": exact_s, "qps_batch_blas_default_threads": len(queries) / exact_s,
                    "index_bytes": base.nbytes}
    log(f"exact (float32 matmul in blocks, BLAS threads): {exact_s:.2f} s, {len(queries) / exact_s:.0f} q/s")

    methods, builds, bare_built = [], res["builds"], {}
    for shards in args.shards:
        for trees in args.trees:
            name = annoy_name(shards, trees)
            sampler.phase(f"{name}: build")
            b = build_annoy(npy, len(queries), shards, trees, 0, workdir)
            log(f"{name}: write_shard x{shards} {b['build_s']:.1f} s (child {b['child_wall_s']:.1f} s, "
                f"maxrss {b['child_maxrss_mib']:.0f} MiB), Annoy files {b['index_bytes'] / 2**20:.0f} MiB, "
                f"load {os.getloadavg()[0]:.1f}")
            builds[name] = {k: v for k, v in b.items() if k not in ("paths", "id_maps")}
            checkpoint(res)
            methods.append(AnnoySharded(name, b, dim))
            if shards == 1:
                bare_built[name] = b
    os.remove(npy)
    if "hnswlib" in args.peers:
        sampler.phase("hnswlib: build")
        h = Hnsw(base, workdir)
        builds["hnswlib"] = {"build_s": h.build_s, "index_bytes": h.index_bytes, "build_threads": CORES}
        checkpoint(res)
        log(f"hnswlib: build {h.build_s:.1f} s ({CORES} threads), {h.index_bytes / 2**20:.0f} MiB")
        methods.append(h)
    if "faiss" in args.peers:
        sampler.phase("faiss: build")
        f = Faiss(base, workdir)
        builds["faiss"] = {"build_s": f.build_s, "index_bytes": f.index_bytes, "build_threads": CORES}
        checkpoint(res)
        log(f"faiss: build {f.build_s:.1f} s ({CORES} threads), {f.index_bytes / 2**20:.0f} MiB")
        methods.append(f)

    # Ladders: recall@10 and q/s in the two batch modes, one measurement per rung.
    chosen = {}
    for m in methods:
        sampler.phase(f"{m.name}: ladder")
        values = (ladder_values(K * m.built["trees"], args.max_search_k, args.steps) if m.name.startswith("annoy")
                  else ladder_values(K, args.max_ef, args.steps))
        rows = []
        for v in values:
            m.set(v)
            t1, ids = timed(m, queries, "batch-1t")
            tall, _ = timed(m, queries, "batch-all")
            r = recall(ids, truth)
            rows.append({"param": v, "recall": r, "qps_batch_1t": len(queries) / t1,
                         "qps_batch_all": len(queries) / tall})
            log(f"  {m.name:12s} {'search_k' if m.name.startswith('annoy') else 'ef':8s}={v:7d} "
                f"recall@10={r:.4f} q/s 1t={len(queries) / t1:8.0f} all={len(queries) / tall:8.0f}")
            if m.name not in chosen and r >= TARGET:
                chosen[m.name] = v
            if r >= args.stop_recall or t1 > args.rung_cap_s:
                break
        res["ladders"][m.name] = rows
        res["chosen"] = chosen
        checkpoint(res)
    res["chosen"] = chosen
    for name, b in bare_built.items():
        if name in chosen:
            bare = AnnoyBare(b, dim)
            methods.append(bare)
            chosen[bare.name] = chosen[name]

    # Side by side at the smallest rung reaching the target, interleaved, --repeats times.
    live = [m for m in methods if m.name in chosen]
    for m in live:
        m.set(chosen[m.name])
    times = {m.name: {mode: [] for mode in MODES} for m in live}
    recalls = {}
    sampler.phase("side by side")
    for rep in range(args.repeats):
        for mode in MODES:
            order = live[rep % len(live):] + live[:rep % len(live)]
            for m in order:
                t, ids = timed(m, queries, mode)
                times[m.name][mode].append(t)
                recalls.setdefault(m.name, recall(ids, truth))
        log(f"  side by side: repeat {rep + 1}/{args.repeats} done (load {os.getloadavg()[0]:.1f})")
    side = {}
    for m in live:
        side[m.name] = {"param": chosen[m.name], "recall": recalls[m.name],
                        "qps": {mode: len(queries) / _measure.median(times[m.name][mode]) for mode in MODES},
                        "seconds": times[m.name]}
    ratios = {}
    if "hnswlib" in times:
        for m in live:
            if m.name.startswith("annoy"):
                ratios[m.name] = {mode: _measure.median([h / a for a, h in zip(times[m.name][mode],
                                                                                times["hnswlib"][mode])])
                                  for mode in MODES}
    res["side_by_side"], res["ratio_qps_vs_hnswlib"] = side, ratios
    res["partial"] = False
    sampler.phase("done")
    for m in methods:
        m.close()
    return res


def print_tables(res):
    log(f"\n### {res['dataset']} ({res['n']} x {res['dim']})")
    log("| method | shards | trees | build s | index MiB |")
    log("| --- | ---: | ---: | ---: | ---: |")
    log(f"| exact (numpy) | - | - | - | {res['exact']['index_bytes'] / 2**20:.0f} |")
    for name, b in res["builds"].items():
        log(f"| {name} | {b.get('shards', '-')} | {b.get('trees', '-')} | {b['build_s']:.1f} | "
            f"{b['index_bytes'] / 2**20:.0f} |")
    log("\n| method | search_k / ef | recall@10 | q/s batch 1 thread | q/s batch all cores |")
    log("| --- | ---: | ---: | ---: | ---: |")
    for name, rows in res["ladders"].items():
        for r in rows:
            log(f"| {name} | {r['param']} | {r['recall']:.4f} | {r['qps_batch_1t']:.0f} | {r['qps_batch_all']:.0f} |")
    log(f"\nAt the smallest setting with recall@10 >= {TARGET} (medians of repeats, interleaved):")
    log("| method | search_k / ef | recall@10 | " + " | ".join(f"q/s {m}" for m in MODES) + " |")
    log("| --- | ---: | ---: | " + " | ".join("---:" for _ in MODES) + " |")
    for name, s in res["side_by_side"].items():
        log(f"| {name} | {s['param']} | {s['recall']:.4f} | " + " | ".join(f"{s['qps'][m]:.0f}" for m in MODES) + " |")
    for name, r in res["ratio_qps_vs_hnswlib"].items():
        log(f"| {name} / hnswlib (q/s ratio) | | | " + " | ".join(f"{r[m]:.3f}" for m in MODES) + " |")
    missing = [n for n in res["ladders"] if n not in res["chosen"]]
    if missing:
        log(f"not reaching {TARGET} within the ladder: {', '.join(missing)}")


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_build":
        a = sys.argv[2:]
        return build_child(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), a[5])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["real", "synthetic"], choices=["real", "synthetic"])
    p.add_argument("--real-n", type=int, default=100_000)
    p.add_argument("--synthetic-n", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 4])
    p.add_argument("--trees", type=int, nargs="+", default=None,
                   help="Annoy trees per shard, one or more values: every (shards, trees) combination is its "
                        "own method (the pipeline's default: 10)")
    p.add_argument("--peers", nargs="*", default=["hnswlib", "faiss"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-search-k", type=int, default=409_600)
    p.add_argument("--max-ef", type=int, default=2048)
    p.add_argument("--stop-recall", type=float, default=0.98, help="stop a ladder once recall@10 reaches this")
    p.add_argument("--rung-cap-s", type=float, default=30.0, help="stop a ladder once a batch-1t rung takes longer")
    p.add_argument("--steps", type=int, default=2, help="ladder rungs per doubling of search_k / ef")
    p.add_argument("--quick", action="store_true",
                   help="10k synthetic vectors, 200 queries, 1 repeat, coarse ladder, 10 and 20 trees")
    p.add_argument("--json")
    p.add_argument("--workdir")
    args = p.parse_args(argv)
    if args.quick:
        args.datasets, args.synthetic_n, args.queries, args.repeats = ["synthetic"], 10_000, 200, 1
        args.steps, args.stop_recall = 1, 0.97
        if args.trees is None:
            args.trees = [10, 20]
    args.trees = args.trees or [10]
    args.trees = list(dict.fromkeys(args.trees))
    args.shards = list(dict.fromkeys(args.shards))
    workdir = tempfile.mkdtemp(prefix="bench-ann-", dir=args.workdir)
    out = {"date": datetime.date.today().isoformat(), "argv": sys.argv[1:], "machine": _measure.machine_facts(),
           "k": K, "target_recall": TARGET, "cores": CORES, "results": []}
    for pkg in ("hnswlib", "faiss-cpu"):
        try:
            import importlib.metadata as md

            out["machine"][pkg] = md.version(pkg)
        except Exception:
            out["machine"][pkg] = None
    # SIGTERM (stopping a long run) unwinds like Ctrl-C: the temp dir goes, the last checkpoint stays.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sampler = LoadSampler()
    out["load_at_start"] = os.getloadavg()

    def save(current=None):
        if not args.json:
            return
        doc = dict(out, results=out["results"] + ([current] if current is not None else []),
                   load=sampler.summary(), load_samples=list(sampler.samples))
        with open(args.json + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(args.json + ".tmp", args.json)

    try:
        for ds in args.datasets:
            if ds == "real":
                base, q, info = _ann_data.real(args.real_n, args.queries, log=log)
            else:
                base, q, info = _ann_data.synthetic(args.synthetic_n, args.queries)
            sampler.phase(f"{ds}: load data")
            res = run_dataset(ds, np.ascontiguousarray(base), np.ascontiguousarray(q), info, args, workdir, sampler,
                              checkpoint=save)
            res["wall_s"] = round(time.perf_counter() - sampler.t0, 1)
            out["results"].append(res)
            print_tables(res)
            del base, q
            save()
    finally:
        sampler.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
