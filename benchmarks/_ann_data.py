"""Datasets of bench_ann.py: real text embeddings (Python standard library lines) and a synthetic mixture.

Both are cached as .npy under benchmarks/results/cache/ (git-ignored), float32, rows L2-normalised:

* ``real``: distinct short texts from the Python standard library's sources (every line of every
  ``.py`` file under the running interpreter's stdlib, stripped, a leading ``#`` removed, 30-200
  characters, at least three words of letters; duplicates dropped), ordered by sha256 of the text,
  the first ``queries`` held out as queries and the next ``n`` indexed. Encoded once with
  ``builtin:use-multilingual-v3`` (512-d).
* ``synthetic``: a seeded Gaussian mixture in 256-d: ``clusters`` unit-norm centres with Zipf-like
  weights, each cluster spread along its own random rank-16 subspace with a decaying spectrum and a
  per-cluster scale (anisotropic), plus isotropic noise; then L2-normalised. Queries are drawn from
  the same mixture with a different seed (never in the index).
"""

import hashlib
import json
import os
import re
import sysconfig
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "results", "cache")
TEXT_ENCODER = "builtin:use-multilingual-v3"
_WORDS = re.compile(r"[A-Za-z]{2,}")


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def stdlib_texts() -> list:
    """Distinct short texts of the stdlib sources, in sha256 order (deterministic for one Python version)."""
    root = sysconfig.get_paths()["stdlib"]
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except (OSError, UnicodeDecodeError):
                continue
            for line in lines:
                text = line.strip().lstrip("#").strip()
                if 30 <= len(text) <= 200 and len(_WORDS.findall(text)) >= 3:
                    seen.add(text)
    return sorted(seen, key=lambda t: hashlib.sha256(t.encode("utf-8")).digest())


def real(n: int, queries: int, batch: int = 256, log=print):
    """(base [n, 512], queries [queries, 512], info) of real text embeddings; encodes once, then cached."""
    os.makedirs(CACHE, exist_ok=True)
    stem = os.path.join(CACHE, f"real-stdlib-use-{queries}q-{n}")
    if os.path.exists(stem + ".npy") and os.path.exists(stem + ".json"):
        with open(stem + ".json") as f:
            info = json.load(f)
        x = np.load(stem + ".npy")
        return x[queries:], x[:queries], info
    texts = stdlib_texts()
    if len(texts) < n + queries:
        raise SystemExit(f"only {len(texts)} distinct stdlib texts, {n + queries} needed")
    texts = texts[: n + queries]
    from embedding.encoders import Encoder  # TensorFlow: only when encoding

    t0 = time.perf_counter()
    enc = Encoder(TEXT_ENCODER, "text")
    load_s = time.perf_counter() - t0
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # length-sorted batches pad less
    out = None
    t0 = time.perf_counter()
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        vec = enc.encode([texts[i] for i in idx])
        if out is None:
            out = np.zeros((len(texts), vec.shape[1]), np.float32)
        out[idx] = vec
        if (start // batch) % 40 == 0:
            done = start + len(idx)
            log(f"  encoded {done}/{len(texts)} ({done / (time.perf_counter() - t0):.0f} texts/s)")
    encode_s = time.perf_counter() - t0
    out = _normalise(out)
    info = {
        "source": "Python standard library .py lines (stripped, '#' removed, 30-200 chars, >=3 words, distinct), "
                  "sha256 order",
        "stdlib": sysconfig.get_paths()["stdlib"],
        "encoder": TEXT_ENCODER,
        "texts_sha256": hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest(),
        "n": n, "queries": queries, "dim": int(out.shape[1]),
        "encoder_load_s": round(load_s, 2), "encode_s": round(encode_s, 1),
        "texts_per_s": round(len(texts) / encode_s, 1),
        "mean_chars": round(float(np.mean([len(t) for t in texts])), 1),
        "examples": texts[queries:queries + 5],
    }
    np.save(stem + ".tmp.npy", out)
    os.replace(stem + ".tmp.npy", stem + ".npy")
    with open(stem + ".json", "w") as f:
        json.dump(info, f, indent=1)
    return out[queries:], out[:queries], info


def _mixture(rng, params, count: int, chunk: int = 10_000) -> np.ndarray:
    centres, bases, spectra, scales, weights, noise = params
    dim = centres.shape[1]
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, chunk):
        m = min(chunk, count - start)
        c = rng.choice(len(weights), size=m, p=weights)
        z = rng.standard_normal((m, spectra.shape[1]), dtype=np.float32) * spectra[c] * scales[c, None]
        x = centres[c] + np.einsum("nr,nrd->nd", z, bases[c], optimize=True)
        x += rng.standard_normal((m, dim), dtype=np.float32) * noise
        out[start:start + m] = _normalise(x)
    return out


def synthetic(n: int, queries: int, dim: int = 256, clusters: int = 2000, rank: int = 16, seed: int = 0):
    """(base [n, dim], queries [queries, dim], info) from the seeded mixture; cached."""
    os.makedirs(CACHE, exist_ok=True)
    stem = os.path.join(CACHE, f"synthetic-{dim}d-{clusters}c-seed{seed}-{queries}q-{n}")
    info = {"source": "Gaussian mixture, anisotropic rank-16 clusters + isotropic noise, L2-normalised",
            "n": n, "queries": queries, "dim": dim, "clusters": clusters, "rank": rank, "seed": seed,
            "within_cluster_scale": "U(0.3, 0.8) along a rank-16 subspace, spectrum j^-0.5",
            "noise_norm": 0.3, "cluster_weights": "Zipf-like, 1/(rank+10)"}
    if os.path.exists(stem + ".npy"):
        x = np.load(stem + ".npy", mmap_mode="r")
        return np.asarray(x[queries:]), np.asarray(x[:queries]), info
    rng = np.random.default_rng(seed)
    centres = _normalise(rng.standard_normal((clusters, dim), dtype=np.float32))
    bases = rng.standard_normal((clusters, rank, dim), dtype=np.float32)
    bases /= np.linalg.norm(bases, axis=2, keepdims=True)
    spectra = np.arange(1, rank + 1, dtype=np.float32) ** -0.5
    spectra = np.tile(spectra / np.linalg.norm(spectra), (clusters, 1))
    scales = rng.uniform(0.3, 0.8, clusters).astype(np.float32)
    weights = 1.0 / (rng.permutation(clusters) + 10.0)
    weights /= weights.sum()
    noise = np.float32(0.3 / np.sqrt(dim))
    params = (centres, bases, spectra, scales, weights, noise)
    q = _mixture(np.random.default_rng(seed + 1), params, queries)
    base = _mixture(rng, params, n)
    x = np.concatenate([q, base])
    np.save(stem + ".tmp.npy", x)
    os.replace(stem + ".tmp.npy", stem + ".npy")
    return base, q, info


if __name__ == "__main__":  # prepare the caches: python benchmarks/_ann_data.py real 100000 1000
    import sys

    sys.path.insert(0, os.path.dirname(HERE))
    kind, n, nq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    t0 = time.perf_counter()
    b, q, inf = (real if kind == "real" else synthetic)(n, nq)
    print(kind, b.shape, q.shape, f"{time.perf_counter() - t0:.1f}s", json.dumps({k: v for k, v in inf.items() if k != "examples"}))
