"""End-to-end benchmark of ``catalog-index index`` against bare encoders in one process.

    python benchmarks/bench_index.py [--sizes 1000 10000] [--repeats 3] [--no-multiprocessing] [--json OUT]

For every size N a catalog of N good items (``generate_catalog(bad_rows=False)``,
2 Parquet files, ~75 % of items with a 48-96 px PNG/JPEG image) and the tiny
encoders of ``embedding/tiny.py`` (text 64-d, image 48-d at 32x32) are written
to a temp dir. Then, side by side in each repeat (configurations interleaved so
that machine noise hits them alike), each in a fresh child process:

* ``bare``    - one plain Python process: read the catalog with pyarrow,
                ``images.load_image`` + ``Encoder.encode`` for images and texts in
                batches of 32, ``fusion.ProjectionFusion`` (256-d), fused vectors
                kept in memory. No Beam pipeline, no Annoy, no output files.
* ``direct``  - ``catalog-index index ... --shards 4`` (DirectRunner, default options:
                the in-process FnApiRunner, one worker).
* ``mp2``     - the same plus ``--direct_num_workers 2 --direct_running_mode
                multi_processing`` (two SDK worker processes fed over gRPC).

Figures per run: process wall time (start of the child to its exit: interpreter
start, imports, validation and encoder probes included), items/s = items
indexed / wall, and memory (see _measure.py). The pipeline's own "wall time"
line (after validation, so without imports and probes) and the bare child's
time after its encoders are loaded are kept as ``inner_s`` for a second,
start-up-free ratio. Medians over ``--repeats``.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import _measure  # noqa: E402

BATCH = 32
CLI = os.path.join(os.path.dirname(sys.executable), "catalog-index")
CONFIGS = ("bare", "direct", "mp2")
FUSED_DIM = 256


# ------------------------------------------------------------------ children


def child_setup(out_dir, n_items):
    from catalog_index.sample import generate_catalog
    from embedding import tiny

    info = generate_catalog(out_dir, n_items, seed=0, bad_rows=False)
    tiny.build_text_encoder(os.path.join(out_dir, "encoders", "text"), seed=0)
    tiny.build_image_encoder(os.path.join(out_dir, "encoders", "image"), seed=0)
    print("BENCH_RESULT " + json.dumps({"catalog_glob": info["catalog_glob"], "files": info["files"],
                                        "rows": info["rows"], "expected": info["expected"]}))


def child_bare(catalog_files, text_handle, image_handle):
    t0 = time.perf_counter()
    import numpy as np
    import pyarrow.parquet as pq

    from embedding import encoders as enc
    from embedding import fusion as fus
    from embedding import images
    from pipelines.transforms import CatalogRow, item_text
    from schemas import catalog as cat

    t_import = time.perf_counter()
    text_enc = enc.Encoder(text_handle, enc.TEXT)
    image_enc = enc.Encoder(image_handle, enc.IMAGE)
    text_dim, image_dim = text_enc.probe(), image_enc.probe()
    fusion = fus.ProjectionFusion(fus.FusionSpec(fus.PROJECTION, text_dim, image_dim, FUSED_DIM))
    t_loaded = time.perf_counter()

    rows = []
    for path in catalog_files:
        table = pq.read_table(path, columns=list(cat.COLUMNS))
        cols = {c: table.column(c).to_pylist() for c in cat.COLUMNS}
        rows.extend(CatalogRow(cols[cat.ITEM_ID][i], cols[cat.TITLE][i], cols[cat.DESCRIPTION][i],
                               cols[cat.IMAGE_URI][i], path, i) for i in range(table.num_rows))
    t_read = time.perf_counter()

    phase = {"load_images_s": 0.0, "encode_images_s": 0.0, "encode_texts_s": 0.0, "fuse_s": 0.0}
    fused_parts = []
    n_images = n_texts = 0
    for a in range(0, len(rows), BATCH):
        batch = rows[a:a + BATCH]
        n = len(batch)
        t = time.perf_counter()
        img_idx, arrays = [], []
        for i, r in enumerate(batch):
            if r.image_uri and r.image_uri.strip():
                try:
                    arrays.append(images.load_image(r.image_uri.strip(), image_enc.image_size))
                    img_idx.append(i)
                except images.ImageError:
                    pass
        t1 = time.perf_counter()
        image = np.zeros((n, image_dim), np.float32)
        image_mask = np.zeros(n, np.float32)
        if arrays:
            image[img_idx] = image_enc.encode(np.stack(arrays))
            image_mask[img_idx] = 1.0
        t2 = time.perf_counter()
        texts = [(i, item_text(r)) for i, r in enumerate(batch)]
        texts = [(i, s) for i, s in texts if s is not None]
        text = np.zeros((n, text_dim), np.float32)
        text_mask = np.zeros(n, np.float32)
        if texts:
            text[[i for i, _ in texts]] = text_enc.encode([s for _, s in texts])
            text_mask[[i for i, _ in texts]] = 1.0
        t3 = time.perf_counter()
        fused_parts.append(fusion(text, text_mask, image, image_mask))
        t4 = time.perf_counter()
        phase["load_images_s"] += t1 - t
        phase["encode_images_s"] += t2 - t1
        phase["encode_texts_s"] += t3 - t2
        phase["fuse_s"] += t4 - t3
        n_images += len(arrays)
        n_texts += len(texts)
    fused = np.concatenate(fused_parts) if fused_parts else np.zeros((0, FUSED_DIM), np.float32)
    ok = int((np.linalg.norm(fused, axis=1) > 0.5).sum())
    t_end = time.perf_counter()
    print("BENCH_RESULT " + json.dumps({
        "items": len(rows), "indexed": ok, "images": n_images, "texts": n_texts,
        "import_s": t_import - t0, "load_encoders_s": t_loaded - t_import, "read_s": t_read - t_loaded,
        "inner_s": t_end - t_loaded, **phase,
    }), flush=True)


# ------------------------------------------------------------------ parent


def _result_line(output):
    lines = [ln for ln in output.splitlines() if ln.startswith("BENCH_RESULT ")]
    return json.loads(lines[-1].split(" ", 1)[1]) if lines else None


def _env():
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def setup(work, n_items):
    out = os.path.join(work, f"catalog-{n_items}")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_setup", out, str(n_items)],
                          capture_output=True, text=True, env=_env(), cwd=ROOT)
    info = _result_line(proc.stdout)
    if proc.returncode or info is None:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"catalog setup for {n_items} items failed")
    info["text"] = os.path.join(out, "encoders", "text")
    info["image"] = os.path.join(out, "encoders", "image")
    info["dir"] = out
    return info


def run_one(config, info, work, tag):
    if config == "bare":
        cmd = [sys.executable, os.path.abspath(__file__), "--_bare", info["text"], info["image"], *info["files"]]
        m = _measure.run_measured(cmd, env=_env(), cwd=ROOT)
        inner = _result_line(m["output"])
        if m["rc"] or inner is None:
            raise RuntimeError(f"bare run failed (rc {m['rc']}):\n{m['output'][-3000:]}")
        indexed, inner_s = inner["indexed"], inner["inner_s"]
    else:
        out = os.path.join(work, f"out-{tag}")
        cmd = [CLI, "index", "--catalog", info["catalog_glob"], "--output", out,
               "--text-encoder", info["text"], "--image-encoder", info["image"], "--shards", "4"]
        if config == "mp2":
            cmd += ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
        m = _measure.run_measured(cmd, env=_env(), cwd=work)
        shutil.rmtree(out, ignore_errors=True)
        found = re.search(r"indexed (\d+) in \d+ shard", m["output"])
        wall = re.search(r"wall time ([\d.]+)s", m["output"])
        if m["rc"] or not found or not wall:
            raise RuntimeError(f"{config} run failed (rc {m['rc']}):\n{m['output'][-3000:]}")
        indexed, inner_s = int(found.group(1)), float(wall.group(1))
        inner = {}
    run = {k: v for k, v in m.items() if k != "output"}
    run.update(inner)
    run.update(config=config, indexed=indexed, inner_s=inner_s, items_per_s=indexed / m["wall_s"],
               inner_items_per_s=indexed / inner_s if inner_s > 0 else float("nan"))
    return run


def summarise(runs, sizes, configs):
    med = _measure.median
    table = {}
    for n in sizes:
        for c in configs:
            rs = [r for r in runs if r["n_items"] == n and r["config"] == c]
            if not rs:
                continue
            table[(n, c)] = {k: med([r[k] for r in rs]) for k in (
                "wall_s", "items_per_s", "inner_s", "inner_items_per_s", "maxrss_mib", "tree_peak_rss_mib",
                "tree_peak_pss_mib")}
            table[(n, c)]["indexed"] = rs[0]["indexed"]
            table[(n, c)]["runs"] = len(rs)
            # Ratios against the bare run of the same repeat (side by side), then the median.
            if c != "bare":
                pairs = [(r, b) for r in rs for b in runs
                         if b["config"] == "bare" and b["n_items"] == n and b["repeat"] == r["repeat"]]
                table[(n, c)]["ratio"] = med([r["items_per_s"] / b["items_per_s"] for r, b in pairs])
                table[(n, c)]["inner_ratio"] = med([r["inner_items_per_s"] / b["inner_items_per_s"]
                                                    for r, b in pairs])
    return table


def print_table(table, sizes, configs, repeats):
    print()
    print(f"medians of {repeats} run(s); ratio = pipeline items/s / bare items/s of the same repeat (median)")
    head = (f"{'items':>6} {'config':>7} {'wall s':>7} {'items/s':>8} {'ratio':>6} {'inner s':>8} "
            f"{'inner it/s':>10} {'in.ratio':>8} {'maxrss MiB':>10} {'tree RSS':>9} {'tree PSS':>9}")
    print(head)
    print("-" * len(head))
    for n in sizes:
        for c in configs:
            t = table.get((n, c))
            if t is None:
                continue
            ratio = f"{t['ratio']:.3f}" if "ratio" in t else "1"
            iratio = f"{t['inner_ratio']:.3f}" if "inner_ratio" in t else "1"
            print(f"{n:>6} {c:>7} {t['wall_s']:>7.2f} {t['items_per_s']:>8.0f} {ratio:>6} {t['inner_s']:>8.2f} "
                  f"{t['inner_items_per_s']:>10.0f} {iratio:>8} {t['maxrss_mib']:>10.0f} "
                  f"{t['tree_peak_rss_mib']:>9.0f} {t['tree_peak_pss_mib']:>9.0f}")
    if len(sizes) >= 2:
        lo, hi = min(sizes), max(sizes)
        print()
        print(f"memory growth {lo} -> {hi} items (median peak, per extra item) vs {FUSED_DIM * 4} B of fused "
              f"vector per item:")
        for c in configs:
            a, b = table.get((lo, c)), table.get((hi, c))
            if a and b:
                for key in ("maxrss_mib", "tree_peak_pss_mib"):
                    per_item = (b[key] - a[key]) * 2**20 / (hi - lo)
                    print(f"  {c:>7} {key:>18}: {a[key]:7.0f} -> {b[key]:7.0f} MiB, "
                          f"{per_item:8.0f} B/item = {per_item / (FUSED_DIM * 4):5.1f}x the fused vector")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-multiprocessing", action="store_true", help="skip the mp2 configuration")
    ap.add_argument("--json", help="write the raw runs and the summary here")
    args = ap.parse_args(argv)
    configs = [c for c in CONFIGS if not (args.no_multiprocessing and c == "mp2")]

    work = tempfile.mkdtemp(prefix="bench-index-")
    runs = []
    try:
        for n in args.sizes:
            t = time.perf_counter()
            info = setup(work, n)
            print(f"# {n} items: catalog ({info['rows']} rows) and encoders written in "
                  f"{time.perf_counter() - t:.1f}s", flush=True)
            for r in range(args.repeats):
                for c in configs:
                    run = run_one(c, info, work, f"{n}-{c}-{r}")
                    run.update(n_items=n, repeat=r)
                    runs.append(run)
                    print(f"  n={n} rep={r} {c:>6}: wall {run['wall_s']:6.2f}s  {run['items_per_s']:6.0f} items/s  "
                          f"inner {run['inner_s']:6.2f}s  maxrss {run['maxrss_mib']:6.0f} MiB  "
                          f"tree RSS {run['tree_peak_rss_mib']:6.0f} MiB  PSS {run['tree_peak_pss_mib']:6.0f} MiB  "
                          f"indexed {run['indexed']}", flush=True)
            shutil.rmtree(info["dir"], ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = summarise(runs, args.sizes, configs)
    print_table(table, args.sizes, configs, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _measure.machine_facts(), "runs": runs,
                       "summary": [{"n_items": n, "config": c, **v} for (n, c), v in table.items()]}, f, indent=2)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_setup":
        child_setup(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_bare":
        child_bare(sys.argv[4:], sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
