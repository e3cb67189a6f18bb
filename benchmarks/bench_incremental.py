"""Incremental runs (issue 9): a full index of catalog A, then catalog B (A with 1 % of the items changed)
indexed incrementally (reusing A's vectors) and in full (``--no-reuse``), side by side.

    python benchmarks/bench_incremental.py [--items 100000] [--repeats 2] [--image-pool 1000]
        [--text-dim 384] [--image-dim 1280] [--dimension 256] [--shards 1] [--image-version]
        [--workdir DIR] [--keep] [--budget-s S] [--json OUT]
    python benchmarks/bench_incremental.py --report OUT.json   # the runs' stage times from their logs
    python benchmarks/bench_incremental.py --finish OUT.json   # compare repeat 0's outputs and summarise again

Everything runs ``catalog-index index ... --runner DirectRunner`` as a user would, each in a fresh child
process (see _measure.py for the memory figures), with the tiny encoders of ``embedding/tiny.py``
configured to the built-in encoders' output sizes (text 384-d like MiniLM, image 1,280-d like
EfficientNet-Lite0; the tiny image encoder's own 32x32 input) and the other options at their defaults
(``--shards`` 1 unless given).

Catalog A (seeded): ``--items`` items; titles ``<colour> <kind> <size> <code>`` with a per-item product
code so that texts are distinct (the pipeline encodes each distinct text once; the sample catalog's
small vocabulary would make most texts repeat), a description for ~80 %, and an image for 75 %. The
images are ``--image-pool`` distinct small PNG/JPEG pictures (48-96 px, ``catalog_index.sample``'s
drawings), each referenced by many items (item i -> picture i mod pool). Every item's image is still
fetched, decoded and encoded in a full run (the pipeline does not share work between equal image bytes),
and an incremental run still reads and hashes every image whose (image_uri, image_version) it cannot trust.

Catalog B = A with ``--churn`` (1 %) of the items changed, a quarter each: new text (title), new image
(a new picture file with new bytes at a new URI), new items (new ids, with an image like the others),
deleted items. With ``--image-version`` the same pair of catalogs is also written with an
``image_version`` column (A's value per picture; changed images get a new value), and a second pair of
runs measures that variant: a full index of A' (into its own root), then B' incrementally.

Runs: 1. full A -> root ``a``; for each repeat r, interleaved (order alternates): ``a`` copied to
``inc-r`` (the copy is not timed) and ``catalog-index index --catalog B --output inc-r`` (default reuse
from LATEST), and ``catalog-index index --catalog B --output full-r --no-reuse``. Outputs of repeat 0 are
compared: item ids per shard, max abs difference of the text, image and fused vectors between the two
embeddings tables, and whether the shard and table files are byte-identical. Each child's output lines
are time-stamped by this script so the stages (start-up, validation, reading/hashing, shard builds,
recall gate, publication) can be told apart.
"""

import argparse
import datetime
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import _measure  # noqa: E402

CLI = os.path.join(os.path.dirname(sys.executable), "catalog-index")


# ------------------------------------------------------------------ catalogs


def _write(table_rows, path, with_version):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {
        "item_id": pa.array([r[0] for r in table_rows], pa.string()),
        "title": pa.array([r[1] for r in table_rows], pa.string()),
        "description": pa.array([r[2] for r in table_rows], pa.string()),
        "image_uri": pa.array([r[3] for r in table_rows], pa.string()),
    }
    if with_version:
        cols["image_version"] = pa.array([r[4] for r in table_rows], pa.string())
    pq.write_table(pa.table(cols), path)


