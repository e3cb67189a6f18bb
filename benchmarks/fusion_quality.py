"""Fusion quality: the seeded random projection vs a PCA fitted on the catalog.

The default fusion (embedding/fusion.py, ``ProjectionFusion``) maps the weighted
concatenation of the L2-normalised text and image vectors to ``dim`` with a
seeded random matrix with orthonormal rows/columns. The alternative is a PCA
fitted on the catalog's concatenated vectors. This script measures both on the
Grocery Store dataset (../shared/data/grocery-store) against the unreduced
concatenation:

* catalog: the 2,640 train photos; item text = class name ('-' -> ' ') + the
  product description, item image = the photo (both masks 1);
* photo queries: the 296 val photos, image only (text mask 0);
* text queries: the 81 product names, text only (image mask 0).

Methods, for each target dimension D:

* ``reference``   the full weighted concatenation (text_dim + image_dim), no reduction;
* ``random``      the project's ProjectionFusion (seed 0, the pipeline default), and
                  the mean and spread over several seeds;
* ``pca``         a matrix fitted on the catalog: top-D right singular vectors of the
                  centred catalog concatenations, applied as a plain matrix
                  (``l2n(x @ W)``): a drop-in replacement of the projection matrix;
* ``pca-centred`` the same with the catalog mean subtracted first (``l2n((x - mu) @ W)``,
                  sklearn's ``PCA.transform``);
* ``pca-whiten``  centred and whitened (each component divided by its singular value,
                  floored at 1e-3 of the largest so null directions are not blown up);
* ``pca-sample``  ``pca`` fitted on a random 10% of the catalog items (a cheaper first pass);
* ``pca-stale``   ``pca`` fitted only on the items of half the products (even fine ids) and
                  applied to the whole catalog: a fit that predates the products added since.

Metrics (brute-force cosine, numpy):

* photo P@1 fine / coarse: the nearest catalog item has the query's fine / coarse class;
* text P@10: fraction of the 10 nearest catalog items of the queried product;
* R@10 photo / text / item: neighbour recall vs the reference, i.e. how many of the
  reference top-10 catalog neighbours the reduced vectors keep, for photo queries,
  text queries and catalog items as queries (item-to-item, self excluded). Tie-aware:
  a returned item counts when its reference score reaches the reference 10th-best
  score (catalog items of one product share the identical text, so text queries tie).

Usage::

    .venv/bin/python benchmarks/fusion_quality.py [--data DIR] [--dims 64 128 256] [--json OUT]

Encoders: the project's tiny real SavedModels (embedding/tiny.py), built into a
temporary directory with text dim 512 and image dim 768 so that the 1,280-wide
concatenation is wider than every target. They are feature extractors, not
pretrained models; see benchmarks/fusion_quality.md for what that implies.
"""

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "grocery-store", "dataset")
K = 10


# ----------------------------------------------------------------------------- data


def read_classes(data_dir):
    """{fine_id: (name, coarse_id, coarse_name, description)} from classes.csv."""
    classes = {}
    with open(os.path.join(data_dir, "classes.csv"), newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)  # header
        for row in reader:
            if not row:
                continue
            name, fine, coarse_name, coarse, _iconic, desc_path = [c.strip() for c in row[:6]]
            with open(os.path.join(data_dir, desc_path.lstrip("/")), encoding="utf-8") as d:
                description = " ".join(d.read().split())
            classes[int(fine)] = (name, int(coarse), coarse_name, description)
    return classes


def read_split(data_dir, name):
    """[(absolute photo path, fine_id, coarse_id)] from train.txt / val.txt."""
    out = []
    with open(os.path.join(data_dir, name), encoding="utf-8") as f:
        for line in f:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 3 and parts[0]:
                out.append((os.path.join(data_dir, parts[0]), int(parts[1]), int(parts[2])))
    return out


def product_name(class_name):
    return class_name.replace("-", " ")


# -------------------------------------------------------------------------- encoding


