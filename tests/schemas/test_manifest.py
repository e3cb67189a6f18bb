import copy

import pytest

from schemas.errors import PublicationError
from schemas import manifest as mf

SHA = "a" * 64
ENCODER = {"handle": "/m", "output_dim": 8, "fingerprint": "sha256:" + SHA}


def good_manifest():
    shards = [
        {"index": i, "path": f"shards/s{i}.ann", "count": c, "size": 10, "sha256": SHA,
         "id_map": f"shards/s{i}.ids.parquet", "embeddings": f"embeddings/p{i}.parquet"}
        for i, c in enumerate([3, 4])
    ]
    files = {}
    for shard in shards:
        files[shard["path"]] = {"size": shard["size"], "sha256": shard["sha256"]}
        files[shard["id_map"]] = files[shard["embeddings"]] = {"size": 5, "sha256": SHA}
    return {
        "format_version": 2, "version": "2026-11-28", "release": "r20261128T070000Z-0123abcd",
        "snapshot": "2026-11-28T00:00:00Z", "created_at": "2026-11-28T07:00:00+00:00",
        "catalog": {"pattern": "c/*.parquet", "files": ["c/a.parquet"]},
        "inputs": {"digest": "sha256:" + SHA, "catalog": [{"path": "c/a.parquet", "size": 10, "sha256": SHA}]},
        "files": files,
        "validation": {"sample_size": 7, "recall_at_10": 1.0, "self_hit_at_1": 1.0, "search_k": 100, "min_recall": 0.95},
        "dimension": 16, "metric": "angular", "trees": 10, "seed": 0,
        "encoders": {"text": ENCODER, "image": dict(ENCODER, image_size=[32, 32])},
        "fusion": {"kind": "projection", "text_dim": 8, "image_dim": 8, "dim": 16},
        "shards": shards,
        "tables": {"embeddings": ["embeddings/p0.parquet"], "rejected": [], "degraded": []},
        "counts": {"read": 9, "indexed": 7, "rejected": 2, "rejected_by_reason": {"empty_item_id": 2},
                   "degraded": 1, "degraded_by_reason": {"image_fetch_failed": 1}},
    }


def test_good_manifest_validates():
    mf.validate_manifest(good_manifest())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m["counts"].update(read=10), "read 10 != indexed 7 \\+ rejected 2"),
        (lambda m: m["shards"][0].update(count=2), "shard counts sum to 6"),
        (lambda m: m["counts"]["rejected_by_reason"].update(empty_item_id=1), "rejected_by_reason"),
        (lambda m: m["counts"].update(degraded=2), "degraded_by_reason"),
        (lambda m: m["shards"][1].update(index=5), "shard indices"),
        (lambda m: m.update(metric="euclidean"), "metric"),
        (lambda m: m["shards"][0].update(path="/abs/path.ann"), "shards/0/path"),
        (lambda m: m.pop("counts"), "counts"),
        (lambda m: m["shards"][0].update(sha256="xyz"), "sha256"),
        (lambda m: m.update(version="v2\n"), "is not a valid version name"),
        (lambda m: m.update(release="../r"), "release"),
        (lambda m: m.pop("files"), "files"),
        (lambda m: m["files"]["shards/s0.ann"].update(size=11), "shard checksum differs from its entry in files"),
        (lambda m: m["files"].update({"../escape.bin": {"size": 1, "sha256": SHA}}), "files"),
        (lambda m: m["shards"][1].update(path="shards/../../x.ann"), "shards/1/path"),
        (lambda m: m.update(snapshot="yesterday"), "snapshot"),
        (lambda m: m.update(format_version=1), "format_version"),
        (lambda m: m.pop("validation"), "validation"),
        (lambda m: m["validation"].update(recall_at_10=1.5), "validation"),
    ],
)
def test_broken_manifest_is_refused(mutate, message):
    manifest = copy.deepcopy(good_manifest())
    mutate(manifest)
    with pytest.raises(PublicationError, match=message):
        mf.validate_manifest(manifest)