def make_catalogs(work, n_items, churn, pool, n_files, seed, with_version):
    """Writes A and B (and A', B' with image_version); returns facts about them."""
    import numpy as np

    from catalog_index import sample

    rng = np.random.default_rng(seed)
    img_dir = os.path.join(work, "images")
    os.makedirs(img_dir, exist_ok=True)
    kinds, colours = list(sample.KINDS), list(sample.COLOURS)

    def picture(name, k):
        kind, colour = kinds[int(rng.integers(len(kinds)))], colours[int(rng.integers(len(colours)))]
        size = sample.IMAGE_SIZES[int(rng.integers(len(sample.IMAGE_SIZES)))]
        img = sample._draw_product(rng, kind, colour, size)
        if k % 2:
            return sample._save(img, os.path.join(img_dir, name + ".png"))
        return sample._save(img, os.path.join(img_dir, name + ".jpg"), quality=90)

    t0 = time.perf_counter()
    pictures = [picture(f"pool-{k:05d}", k) for k in range(pool)]
    t_pool = time.perf_counter() - t0

    def item(i, tag=""):
        kind, colour = kinds[int(rng.integers(len(kinds)))], colours[int(rng.integers(len(colours)))]
        size_word = sample.KINDS[kind][2][int(rng.integers(len(sample.KINDS[kind][2])))]
        code = f"{tag}{int(rng.integers(10 ** 8)):08d}"
        title = f"{colour} {kind} {size_word} {code}"
        desc = None if rng.random() < 0.2 else (
            f"{sample.ADJECTIVES[int(rng.integers(len(sample.ADJECTIVES)))].capitalize()} {colour} {kind} "
            f"by {sample.BRANDS[int(rng.integers(len(sample.BRANDS)))]}.")
        if rng.random() < sample.NO_IMAGE_FRACTION:
            uri, ver = None, None
        else:
            k = i % pool
            uri, ver = pictures[k], f"v1-{k}"
        return [f"item-{i:07d}", title, desc, uri, ver]

    a_rows = [item(i) for i in range(n_items)]
    quarter = int(round(n_items * churn / 4))
    order = rng.permutation(n_items)
    text_idx = sorted(order[:quarter].tolist())
    with_img = [int(i) for i in order[quarter:] if a_rows[int(i)][3] is not None]
    image_idx = sorted(with_img[:quarter])
    used = set(text_idx) | set(image_idx)
    rest = [int(i) for i in order[quarter:] if int(i) not in used]
    deleted_idx = set(rest[:quarter])

    b_rows = []
    for i, row in enumerate(a_rows):
        if i in deleted_idx:
            continue
        row = list(row)
        if i in text_idx:
            row[1] = row[1] + " (new edition)"
        if i in image_idx:
            row[3] = picture(f"changed-{i:07d}", i)
            row[4] = "v2"
        b_rows.append(row)
    new_rows = [item(n_items + j, tag="N") for j in range(quarter)]
    b_rows.extend(new_rows)
    # B's rows in another order than A's, as a new export would be.
    b_rows = [b_rows[i] for i in rng.permutation(len(b_rows))]

    paths = {}
    # A always carries image_version (so its embeddings table records the versions); B without it
    # (every image read and hashed), Bv with it (unchanged (image_uri, image_version): no fetch).
    for tag, rows, versioned in (("A", a_rows, True), ("B", b_rows, False), ("Bv", b_rows, True)):
        if tag == "Bv" and not with_version:
            continue
        d = os.path.join(work, "catalog-" + tag)
        os.makedirs(d, exist_ok=True)
        for f, part in enumerate(np.array_split(np.arange(len(rows)), n_files)):
            _write([rows[int(j)] for j in part], os.path.join(d, f"part-{f:05d}.parquet"), versioned)
        paths[tag] = os.path.join(d, "part-*.parquet")
    return {
        "paths": paths, "a_items": len(a_rows), "b_items": len(b_rows),
        "a_with_image": sum(r[3] is not None for r in a_rows), "b_with_image": sum(r[3] is not None for r in b_rows),
        "changed_text": len(text_idx), "changed_image": len(image_idx), "new": len(new_rows),
        "deleted": len(deleted_idx), "pool_pictures": pool, "pool_seconds": round(t_pool, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }


BUILTIN = ("builtin:minilm-l6-v2", "builtin:efficientnet-lite0")  # --builtin: the default English encoders


# ------------------------------------------------------------------ measuring one run






def run_timed(cmd, log_path, interval=0.5):
    """Runs cmd in a fresh child: wall, rc, wait4 maxrss, tree RSS/PSS peaks, output lines with their
    offsets in seconds from the start."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_measure.child_env(), cwd=ROOT)
    peaks = {"rss": 0, "pss": 0}
    stop = threading.Event()
    lines = []

    def sample():
        while not stop.is_set():
            rss = pss = 0
            for p in _measure._tree(proc.pid):
                r, s = _measure._rss_pss(p)
                rss += r
                pss += s
            peaks["rss"], peaks["pss"] = max(peaks["rss"], rss), max(peaks["pss"], pss)
            stop.wait(interval)

    def read():
        with open(log_path, "w") as log:
            for raw in proc.stdout:
                t = time.perf_counter() - start
                line = raw.decode("utf-8", "replace").rstrip("\n")
                lines.append((round(t, 2), line))
                log.write(f"{t:8.2f} {line}\n")
                log.flush()

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read, daemon=True)]
    for t in threads:
        t.start()
    load_before = _measure.loadavg()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stop.set()
    for t in threads:
        t.join()
    return {
        "wall_s": wall, "rc": os.waitstatus_to_exitcode(status), "maxrss_mib": usage.ru_maxrss / 1024.0,
        "tree_peak_rss_mib": peaks["rss"] / 2 ** 20, "tree_peak_pss_mib": peaks["pss"] / 2 ** 20,
        "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "loadavg_before": load_before,
        "loadavg_after": _measure.loadavg(), "lines": lines,
    }


def _first(lines, pattern):
    for t, line in lines:
        if re.search(pattern, line):
            return t
    return None


def _last(lines, pattern):
    found = None
    for t, line in lines:
        if re.search(pattern, line):
            found = t
    return found


def stages(lines, wall):
    """Offsets of the log lines that mark stages; the gaps between them are the stages' times."""
    marks = {
        "reuse_resolved": _first(lines, r"reusing the vectors|every item is encoded|not reusing"),
        "pipeline_start": _first(lines, r"indexing \d+ catalog file"),
        "first_shard_built": _first(lines, r"built shard 1/"),
        "last_shard_built": _last(lines, r"built shard \d+/"),
        "recall_gate_first": _first(lines, r"recall gate:"),
        "recall_gate_last": _last(lines, r"recall gate:"),
        "query_encoder": _first(lines, r"query encoder:"),
        "published": _first(lines, r"^published "),
    }
    return {"marks": marks, "wall_s": wall}


def parse_summary(lines):
    text = "\n".join(line for _, line in lines)
    out = {}
    m = re.search(r"wall time ([\d.]+)s \(validation and model probes ([\d.]+)s\)", text)
    if m:
        out["cli_wall_s"], out["cli_validation_s"] = float(m.group(1)), float(m.group(2))
    m = re.search(r"read (\d+), indexed (\d+) in (\d+) shard", text)
    if m:
        out["read"], out["indexed"], out["shards"] = map(int, m.groups())
    m = re.search(r"published (\S+)", text)
    if m:
        out["release_dir"] = m.group(1)
    return out


def index_run(name, catalog, output, encoders, args, extra=(), logs=None):
    cmd = [CLI, "index", "--catalog", catalog, "--output", output, "--text-encoder", encoders[0],
           "--image-encoder", encoders[1], "--dimension", str(args.dimension), "--shards", str(args.shards),
           "--runner", "DirectRunner", *extra]
    log_path = os.path.join(logs, f"{name}.log")
    print(f"[{datetime.datetime.now():%H:%M:%S}] {name}: {' '.join(cmd)}", flush=True)
    m = run_timed(cmd, log_path)
    m.update(parse_summary(m["lines"]))
    m["stages"] = stages(m["lines"], m["wall_s"])
    m.update(name=name, cmd=cmd)
    if m["rc"] != 0 or "release_dir" not in m:
        tail = "\n".join(line for _, line in m["lines"][-40:])
        raise RuntimeError(f"{name} failed (rc {m['rc']}), log {log_path}:\n{tail}")
    manifest = json.load(open(os.path.join(m["release_dir"], "manifest.json")))
    c = manifest["counts"]
    m["counts"] = {k: c.get(k) for k in ("read", "indexed", "rejected", "degraded", "reused_text", "encoded_text",
                                          "reused_image", "encoded_image")}
    m["reuse_source"] = (manifest.get("reuse") or {}).get("source")
    m["search_k"] = (manifest.get("validation") or {}).get("search_k")
    print(f"    wall {m['wall_s']:.1f}s (CLI {m.get('cli_wall_s')}s, validation {m.get('cli_validation_s')}s)  "
          f"maxrss {m['maxrss_mib']:.0f} MiB  tree RSS {m['tree_peak_rss_mib']:.0f} MiB  counts {m['counts']}  "
          f"load {m['loadavg_before']} -> {m['loadavg_after']}", flush=True)
    print(f"    marks {m['stages']['marks']}", flush=True)
    return m


def phases(lines, wall):
    """Approximate stage times (s) of one run from its time-stamped log. The progress lines come every 10 s
    (each worker's running totals), so boundaries taken from them are +-10 s."""
    def progress(t_line):
        t, line = t_line
        m = re.search(r"progress \(this worker\): (.*)$", line)
        return (t, dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1)))) if m else None

    prog = [x for x in map(progress, lines) if x]
    final = prog[-1][1] if prog else {}

    def first_reaching(key, value):
        for t, counts in prog:
            if counts.get(key, 0) >= value:
                return t
        return None

    def first_having(key):
        for t, counts in prog:
            if counts.get(key, 0) > 0:
                return t
        return None

    m = stages(lines, wall)["marks"]
    fused = final.get("items_fused", 0)
    points = [
        ("start-up, validation, reuse source check", m["pipeline_start"]),
        ("read catalog (+ previous table)", first_reaching("rows_read", final.get("rows_read", 1))),
        ("images (fetch, hash, decode, encode), texts, join shuffles", first_having("items_fused")),
        ("join + assemble + fuse (to 95 % fused)", first_reaching("items_fused", int(0.95 * fused)) if fused else None),
        ("rest of fuse, group by shard, Annoy build, tables", m["last_shard_built"]),
        ("query encoder export + parity", m["query_encoder"]),
        ("recall gate (copy, read tables, exact + ladder)", m["recall_gate_last"]),
        ("manifest, verification, pointers", m["published"]),
        ("exit", wall),
    ]
    out, prev = [], 0.0
    for name, t in points:
        if t is None:
            continue
        out.append((name, round(t - prev, 1)))
        prev = t
    return out


