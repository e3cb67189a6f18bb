"""Memory and time of a full ``catalog-index index`` run on the local runner at several catalog sizes (issue 9).

    python benchmarks/bench_memory.py [--sizes 10000 100000 1000000] [--image-pool 0] [--files 4]
        [--shards 16] [--dimension 256] [--workdir DIR] [--keep] [--json OUT] [--min-available-gib 1.5]
        [--extra FLAG ...]
    python benchmarks/bench_memory.py --report OUT.json   # summaries again from the raw runs (rewrites OUT)

For each size N (smallest first) this writes a seeded catalog of N items and runs, in a fresh child process,

    catalog-index index --catalog CAT --output OUT --text-encoder T --image-encoder I --shards 16
        --dimension 256 --runner DirectRunner

with the tiny encoders of ``embedding/tiny.py`` at their defaults (text 64-d, image 48-d, 32 x 32 input;
``--text-dim 384 --image-dim 1280`` gives them the built-in encoders' sizes),
built once per work dir. The question is how peak memory grows with the item count: issue 9 asks for at
most ~1 KB per item beyond the vectors of the shards being built at once.

Catalog (seeded, ``--files`` Parquet files): item i's attributes come from one seeded draw for the largest
size, so each catalog is a prefix of the next and they share pictures. Titles ``<colour> <kind> <size>
<code>`` where the 8-digit code is a bijection of the item's index, so every title is distinct (the
pipeline encodes each distinct text once; repeated titles would make text work and memory look smaller
than a real catalog's); a description for ~80 %; an image for ~75 % (``catalog_index.sample.
NO_IMAGE_FRACTION``).

Images: by default one small PNG/JPEG picture per item with an image (48-96 px, drawn for the item's kind
and colour by ``catalog_index.sample``'s code, ~0.35 ms and ~4 KB each: ~5 min and ~3 GB for 1M items;
pictures already in the work dir are kept). ``--image-pool K`` instead reuses K pictures across the items
(item i -> picture i mod K), which makes a large catalog quick to write. The pipeline shares no work
between items with the same image URI or bytes: every item's image is still fetched, decoded and encoded,
and every item carries its own vectors, so memory per item is the same either way (only the page cache,
which is not process memory, holds fewer picture bytes). But with a pool, K << N, the recall gate refuses
the release: the image-only queries of items sharing a picture have many exactly tied neighbours (far more
than 10), which exact search and the 16-shard Annoy merge order differently (image_only recall@10 0.22-0.36
on 2-4k items, 50 pictures). So with a pool the script passes ``--min-recall 0`` (unless ``--extra`` sets
--min-recall): the gate still reads the tables and searches its sample, but stops at the first search_k.

Measured per run (the child and its descendants):

* ``wall_s``, ``user_s``/``sys_s`` and ``maxrss_mib`` from ``os.wait4`` on the child (``ru_maxrss``: the
  largest single process, never a sum), as ``_measure.run_measured`` does;
* ``tree_peak_rss_mib``/``tree_peak_pss_mib``: the tree summed, sampled every ``--interval`` s with
  ``_measure``'s own /proc readers (a peak shorter than the interval can be missed);
* a timeline, one entry per sample: seconds from the start, tree RSS (MiB), CPU cores the tree kept busy
  since the previous sample (utime+stime of every process in the tree from /proc/<pid>/stat; a process's
  time before its first sample is not seen), the busiest threads' shares of a core
  (/proc/<pid>/task/*/stat), and the cores busy on the whole machine (/proc/stat), so that other work on a
  shared machine shows;
* the load average every sample (kept every 10 s) and before/after;
* every output line, time-stamped (TensorFlow's I0000/W0000/E0000 lines dropped), to tell the stages apart:
  ``built shard i/16`` lines and the ``progress (this worker)`` lines.

``_measure.run_measured`` itself is not used because it can neither time-stamp output lines nor sample CPU;
the variant here measures the same way (wait4 + ``_measure._tree``/``_rss_pss``) and adds both, like
bench_incremental.py's run_timed.

Shard stage: the local runner hands every shard group to one bundle, and _BuildShard builds them in a
thread pool of ``os.cpu_count()`` threads; its ``built shard i/16`` lines are logged in shard order as the
builds are collected. ``shard_stage`` reports the mean cores busy (tree, machine, and the busiest two
threads) between the first and the last ``built shard`` line; that window misses the first shard's build
(it starts before the first line), so the stage's true start lies up to one shard build earlier.

Peak tree RSS by stage (``stage_peak_rss_mib``, from the timeline): start-up and validation (to the
``indexing ...`` line); the Beam pipeline (read, images, texts, join, fuse, staging, shard builds: to the
last ``built shard`` line); the query encoder export and parity; the recall gate and publication.

Growth: between consecutive sizes, (tree peak RSS difference) / (items added), in KiB per item, next to the
issue's bound: 1 KiB + the vectors of the shards being built at once (threads / shards of each item's
fused, text and image float32 vectors). Whole-run growth only between runs that finished; per-stage growth
also for a run that failed after its shards were built, for the stages it completed.

A guard stops a run (and says so) when the machine's MemAvailable falls under ``--min-available-gib``.
"""

