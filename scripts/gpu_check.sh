#!/usr/bin/env bash
# CUDA checks of the CLIP stage, as one short script for a GPU machine:
#   1. the gpu-marked tests (CUDA similarity vs open_clip at bf16 / fp16 / fp32, safety on GPU);
#   2. scripts/bench_clip.py: pairs/s of the stage and of the raw forward (their ratio is the
#      efficiency) for en (ViT-B/32), multi (ViT-B/32 image + multilingual text model) and
#      ViT-L/14, at fp16 (configs/laion5b.yaml) and bf16, card named in the JSON;
#   3. scripts/precision_flips.py on CUDA: decisions that flip between fp32, bf16 and fp16.
# Weights are random-init with the real shapes (no downloads on these machines).
#
#   PYTHON=/path/to/python OUT=/tmp/gpu-out scripts/gpu_check.sh
# Results: $OUT/{pytest_gpu.txt,bench_fp16.json,bench_bf16.json,precision_flips.json,summary.txt}
set -u -o pipefail  # a failing test or bench fails the check, not only its last pipe
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-gpu-check-output}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
"$PY" - <<'PYEOF' | tee "$OUT/summary.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for m in ("open_clip", "transformers", "sentence_transformers", "ray"):
    try:
        importlib.import_module(m); print(m, "ok")
    except Exception as e:
        print(m, "MISSING", e)
PYEOF
status=0
timeout 300 "$PY" -m pytest -q -m gpu tests/test_clip_score.py tests/test_safety.py tests/test_text_tower.py \
    -p no:cacheprovider 2>&1 | tail -25 > "$OUT/pytest_gpu.txt" || status=1
cat "$OUT/pytest_gpu.txt"
for prec in fp16 bf16; do
  timeout 420 "$PY" scripts/bench_clip.py --device cuda --precision "$prec" \
      --models ViT-B-32,ViT-B-32+mclip,ViT-L-14 --n 20000 --batch-size 1024 --n-large 8000 \
      --batch-size-large 256 --rounds 3 > "$OUT/bench_$prec.json" 2> "$OUT/bench_$prec.log" || status=1
  tail -n +1 "$OUT/bench_$prec.json" | head -80
done
timeout 300 "$PY" scripts/precision_flips.py --device cuda --n 2000 > "$OUT/precision_flips.json" \
    2> "$OUT/precision_flips.log" || status=1
cat "$OUT/precision_flips.json"
echo "gpu_check status: $status" | tee -a "$OUT/summary.txt"
exit $status