def report(path):
    d = json.load(open(path))
    for r in d["runs"]:
        print(f"{r['name']:>10} wall {r['wall_s']:7.1f}s  cli {r.get('cli_wall_s', float('nan')):7.1f}s  "
              f"maxrss {r['maxrss_mib']:6.0f} MiB  load {r['loadavg_before']} -> {r['loadavg_after']}  {r['counts']}")
        for name, dt in phases([tuple(x) for x in r["lines"]], r["wall_s"]):
            print(f"{'':14}{dt:7.1f}s  {name}")
    if "comparison" in d:
        print(json.dumps({k: v for k, v in d["comparison"].items()}, indent=1))
    if "summary" in d:
        print(json.dumps(d["summary"], indent=1))


# ------------------------------------------------------------------ comparing outputs


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def compare(release_a, release_b):
    """Release a (incremental) against release b (full): ids per shard, vector differences, file bytes."""
    import numpy as np
    import pyarrow.parquet as pq

    def files_of(release):
        return {os.path.relpath(p, release): p for p in glob.glob(os.path.join(release, "**", "*"), recursive=True)
                if os.path.isfile(p)}

    fa, fb = files_of(release_a), files_of(release_b)
    same_names = sorted(set(fa) & set(fb))
    byte_identical = {n: _sha256(fa[n]) == _sha256(fb[n]) for n in same_names if n != "manifest.json"}

    def table(release):
        paths = sorted(p for p in glob.glob(os.path.join(release, "**", "*.parquet"), recursive=True)
                       if "embedding" in os.path.basename(p) or "embedding" in os.path.dirname(p))
        t = [pq.read_table(p) for p in paths]
        import pyarrow as pa
        return pa.concat_tables(t), [os.path.relpath(p, release) for p in paths]

    ta, pa_ = table(release_a)
    tb, pb_ = table(release_b)
    ida, idb = ta.column("item_id").to_pylist(), tb.column("item_id").to_pylist()
    sha, shb = ta.column("shard").to_pylist(), tb.column("shard").to_pylist()
    per_shard_a, per_shard_b = {}, {}
    for i, s in zip(ida, sha):
        per_shard_a.setdefault(s, set()).add(i)
    for i, s in zip(idb, shb):
        per_shard_b.setdefault(s, set()).add(i)
    result = {"embeddings_files": [pa_, pb_], "items": [len(ida), len(idb)],
              "same_ids_per_shard": per_shard_a == per_shard_b,
              "byte_identical": byte_identical,
              "n_files_compared": len(byte_identical),
              "n_byte_identical": sum(byte_identical.values())}
    pos_b = {i: k for k, i in enumerate(idb)}
    order = np.array([pos_b[i] for i in ida], np.int64)

    def dense(table, col):
        """(valid mask, [n, d] float32) of a list<float32> column from its flat buffer."""
        arr = table.column(col).combine_chunks()
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        offsets = arr.offsets.to_numpy()
        values = arr.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        lengths = np.diff(offsets)[valid]
        d = int(lengths.max()) if len(lengths) else 0
        out = np.zeros((len(arr), d), np.float32)
        for k in np.flatnonzero(valid):
            out[k] = values[offsets[k]:offsets[k + 1]]
        return valid, out

    for col in ("text_embedding", "image_embedding", "embedding"):
        va, xa = dense(ta, col)
        vb, xb = dense(tb, col)
        vb, xb = vb[order], xb[order]
        both = va & vb
        diff = np.abs(xa[both] - xb[both]).max(axis=1) if both.any() else np.zeros(0)
        result[col] = {"max_abs_diff": float(diff.max()) if len(diff) else 0.0,
                       "vectors_differing": int((diff > 0).sum()), "null_mismatch": int((va != vb).sum()),
                       "vectors_compared": int(both.sum())}
        del xa, xb
    a_ids, b_ids = ta.column("annoy_id").to_numpy(), tb.column("annoy_id").to_numpy()
    result["same_annoy_ids"] = bool((a_ids == b_ids[order]).all())
    return result