import argparse
import datetime
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
TF_NOISE = re.compile(r"^[IEW]0000 ")
TICKS = os.sysconf("SC_CLK_TCK")
CODE_MULT, CODE_ADD, CODE_MOD = 48271, 1234567, 10 ** 8  # i -> (i * 48271 + 1234567) mod 1e8: a bijection


# ------------------------------------------------------------------ catalog and encoders


class Items:
    """The attributes of items 0 .. max_n - 1 (seeded); a catalog of n items is the first n of them, so the
    smaller catalogs are prefixes of the larger ones and share their pictures."""

    def __init__(self, max_n, seed):
        import numpy as np

        from catalog_index import sample

        assert max_n <= CODE_MOD
        rng = np.random.default_rng(seed)
        self.kinds, self.colours = list(sample.KINDS), list(sample.COLOURS)
        self.size_words = [sample.KINDS[k][2] for k in self.kinds]
        self.kind_i = rng.integers(len(self.kinds), size=max_n)
        self.colour_i = rng.integers(len(self.colours), size=max_n)
        self.size_i = rng.integers(0, np.array([len(w) for w in self.size_words])[self.kind_i])
        self.has_desc = rng.random(max_n) >= 0.2
        self.adj_i = rng.integers(len(sample.ADJECTIVES), size=max_n)
        self.brand_i = rng.integers(len(sample.BRANDS), size=max_n)
        self.has_image = rng.random(max_n) >= sample.NO_IMAGE_FRACTION
        self.codes = (np.arange(max_n, dtype=np.int64) * CODE_MULT + CODE_ADD) % CODE_MOD
        self.seed = seed


def make_pictures(work, items, n, pool):
    """The image URI of each of the first n items (None: no image). pool 0: one picture per item with an
    image, drawn for its kind and colour (as catalog_index.sample does); pool K: K pictures, item i gets
    picture i mod K. Existing files are kept (the smaller catalogs' pictures are the larger ones')."""
    import numpy as np

    from catalog_index import sample

    img_dir = os.path.join(work, "images")
    os.makedirs(img_dir, exist_ok=True)
    t0 = time.perf_counter()
    made = 0

    def picture(k, kind_i, colour_i):
        nonlocal made
        path = os.path.join(img_dir, f"pic-{k:07d}" + (".png" if k % 2 else ".jpg"))
        if not os.path.exists(path):
            rng = np.random.default_rng([items.seed, k])
            size = sample.IMAGE_SIZES[int(rng.integers(len(sample.IMAGE_SIZES)))]
            img = sample._draw_product(rng, items.kinds[kind_i], items.colours[colour_i], size)
            tmp = path + ".tmp"
            img.save(tmp, format="PNG" if k % 2 else "JPEG", **({} if k % 2 else {"quality": 90}))
            os.replace(tmp, path)
            made += 1
        return os.path.abspath(path)

    if pool:
        pics = [picture(k, k % len(items.kinds), k % len(items.colours)) for k in range(pool)]
        uris = [pics[i % pool] if items.has_image[i] else None for i in range(n)]
    else:
        uris = [picture(i, items.kind_i[i], items.colour_i[i]) if items.has_image[i] else None for i in range(n)]
    return uris, {"pictures_made": made, "picture_seconds": round(time.perf_counter() - t0, 1)}


