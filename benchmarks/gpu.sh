#!/usr/bin/env bash
# The issue-16 GPU check, one script: the CUDA tests (engine in bfloat16 against `generate`,
# compiled decode, the stream model on the GPU), then the judging benchmark on a random
# Qwen3-4B-shape judge in bfloat16 (20-step trajectory judged at every call, 8 concurrent
# judgments, 8 parallel calls, 24 generated tokens each) printing the roofline floor and the
# measured/floor ratio, then the warm-up benchmark on the same shape. About 4-6 minutes on one
# H100/H200; each part has its own time limit so the whole stays under 10 (one device call's
# limit). Run from anywhere: `bash benchmarks/gpu.sh` (needs a CUDA torch).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
out="${OUT:-benchmarks}"
mkdir -p "$out"

python - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device: this script is the GPU check"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY

echo "== CUDA tests"
timeout 180 python -m pytest -q -p no:cacheprovider -m cuda \
    tests/test_engine_bfloat16.py tests/test_engine_backend.py tests/test_stream_model.py 2>&1 | tail -15
tests=${PIPESTATUS[0]}

echo "== judging benchmark (cuda, Qwen3-4B shape, bf16)"
timeout 300 python -m soda_guard bench --device cuda --section judging --json > "$out/gpu-judging.json"
bench=$?
python - "$out/gpu-judging.json" <<'PY'
import json, sys
figures = json.load(open(sys.argv[1]))
for key in ("judging_device", "incremental_speedup", "batch_speedup", "batch_speedup_steady_state",
            "batch_speedup_parallel_calls", "judging_roofline_floor_ms", "judging_measured_p50_ms",
            "judging_measured_over_floor_p50"):
    print(f"{key}: {figures.get(key)}")
PY
echo "== warm-up benchmark (cuda, Qwen3-4B shape, bf16): model response to decision, cold and warmed"
timeout 120 python benchmarks/bench_warmup.py --device cuda --repeat 3 | tee "$out/gpu-warmup.txt"
warmup=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench, warm-up exit $warmup"
exit $(( tests || bench || warmup ))
