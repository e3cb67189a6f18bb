"""Training on clicks (issue 8) on real data: derived Grocery click logs -> `catalog-index train` -> index -> query.

1. The index: the 2,640 Grocery train photos as a catalog (title = product
   name, description, image), built with the defaults exactly as
   bench_query_quality.py does; its cached index (results/cache/query-quality/)
   is reused when present.
2. A derived click log (seeded; Parquet with schemas/clicks.CLICKS_SCHEMA) over
   --days UTC days with a Zipf popularity skew over the 81 products. Text
   searches a shopper would type (the product name, the coarse class name,
   descriptive phrases cut from the product description that do not repeat the
   name, typos of the name, other word orders), each clicking a train photo of
   that product; photo searches (a train photo as query_image_uri, a click on
   ANOTHER train photo of the same product). Held-out phrasings: part of the
   descriptive phrases, typos and word orders occur only on the last day (the
   day `catalog-index train` holds out by default), so the text figures below
   measure generalisation, not memorisation.
3. `catalog-index train --clicks LOG --index IDX --output MODELS` (the CLI, its
   defaults), with and without --no-logq; every output line is time-stamped by
   this script to split the wall time into preprocessing (Beam), training
   (the per-epoch lines) and evaluation + export.
4. `catalog-index index ... --fusion-model MODELS` on the same catalog, then
   `catalog-index query --queries FILE --k 10` on the default fusion index, the
   logQ one and the no-logQ one: the 296 val photos (image only: P@1 fine and
   coarse, P@10 fine) and text queries (P@10, recall@10 and hit@10 with
   relevant = the train items of the query's product): the 81 product names,
   the held-out descriptive phrases, typos and word orders (only on the last
   day of the log), the trained phrasings (memorisation, for reference) and the
   43 coarse names (relevant = the coarse class's items). Besides, the image
   vectors alone: exact cosine between the val photos' image vectors (the
   index's image encoder, in this process) and the index's
   embeddings.image_embedding.

    .venv/bin/python benchmarks/bench_training.py [--clicks 100000] [--days 7] [--seed 0]
        [--workdir DIR] [--json OUT] [--fresh]

--workdir (default benchmarks/results/cache/training, git-ignored) keeps the
click log, the models directories, the fusion indexes, the query outputs and
one record per finished stage: a rerun reuses every finished stage (--fresh
redoes them). Skips with a message when the Grocery Store data is absent.
"""

import argparse
import csv
import datetime
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import _grocery  # noqa: E402
import _measure  # noqa: E402
import bench_query_quality as bqq  # noqa: E402

CLI = os.path.join(ROOT, ".venv", "bin", "catalog-index")
DEFAULT_WORKDIR = os.path.join(HERE, "results", "cache", "training")
START_DAY = datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc)

STOPWORDS = set("""a an the and or but of in on at to for from with without by as is are was were be been it its
this that these those there their than then also can may very much more most less so such which who when while
has have had not no only even both all any some other others into out over under up down about after before
you your we our they them he she his her own same per one two""".split())

# Share of each search kind among the clicks (text kinds sum with photo to 1).
MIX = {"photo": 0.40, "name": 0.18, "coarse": 0.06, "desc": 0.20, "typo": 0.09, "order": 0.07}
HELD_OUT_SHARE = 0.5  # on the last day, the share of desc/typo/order searches that use a held-out phrasing
KEYBOARD = {c: n for c, n in zip("qwertyuiopasdfghjklzxcvbnm",
                                 ["wa", "qes", "wrd", "etf", "ryg", "tuh", "yij", "uok", "ipl", "ol", "qsz", "awdx",
                                  "serc", "drft", "ftgv", "gyhb", "hujn", "jikm", "kol", "asx", "zsdc", "xdfv", "cfgb",
                                  "vghn", "bhjm", "njk"])}


# ----------------------------------------------------------------------------- the derived click log


def coarse_names():
    out = {}
    with open(os.path.join(_grocery.DATASET, "classes.csv"), newline="") as f:
        for row in csv.DictReader(f):
            out[int(row["Coarse Class ID (int)"])] = row["Coarse Class Name (str)"].replace("-", " ")
    return out


def words(text):
    return re.findall(r"[a-z0-9åäöé]+(?:'[a-z]+)?", text.lower())


def clauses(text):
    return [words(c) for c in re.split(r"[.,;:!?()/\-]+", text) if c.strip()]


