"""Retrieval quality of the built-in encoders on the Grocery Store dataset.

The index: the 2,640 train photos as catalog items (title = product name,
description = the product's description, image = the photo). Queries:

* photo -> index, image vectors: each of the 296 val photos against the train
  image vectors; precision@1 by fine and by coarse class.
* photo -> index, fused vectors: the val photo as an image-only item (text mask
  0) through the default fusion, against the train items' fused vectors (text
  and image); precision@1 by fine and by coarse class.
* product name -> index, text vectors: each of the 81 product names against the
  train items' text vectors (title + description); precision@1 and @10 (share
  of the top 10 that are photos of that product).

Brute-force cosine search (no Annoy), so the figures are the encoders' and the
fusion's, not the index's. Published anchor: DenseNet-169 off-the-shelf
features + a linear SVM trained on the train split reach 72.5 % fine / 85.2 %
coarse accuracy (Klasson et al., WACV 2019): a trained classifier, where these
figures are zero-shot nearest neighbours.

    .venv/bin/python benchmarks/grocery_quality.py [--text-encoder builtin:minilm-l6-v2]
        [--image-encoder builtin:efficientnet-lite0] [--dimension 256] [--json OUT]
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _grocery  # noqa: E402


def encode_images(encoder, rows, batch=32):
    from embedding.images import load_image

    out = []
    for i in range(0, len(rows), batch):
        arrays = np.stack([load_image(r["image_uri"], encoder.image_size) for r in rows[i:i + batch]])
        out.append(encoder.encode(arrays))
    return np.concatenate(out)


def encode_texts(encoder, texts, batch=64):
    return np.concatenate([encoder.encode(texts[i:i + batch]) for i in range(0, len(texts), batch)])


def precision_at(scores, query_labels, index_labels, k):
    top = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean(index_labels[top] == query_labels[:, None]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-encoder", default="builtin:minilm-l6-v2")
    parser.add_argument("--image-encoder", default="builtin:efficientnet-lite0")
    parser.add_argument("--dimension", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    _grocery.require_dataset()

    from embedding import encoders as enc
    from embedding import fusion as fus
    from pipelines.transforms import CatalogRow, item_text

    train, val = _grocery.split("train"), _grocery.split("val")
    names = _grocery.classes()
    start = time.perf_counter()
    text_enc = enc.Encoder(args.text_encoder, enc.TEXT)
    image_enc = enc.Encoder(args.image_encoder, enc.IMAGE)
    texts = [item_text(CatalogRow(r["item_id"], r["title"], r["description"], None, "", 0)) for r in train]
    train_text = encode_texts(text_enc, texts)
    train_image = encode_images(image_enc, train)
    val_image = encode_images(image_enc, val)
    name_ids = sorted(names)
    name_vecs = encode_texts(text_enc, [names[i][0] for i in name_ids])
    encode_s = time.perf_counter() - start

    fine = np.array([r["fine"] for r in train])
    coarse = np.array([r["coarse"] for r in train])
    vfine = np.array([r["fine"] for r in val])
    vcoarse = np.array([r["coarse"] for r in val])
    norm = fus.l2_normalize

    spec = fus.FusionSpec(fus.PROJECTION, train_text.shape[1], train_image.shape[1], args.dimension)
    fusion = fus.ProjectionFusion(spec)
    n, m = len(train), len(val)
    train_fused = fusion(train_text, np.ones(n), train_image, np.ones(n))
    val_fused = fusion(np.zeros((m, spec.text_dim)), np.zeros(m), val_image, np.ones(m))

    image_scores = norm(val_image) @ norm(train_image).T
    fused_scores = val_fused @ train_fused.T
    text_scores = norm(name_vecs) @ norm(train_text).T
    name_labels = np.array(name_ids)
    results = {
        "text_encoder": args.text_encoder,
        "image_encoder": args.image_encoder,
        "dimension": args.dimension,
        "train_items": n,
        "val_photos": m,
        "encode_s": round(encode_s, 1),
        "image_p1_fine": precision_at(image_scores, vfine, fine, 1),
        "image_p1_coarse": precision_at(image_scores, vcoarse, coarse, 1),
        "fused_p1_fine": precision_at(fused_scores, vfine, fine, 1),
        "fused_p1_coarse": precision_at(fused_scores, vcoarse, coarse, 1),
        "name_p1_fine": precision_at(text_scores, name_labels, fine, 1),
        "name_p10_fine": precision_at(text_scores, name_labels, fine, 10),
    }
    print(f"{'measure':28s} value")
    for key, value in results.items():
        print(f"{key:28s} {value:.3f}" if isinstance(value, float) else f"{key:28s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
