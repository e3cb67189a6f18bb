"""Benchmark of the shard-building stage alone: precomputed vectors -> sharded Annoy indexes.

    python benchmarks/bench_shards.py [--items 1000000] [--shards 1 4 16] [--trees 10]
                                      [--mode beam|pool] [--repeats 1] [--json OUT]

The vectors (``--items`` x 256 float32, seeded Gaussian rows normalised to unit
length) are written once to a temporary .npy file; every configuration then runs
in a fresh child process that reads them (memory-mapped) and builds the shards
with the project's code:

* ``--mode beam`` (default): ``pipelines.transforms.WriteAnnoyShards`` on the
  DirectRunner (default options, in-process FnApiRunner), fed by a ParDo that
  turns slices of the .npy file into ``shards.IndexedItem`` (item_id, fused
  vector only). This is exactly the pipeline's stage: stable-hash assignment,
  CoGroupByKey by shard, ``write_shard`` per shard (Annoy build with
  on_disk_build, load-back check, id map and embeddings Parquet).
* ``--mode pool``: ``pipelines.shards.write_shard`` per shard in a
  ``multiprocessing`` pool of 2 (fork), the same assignment by
  ``stable_shard``; no Beam in the way.

Per configuration: wall time of the child, peak memory (see _measure.py: the
largest single process from wait4 and the sampled sum over the process tree),
the time spent in ``write_shard`` (summed over shards) and the output size.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import _measure  # noqa: E402

DIM = 256
SEED = 0
CHUNK = 10_000


def make_vectors(path, n, dim=DIM, seed=SEED):
    import numpy as np

    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    rng = np.random.default_rng(seed)
    for a in range(0, n, 100_000):
        b = min(n, a + 100_000)
        v = rng.standard_normal((b - a, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        out[a:b] = v
    out.flush()
    del out


def item_id(i):
    return f"item-{i:08d}"


# ------------------------------------------------------------------ child: beam


def _child_beam(vectors, n_shards, trees, out_dir):
    import apache_beam as beam
    import numpy as np
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import shards as shd
    from pipelines import transforms as tr

    n = int(np.load(vectors, mmap_mode="r").shape[0])

    def read_chunk(bounds):
        a, b = bounds
        v = np.load(vectors, mmap_mode="r")[a:b]
        for k in range(b - a):
            yield shd.IndexedItem(item_id(a + k), None, None, None, np.array(v[k]))

    start = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions([])) as p:
        _ = (
            p
            | "Chunks" >> beam.Create([(a, min(n, a + CHUNK)) for a in range(0, n, CHUNK)])
            | "Spread" >> beam.Reshuffle()
            | "ReadVectors" >> beam.FlatMap(read_chunk)
            | "WriteAnnoyShards" >> tr.WriteAnnoyShards(out_dir, n_shards, DIM, trees, SEED)
        )
    wall = time.perf_counter() - start
    # ShardInfos stay inside the runner; count what was written instead.
    import glob

    import pyarrow.parquet as pq

    id_maps = glob.glob(os.path.join(out_dir, "shards", "*.ids.parquet"))
    indexed = sum(pq.ParquetFile(f).metadata.num_rows for f in id_maps)
    return {"pipeline_wall_s": wall, "indexed": indexed, "shards": len(id_maps)}


# ------------------------------------------------------------------ child: pool

_ASSIGN = None  # set before forking, inherited by the workers


def _build_one(args):
    import numpy as np

    from pipelines import shards as shd

    index, n_shards, trees, vectors, out_dir = args
    rows = np.flatnonzero(_ASSIGN == index)
    v = np.load(vectors, mmap_mode="r")
    items = [shd.IndexedItem(item_id(int(i)), None, None, None, np.array(v[i])) for i in rows]
    start = time.perf_counter()
    info = shd.write_shard(items, index, n_shards, DIM, trees, SEED, out_dir)
    return info.count, time.perf_counter() - start


def _child_pool(vectors, n_shards, trees, out_dir, processes=2):
    global _ASSIGN
    import multiprocessing as mp

    import numpy as np

    from pipelines import shards as shd

    start = time.perf_counter()
    n = int(np.load(vectors, mmap_mode="r").shape[0])
    _ASSIGN = np.fromiter((shd.stable_shard(item_id(i), n_shards) for i in range(n)), np.int32, n)
    assign_s = time.perf_counter() - start
    ctx = mp.get_context("fork")
    with ctx.Pool(min(processes, n_shards)) as pool:
        results = pool.map(_build_one, [(i, n_shards, trees, vectors, out_dir) for i in range(n_shards)],
                           chunksize=1)
    wall = time.perf_counter() - start
    return {"pipeline_wall_s": wall, "assign_s": assign_s, "indexed": sum(c for c, _ in results),
            "shards": len(results), "write_shard_s_sum": sum(t for _, t in results),
            "write_shard_s_max": max(t for _, t in results)}


def child_main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode")
    ap.add_argument("--vectors")
    ap.add_argument("--shards", type=int)
    ap.add_argument("--trees", type=int)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    fn = _child_beam if a.mode == "beam" else _child_pool
    result = fn(a.vectors, a.shards, a.trees, a.out)
    print("BENCH_RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------ parent


def _dir_size(path):
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            total += os.path.getsize(os.path.join(root, name))
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--trees", type=int, default=10)
    ap.add_argument("--mode", choices=("beam", "pool"), default="beam")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800, help="per run, seconds")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--workdir", help="temp space (default: system temp)")
    args = ap.parse_args(argv)

    work = tempfile.mkdtemp(prefix="bench-shards-", dir=args.workdir)
    results = {"machine": _measure.machine_facts(), "items": args.items, "dim": DIM, "trees": args.trees,
               "mode": args.mode, "runs": []}
    try:
        vectors = os.path.join(work, "vectors.npy")
        t = time.perf_counter()
        make_vectors(vectors, args.items)
        print(f"# {args.items} x {DIM} unit vectors written in {time.perf_counter() - t:.1f}s "
              f"({os.path.getsize(vectors) / 2**20:.0f} MiB)", flush=True)
        for r in range(args.repeats):
            for n_shards in args.shards:
                out = os.path.join(work, f"out-{n_shards}-{r}")
                cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--mode", args.mode,
                       "--vectors", vectors, "--shards", str(n_shards), "--trees", str(args.trees), "--out", out]
                m = _measure.run_measured(cmd, interval=0.5, cwd=ROOT, timeout=args.timeout)
                line = [ln for ln in m["output"].splitlines() if ln.startswith("BENCH_RESULT ")]
                if m["rc"] != 0 or not line:
                    print(m["output"][-4000:], file=sys.stderr)
                    raise SystemExit(f"run with {n_shards} shard(s) failed (rc {m['rc']})")
                inner = json.loads(line[-1].split(" ", 1)[1])
                run = {k: v for k, v in m.items() if k != "output"}
                run.update(inner, n_shards=n_shards, repeat=r, output_bytes=_dir_size(out))
                results["runs"].append(run)
                shutil.rmtree(out, ignore_errors=True)
                print(f"shards={n_shards:<3d} wall={m['wall_s']:7.1f}s  inner={inner['pipeline_wall_s']:7.1f}s  "
                      f"maxrss={m['maxrss_mib']:7.0f} MiB  tree_rss={m['tree_peak_rss_mib']:7.0f} MiB  "
                      f"tree_pss={m['tree_peak_pss_mib']:7.0f} MiB  indexed={inner['indexed']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{args.items} x {DIM}-d, {args.trees} trees, mode={args.mode}, medians of {args.repeats}:")
    print(f"{'shards':>6} {'wall s':>8} {'items/s':>9} {'maxrss MiB':>11} {'tree RSS MiB':>13} "
          f"{'tree PSS MiB':>13} {'output MiB':>11}")
    for n_shards in args.shards:
        rs = [r for r in results["runs"] if r["n_shards"] == n_shards]
        med = lambda k: _measure.median([r[k] for r in rs])  # noqa: E731
        print(f"{n_shards:>6} {med('wall_s'):>8.1f} {args.items / med('wall_s'):>9.0f} {med('maxrss_mib'):>11.0f} "
              f"{med('tree_peak_rss_mib'):>13.0f} {med('tree_peak_pss_mib'):>13.0f} "
              f"{med('output_bytes') / 2**20:>11.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        child_main(sys.argv[2:])
    else:
        sys.exit(main())
