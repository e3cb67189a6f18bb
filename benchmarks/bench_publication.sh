#!/usr/bin/env bash
# Publication overhead, side by side: `catalog-index index` at a base revision and at the working tree,
# same generated catalog (tiny encoders), alternating, N pairs. Usage (from the repo root, venv built):
#   benchmarks/bench_publication.sh [BASE_REV=741cc4b] [ITEMS=3000] [PAIRS=3]
set -euo pipefail
BASE=${1:-741cc4b}; ITEMS=${2:-3000}; PAIRS=${3:-3}
ROOT=$(pwd); WORK=$(mktemp -d); trap 'git worktree remove --force "$WORK/base" >/dev/null 2>&1; rm -rf "$WORK"' EXIT
git worktree add -q "$WORK/base" "$BASE"
.venv/bin/catalog-index sample --output "$WORK/s" --items "$ITEMS" --no-bad-rows > /dev/null 2>&1
ENC="--text-encoder $WORK/s/encoders/text --image-encoder $WORK/s/encoders/image --shards 4"
for i in $(seq "$PAIRS"); do
  for tag in base head; do
    PP=$([ $tag = base ] && echo "$WORK/base" || echo "$ROOT")
    start=$(date +%s.%N)
    PYTHONPATH=$PP .venv/bin/python -m catalog_index.cli index --catalog "$WORK/s/catalog/*.parquet" \
      --output "$WORK/out-$tag-$i" $ENC --version v > "$WORK/log" 2>&1
    echo "$tag pair=$i wall_s=$(echo "$(date +%s.%N) - $start" | bc) $(grep -o 'indexed [0-9]*' "$WORK/log")"
  done
done
