"""Speed of the built-in encoders, alone and inside `catalog-index index`, on real photos.

1. Each encoder alone, in one process, models already loaded: texts/s of
   builtin:minilm-l6-v2 and builtin:use-multilingual-v3 on the Grocery train
   texts (title + description), images/s of builtin:efficientnet-lite0 on
   preprocessed 224x224 arrays; batch 32 and 64; median of 3 passes.
2. The bare image encoder over the 2,640 Grocery train photos in a fresh
   process (decode + resize with embedding.images, encode in batches of 32),
   against `catalog-index index` on the same photos as a catalog (default
   built-in encoders, 4 shards, DirectRunner), run alternately in the same
   session; ratio = pipeline items/s / bare image items/s, median over repeats. Every repeat is a full
   run (``--no-reuse``: the repeats publish into one output root, and would otherwise reuse repeat 0).
   Both walls include process start-up and model loading.

    .venv/bin/python benchmarks/bench_builtin.py [--repeats 3] [--skip-alone] [--json OUT]
"""

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import _grocery  # noqa: E402
import _measure  # noqa: E402


def _texts(rows):
    from pipelines.transforms import CatalogRow, item_text

    return [item_text(CatalogRow(r["item_id"], r["title"], r["description"], None, "", 0)) for r in rows]


def _rate(encoder, inputs, batch):
    """Median over 3 passes of inputs/s through encoder.encode in batches of ``batch``."""
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        for i in range(0, len(inputs), batch):
            encoder.encode(inputs[i:i + batch])
        rates.append(len(inputs) / (time.perf_counter() - t))
    return _measure.median(rates)


def child_alone(n_texts, n_images):
    import numpy as np

    from embedding import encoders as enc
    from embedding.images import load_image

    rows = _grocery.split("train")
    texts = _texts(rows)[:n_texts]
    out = {}
    for handle in ("builtin:minilm-l6-v2", "builtin:use-multilingual-v3"):
        e = enc.Encoder(handle, enc.TEXT)
        e.encode(texts[:8])
        for batch in (32, 64):
            out[f"{handle} texts/s batch {batch}"] = _rate(e, texts, batch)
    e = enc.Encoder("builtin:efficientnet-lite0", enc.IMAGE)
    arrays = np.stack([load_image(r["image_uri"], e.image_size) for r in rows[:n_images]])
    e.encode(arrays[:8])
    for batch in (32, 64):
        out[f"builtin:efficientnet-lite0 images/s batch {batch}"] = _rate(e, arrays, batch)
    print("RESULT " + json.dumps(out))


def child_bare():
    import numpy as np

    from embedding import encoders as enc
    from embedding.images import load_image

    rows = _grocery.split("train")
    e = enc.Encoder("builtin:efficientnet-lite0", enc.IMAGE)
    t = time.perf_counter()
    for i in range(0, len(rows), 32):
        e.encode(np.stack([load_image(r["image_uri"], e.image_size) for r in rows[i:i + 32]]))
    print("RESULT " + json.dumps({"inner_s": time.perf_counter() - t, "items": len(rows)}))


def write_catalog(path, distinct_texts=False):
    """The train photos as a catalog. The dataset gives all photos of a product the same
    title and description (81 distinct texts); ``distinct_texts`` appends the photo's
    file name to each title so every item's text differs, the worst case for the
    pipeline's text de-duplication."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _grocery.split("train")
    cols = ("item_id", "title", "description", "image_uri")
    out = []
    for r in rows:
        item = {c: r[c] for c in cols}
        if distinct_texts:
            item["title"] = f"{r['title']} {os.path.basename(r['image_uri'])[:-4].replace('_', ' ')}"
        out.append(item)
    pq.write_table(pa.Table.from_pylist(out), path)
    return len(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-alone", action="store_true")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--json")
    parser.add_argument("--child", choices=["alone", "bare"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _grocery.require_dataset()
    if args.child == "alone":
        return child_alone(args.texts, args.images)
    if args.child == "bare":
        return child_bare()

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    py = sys.executable
    exe = os.path.join(os.path.dirname(py), "catalog-index")
    subprocess_models = [exe, "models", "build"]  # build once, outside any measurement
    _measure.run_measured(subprocess_models, env=env)
    report = {"machine": _measure.machine_facts(), "date": time.strftime("%Y-%m-%d")}
    if not args.skip_alone:
        r = _measure.run_measured([py, __file__, "--child", "alone", "--texts", str(args.texts),
                                   "--images", str(args.images)], env=env)
        line = [x for x in r["output"].splitlines() if x.startswith("RESULT ")]
        if r["rc"] != 0 or not line:
            sys.exit(r["output"][-3000:])
        report["alone"] = json.loads(line[-1][7:])
        for key, value in report["alone"].items():
            print(f"{key:48s} {value:8.1f}")

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-builtin-") as work:
        catalog = os.path.join(work, "grocery.parquet")
        n = write_catalog(catalog)
        distinct = os.path.join(work, "grocery-distinct-texts.parquet")
        write_catalog(distinct, distinct_texts=True)
        for rep in range(args.repeats):
            bare = _measure.run_measured([py, __file__, "--child", "bare"], env=env)
            line = [x for x in bare["output"].splitlines() if x.startswith("RESULT ")]
            if bare["rc"] != 0 or not line:
                sys.exit(bare["output"][-3000:])
            inner = json.loads(line[-1][7:])["inner_s"]
            pipe = _measure.run_measured([exe, "index", "--catalog", catalog, "--output", os.path.join(work, "out"),
                                          "--shards", "4", "--version", f"r{rep}", "--no-reuse"], env=env)
            if pipe["rc"] != 0:
                sys.exit(pipe["output"][-3000:])
            pipe_d = _measure.run_measured([exe, "index", "--catalog", distinct, "--output",
                                            os.path.join(work, "out-d"), "--shards", "4", "--version", f"r{rep}",
                                            "--no-reuse"],
                                           env=env)
            if pipe_d["rc"] != 0:
                sys.exit(pipe_d["output"][-3000:])
            run = {"bare_wall_s": bare["wall_s"], "bare_inner_s": inner, "bare_maxrss_mib": bare["maxrss_mib"],
                   "pipe_wall_s": pipe["wall_s"], "pipe_maxrss_mib": pipe["maxrss_mib"],
                   "ratio": bare["wall_s"] / pipe["wall_s"],
                   "pipe_distinct_wall_s": pipe_d["wall_s"], "pipe_distinct_maxrss_mib": pipe_d["maxrss_mib"],
                   "ratio_distinct": bare["wall_s"] / pipe_d["wall_s"]}
            runs.append(run)
            print(f"rep {rep}: bare {bare['wall_s']:.1f}s ({n / bare['wall_s']:.1f} items/s, inner {inner:.1f}s), "
                  f"pipeline {pipe['wall_s']:.1f}s ({n / pipe['wall_s']:.1f} items/s), ratio {run['ratio']:.3f}; "
                  f"distinct texts {pipe_d['wall_s']:.1f}s ({n / pipe_d['wall_s']:.1f} items/s), "
                  f"ratio {run['ratio_distinct']:.3f}")
    med = {k: _measure.median([r[k] for r in runs]) for k in runs[0]}
    report.update(items=n, runs=runs, median=med)
    print(f"median over {len(runs)}: bare {n / med['bare_wall_s']:.1f} items/s, pipeline "
          f"{n / med['pipe_wall_s']:.1f} items/s, ratio {med['ratio']:.3f}; distinct texts "
          f"{n / med['pipe_distinct_wall_s']:.1f} items/s, ratio {med['ratio_distinct']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