# ------------------------------------------------------------------ main




def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100000)
    ap.add_argument("--churn", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--image-pool", type=int, default=1000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--text-dim", type=int, default=384)
    ap.add_argument("--image-dim", type=int, default=1280)
    ap.add_argument("--dimension", type=int, default=256)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--builtin", action="store_true",
                    help="the built-in encoders themselves (MiniLM-L6-v2, EfficientNet-Lite0 at 224 x 224; built "
                         "in the model cache beforehand: catalog-index models build) instead of the tiny ones")
    ap.add_argument("--image-version", action="store_true",
                    help="also an incremental run of B with its image_version column, in every repeat")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="start no further repeat when it would end past this many seconds from the start")
    ap.add_argument("--workdir", help="keep everything here (default: a temp dir, deleted)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", help="write the raw runs and the summary here")
    args = ap.parse_args(argv)

    work = args.workdir or tempfile.mkdtemp(prefix="bench-incremental-")
    os.makedirs(work, exist_ok=True)
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    t_all = time.perf_counter()
    result = {"machine": _measure.machine_facts(), "args": vars(args), "runs": [], "code": _measure.code_state(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat()}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=str)

    try:
        t = time.perf_counter()
        encoders = (BUILTIN if args.builtin else _measure.tiny_encoders(work, args.text_dim, args.image_dim))
        cat = make_catalogs(work, args.items, args.churn, args.image_pool, args.files, 0, args.image_version)
        result["catalogs"] = cat
        result["setup_s"] = time.perf_counter() - t
        print(f"# setup {result['setup_s']:.1f}s: {json.dumps({k: v for k, v in cat.items() if k != 'paths'})}",
              flush=True)
        save()

        root_a = os.path.join(work, "a")
        run = index_run("full-A", cat["paths"]["A"], root_a, encoders, args, logs=logs)
        run.update(kind="full", catalog="A", repeat=None)
        result["runs"].append(run)
        save()

        kept = {}
        kinds = ["inc", "full"] + (["inc-image-version"] if args.image_version else [])
        for r in range(args.repeats):
            elapsed = time.perf_counter() - t_all
            done = [x for x in result["runs"] if x["repeat"] is not None]
            per_repeat = sum(x["wall_s"] for x in done) / r if r else 0
            if r and args.budget_s and elapsed + per_repeat * 1.1 > args.budget_s:
                print(f"# stopping after {r} repeat(s): {elapsed:.0f}s spent, a repeat takes ~{per_repeat:.0f}s, "
                      f"budget {args.budget_s}s", flush=True)
                result["repeats_done"] = r
                break
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for kind in order:
                if kind.startswith("inc"):
                    out = os.path.join(work, f"{kind}-{r}")
                    shutil.rmtree(out, ignore_errors=True)
                    subprocess.run(["cp", "-a", root_a, out], check=True)
                    catalog = cat["paths"]["Bv" if kind == "inc-image-version" else "B"]
                    name = f"{'incv' if kind == 'inc-image-version' else 'inc'}-B-{r}"
                    run = index_run(name, catalog, out, encoders, args, logs=logs)
                else:
                    out = os.path.join(work, f"full-{r}")
                    shutil.rmtree(out, ignore_errors=True)
                    run = index_run(f"full-B-{r}", cat["paths"]["B"], out, encoders, args, extra=["--no-reuse"],
                                    logs=logs)
                run.update(kind=kind, catalog="Bv" if kind == "inc-image-version" else "B", repeat=r)
                result["runs"].append(run)
                save()
                if r == 0:
                    kept[kind] = run["release_dir"]
                elif not args.keep:
                    shutil.rmtree(out, ignore_errors=True)

        result.setdefault("repeats_done", args.repeats)
        finish(result, t_all)
        save()
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def finish(result, t_all=None):
    """Compares the incremental and full outputs of repeat 0 and adds the summary (medians, ratios)."""
    kept = {r["kind"]: r["release_dir"] for r in result["runs"] if r["repeat"] == 0}
    print("# comparing incremental and full outputs of repeat 0", flush=True)
    t = time.perf_counter()
    result["comparison"] = compare(kept["inc"], kept["full"])
    result["comparison_s"] = time.perf_counter() - t
    print(json.dumps({k: v for k, v in result["comparison"].items() if k != "byte_identical"}), flush=True)

    med = _measure.median
    inc = [r for r in result["runs"] if r["kind"] == "inc"]
    full = [r for r in result["runs"] if r["kind"] == "full" and r["catalog"] == "B"]
    pairs = [(i, f) for i in inc for f in full if i["repeat"] == f["repeat"]]
    result["summary"] = {
        "inc_wall_median_s": med([r["wall_s"] for r in inc]),
        "full_wall_median_s": med([r["wall_s"] for r in full]),
        "ratio_median": med([f["wall_s"] / i["wall_s"] for i, f in pairs]),
        "inc_cli_wall_median_s": med([r["cli_wall_s"] for r in inc]),
        "full_cli_wall_median_s": med([r["cli_wall_s"] for r in full]),
        "cli_ratio_median": med([f["cli_wall_s"] / i["cli_wall_s"] for i, f in pairs]),
    }
    incv = [r for r in result["runs"] if r["kind"] == "inc-image-version"]
    if incv:
        pairs_v = [(i, f) for i in incv for f in full if i["repeat"] == f["repeat"]]
        result["summary"].update({
            "incv_wall_median_s": med([r["wall_s"] for r in incv]),
            "ratio_v_median": med([f["wall_s"] / i["wall_s"] for i, f in pairs_v]),
            "cli_ratio_v_median": med([f["cli_wall_s"] / i["cli_wall_s"] for i, f in pairs_v]),
        })
    if t_all is not None:
        result["total_s"] = time.perf_counter() - t_all
    print(f"# summary {json.dumps(result['summary'])}", flush=True)
    for r in result["runs"]:
        print(f"{r['name']:>10} wall {r['wall_s']:7.1f}s  cli {r.get('cli_wall_s', float('nan')):7.1f}s  "
              f"maxrss {r['maxrss_mib']:6.0f} MiB  tree RSS {r['tree_peak_rss_mib']:6.0f} MiB  {r['counts']}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        report(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--finish":  # compare + summary again from a saved JSON
        saved = json.load(open(sys.argv[2]))
        finish(saved)
        with open(sys.argv[2], "w") as f:
            json.dump(saved, f, indent=1, default=str)
    else:
        sys.exit(main())
