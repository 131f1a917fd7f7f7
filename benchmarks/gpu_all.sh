#!/usr/bin/env bash
# Every GPU measurement of clipxfer in one run, written as one JSON file:
#   1. encode end to end (clipxfer index's path) vs the naive open_clip loop and the raw forward,
#      ViT-B-32 (random weights) in bf16, JPEG decoding on the GPU (nvjpeg) and off (PIL workers);
#   2. a LoRA fine-tune of ViT-B-32 at 16 shots x 100 classes (synthetic images), timed;
#   3. clipxfer embed --engine ray with one GPU actor (Ray start-up included);
#   4. search at 1M vectors on faiss-gpu (flat and IVF), when this faiss has GPU support.
# A step that fails is recorded as failed and the others still run; the exit status is 1 if any failed.
#
#   benchmarks/gpu_all.sh [--out FILE] [--dry-run]
#
# --dry-run: tiny sizes on the CPU (fp32), every step end to end, so the script cannot rot
# (tests/test_gpu_all.py runs it). PYTHON picks the interpreter (default: python).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=benchmarks/results/gpu_all.json
DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "gpu_all.sh: unknown argument $1 (use --out FILE, --dry-run)" >&2; exit 2 ;;
    esac
done

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu PRECISION=fp32 IMAGES=16 NAIVE=16 BATCH=8 RAY_GPUS=0
    CLASSES=3 SHOTS=2 PER_CLASS=8 EPOCHS=(--epochs 1) MAX_TEST=6 SEARCH_SIZE=2000 QUERIES=50 SINGLE=10
else
    DEVICE=cuda PRECISION=bf16 IMAGES=8192 NAIVE=2048 BATCH=512 RAY_GPUS=1
    CLASSES=100 SHOTS=16 PER_CLASS=40 EPOCHS=() MAX_TEST=1000 SEARCH_SIZE=1000000 QUERIES=1000 SINGLE=200
fi
MODEL=ViT-B-32
WORK=$(mktemp -d "${TMPDIR:-/tmp}/clipxfer-gpu-all.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export CLIPXFER_CACHE="$WORK/cache"  # the runs share nothing with earlier ones (text cache, features)
STARTED=$(date +%s.%N)

# step NAME COMMAND...: stdout -> $WORK/NAME.out (JSON), stderr -> $WORK/NAME.log, status and seconds
# -> $WORK/NAME.meta. Only the JSON goes to stdout, so progress stays out of it.
step() {
    local name=$1
    shift
    echo "gpu_all: $name ..." >&2
    local start end status
    start=$(date +%s.%N)
    if "$@" >"$WORK/$name.out" 2>"$WORK/$name.log"; then status=ok; else status=failed; fi
    end=$(date +%s.%N)
    echo "$status $start $end" >"$WORK/$name.meta"
    if [ "$status" = failed ]; then
        echo "gpu_all: $name failed; the end of its output:" >&2
        tail -n 5 "$WORK/$name.log" >&2
    fi
}

# 1. encode, nvjpeg on (the default on CUDA) and off
ENCODE=(benchmarks/encode.py --model "$MODEL" --pretrained random --device "$DEVICE" --runtime torch
        --precision "$PRECISION" --sets photo_500x375 --count "$IMAGES" --naive-limit "$NAIVE"
        --batch-size "$BATCH" --data-dir "$WORK/images" --json)
step encode_device_decode "$PYTHON" "${ENCODE[@]}"
step encode_pil_decode env CLIPXFER_DEVICE_DECODE=0 "$PYTHON" "${ENCODE[@]}"

# 2. LoRA fine-tune on CLASSES synthetic classes, SHOTS each (the rest: validation and test)
step finetune_data "$PYTHON" - "$WORK/classes" "$CLASSES" "$PER_CLASS" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image

root, classes, per_class = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
for c in range(classes):
    folder = root / f"class{c:03d}"
    folder.mkdir(parents=True)
    tint = rng.integers(0, 256, 3)  # each class its own colour, so there is something to learn
    for i in range(per_class):
        pixels = (0.5 * rng.integers(0, 256, (224, 224, 3)) + 0.5 * tint).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
print(json.dumps({"classes": classes, "images_per_class": per_class}))
EOF
step finetune_lora "$PYTHON" -m clipxfer finetune "$WORK/classes" --model "$MODEL:random" --method lora \
    --shots "$SHOTS" "${EPOCHS[@]}" --device "$DEVICE" --precision "$PRECISION" --max-test "$MAX_TEST" --no-save --json

# 3. embed on Ray with one GPU actor, on the encode step's images
step embed_ray "$PYTHON" -m clipxfer embed "$WORK/images/photo_500x375-$IMAGES" --out "$WORK/embeddings" \
    --engine ray --num-gpus-per-worker "$RAY_GPUS" --model "$MODEL:random" --device "$DEVICE" \
    --precision "$PRECISION" --batch-size "$BATCH" --json

# 4. search: faiss-gpu when present; the dry run measures the CPU path at a tiny size instead
if "$PYTHON" -c "import faiss, sys; sys.exit(0 if hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() > 0 else 1)"; then
    step search_gpu "$PYTHON" benchmarks/search.py --sizes "$SEARCH_SIZE" --types flat ivf --gpu \
        --queries "$QUERIES" --single "$SINGLE"
elif [ "$DRY_RUN" = 1 ]; then
    step search_cpu "$PYTHON" benchmarks/search.py --sizes "$SEARCH_SIZE" --types flat ivf \
        --queries "$QUERIES" --single "$SINGLE"
else
    echo "gpu_all: search_gpu skipped: this faiss has no GPU support (pip install faiss-gpu-cu12)" >&2
fi

mkdir -p "$(dirname "$OUT")"
"$PYTHON" benchmarks/gpu_all_report.py "$WORK" "$STARTED" "$DRY_RUN" >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "gpu_all: wrote $OUT" >&2
! grep -q '^failed' "$WORK"/*.meta