def encode_all(classes, train, val, text_dim, image_dim, image_size, seed, batch=64):
    from embedding import tiny
    from embedding.encoders import Encoder
    from embedding.images import load_image

    with tempfile.TemporaryDirectory(prefix="fusion_quality_") as tmp:
        text_enc = Encoder(tiny.build_text_encoder(os.path.join(tmp, "text"), text_dim, seed), "text")
        image_enc = Encoder(
            tiny.build_image_encoder(os.path.join(tmp, "image"), image_dim, image_size, seed), "image"
        )
        fine_ids = sorted(classes)
        item_texts = [f"{product_name(classes[c][0])} {classes[c][3]}" for c in fine_ids]
        query_texts = [product_name(classes[c][0]) for c in fine_ids]
        class_text = dict(zip(fine_ids, text_enc.encode(item_texts)))
        text_queries = text_enc.encode(query_texts)

        def images(rows):
            out = []
            for start in range(0, len(rows), batch):
                pix = np.stack([load_image(p, (image_size, image_size)) for p, _, _ in rows[start:start + batch]])
                out.append(image_enc.encode(pix))
            return np.concatenate(out)

        catalog_image = images(train)
        query_image = images(val)
    catalog_text = np.stack([class_text[f] for _, f, _ in train])
    return catalog_text, catalog_image, query_image, text_queries, np.array(fine_ids)


# ----------------------------------------------------------------------------- fusion


def weighted_concat(text, text_mask, image, image_mask, wt, wi):
    """The first step of ProjectionFusion: weighted normalised blocks, concatenated."""
    from embedding.fusion import l2_normalize

    t = l2_normalize(text) * (wt * np.asarray(text_mask, np.float32))[:, None]
    i = l2_normalize(image) * (wi * np.asarray(image_mask, np.float32))[:, None]
    return np.concatenate([t, i], axis=1)


def fit_pca(x):
    start = time.perf_counter()
    mu = x.mean(axis=0, dtype=np.float64)
    _, s, vt = np.linalg.svd(x.astype(np.float64) - mu, full_matrices=False)
    return mu, s, vt, time.perf_counter() - start


def pca_maps(mu, s, vt, d):
    from embedding.fusion import l2_normalize

    w = vt[:d].T
    scale = np.maximum(s[:d], 1e-3 * s[0])
    return {
        "pca": lambda x: l2_normalize((x @ w).astype(np.float32)),
        "pca-centred": lambda x: l2_normalize(((x - mu) @ w).astype(np.float32)),
        "pca-whiten": lambda x: l2_normalize((((x - mu) @ w) / scale).astype(np.float32)),
    }


# ---------------------------------------------------------------------------- metrics


def topk(scores, k):
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)


def tie_aware_recall(ref_scores, got_top, k):
    """Mean fraction of the returned top-k whose reference score reaches the reference k-th best."""
    kth = -np.partition(-ref_scores, k - 1, axis=1)[:, k - 1]
    got = np.take_along_axis(ref_scores, got_top, axis=1)
    return float(np.mean(got >= kth[:, None] - 1e-5))


def evaluate(cat, photo_q, text_q, labels, ref):
    """Metrics of one set of fused vectors; ``ref`` holds the reference score matrices."""
    train_fine, train_coarse, val_fine, val_coarse, text_fine = labels
    s_photo = photo_q @ cat.T
    s_text = text_q @ cat.T
    s_item = cat @ cat.T
    np.fill_diagonal(s_item, -np.inf)
    nn1 = np.argmax(s_photo, axis=1)
    top_text = topk(s_text, K)
    out = {
        "photo_p1_fine": float(np.mean(train_fine[nn1] == val_fine)),
        "photo_p1_coarse": float(np.mean(train_coarse[nn1] == val_coarse)),
        "text_p10": float(np.mean(train_fine[top_text] == text_fine[:, None])),
    }
    if ref is not None:
        out["recall10_photo"] = tie_aware_recall(ref["photo"], topk(s_photo, K), K)
        out["recall10_text"] = tie_aware_recall(ref["text"], top_text, K)
        out["recall10_item"] = tie_aware_recall(ref["item"], topk(s_item, K), K)
    return out, {"photo": s_photo, "text": s_text, "item": s_item}


# ------------------------------------------------------------------------------- main

COLUMNS = [
    ("photo_p1_fine", "photo P@1 fine"),
    ("photo_p1_coarse", "photo P@1 coarse"),
    ("text_p10", "text P@10"),
    ("recall10_photo", "R@10 photo"),
    ("recall10_text", "R@10 text"),
    ("recall10_item", "R@10 item"),
]