def is_name_word(w, name_words):
    return any(w == n or (len(n) >= 4 and (w.startswith(n) or n.startswith(w) and len(w) >= 4)) for n in name_words)


def descriptive_phrases(classes):
    """{fine: [(clause, start, end, phrase), ...]}: 2-5 word windows of the description, starting and ending on a
    content word, with >= 2 content words, no word of the product's own name, found in no other product's
    description."""
    norm = {fine: " " + " ".join(words(desc)) + " " for fine, (_, desc, _) in classes.items()}
    out = {}
    for fine, (name, desc, _) in classes.items():
        name_words = set(words(name))
        found = []
        for c, clause in enumerate(clauses(desc)):
            for n in (2, 3, 4, 5):
                for s in range(0, len(clause) - n + 1):
                    win = clause[s:s + n]
                    if win[0] in STOPWORDS or win[-1] in STOPWORDS or len(win[-1]) < 3:
                        continue
                    content = sum(w not in STOPWORDS for w in win)
                    if content < 2 or content < n - content or any(is_name_word(w, name_words) for w in win):
                        continue
                    phrase = " ".join(win)
                    if any(f" {phrase} " in other for g, other in norm.items() if g != fine):
                        continue
                    if phrase not in [f[3] for f in found]:
                        found.append((c, s, s + n, phrase))
        out[fine] = found
    return out


def typo(text, rng):
    """One keyboard-style edit inside a word of >= 4 letters: drop, swap, neighbour key, or doubled letter."""
    ws = text.split(" ")
    cands = [i for i, w in enumerate(ws) if len(w) >= 4 and w.isalpha()]
    if not cands:
        return None
    i = cands[rng.integers(len(cands))]
    w = ws[i]
    p = int(rng.integers(1, len(w) - 1))  # keep the first letter, as people mostly do
    op = rng.integers(4)
    if op == 0:
        w = w[:p] + w[p + 1:]
    elif op == 1:
        w = w[:p] + w[p + 1] + w[p] + w[p + 2:]
    elif op == 2:
        near = KEYBOARD.get(w[p], "")
        if not near:
            return None
        w = w[:p] + near[rng.integers(len(near))] + w[p + 1:]
    else:
        w = w[:p] + w[p] + w[p:]
    ws[i] = w
    out = " ".join(ws)
    return out if out != text else None


def word_orders(name, coarse):
    """Other orders of the name's words, and the name with its coarse class before or after."""
    ws = name.lower().split()
    out = []
    if len(ws) >= 2:
        out.append(" ".join(ws[1:] + ws[:1]))
        out.append(" ".join(reversed(ws)))
    c = coarse.lower()
    if c not in ws and c != name.lower():
        out.append(f"{c} {name.lower()}")
        out.append(f"{name.lower()} {c}")
    seen, res = {name.lower()}, []
    for o in out:
        if o not in seen:
            seen.add(o)
            res.append(o)
    return res


def phrasings(classes, coarse, rng, max_desc=9):
    """{fine: {"desc"|"typo"|"order": {"train": [...], "held_out": [...]}}} plus the name and coarse texts."""
    desc = descriptive_phrases(classes)
    plan = {}
    for fine in sorted(classes):
        name, _, cid = classes[fine]
        entry = {"name": name.lower(), "coarse": coarse[cid].lower()}
        # Non-overlapping spans of the description, so a held-out phrase is never a sub- or super-string of a
        # trained one (they may still share single words elsewhere in the description).
        windows = list(desc[fine])
        # Shorter windows first (shoppers type 2-4 words), randomly within about a word of length.
        order = np.argsort([(e - s) + rng.uniform(0, 1.5) for _, s, e, _ in windows], kind="stable")
        taken, phrases = set(), []
        for w in order:
            c, s, e, phrase = windows[w]
            span = {(c, x) for x in range(s, e)}
            if span & taken:
                continue
            taken |= span
            phrases.append(phrase)
            if len(phrases) == max_desc:
                break
        typos = []
        for _ in range(200):
            t = typo(name.lower(), rng)
            if t and t not in typos:
                typos.append(t)
            if len(typos) == 9:
                break
        orders = word_orders(name, coarse[cid])
        rng.shuffle(orders)
        for kind, pool in (("desc", phrases), ("typo", typos), ("order", orders)):
            held = len(pool) // 3 if len(pool) >= 3 else (1 if len(pool) == 2 else 0)
            entry[kind] = {"held_out": pool[:held], "train": pool[held:]}
        plan[fine] = entry
    # A held-out phrasing must never occur among any product's trained texts.
    trained = set()
    for e in plan.values():
        trained.update([e["name"], e["coarse"]])
        for kind in ("desc", "typo", "order"):
            trained.update(e[kind]["train"])
    for e in plan.values():
        for kind in ("desc", "typo", "order"):
            e[kind]["held_out"] = [t for t in e[kind]["held_out"] if t not in trained]
    return plan