def make_catalog(work, items, n, n_files, pool):
    """Writes work/catalog-N/part-*.parquet (the first n items); returns facts about it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from catalog_index import sample

    t0 = time.perf_counter()
    uris, pic_facts = make_pictures(work, items, n, pool)
    ids, titles, descs = [], [], []
    for i in range(n):
        kind, colour = items.kinds[items.kind_i[i]], items.colours[items.colour_i[i]]
        ids.append(f"item-{i:07d}")
        titles.append(f"{colour} {kind} {items.size_words[items.kind_i[i]][items.size_i[i]]} {items.codes[i]:08d}")
        descs.append(f"{sample.ADJECTIVES[items.adj_i[i]].capitalize()} {colour} {kind} by "
                     f"{sample.BRANDS[items.brand_i[i]]}." if items.has_desc[i] else None)
    assert len(set(titles)) == n, "titles must be distinct"
    d = os.path.join(work, f"catalog-{n}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    bounds = np.linspace(0, n, n_files + 1).astype(int)
    for f in range(n_files):
        a, b = bounds[f], bounds[f + 1]
        pq.write_table(pa.table({
            "item_id": pa.array(ids[a:b], pa.string()), "title": pa.array(titles[a:b], pa.string()),
            "description": pa.array(descs[a:b], pa.string()), "image_uri": pa.array(uris[a:b], pa.string()),
        }), os.path.join(d, f"part-{f:05d}.parquet"))
    with_image = sum(u is not None for u in uris)
    return {"glob": os.path.join(d, "part-*.parquet"), "dir": d, "items": n, "with_image": with_image,
            "distinct_image_uris": len(set(u for u in uris if u is not None)),
            "with_description": int(items.has_desc[:n].sum()), "distinct_titles": n, "files": n_files,
            "image_pool": pool, **pic_facts, "seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------ measuring one run






def _mem_available_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    return None


def _ticks(stat_path):
    """utime + stime (clock ticks) from a /proc/.../stat file, or None when it is gone."""
    try:
        with open(stat_path) as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rfind(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5), counted from 3


def _machine_busy_ticks():
    with open("/proc/stat") as f:
        cpu = f.readline().split()[1:]
    vals = [int(x) for x in cpu]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already in user
    return total - idle


def run_timed(cmd, log_path, interval=0.5, min_available_gib=1.5):
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_measure.child_env(), cwd=ROOT)
    peaks = {"rss": 0, "pss": 0}
    stop = threading.Event()
    lines, timeline, loads = [], [], []
    guard = {"killed": None, "min_available_gib": None}

    def sample():
        last_proc, last_thread = {}, {}
        last_machine, last_t = _machine_busy_ticks(), time.perf_counter()
        cpu_total = 0.0
        next_load = 0.0
        while not stop.is_set():
            stop.wait(interval)
            now = time.perf_counter()
            dt = now - last_t
            rss = pss = 0
            proc_ticks, thread_ticks = {}, {}
            for p in _measure._tree(proc.pid):
                r, s = _measure._rss_pss(p)
                rss += r
                pss += s
                t = _ticks(f"/proc/{p}/stat")
                if t is not None:
                    proc_ticks[p] = t
                try:
                    tids = os.listdir(f"/proc/{p}/task")
                except OSError:
                    tids = ()
                for tid in tids:
                    t = _ticks(f"/proc/{p}/task/{tid}/stat")
                    if t is not None:
                        thread_ticks[(p, tid)] = t
            machine = _machine_busy_ticks()
            busy = sum(t - last_proc[p] for p, t in proc_ticks.items() if p in last_proc) / TICKS
            threads = sorted(((t - last_thread[k]) / TICKS / dt for k, t in thread_ticks.items() if k in last_thread),
                             reverse=True)[:4]
            cpu_total += busy
            peaks["rss"], peaks["pss"] = max(peaks["rss"], rss), max(peaks["pss"], pss)
            avail = _mem_available_gib()
            guard["min_available_gib"] = avail if guard["min_available_gib"] is None else min(
                guard["min_available_gib"], avail)
            t_rel = now - start
            timeline.append([round(t_rel, 2), round(rss / 2 ** 20, 1), round(busy / dt, 3),
                             [round(x, 3) for x in threads], round((machine - last_machine) / TICKS / dt, 3),
                             round(cpu_total, 2), round(avail, 2)])
            if t_rel >= next_load:
                loads.append([round(t_rel, 1), _measure.loadavg()])
                next_load = t_rel + 10
            if avail is not None and avail < min_available_gib and guard["killed"] is None:
                guard["killed"] = f"MemAvailable {avail:.2f} GiB < {min_available_gib} GiB at {t_rel:.0f}s"
                print(f"    !! {guard['killed']}: killing the run", flush=True)
                proc.kill()
            last_proc, last_thread, last_machine, last_t = proc_ticks, thread_ticks, machine, now

    def read():
        with open(log_path, "w") as log:
            for raw in proc.stdout:
                t = time.perf_counter() - start
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if TF_NOISE.match(line):
                    continue
                lines.append((round(t, 2), line))
                log.write(f"{t:8.2f} {line}\n")
                log.flush()
                if re.search(r"built shard|memory estimate|indexing \d+ catalog|published |Error|error:", line):
                    print(f"    {t:8.1f}s {line[:200]}", flush=True)

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read, daemon=True)]
    load_before = _measure.loadavg()
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stop.set()
    for t in threads:
        t.join()
    return {
        "wall_s": wall, "rc": os.waitstatus_to_exitcode(status), "maxrss_mib": usage.ru_maxrss / 1024.0,
        "tree_peak_rss_mib": peaks["rss"] / 2 ** 20, "tree_peak_pss_mib": peaks["pss"] / 2 ** 20,
        "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "loadavg_before": load_before,
        "loadavg_after": _measure.loadavg(), "loadavg_samples": loads, "killed": guard["killed"],
        "min_mem_available_gib": guard["min_available_gib"], "lines": lines,
        "timeline_fields": ["t_s", "tree_rss_mib", "tree_cores_busy", "top_threads_core_share",
                            "machine_cores_busy", "tree_cpu_s_cumulative", "mem_available_gib"],
        "timeline": timeline,
    }


# ------------------------------------------------------------------ reading a run


def parse(lines):
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
    m = re.search(r"memory estimate for the local runner: ([\d.]+) GiB of (\S+)", text)
    if m:
        out["memory_estimate_gib"] = float(m.group(1))
        out["memory_available_at_start_gib"] = None if m.group(2) == "?" else float(m.group(2))
    shards = []
    for t, line in lines:
        m = re.search(r"built shard (\d+)/(\d+): (\d+) items, (\d+) bytes", line)
        if m:
            shards.append({"t_s": t, "shard": int(m.group(1)), "items": int(m.group(3)), "bytes": int(m.group(4))})
    out["shard_lines"] = shards

    def first(pattern):
        return next((t for t, line in lines if re.search(pattern, line)), None)

    def last(pattern):
        found = None
        for t, line in lines:
            if re.search(pattern, line):
                found = t
        return found

    out["marks"] = {
        "pipeline_start": first(r"indexing \d+ catalog file"),
        "first_progress": first(r"progress \(this worker\)"),
        "first_fused": first(r"progress \(this worker\).*items_fused="),
        "last_progress_before_shards": max((t for t, line in lines if "progress (this worker)" in line
                                            and (not shards or t < shards[0]["t_s"])), default=None),
        "first_shard_built": shards[0]["t_s"] if shards else None,
        "last_shard_built": shards[-1]["t_s"] if shards else None,
        "query_encoder": first(r"query encoder:"),
        "recall_gate_first": first(r"recall gate:"),
        "recall_gate_last": last(r"recall gate:"),
        "published": first(r"^published "),
    }
    return out


def window(timeline, t0, t1):
    """Means over the samples in [t0, t1]: tree cores busy (from cumulative CPU), machine cores busy, the
    busiest and second-busiest thread's share of a core, peak tree RSS."""
    if t0 is None or t1 is None or t1 <= t0:
        return None
    inside = [s for s in timeline if t0 <= s[0] <= t1]
    if len(inside) < 2:
        return None
    span = inside[-1][0] - inside[0][0]
    tree_cores = (inside[-1][5] - inside[0][5]) / span if span > 0 else None
    body = inside[1:]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else None

    return {
        "from_s": t0, "to_s": t1, "seconds": round(t1 - t0, 1), "samples": len(inside),
        "tree_cores_busy_mean": tree_cores and round(tree_cores, 2),
        "machine_cores_busy_mean": round(mean(s[4] for s in body), 2),
        "others_cores_busy_mean": round(mean(s[4] for s in body) - (tree_cores or 0), 2),
        "busiest_thread_mean": round(mean(s[3][0] if s[3] else 0 for s in body), 2),
        "second_thread_mean": round(mean(s[3][1] if len(s[3]) > 1 else 0 for s in body), 2),
        "share_of_samples_tree_over_1_5_cores": round(mean(1.0 if s[2] > 1.5 else 0.0 for s in body), 2),
        "tree_rss_peak_mib": max(s[1] for s in inside),
    }


