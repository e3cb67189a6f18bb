"""Retrieval quality through the product: `catalog-index index` then `catalog-index query`, against brute force.

The index: the 2,640 Grocery Store train photos as catalog items (title =
product name, description = the product's description, image = the photo),
built with `catalog-index index` and its defaults (built-in encoders, default
fusion, 1 shard unless --shards, the default trees (50), the recall gate that writes the
release's search_k into the manifest's validation).

Queries, answered by `catalog-index query --index OUT --queries FILE` (one
child process, the release's default search_k):

* the 296 val photos as image-only queries;
* the 81 product names as text-only queries.

P@1 fine / coarse: the class of the first result against the query's class.
The same figure from brute force: the release's own fused vectors (the
embeddings table of every shard) and the same query vectors (embedded in this
process with search.open_index(...).embed_each, the code path `query` uses),
exact cosine top 1 (search.ann.exact_search). The difference is what the ANN
costs; the top-1 agreement (ANN first result == exact first result) is
reported too.

    .venv/bin/python benchmarks/bench_query_quality.py [--workdir DIR] [--shards 1] [--json OUT]

--workdir keeps the catalog, the index and the query outputs (default
benchmarks/results/cache/query-quality, git-ignored); an index already there
is reused unless --rebuild (bench_http.py serves the same index). Skips with a
message when the Grocery Store data is absent.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import _grocery  # noqa: E402
import _measure  # noqa: E402

CLI = os.path.join(ROOT, ".venv", "bin", "catalog-index")
DEFAULT_WORKDIR = os.path.join(HERE, "results", "cache", "query-quality")
# The console script with tensorflow-text's ops registered first. Used only when the plain command fails
# with "Op type not registered" (a reader loading a release's query_encoder exported from a built-in text
# model, whose tokeniser ops live in tensorflow-text, without importing it); the results say so.
TF_TEXT_CLI = [os.path.join(ROOT, ".venv", "bin", "python"), "-c",
               "import sys, tensorflow_text; from catalog_index.cli import main; sys.exit(main())"]


def missing_text_ops(stderr: str) -> bool:
    return "Op type not registered" in stderr


def write_catalog(rows, path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "item_id": [r["item_id"] for r in rows],
        "title": [r["title"] for r in rows],
        "description": [r["description"] for r in rows],
        "image_uri": [r["image_uri"] for r in rows],
    })
    pq.write_table(table, path)


def has_index(out):
    return os.path.exists(os.path.join(out, "LATEST"))


def build_index(workdir, shards, rebuild):
    """Runs `catalog-index index` on the train split (unless an index is already there); returns (out, run)."""
    catalog = os.path.join(workdir, "catalog", "train.parquet")
    out = os.path.join(workdir, "index")
    if has_index(out) and not rebuild:
        print(f"reusing the index at {out} (--rebuild to build it again)", flush=True)
        return out, None
    os.makedirs(os.path.dirname(catalog), exist_ok=True)
    write_catalog(_grocery.split("train"), catalog)
    cmd = [CLI, "index", "--catalog", catalog, "--output", out, "--shards", str(shards)]
    print("$ " + " ".join(cmd), flush=True)
    run = _measure.run_measured(cmd, stdout_path=os.path.join(workdir, "index.log"))
    if run["rc"] != 0:
        sys.exit(f"catalog-index index failed (exit {run['rc']}):\n{run['output'][-3000:]}")
    return out, {"cmd": cmd, "wall_s": round(run["wall_s"], 1), "maxrss_mib": round(run["maxrss_mib"]),
                 "summary": [l for l in run["output"].splitlines() if "wall" in l or "indexed" in l][-5:]}


def run_query(out, queries_path, k, workdir):
    """(answers, wall, cmd, workaround): the plain command first; the tensorflow-text shim only if it fails so."""
    args = ["query", "--index", out, "--queries", queries_path, "--k", str(k)]
    stdout_path = os.path.join(workdir, "query-output.jsonl")
    workaround = None
    for attempt, prefix in enumerate(([CLI], TF_TEXT_CLI)):
        cmd = prefix + args
        print("$ " + " ".join(cmd), flush=True)
        start = time.perf_counter()
        with open(stdout_path, "wb") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, check=False)
        wall = time.perf_counter() - start
        stderr = proc.stderr.decode("utf-8", "replace")
        if proc.returncode == 0:
            break
        if attempt == 0 and missing_text_ops(stderr):
            workaround = stderr.strip().splitlines()[-1][:600]
            print(f"the plain command failed, missing tensorflow-text ops:\n  {workaround}\n"
                  "  rerunning with tensorflow_text imported first (reported in the results)", flush=True)
            continue
        sys.exit(f"catalog-index query failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    with open(stdout_path, encoding="utf-8") as f:
        answers = [json.loads(line) for line in f if line.strip()]
    return answers, wall, cmd, workaround


def release_vectors(searcher):
    """(item_ids, fused matrix) from the embeddings tables of every shard of the open release."""
    import pyarrow.parquet as pq

    from schemas import embeddings as emb

    ids, parts = [], []
    for shard in sorted(searcher.manifest["shards"], key=lambda s: s["index"]):
        table = pq.read_table(os.path.join(searcher.release_dir, shard["embeddings"]),
                              columns=[emb.ITEM_ID, emb.EMBEDDING])
        ids.extend(table.column(emb.ITEM_ID).to_pylist())
        parts.append(np.asarray(table.column(emb.EMBEDDING).to_pylist(), dtype=np.float32))
    return ids, np.concatenate(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--rebuild", action="store_true", help="build the index again (a new version in the same root)")
    parser.add_argument("--k", type=int, default=10, help="results per query asked of `catalog-index query`")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    _grocery.require_dataset()
    os.makedirs(args.workdir, exist_ok=True)

    train, val = _grocery.split("train"), _grocery.split("val")
    classes = _grocery.classes()
    out, index_run = build_index(args.workdir, args.shards, args.rebuild)

    # Queries: val photos (image only) and product names (text only); labels by query id.
    queries, labels = [], {}
    for r in val:
        qid = "photo:" + r["item_id"]
        queries.append({"id": qid, "image": r["image_uri"]})
        labels[qid] = (r["fine"], r["coarse"])
    for fine in sorted(classes):
        qid = f"name:{fine}"
        queries.append({"id": qid, "text": classes[fine][0]})
        labels[qid] = (fine, classes[fine][2])
    queries_path = os.path.join(args.workdir, "queries.jsonl")
    with open(queries_path, "w", encoding="utf-8") as f:
        for q in queries:
            f.write(json.dumps(q) + "\n")

    answers, query_wall, query_cmd, workaround = run_query(out, queries_path, args.k, args.workdir)
    item_label = {r["item_id"]: (r["fine"], r["coarse"]) for r in train}

    # Brute force over the same release: its fused vectors, the same query embedding code.
    from search import ann
    from search.index import open_index

    if workaround:
        import tensorflow_text  # noqa: F401  (the same workaround in this process)
    searcher = open_index(out)
    ids, matrix = release_vectors(searcher)
    texts = [q.get("text") for q in queries]
    images = []
    for q in queries:
        if q.get("image"):
            with open(q["image"], "rb") as f:
                images.append(f.read())
        else:
            images.append(None)
    vectors, errors = [], []
    for i in range(0, len(queries), 64):  # the query command's default batch
        v, e = searcher.embed_each(texts[i:i + 64], images[i:i + 64])
        vectors.append(v)
        errors.extend(e)
    vectors = np.concatenate(vectors)
    exact = ann.exact_search(matrix, ids, vectors, 1)

    by_id = {a["id"]: a for a in answers}
    groups = {"photos": [q["id"] for q in queries if q["id"].startswith("photo:")],
              "names": [q["id"] for q in queries if q["id"].startswith("name:")]}
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": _measure.machine_facts(),
        "index": out,
        "index_run": index_run,
        "release": {"version": searcher.version, "release": searcher.release,
                    "items": len(ids), "dimension": int(matrix.shape[1]),
                    "shards": len(searcher.manifest["shards"]),
                    "validation": searcher.manifest.get("validation"),
                    "encoders": {k: v for k, v in (searcher.manifest.get("encoders") or {}).items()}},
        "default_search_k": searcher.default_search_k,
        "query_cmd": query_cmd,
        "plain_query_failed": workaround,
        "query_wall_s": round(query_wall, 1),
        "queries": len(queries),
    }
    position = {q["id"]: i for i, q in enumerate(queries)}
    print(f"{'queries':8s} {'n':>4s} {'errors':>6s} {'ANN fine':>9s} {'exact fine':>10s} {'diff':>7s} "
          f"{'ANN coarse':>10s} {'exact coarse':>12s} {'diff':>7s} {'top1 agree':>10s}")
    for name, qids in groups.items():
        ann_fine = ann_coarse = ex_fine = ex_coarse = agree = n_err = 0
        for qid in qids:
            fine, coarse = labels[qid]
            answer = by_id.get(qid, {})
            if "results" not in answer or errors[position[qid]] is not None:
                n_err += 1
                continue
            first = answer["results"][0]["item_id"] if answer["results"] else None
            best = exact[position[qid]][0][0]
            got = item_label.get(first, (None, None))
            ex = item_label[best]
            ann_fine += got[0] == fine
            ann_coarse += got[1] == coarse
            ex_fine += ex[0] == fine
            ex_coarse += ex[1] == coarse
            agree += first == best
        n = len(qids)
        row = {"n": n, "errors": n_err,
               "ann_p1_fine": ann_fine / n, "exact_p1_fine": ex_fine / n,
               "diff_fine_points": 100 * (ann_fine - ex_fine) / n,
               "ann_p1_coarse": ann_coarse / n, "exact_p1_coarse": ex_coarse / n,
               "diff_coarse_points": 100 * (ann_coarse - ex_coarse) / n,
               "top1_agreement": agree / n}
        results[name] = row
        print(f"{name:8s} {n:4d} {n_err:6d} {row['ann_p1_fine']:9.3f} {row['exact_p1_fine']:10.3f} "
              f"{row['diff_fine_points']:+7.1f} {row['ann_p1_coarse']:10.3f} {row['exact_p1_coarse']:12.3f} "
              f"{row['diff_coarse_points']:+7.1f} {row['top1_agreement']:10.3f}")
    # The same vectors through the library at other search_k (in this process): what the default leaves.
    def p_at_1(hits_by_query, qids):
        fine = coarse = agree = 0
        for qid in qids:
            hits = hits_by_query[position[qid]]
            first = hits[0].item_id if hits else None
            got = item_label.get(first, (None, None))
            fine += got[0] == labels[qid][0]
            coarse += got[1] == labels[qid][1]
            agree += first == exact[position[qid]][0][0]
        return fine / len(qids), coarse / len(qids), agree / len(qids)

    good = [i for i, e in enumerate(errors) if e is None]
    ladder, ks = [], [searcher.default_search_k]
    while ks[-1] > 0 and ks[-1] < 2 * len(ids) * 10:
        ks.append(ks[-1] * 2)
    ks.append(-1)
    print(f"\n{'search_k':>8s} {'photos fine':>11s} {'coarse':>7s} {'agree':>6s} {'names fine':>10s} {'coarse':>7s} "
          f"{'agree':>6s} {'ms/query':>8s}")
    for search_k in ks:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            found = searcher.search(vectors=vectors[good], k=args.k, search_k=search_k)
            times.append(time.perf_counter() - t0)
        hits_by_query = [None] * len(queries)
        for i, hits in zip(good, found):
            hits_by_query[i] = hits
        row = {"search_k": search_k, "ms_per_query": 1000 * _measure.median(times) / len(good)}
        for name, qids in groups.items():
            row[name + "_p1_fine"], row[name + "_p1_coarse"], row[name + "_top1_agreement"] = p_at_1(hits_by_query, qids)
        ladder.append(row)
        print(f"{search_k:8d} {row['photos_p1_fine']:11.3f} {row['photos_p1_coarse']:7.3f} "
              f"{row['photos_top1_agreement']:6.3f} {row['names_p1_fine']:10.3f} {row['names_p1_coarse']:7.3f} "
              f"{row['names_top1_agreement']:6.3f} {row['ms_per_query']:8.2f}")
    results["search_k_ladder"] = ladder
    # How far the queries are from their nearest item (the recall gate searches items by their own vectors).
    for name, qids in groups.items():
        cos = [exact[position[q]][0][1] for q in qids]
        results[name]["exact_top1_cosine_median"] = float(np.median(cos))
    print(f"median cosine of the exact first result: photos {results['photos']['exact_top1_cosine_median']:.3f}, "
          f"names {results['names']['exact_top1_cosine_median']:.3f} (the recall gate's self-queries: 1.0)")
    print(f"default search_k {searcher.default_search_k}; validation {searcher.manifest.get('validation')}")
    print(f"catalog-index query: {len(queries)} queries in {query_wall:.1f} s (start-up included)")
    searcher.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