def zipf_weights(n, s, rng):
    w = 1.0 / np.arange(1, n + 1) ** s
    w = w[rng.permutation(n)]
    return w / w.sum()


def generate_clicks(n_clicks, days, seed, zipf_s=1.0):
    """(rows as column lists, metadata): the derived click log; see the module docstring."""
    rng = np.random.default_rng(seed)
    classes = _grocery.classes()
    coarse = coarse_names()
    train = _grocery.split("train")
    by_fine = {}
    for r in train:
        by_fine.setdefault(r["fine"], []).append(r)
    fines = sorted(by_fine)
    pop = zipf_weights(len(fines), zipf_s, rng)
    plan = phrasings(classes, coarse, rng)
    kinds = list(MIX)
    kind_p = np.array([MIX[k] for k in kinds])
    cols = {k: [] for k in ("event_time", "query", "query_image_uri", "item_id", "event", "session_id", "position")}
    kinds_out, held_out_used, trained_used = [], {}, {}
    per_day = np.full(days, n_clicks // days)
    per_day[: n_clicks - per_day.sum()] += 1
    for day in range(days):
        last = day == days - 1
        day_start = START_DAY + datetime.timedelta(days=day)
        products = rng.choice(len(fines), size=per_day[day], p=pop)
        ks = rng.choice(len(kinds), size=per_day[day], p=kind_p)
        for j, (pi, ki) in enumerate(zip(products, ks)):
            fine, kind = fines[pi], kinds[ki]
            items = by_fine[fine]
            e = plan[fine]
            text = image = None
            held = False
            if kind == "photo":
                a, b = rng.choice(len(items), size=2, replace=False)
                image, item = items[a]["image_uri"], items[b]["item_id"]
            else:
                item = items[rng.integers(len(items))]["item_id"]
                if kind == "name":
                    text = e["name"]
                elif kind == "coarse":
                    text = e["coarse"]
                else:
                    pool = e[kind]
                    use_held = last and pool["held_out"] and (rng.random() < HELD_OUT_SHARE or not pool["train"])
                    if not use_held and not pool["train"]:
                        text = e["name"]  # nothing of that kind for this product: the shopper types the name
                        kind = "name"
                    else:
                        source = pool["held_out"] if use_held else pool["train"]
                        text = source[rng.integers(len(source))]
                        held = bool(use_held)
            seconds = float(rng.uniform(0, 86400 - 1e-3))
            cols["event_time"].append(day_start + datetime.timedelta(seconds=seconds))
            cols["query"].append(text)
            cols["query_image_uri"].append(image)
            cols["item_id"].append(item)
            r = rng.random()
            cols["event"].append("purchase" if r < 0.04 else "add_to_cart" if r < 0.14 else "click")
            cols["session_id"].append(f"s{day}-{j // 4}")
            cols["position"].append(int(min(rng.geometric(0.3), 50)))
            kinds_out.append(kind + (":held_out" if held else ""))
            if text is not None and kind in ("desc", "typo", "order"):
                (held_out_used if held else trained_used).setdefault((kind, text, fine), 0)
                (held_out_used if held else trained_used)[(kind, text, fine)] += 1
    meta = {
        "clicks": n_clicks, "days": days, "seed": seed, "zipf_s": zipf_s, "mix": MIX,
        "held_out_share_last_day": HELD_OUT_SHARE,
        "first_day": START_DAY.date().isoformat(),
        "popularity": {str(f): float(p) for f, p in zip(fines, pop)},
        "kinds": {k: kinds_out.count(k) for k in sorted(set(kinds_out))},
        "distinct_texts": len(set(t for t in cols["query"] if t is not None)),
        "distinct_query_photos": len(set(u for u in cols["query_image_uri"] if u is not None)),
        "plan": {str(f): e for f, e in plan.items()},
        "held_out_used": [[k, t, f, n] for (k, t, f), n in sorted(held_out_used.items())],
        "trained_used": [[k, t, f, n] for (k, t, f), n in sorted(trained_used.items())],
    }
    return cols, meta


def write_clicks(cols, path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from schemas import clicks

    table = pa.table({name: pa.array(cols[name], type=clicks.CLICKS_SCHEMA.field(name).type)
                      for name in clicks.CLICKS_SCHEMA.names}, schema=clicks.CLICKS_SCHEMA)
    pq.write_table(table, path)


# ----------------------------------------------------------------------------- running the CLI


class LoadSampler:
    """1-minute load average every 5 s while a stage runs (the machine is shared)."""

    def __init__(self):
        self.samples, self._stop = [], threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(5)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def summary(self):
        s = self.samples or [os.getloadavg()[0]]
        return {"min": round(min(s), 2), "median": round(_measure.median(s), 2), "max": round(max(s), 2)}


def run_timed(cmd, log_path):
    """Runs cmd, time-stamping each output line (stdout + stderr); returns a record with wall, rc, maxrss, lines."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    lines = []
    with LoadSampler() as load, open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            t = time.perf_counter() - start
            lines.append((round(t, 2), line.rstrip("\n")))
            log.write(f"[{t:8.2f}] {line}")
            if re.search(r"epoch \d+/|wall time|trained |preprocess|published|error", line):
                print(f"  [{t:7.1f}s] {line.rstrip()[:200]}", flush=True)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status)
    return {"cmd": cmd, "rc": rc, "wall_s": round(wall, 1), "maxrss_mib": round(usage.ru_maxrss / 1024),
            "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1), "load_1min": load.summary(),
            "lines": lines}


def stage(workdir, name, fresh, fn):
    """Runs fn() once and keeps its record as workdir/stage-NAME.json; a later run reuses it (unless fresh)."""
    path = os.path.join(workdir, f"stage-{name}.json")
    if os.path.exists(path) and not fresh:
        print(f"reusing stage {name} ({path})", flush=True)
        with open(path) as f:
            return json.load(f)
    record = fn()
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    return record


def train(workdir, tag, clicks_path, index, models, extra, models_version):
    cmd = [CLI, "train", "--clicks", clicks_path, "--index", index, "--output", models,
           "--models-version", models_version] + extra
    rec = run_timed(cmd, os.path.join(workdir, f"train-{tag}.log"))
    if rec["rc"] != 0:
        sys.exit(f"catalog-index train failed (exit {rec['rc']}):\n" + "\n".join(l for _, l in rec["lines"][-30:]))
    vdir = os.path.join(models, models_version)
    with open(os.path.join(vdir, "training.json")) as f:
        training = json.load(f)
    with open(os.path.join(vdir, "evaluation.json")) as f:
        evaluation = json.load(f)
    phases = train_phases(rec["lines"], training["history"], rec["wall_s"])
    print(f"  phases: {phases}", flush=True)
    rec["lines"] = [x for x in rec["lines"] if "click" in x[1] or "epoch" in x[1]][:5] + rec["lines"][-25:]
    return {"run": rec, "phases": phases, "training": {k: training[k] for k in ("options", "data", "history",
                                                                                 "towers", "version")},
            "evaluation": strip_curves(evaluation)}


def train_phases(lines, history, wall_s):
    """Wall time by phase, from the time-stamped output lines of `catalog-index train`.

    Preprocessing runs from the "preprocessing N click file(s)" log line to the summary line the Beam step logs
    when it is done ("read N click rows: kept ..."); the epochs' own seconds are the training (the first epoch
    includes tracing the training step); between the two, the examples and item vectors are loaded into memory;
    after the last epoch come the evaluation, the export and the publication.
    """
    t_pre_start = next((t for t, l in lines if "preprocessing" in l and "click file" in l), None)
    t_pre_end = next((t for t, l in lines if "click rows: kept" in l), None)
    t_last_epoch = [t for t, l in lines if re.match(r"epoch \d+/\d+:", l)][-1]
    train_s = sum(h["seconds"] for h in history)
    t_train_start = t_last_epoch - train_s
    return {
        "startup_and_validation_s": t_pre_start,
        "preprocessing_beam_s": round(t_pre_end - t_pre_start, 1),
        "load_examples_s": round(t_train_start - t_pre_end, 1),
        "training_s": round(train_s, 1),
        "evaluation_export_publish_s": round(wall_s - t_last_epoch, 1),
        "wall_s": wall_s,
        "examples_per_s_per_epoch": [round(h["examples_per_s"]) for h in history],
        "examples_per_s_epochs_2_on_median": round(_measure.median([h["examples_per_s"] for h in history[1:]]))
        if len(history) > 1 else None,
    }


def read_log(path):
    """[(seconds, line)] from a log written by run_timed."""
    out = []
    with open(path) as f:
        for raw in f:
            m = re.match(r"\[\s*([0-9.]+)\] (.*)", raw.rstrip("\n"))
            if m:
                out.append((float(m.group(1)), m.group(2)))
    return out


def strip_curves(evaluation):
    out = json.loads(json.dumps(evaluation))
    for model in ("candidate", "baseline"):
        for fig in out.get(model, {}).values():
            if isinstance(fig, dict):
                fig.pop("recall_curve", None)
    return out


def build_fusion_index(workdir, tag, catalog, models):
    out = os.path.join(workdir, f"index-{tag}")
    cmd = [CLI, "index", "--catalog", catalog, "--output", out, "--shards", "1", "--fusion-model", models]
    rec = run_timed(cmd, os.path.join(workdir, f"index-{tag}.log"))
    if rec["rc"] != 0:
        sys.exit(f"catalog-index index --fusion-model failed (exit {rec['rc']}):\n"
                 + "\n".join(l for _, l in rec["lines"][-30:]))
    rec["summary"] = [l for _, l in rec["lines"] if "wall" in l or "indexed" in l or "search_k" in l][-6:]
    rec["lines"] = rec["lines"][-40:]
    return {"out": out, "run": rec}


def run_queries(workdir, tag, index, queries_path, k):
    out_path = os.path.join(workdir, f"query-{tag}.jsonl")
    cmd = [CLI, "query", "--index", index, "--queries", queries_path, "--k", str(k)]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(out_path, "wb") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"catalog-index query failed (exit {proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
    with open(out_path, encoding="utf-8") as f:
        answers = [json.loads(line) for line in f if line.strip()]
    return {"cmd": cmd, "wall_s": round(wall, 1), "answers": answers}


# ----------------------------------------------------------------------------- figures


def query_set(meta, classes, coarse, val):
    """The evaluation queries: [{"id", "text"|"image", "group", "fine" or "coarse"}]."""
    qs = []
    for r in val:
        qs.append({"id": "photo:" + r["item_id"], "image": r["image_uri"], "group": "photos",
                   "fine": r["fine"], "coarse": r["coarse"]})
    plan = {int(f): e for f, e in meta["plan"].items()}
    for fine in sorted(plan):
        qs.append({"id": f"name:{fine}", "text": plan[fine]["name"], "group": "names", "fine": fine,
                   "coarse": classes[fine][2]})
    for kind, text, fine, _ in meta["held_out_used"]:
        qs.append({"id": f"{kind}-held:{fine}:{text}", "text": text, "group": f"{kind}_held_out", "fine": fine,
                   "coarse": classes[fine][2]})
    for kind, text, fine, _ in meta["trained_used"]:
        if kind == "desc":
            qs.append({"id": f"desc-train:{fine}:{text}", "text": text, "group": "desc_trained", "fine": fine,
                       "coarse": classes[fine][2]})
    for cid in sorted(coarse):
        qs.append({"id": f"coarse:{cid}", "text": coarse[cid].lower(), "group": "coarse_names", "fine": None,
                   "coarse": cid})
    return qs


GROUPS = ("photos", "names", "desc_held_out", "typo_held_out", "order_held_out", "desc_trained", "coarse_names")


def score(queries, ranked, item_label, n_fine, n_coarse, k=10):
    """{group: figures} from each query's ranked item ids (None for an error)."""
    out = {}
    for group in GROUPS:
        rows = [(q, ranked.get(q["id"])) for q in queries if q["group"] == group]
        if not rows:
            continue
        p1f = p1c = p10 = rec = hit = errors = 0
        for q, ids in rows:
            if ids is None:
                errors += 1
                continue
            labels = [item_label.get(i, (None, None)) for i in ids[:k]]
            if q["fine"] is not None:
                rel = [lab[0] == q["fine"] for lab in labels]
                n_rel = n_fine[q["fine"]]
            else:
                rel = [lab[1] == q["coarse"] for lab in labels]
                n_rel = n_coarse[q["coarse"]]
            p1f += bool(labels) and q["fine"] is not None and labels[0][0] == q["fine"]
            p1c += bool(labels) and labels[0][1] == q["coarse"]
            p10 += sum(rel) / k
            rec += sum(rel) / n_rel
            hit += any(rel)
        n = len(rows)
        out[group] = {"n": n, "errors": errors, "p1_fine": p1f / n, "p1_coarse": p1c / n, "p10": p10 / n,
                      "recall10": rec / n, "hit10": hit / n}
    return out


def exact_search(index, queries, item_label, n_fine, n_coarse, ann_output, k=10):
    """The same queries, exact cosine over the release's fused vectors (no ANN), embedded by the release's own
    query encoder in this process (search.open_index(...).embed_each, the code `query` runs); and the ANN's
    recall@10 against it per group (|`catalog-index query` top 10 & exact top 10| / 10, from ann_output)."""
    from search import ann
    from search.index import open_index

    start = time.perf_counter()
    searcher = open_index(index)
    ids, matrix = bqq.release_vectors(searcher)
    texts = [q.get("text") for q in queries]
    images = []
    for q in queries:
        if q.get("image"):
            with open(q["image"], "rb") as f:
                images.append(f.read())
        else:
            images.append(None)
    vectors, errors = [], []
    for i in range(0, len(queries), 64):
        v, e = searcher.embed_each(texts[i:i + 64], images[i:i + 64])
        vectors.append(v)
        errors.extend(e)
    vectors = np.concatenate(vectors)
    found = ann.exact_search(matrix, ids, vectors, k)
    search_k = searcher.default_search_k
    searcher.close()
    ranked = {q["id"]: None if errors[n] is not None else [hit[0] for hit in found[n]]
              for n, q in enumerate(queries)}
    with open(ann_output, encoding="utf-8") as f:
        ann_ranked = {a["id"]: [h["item_id"] for h in a.get("results", [])] for a in map(json.loads, f)}
    overlap = {}
    for group in GROUPS:
        vals = [len(set(ann_ranked.get(q["id"], [])) & set(ranked[q["id"]] or [])) / k
                for q in queries if q["group"] == group and ranked[q["id"]]]
        if vals:
            overlap[group] = round(float(np.mean(vals)), 4)
    return {"release_default_search_k": search_k, "wall_s": round(time.perf_counter() - start, 1),
            "ann_recall10_vs_exact": overlap, "figures": score(queries, ranked, item_label, n_fine, n_coarse)}


def image_only(default_index, val, item_label, n_fine, k=10):
    """Val photos against the index's image vectors alone, exact cosine (the index's own image encoder)."""
    import pyarrow.parquet as pq

    from embedding import encoders as enc
    from embedding.images import load_image
    from schemas import embeddings as emb
    from search.release import read_pointer, verified_release

    pointer = read_pointer(default_index, None)
    release_dir, manifest = verified_release(default_index, pointer, None)
    ids, vecs = [], []
    for rel in manifest["tables"]["embeddings"]:
        t = pq.read_table(os.path.join(release_dir, rel), columns=[emb.ITEM_ID, emb.IMAGE_EMBEDDING])
        ids.extend(t.column(emb.ITEM_ID).to_pylist())
        vecs.extend(t.column(emb.IMAGE_EMBEDDING).to_pylist())
    items = np.asarray(vecs, np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    handle = manifest["encoders"]["image"]["handle"] if isinstance(manifest["encoders"]["image"], dict) else \
        manifest["encoders"]["image"]
    encoder = enc.Encoder(handle, enc.IMAGE)
    start = time.perf_counter()
    q = np.concatenate([encoder.encode(np.stack([load_image(r["image_uri"], encoder.image_size)
                                                 for r in val[i:i + 32]])) for i in range(0, len(val), 32)])
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    # Sanity: the same encoder on a few train photos gives the table's vectors.
    pos = {i: n for n, i in enumerate(ids)}
    train = _grocery.split("train")[:16]
    t = encoder.encode(np.stack([load_image(r["image_uri"], encoder.image_size) for r in train]))
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    parity = float(min((t[j] * items[pos[r["item_id"]]]).sum() for j, r in enumerate(train)))
    top = np.argsort(-(q @ items.T), axis=1)[:, :k]
    ranked = {"photo:" + r["item_id"]: [ids[j] for j in top[n]] for n, r in enumerate(val)}
    queries = [{"id": "photo:" + r["item_id"], "group": "photos", "fine": r["fine"], "coarse": r["coarse"]}
               for r in val]
    return {"encoder": handle, "encode_s": round(time.perf_counter() - start, 1),
            "parity_min_cosine_16_train_photos": round(parity, 5),
            "figures": score(queries, ranked, item_label, n_fine, {})}


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=100_000, help="rows in the derived click log")
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0, help="seed of the click log (training uses its default)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of product popularity")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    parser.add_argument("--fresh", action="store_true", help="redo every stage (new models versions, new indexes)")
    parser.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "FLAGS"),
                        help="one more training configuration: a name and extra `catalog-index train` flags, "
                             "e.g. --variant logq-e1 '--epochs 1'")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    _grocery.require_dataset()
    os.makedirs(args.workdir, exist_ok=True)
    t_all = time.perf_counter()
    results = {"date": datetime.date.today().isoformat(), "machine": _measure.machine_facts(),
               "load_1min_at_start": os.getloadavg()[0], "args": vars(args)}

    # 1. The default index (cached by bench_query_quality.py).
    qq_index, qq_run = bqq.build_index(bqq.DEFAULT_WORKDIR, 1, False)
    catalog = os.path.join(bqq.DEFAULT_WORKDIR, "catalog", "train.parquet")
    results["default_index"] = {"out": qq_index, "built_now": qq_run}

    # 2. The click log.
    tag = f"{args.clicks}-d{args.days}-s{args.seed}-z{args.zipf:g}"
    clicks_path = os.path.join(args.workdir, f"clicks-{tag}.parquet")

    def make_log():
        start = time.perf_counter()
        cols, meta = generate_clicks(args.clicks, args.days, args.seed, args.zipf)
        write_clicks(cols, clicks_path)
        meta["generate_s"] = round(time.perf_counter() - start, 1)
        meta["path"] = clicks_path
        return meta

    meta = stage(args.workdir, f"clicks-{tag}", args.fresh or not os.path.exists(clicks_path), make_log)
    results["click_log"] = {k: v for k, v in meta.items() if k not in ("plan", "held_out_used", "trained_used")}
    results["click_log"]["held_out_phrasings"] = {
        kind: sum(1 for k, *_ in meta["held_out_used"] if k == kind) for kind in ("desc", "typo", "order")}
    results["click_log"]["trained_phrasings"] = {
        kind: sum(1 for k, *_ in meta["trained_used"] if k == kind) for kind in ("desc", "typo", "order")}
    print(f"click log: {clicks_path}: {meta['kinds']}, {meta['distinct_texts']} distinct texts, "
          f"{meta['distinct_query_photos']} distinct query photos", flush=True)

    # 3. Train, with and without logQ; 4. index with each.
    configs = {"logq": [], "nologq": ["--no-logq"]}
    configs.update({name: flags.split() for name, flags in args.variant})
    for name, extra in configs.items():
        models = os.path.join(args.workdir, f"models-{tag}-{name}")
        version = f"m-{tag}-{name}".replace(".", "_")
        results[f"train_{name}"] = stage(
            args.workdir, f"train-{tag}-{name}", args.fresh,
            lambda: train(args.workdir, f"{tag}-{name}", clicks_path, qq_index, models, extra, version))
        rec = results[f"train_{name}"]
        rec["phases"] = train_phases(read_log(os.path.join(args.workdir, f"train-{tag}-{name}.log")),
                                     rec["training"]["history"], rec["run"]["wall_s"])
        results[f"index_{name}"] = stage(
            args.workdir, f"index-{tag}-{name}", args.fresh,
            lambda: build_fusion_index(args.workdir, f"{tag}-{name}", catalog, models))

    # 5. Queries through the product.
    classes, coarse = _grocery.classes(), coarse_names()
    train_rows, val = _grocery.split("train"), _grocery.split("val")
    item_label = {r["item_id"]: (r["fine"], r["coarse"]) for r in train_rows}
    n_fine, n_coarse = {}, {}
    for r in train_rows:
        n_fine[r["fine"]] = n_fine.get(r["fine"], 0) + 1
        n_coarse[r["coarse"]] = n_coarse.get(r["coarse"], 0) + 1
    queries = query_set(meta, classes, coarse, val)
    queries_path = os.path.join(args.workdir, f"queries-{tag}.jsonl")
    with open(queries_path, "w", encoding="utf-8") as f:
        for q in queries:
            f.write(json.dumps({"id": q["id"], **({"text": q["text"]} if "text" in q else {"image": q["image"]})})
                    + "\n")
    indexes = {"default": qq_index, **{f"trained_{name}": results[f"index_{name}"]["out"] for name in configs}}
    results["query"], results["exact"] = {}, {}
    for name, index in indexes.items():
        def through_query():
            q = run_queries(args.workdir, f"{tag}-{name}", index, queries_path, 10)
            ranked = {a["id"]: [h["item_id"] for h in a["results"]] if "results" in a else None
                      for a in q["answers"]}
            return {"cmd": q["cmd"], "wall_s": q["wall_s"],
                    "figures": score(queries, ranked, item_label, n_fine, n_coarse)}

        results["query"][name] = stage(args.workdir, f"query-{tag}-{name}", args.fresh, through_query)
        results["exact"][name] = stage(
            args.workdir, f"exact-{tag}-{name}", args.fresh,
            lambda: exact_search(index, queries, item_label, n_fine, n_coarse,
                                 os.path.join(args.workdir, f"query-{tag}-{name}.jsonl")))
    results["image_vectors_alone"] = image_only(qq_index, val, item_label, n_fine)
    # Wall of every stage as first run (stages reused from earlier runs keep their own figures).
    results["stage_wall_s"] = {
        "generate_click_log": meta.get("generate_s"),
        **{f"train_{n}": results[f"train_{n}"]["run"]["wall_s"] for n in configs},
        **{f"index_{n}": results[f"index_{n}"]["run"]["wall_s"] for n in configs},
        **{f"query_{n}": r["wall_s"] for n, r in results["query"].items()},
        **{f"exact_{n}": r["wall_s"] for n, r in results["exact"].items()},
        "image_vectors_alone": results["image_vectors_alone"]["encode_s"]}
    results["total_wall_s_this_run"] = round(time.perf_counter() - t_all, 1)
    results["load_1min_at_end"] = os.getloadavg()[0]

    # Print the tables.
    rows = [("default fusion (cached index)", results["query"]["default"]["figures"])]
    rows += [(f"trained, {name} {' '.join(configs[name])}", results["query"][f"trained_{name}"]["figures"])
             for name in configs]
    rows.append(("image vectors alone (exact)", results["image_vectors_alone"]["figures"]))
    exact = [results["exact"]["default"]["figures"]] + [results["exact"][f"trained_{n}"]["figures"] for n in configs]
    print(f"\n{'photos (val, n=296)':32s} {'P@1 fine':>9s} {'P@1 coarse':>10s} {'P@10 fine':>9s}   exact: "
          f"{'P@1 fine':>9s} {'P@1 coarse':>10s} {'P@10 fine':>9s}")
    for i, (label, fig) in enumerate(rows):
        p = fig["photos"]
        e = exact[i]["photos"] if i < len(exact) else p
        print(f"{label:32s} {p['p1_fine']:9.3f} {p['p1_coarse']:10.3f} {p['p10']:9.3f}          "
              f"{e['p1_fine']:9.3f} {e['p1_coarse']:10.3f} {e['p10']:9.3f}")
    for group in GROUPS[1:]:
        n = rows[0][1][group]["n"]
        print(f"\n{group + f' (n={n})':32s} {'P@1':>7s} {'P@10':>7s} {'R@10':>7s} {'hit@10':>7s} {'errors':>6s}"
              f"   exact P@10")
        for i, (label, fig) in enumerate(rows[:-1]):
            g = fig[group]
            p1 = g["p1_fine"] if group != "coarse_names" else g["p1_coarse"]
            print(f"{label:32s} {p1:7.3f} {g['p10']:7.3f} {g['recall10']:7.3f} {g['hit10']:7.3f} {g['errors']:6d}"
                  f"   {exact[i][group]['p10']:.3f}")
    print("\nANN recall@10 against exact search (search_k = the release's default):")
    for name, ex in results["exact"].items():
        print(f"  {name:22s} search_k {ex['release_default_search_k']:5d}: {ex['ann_recall10_vs_exact']}")
    for name in configs:
        ev = results[f"train_{name}"]["evaluation"]
        ph = results[f"train_{name}"]["phases"]
        print(f"\ntrain {name}: phases {ph}")
        for kind in ("text", "photo", "all"):
            c, b = ev["candidate"].get(kind), ev["baseline"].get(kind)
            if c:
                print(f"  held-out {kind:5s} ({c['queries']}): recall@10 {c['recall_at_10']:.3f} vs baseline "
                      f"{b['recall_at_10']:.3f}; MRR {c['mrr']:.3f} vs {b['mrr']:.3f}")
    walls = results["stage_wall_s"]
    print(f"\nstage walls (s): {walls}; sum {sum(v or 0 for v in walls.values()):.0f}"
          f"\nthis run {results['total_wall_s_this_run']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