def summarise(run):
    tl, m = run["timeline"], run["marks"]
    run["shard_stage"] = window(tl, m["first_shard_built"], m["last_shard_built"])
    run["before_shards"] = window(tl, m["pipeline_start"], m["first_shard_built"])
    peak_t = max(tl, key=lambda s: s[1])[0] if tl else None
    # Peak tree RSS per stage: start-up and validation; the Beam pipeline (read, images, texts, join, fuse,
    # staging, shard builds); query encoder export and parity; recall gate and publication.
    edges = [("startup", 0.0, m["pipeline_start"]), ("pipeline", m["pipeline_start"], m["last_shard_built"]),
             ("query_encoder", m["last_shard_built"], m["query_encoder"] or m["recall_gate_first"]),
             ("recall_gate_and_publication", m["query_encoder"] or m["last_shard_built"], run["wall_s"])]
    run["stage_peak_rss_mib"] = {
        name: max((s[1] for s in tl if a is not None and b is not None and a <= s[0] <= b), default=None)
        for name, a, b in edges}
    run["tree_rss_peak_at_s"] = peak_t
    if m.get("last_shard_built"):
        run["items_per_s_to_last_shard"] = run["items"] / m["last_shard_built"]
    if run.get("indexed"):
        run["items_per_s"] = run["indexed"] / run["wall_s"]
        if run.get("cli_wall_s"):
            run["items_per_s_cli"] = run["indexed"] / run["cli_wall_s"]
    loads = [l for _, l in run["loadavg_samples"] if l]
    if loads:
        run["loadavg1_mean"] = round(sum(l[0] for l in loads) / len(loads), 2)
        run["loadavg1_max"] = max(l[0] for l in loads)


