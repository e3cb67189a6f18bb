"""Languages: what `--text-encoder auto` costs at validation, and why it matters (cross-lingual queries).

    .venv/bin/python benchmarks/bench_languages.py [--repeats 3]

1. Cost of the auto rule on 5,000 sampled texts, as validation runs it: sample the texts from a
   Parquet catalog (`pipelines.options.sample_texts`) and detect their languages
   (`embedding.languages.choose`), in a fresh process each repeat (so the detector's model load
   is included), for an English catalog (Grocery titles + descriptions), a Chinese one and a mix;
   then what detection costs inside a real `IndexOptions.validate()` (built-in MiniLM chosen, tiny
   image encoder), where the model loads in the background while the image encoder is inspected.
2. 20 Chinese shopper queries against the 81 English Grocery product names, text vectors only,
   brute-force cosine: how often the right product group (coarse class) comes first / in the top 5,
   with MiniLM (English only) and USE multilingual. Needs ../shared/data (skips without it) and
   builds the built-in models into $CATALOG_INDEX_MODEL_CACHE (or the default cache) if needed.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# Query -> expected coarse class of the Grocery Store dataset (classes.csv).
QUERIES = {
    "苹果": 0, "香蕉": 2, "牛奶": 20, "番茄": 41, "西瓜": 7, "梨": 13, "橙子": 9, "柠檬": 4, "芒果": 6, "菠萝": 14,
    "酸奶": 27, "果汁": 19, "土豆": 39, "胡萝卜": 31, "黄瓜": 32, "大蒜": 33, "生姜": 34, "洋葱": 37, "蘑菇": 36,
    "茄子": 29,
}
CHINESE_TITLES = ["新鲜红苹果 一公斤", "进口香蕉", "全脂牛奶 1升", "有机番茄", "无籽西瓜", "香梨", "脐橙", "黄柠檬",
                  "台农芒果", "菠萝", "原味酸奶", "鲜榨橙汁", "黄心土豆", "胡萝卜", "水果黄瓜", "紫皮大蒜", "小黄姜",
                  "红洋葱", "香菇", "长茄子"]


def _catalog(path, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"item_id": [f"i{i}" for i in range(len(texts))], "title": texts}), path,
                   row_group_size=1000)


def _cost_child(path, image_encoder):
    """Runs in a fresh process: (a) sample 5,000 texts and choose, cold then warm; (b) a real validation."""
    import pyarrow.parquet as pq
    from apache_beam.options.pipeline_options import PipelineOptions

    from embedding import languages
    from pipelines.options import IndexOptions, sample_texts

    rows = pq.ParquetFile(path).metadata.num_rows
    t0 = time.perf_counter()
    texts = sample_texts([path], [rows])
    t1 = time.perf_counter()
    choice = languages.choose("auto", texts)
    t2 = time.perf_counter()
    languages.choose("auto", texts)  # warm: the model is loaded
    t3 = time.perf_counter()
    languages._identifier = None  # cold again for the validation below
    with tempfile.TemporaryDirectory() as out:
        opts = PipelineOptions(["--catalog", path, "--output", out, "--image-encoder", image_encoder]).view_as(
            IndexOptions)
        t4 = time.perf_counter()
        plan = opts.validate()
        t5 = time.perf_counter()
    print(json.dumps({"sampled": len(texts), "sample_s": t1 - t0, "choose_cold_s": t2 - t1, "choose_warm_s": t3 - t2,
                      "in_validation_s": plan.text_choice.seconds, "validation_s": t5 - t4,
                      "handle": choice.handle, "shares": dict(list(choice.shares.items())[:3])}))


def cost(repeats):
    import _grocery
    from embedding import tiny

    names = _grocery.classes()
    english = [f"{n}\n{d}" for n, d, _ in names.values()]
    sets = {
        "english (Grocery titles + descriptions)": [english[i % len(english)] for i in range(5000)],
        "chinese titles": [CHINESE_TITLES[i % len(CHINESE_TITLES)] for i in range(5000)],
        "mixed 90% en / 10% zh": [CHINESE_TITLES[i % 20] if i % 10 == 0 else english[i % len(english)]
                                  for i in range(5000)],
    }
    out = {}
    keys = ("sample_s", "choose_cold_s", "choose_warm_s", "in_validation_s", "validation_s")
    with tempfile.TemporaryDirectory() as tmp:
        image_encoder = tiny.build_image_encoder(os.path.join(tmp, "image"))
        for label, texts in sets.items():
            path = os.path.join(tmp, "c.parquet")
            _catalog(path, texts)
            runs = []
            for _ in range(repeats):
                done = subprocess.run([sys.executable, __file__, "--_cost", path, image_encoder], capture_output=True,
                                      text=True, check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            med = {k: statistics.median(r[k] for r in runs) for k in keys}
            out[label] = dict(med, handle=runs[0]["handle"], shares=runs[0]["shares"], sampled=runs[0]["sampled"])
            print(f"{label:40s} {runs[0]['sampled']} texts: sample {med['sample_s']:.3f}s; detect alone cold "
                  f"{med['choose_cold_s']:.3f}s (model load included), warm {med['choose_warm_s']:.3f}s; inside "
                  f"validation {med['in_validation_s']:.3f}s of {med['validation_s']:.1f}s -> {runs[0]['handle']} "
                  f"{runs[0]['shares']}")
    return out


def cross_lingual():
    import numpy as np

    import _grocery
    from embedding import encoders as enc
    from embedding import languages

    if not os.path.isdir(_grocery.DATASET):
        print(f"cross-lingual: skipped, no Grocery data at {_grocery.DATASET}")
        return None
    names = _grocery.classes()
    titles = [n for n, _, _ in names.values()]
    coarse = np.array([c for _, _, c in names.values()])
    queries = list(QUERIES)
    expected = np.array([QUERIES[q] for q in queries])
    out = {}
    for handle in (languages.ENGLISH_ENCODER, languages.MULTILINGUAL_ENCODER):
        encoder = enc.Encoder(handle, enc.TEXT)
        items = encoder.encode(titles)
        qs = encoder.encode(queries)
        items = items / np.linalg.norm(items, axis=1, keepdims=True)
        qs = qs / np.linalg.norm(qs, axis=1, keepdims=True)
        ranked = np.argsort(-(qs @ items.T), axis=1)
        top1 = int((coarse[ranked[:, 0]] == expected).sum())
        top5 = int(sum(expected[i] in coarse[ranked[i, :5]] for i in range(len(queries))))
        out[handle] = {"top1": top1, "top5": top5, "queries": len(queries)}
        print(f"cross-lingual {handle:30s} right group first {top1}/{len(queries)}, in top 5 {top5}/{len(queries)}")
    return out


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--_cost":
        _cost_child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = {"date": time.strftime("%Y-%m-%d"), "cost": cost(args.repeats), "cross_lingual": cross_lingual()}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"bench_languages-{results['date']}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
