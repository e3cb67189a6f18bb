"""The fingerprint of a SavedModel folder: what the manifest records as ``fingerprint``.

Kept free of Beam so the built-in model cache (``embedding.builtin``) can verify
its entries with the very same function; ``embedding.encoders.fingerprint`` is
this function, re-exported.
"""

import hashlib
from typing import Iterable


def fingerprint(model_dir: str, exclude: Iterable[str] = ()) -> str:
    """sha256 over the SavedModel's files (names and bytes), stable across copies.

    ``exclude`` lists paths relative to ``model_dir`` ("/"-separated) left out of
    the digest, e.g. a marker file that itself records the fingerprint. Local
    folders and gs:// work alike (through ``tf.io.gfile``).
    """
    import tensorflow as tf  # lazily: importing this module must stay cheap

    skip = set(exclude)
    digest = hashlib.sha256()
    paths = []
    for root, _, files in tf.io.gfile.walk(model_dir):
        for name in files:
            paths.append(tf.io.gfile.join(root, name))
    for path in sorted(paths):
        rel = path[len(model_dir):].lstrip("/")
        if rel in skip:
            continue
        digest.update(rel.encode() + b"\0")
        with tf.io.gfile.GFile(path, "rb") as f:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()