def growth(runs, shards, threads, dims):
    """KiB per added item between consecutive sizes, next to the issue's bound. Whole-run figures only
    between runs that finished (rc 0); per-stage figures also for a run that failed later (e.g. in the
    recall gate), for the stages it completed (the pipeline stage: up to its last ``built shard`` line)."""
    vec_bytes = 4 * sum(dims)
    at_once = min(threads, shards)
    bound_bytes = 1024 + at_once / shards * vec_bytes
    usable = sorted((r for r in runs if not r.get("killed") and r.get("marks", {}).get("last_shard_built")),
                    key=lambda r: r["items"])
    rows = []
    for a, b in zip(usable, usable[1:]):
        added = b["items"] - a["items"]
        row = {"from_items": a["items"], "to_items": b["items"], "bound_kib_per_item": bound_bytes / 1024}
        if a["rc"] == 0 and b["rc"] == 0:
            row.update({
                "tree_rss_kib_per_item": (b["tree_peak_rss_mib"] - a["tree_peak_rss_mib"]) * 1024 / added,
                "tree_pss_kib_per_item": (b["tree_peak_pss_mib"] - a["tree_peak_pss_mib"]) * 1024 / added,
                "maxrss_kib_per_item": (b["maxrss_mib"] - a["maxrss_mib"]) * 1024 / added,
            })
            row["within_bound"] = row["tree_rss_kib_per_item"] <= row["bound_kib_per_item"]
        pa_, pb = a.get("stage_peak_rss_mib") or {}, b.get("stage_peak_rss_mib") or {}
        row["stage_peak_kib_per_item"] = {
            name: (pb[name] - pa_[name]) * 1024 / added for name in pb
            if pb[name] is not None and pa_.get(name) is not None
            and (name in ("startup", "pipeline") or (a["rc"] == 0 and b["rc"] == 0))}
        rows.append(row)
    return {"vector_bytes_per_item": vec_bytes, "shards_built_at_once": at_once,
            "bound_bytes_per_item": bound_bytes, "steps": rows}