PRACTICAL = [
    "random projection: no pass over the catalog; the matrix is rebuilt on every worker from "
    "(in_dim, dim, seed), nothing to ship; identical across catalog versions, so vectors of "
    "different index versions (and of items fused incrementally/backfilled) stay comparable.",
    "PCA: needs a full first pass (encode the whole catalog, fit, then fuse) -> a two-pass "
    "pipeline (or a fit on a sample); the fitted matrix (and mean) must be stored and shipped "
    "with each index version and used for queries; a refit on a new catalog changes the basis "
    "(component order and signs), so vectors of different versions are not comparable and "
    "incremental updates must reuse the old fit until a full rebuild.",
]


def fmt_row(name, d, m, spread=None):
    cells = []
    for key, _ in COLUMNS:
        if key not in m:
            cells.append("-")
        elif spread is not None:
            cells.append(f"{m[key]:.3f}±{spread[key]:.3f}")
        else:
            cells.append(f"{m[key]:.3f}")
    return f"| {name} | {d} | " + " | ".join(cells) + " |"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="grocery-store dataset/ folder")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--text-dim", type=int, default=512)
    p.add_argument("--image-dim", type=int, default=768)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--text-weight", type=float, default=1.0)
    p.add_argument("--image-weight", type=float, default=1.0)
    p.add_argument("--encoder-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="random projection seeds; the first is reported on its own (0 = pipeline default)")
    p.add_argument("--json", metavar="OUT", help="also write all figures as JSON")
    args = p.parse_args(argv)

    data = os.path.abspath(args.data)
    if not os.path.isfile(os.path.join(data, "classes.csv")):
        print(f"fusion_quality: Grocery Store data not found at {data} (see ../shared/data/README.md); "
              f"nothing measured.")
        return 0
    in_dim = args.text_dim + args.image_dim
    if max(args.dims) >= in_dim:
        p.error(f"--dims must be below text_dim + image_dim = {in_dim}")

    from embedding.fusion import PROJECTION, FusionSpec, ProjectionFusion, l2_normalize

    classes = read_classes(data)
    train, val = read_split(data, "train.txt"), read_split(data, "val.txt")
    print(f"catalog {len(train)} photos, {len(val)} photo queries, {len(classes)} text queries", flush=True)

    start = time.perf_counter()
    cat_t, cat_i, q_i, q_t, fine_ids = encode_all(
        classes, train, val, args.text_dim, args.image_dim, args.image_size, args.encoder_seed
    )
    encode_s = time.perf_counter() - start
    print(f"encoded in {encode_s:.1f}s", flush=True)

    n_cat, n_photo, n_text = len(cat_t), len(q_i), len(q_t)
    ones, zeros = np.ones, np.zeros
    wt, wi = args.text_weight, args.image_weight
    # (text, text_mask, image, image_mask) per set, exactly as the pipeline calls a fusion.
    inputs = {
        "catalog": (cat_t, ones(n_cat), cat_i, ones(n_cat)),
        "photo": (zeros((n_photo, args.text_dim), np.float32), zeros(n_photo), q_i, ones(n_photo)),
        "text": (q_t, ones(n_text), zeros((n_text, args.image_dim), np.float32), zeros(n_text)),
    }
    concat = {k: weighted_concat(*v, wt, wi) for k, v in inputs.items()}
    labels = (
        np.array([f for _, f, _ in train]), np.array([c for _, _, c in train]),
        np.array([f for _, f, _ in val]), np.array([c for _, _, c in val]),
        fine_ids,
    )

    # Reference: the unreduced concatenation, cosine.
    ref_vecs = {k: l2_normalize(v) for k, v in concat.items()}
    ref_metrics, ref = evaluate(ref_vecs["catalog"], ref_vecs["photo"], ref_vecs["text"], labels, None)
    results = [{"method": "reference", "dim": in_dim, **ref_metrics}]
    # How crowded the reference scores are: a small gap between the 1st and the 10th
    # neighbour means a small distortion of the scores reorders the top 10.
    crowding = {}
    for kind in ("photo", "text", "item"):
        sc = np.where(np.isfinite(ref[kind]), ref[kind], np.nan)
        srt = -np.sort(-np.nan_to_num(sc, nan=-np.inf), axis=1)
        crowding[kind] = {"mean": float(np.nanmean(sc)), "top1": float(srt[:, 0].mean()),
                          "top10": float(srt[:, K - 1].mean())}
    print("reference cosines (mean / mean 1st / mean 10th neighbour): " + "; ".join(
        f"{kind} {c['mean']:.3f} / {c['top1']:.3f} / {c['top10']:.3f}" for kind, c in crowding.items()), flush=True)

    mu, s, vt, fit_s = fit_pca(concat["catalog"])
    rng = np.random.default_rng(0)
    sample_fit = fit_pca(concat["catalog"][rng.choice(n_cat, n_cat // 10, replace=False)])
    stale_fit = fit_pca(concat["catalog"][labels[0] % 2 == 0])
    var = s ** 2 / np.sum(s ** 2)
    rank = int(np.sum(s > 1e-6 * s[0]))
    rank_t = int(np.linalg.matrix_rank(cat_t.astype(np.float64), tol=1e-5))
    rank_i = int(np.linalg.matrix_rank(cat_i.astype(np.float64), tol=1e-5))
    print(f"catalog concatenation: {in_dim} wide, numerical rank {rank} "
          f"(text block {rank_t}, image block {rank_i}); PCA fit {fit_s:.2f}s", flush=True)

    for d in args.dims:
        per_seed = []
        for seed in args.seeds:
            spec = FusionSpec(PROJECTION, args.text_dim, args.image_dim, d, wt, wi, seed)
            t0 = time.perf_counter()
            fusion = ProjectionFusion(spec)
            build_s = time.perf_counter() - t0
            fused = {k: fusion(*v) for k, v in inputs.items()}
            # Sanity: our concatenation is the fusion's first step.
            np.testing.assert_allclose(
                fused["catalog"], l2_normalize(concat["catalog"] @ fusion.matrix), atol=1e-5
            )
            m, _ = evaluate(fused["catalog"], fused["photo"], fused["text"], labels, ref)
            per_seed.append({"seed": seed, "matrix_build_s": build_s, **m})
        keys = [k for k, _ in COLUMNS]
        results.append({"method": f"random (seed {args.seeds[0]})", "dim": d, **per_seed[0]})
        if len(per_seed) > 1:
            results.append({
                "method": f"random ({len(per_seed)} seeds)", "dim": d,
                **{k: float(np.mean([r[k] for r in per_seed])) for k in keys},
                "sd": {k: float(np.std([r[k] for r in per_seed])) for k in keys},
                "per_seed": per_seed,
            })
        maps = pca_maps(mu, s, vt, d)
        maps["pca-sample"] = pca_maps(*sample_fit[:3], d)["pca"]
        maps["pca-stale"] = pca_maps(*stale_fit[:3], d)["pca"]
        for name, fn in maps.items():
            fused = {k: fn(v) for k, v in concat.items()}
            m, _ = evaluate(fused["catalog"], fused["photo"], fused["text"], labels, ref)
            extra = {"variance_kept": float(var[:d].sum())} if name in ("pca", "pca-centred", "pca-whiten") else {}
            results.append({"method": name, "dim": d, **extra, **m})

    header = "| method | D | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in results:
        lines.append(fmt_row(r["method"], r["dim"], r, r.get("sd")))
    print()
    print("\n".join(lines))
    print()
    print("PCA variance kept (catalog): " + ", ".join(f"D={d}: {var[:d].sum():.3f}" for d in args.dims))
    print(f"PCA fit (SVD of {n_cat}x{in_dim}): {fit_s:.2f}s; random matrix build: "
          + ", ".join(f"D={r['dim']}: {r['matrix_build_s'] * 1000:.0f}ms"
                      for r in results if r["method"].startswith("random (seed")))
    print()
    for note in PRACTICAL:
        print("- " + note)

    if args.json:
        out = {
            "data": data,
            "catalog_items": n_cat, "photo_queries": n_photo, "text_queries": n_text,
            "text_dim": args.text_dim, "image_dim": args.image_dim, "image_size": args.image_size,
            "text_weight": wt, "image_weight": wi, "encoder_seed": args.encoder_seed,
            "dims": args.dims, "seeds": args.seeds, "k": K,
            "catalog_rank": {"concat": rank, "text": rank_t, "image": rank_i},
            "pca_variance_kept": {str(d): float(var[:d].sum()) for d in args.dims},
            "reference_cosines": crowding,
            "pca_fit_s": fit_s, "encode_s": encode_s,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "results": results,
            "practical": PRACTICAL,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
