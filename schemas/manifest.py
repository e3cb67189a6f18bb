"""The index manifest: its JSON Schema and the accounting rules it must obey.

``manifest.schema.json`` (next to this file) is the contract with readers;
``validate_manifest`` checks both the schema and the arithmetic a schema cannot
express (read = indexed + rejected, shard counts sum to indexed, ...).
"""

import functools
import json
import os

import jsonschema

from schemas.errors import PublicationError
from schemas import layout

FORMAT_VERSION = 2
MANIFEST_FILE = layout.MANIFEST_FILE
LATEST_FILE = layout.LATEST_FILE
# Indexed items by how each vector came about (incremental runs); per modality reused + encoded = the
# indexed items with that vector (both are counted from the items each shard wrote).
VECTOR_COUNTS = ("reused_text", "encoded_text", "reused_image", "encoded_image")
SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "manifest.schema.json")


@functools.lru_cache(maxsize=1)
def manifest_schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return json.load(f)


def validate_manifest(manifest: dict) -> None:
    """Raises PublicationError when the manifest breaks its schema or its accounting."""
    try:
        jsonschema.validate(manifest, manifest_schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise PublicationError(f"manifest is invalid at {where}: {e.message}") from e
    counts = manifest["counts"]
    problems = []
    if not layout.is_version_name(manifest["version"]):
        problems.append(f"version {manifest['version']!r} is not a valid version name")
    if not layout.is_release_id(manifest["release"]):
        problems.append(f"release {manifest['release']!r} is not a release folder name")
    if counts["read"] != counts["indexed"] + counts["rejected"]:
        problems.append(f"read {counts['read']} != indexed {counts['indexed']} + rejected {counts['rejected']}")
    if sum(counts["rejected_by_reason"].values()) != counts["rejected"]:
        problems.append("rejected_by_reason does not sum to rejected")
    if sum(counts["degraded_by_reason"].values()) != counts["degraded"]:
        problems.append("degraded_by_reason does not sum to degraded")
    if counts["degraded"] > counts["indexed"]:
        problems.append("more degraded than indexed items")
    vectors = [k for k in VECTOR_COUNTS if k in counts]
    if vectors and len(vectors) != len(VECTOR_COUNTS):
        problems.append(f"counts has {', '.join(vectors)} but not all of {', '.join(VECTOR_COUNTS)}")
    elif vectors:
        for modality in ("text", "image"):
            with_vector = counts[f"reused_{modality}"] + counts[f"encoded_{modality}"]
            if with_vector > counts["indexed"]:
                problems.append(f"reused_{modality} + encoded_{modality} = {with_vector} is more than indexed "
                                f"{counts['indexed']}")
    shard_total = sum(s["count"] for s in manifest["shards"])
    if shard_total != counts["indexed"]:
        problems.append(f"shard counts sum to {shard_total}, indexed is {counts['indexed']}")
    indices = [s["index"] for s in manifest["shards"]]
    if indices != list(range(len(indices))):
        problems.append(f"shard indices {indices} are not 0..{len(indices) - 1}")
    if manifest["fusion"]["dim"] != manifest["dimension"]:
        problems.append("fusion dim differs from dimension")
    for shard in manifest["shards"]:
        entry = manifest["files"].get(shard["path"])
        if entry is not None and (entry["size"], entry["sha256"]) != (shard["size"], shard["sha256"]):
            problems.append(f"{shard['path']}: shard checksum differs from its entry in files")
    if problems:
        raise PublicationError("manifest accounting does not add up: " + "; ".join(problems))


def dumps(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