# ------------------------------------------------------------------ main




def table(result):
    g = {(s["to_items"]): s for s in (result.get("growth") or {}).get("steps", [])}
    print(f"{'items':>9} {'wall s':>8} {'items/s':>8} {'maxrss':>8} {'tree RSS':>9} {'KiB/item':>9} "
          f"{'shard cores':>11} {'others':>7} {'load1':>6}")
    for r in result["runs"]:
        st = r.get("shard_stage") or {}
        step = g.get(r["items"])
        print(f"{r['items']:>9} {r['wall_s']:>8.1f} {r.get('items_per_s', float('nan')):>8.0f} "
              f"{r['maxrss_mib']:>8.0f} {r['tree_peak_rss_mib']:>9.0f} "
              f"{(step.get('tree_rss_kib_per_item', float('nan')) if step else float('nan')):>9.2f} "
              f"{st.get('tree_cores_busy_mean') or float('nan'):>11.2f} "
              f"{st.get('others_cores_busy_mean') if st.get('others_cores_busy_mean') is not None else float('nan'):>7.2f} "
              f"{r.get('loadavg1_mean', float('nan')):>6.2f}"
              + (f"  rc {r['rc']} {r.get('killed') or ''}" if r["rc"] else ""))
    print("peak tree RSS (MiB) by stage:")
    for r in result["runs"]:
        print(f"{r['items']:>9} " + "  ".join(f"{k} {v}" for k, v in (r.get("stage_peak_rss_mib") or {}).items())
              + f"  (overall peak at {r.get('tree_rss_peak_at_s')}s)")
    for step in g.values():
        print(f"growth {step['from_items']} -> {step['to_items']}: tree RSS {step.get('tree_rss_kib_per_item')}, "
              f"maxrss {step.get('maxrss_kib_per_item')} KiB/item; by stage "
              + ", ".join(f"{k} {v:.2f}" for k, v in (step.get("stage_peak_kib_per_item") or {}).items()))
    if result.get("growth"):
        print(f"bound: {result['growth']['bound_bytes_per_item'] / 1024:.2f} KiB/item "
              f"(1 KiB + {result['growth']['shards_built_at_once']}/{result['args']['shards']} of "
              f"{result['growth']['vector_bytes_per_item']} B of vectors)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000, 1000000])
    ap.add_argument("--image-pool", type=int, default=0,
                    help="0 (default): one picture per item with an image; K: K pictures reused across items "
                         "(then --min-recall 0 is passed unless --extra has --min-recall; see above)")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--dimension", type=int, default=256)
    ap.add_argument("--text-dim", type=int, default=64,
                    help="the tiny text encoder's size (384: the built-in MiniLM's)")
    ap.add_argument("--image-dim", type=int, default=48,
                    help="the tiny image encoder's size (1280: the built-in EfficientNet-Lite0's)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between memory/CPU samples")
    ap.add_argument("--min-available-gib", type=float, default=1.5,
                    help="kill a run when the machine's MemAvailable falls below this")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="further flags for catalog-index index (e.g. --no-memory-check); must come last")
    ap.add_argument("--workdir", help="work here (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep catalogs and outputs (default: deleted)")
    ap.add_argument("--json", help="write the raw runs and the summary here")
    args = ap.parse_args(argv)

    work = args.workdir or tempfile.mkdtemp(prefix="bench-memory-")
    os.makedirs(work, exist_ok=True)
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    threads = os.cpu_count() or 1
    result = {"machine": _measure.machine_facts(), "args": vars(args), "code": _measure.code_state(), "runs": [],
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "encoders": {"text_dim": args.text_dim, "image_dim": args.image_dim, "image_size": 32}, "shard_threads": threads}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=None, separators=(",", ":"), default=str)

    try:
        text, image = _measure.tiny_encoders(work, args.text_dim, args.image_dim)
        items = Items(max(args.sizes), 0)
        extra = list(args.extra)
        if args.image_pool and not any(x.startswith(("--min-recall", "--min_recall")) for x in extra):
            extra += ["--min-recall", "0"]
        for n in sorted(args.sizes):
            cat = make_catalog(work, items, n, args.files, args.image_pool)
            print(f"[{datetime.datetime.now():%H:%M:%S}] catalog {n}: {json.dumps({k: v for k, v in cat.items() if k not in ('glob', 'dir')})}",
                  flush=True)
            out = os.path.join(work, f"out-{n}")
            shutil.rmtree(out, ignore_errors=True)
            cmd = [CLI, "index", "--catalog", cat["glob"], "--output", out, "--text-encoder", text,
                   "--image-encoder", image, "--shards", str(args.shards), "--dimension", str(args.dimension),
                   "--runner", "DirectRunner", *extra]
            print(f"[{datetime.datetime.now():%H:%M:%S}] run {n}: {' '.join(cmd)}", flush=True)
            run = run_timed(cmd, os.path.join(logs, f"index-{n}.log"), args.interval, args.min_available_gib)
            run.update(parse(run["lines"]))
            run.update(items=n, catalog={k: v for k, v in cat.items() if k not in ("glob", "dir")}, cmd=cmd)
            if run.get("release_dir") and os.path.exists(os.path.join(run["release_dir"], "manifest.json")):
                manifest = json.load(open(os.path.join(run["release_dir"], "manifest.json")))
                run["counts"] = manifest.get("counts")
            try:
                run["output_bytes"] = int(subprocess.run(["du", "-sb", out], capture_output=True, text=True)
                                          .stdout.split()[0])
            except (IndexError, ValueError):
                run["output_bytes"] = None
            summarise(run)
            result["runs"].append(run)
            result["growth"] = growth(result["runs"], args.shards, threads, (args.dimension, args.text_dim, args.image_dim))
            save()
            st = run.get("shard_stage") or {}
            print(f"    rc {run['rc']}  wall {run['wall_s']:.1f}s  indexed {run.get('indexed')}  "
                  f"items/s {run.get('items_per_s', 0):.0f}  maxrss {run['maxrss_mib']:.0f} MiB  "
                  f"tree RSS {run['tree_peak_rss_mib']:.0f} MiB (at {run['tree_rss_peak_at_s']}s)  "
                  f"shard stage {st.get('seconds')}s, {st.get('tree_cores_busy_mean')} cores (others "
                  f"{st.get('others_cores_busy_mean')})  load {run['loadavg_before']} -> {run['loadavg_after']}",
                  flush=True)
            if run["rc"] != 0:
                print("\n".join(line for _, line in run["lines"][-30:]), flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(cat["dir"], ignore_errors=True)
        result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
        save()
        table(result)
    finally:
        if not args.keep:
            for name in ["images"] + [n for n in os.listdir(work) if n.startswith("encoders")]:
                shutil.rmtree(os.path.join(work, name), ignore_errors=True)
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--report":  # summaries again from the raw runs; rewrites the file
        saved = json.load(open(sys.argv[2]))
        for r in saved["runs"]:
            summarise(r)
        a = saved["args"]
        saved["growth"] = growth(saved["runs"], a["shards"], saved["shard_threads"],
                                 (a["dimension"], a.get("text_dim", 64), a.get("image_dim", 48)))
        with open(sys.argv[2], "w") as f:
            json.dump(saved, f, indent=None, separators=(",", ":"), default=str)
        table(saved)
    else:
        sys.exit(main())
