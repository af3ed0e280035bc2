#!/usr/bin/env bash
# A judge cascade measured with real weights: Qwen3Guard-Gen-0.6B then SODA, on the shared
# datasets, in one `soda-guard eval` run per dataset that also judges every record with SODA
# alone. Prints the cascade table (settle shares, latency p50/p95 per stage and end to end,
# recall/FPR of the cascade and of SODA alone); report.json per dataset under $OUT.
#
#   SCREEN_MODEL=/models/Qwen3Guard-Gen-0.6B SODA_MODEL=/models/SODA-Agent-Safety-Judge \
#     bash benchmarks/cascade.sh [DATASET ...]
#
# Defaults: both shared datasets, per-step (a judgment before every tool call, as the guard
# runs). Needs the [local] and [eval] extras; a GPU makes it minutes instead of hours.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SCREEN_MODEL:?set SCREEN_MODEL to a Qwen3Guard-Gen folder or hub id}"
: "${SODA_MODEL:?set SODA_MODEL to the SODA judge folder or hub id}"
out="${OUT:-cascade-out}"
mkdir -p "$out"
policy="$out/cascade.yaml"
sed -e "s|SCREEN_MODEL|$SCREEN_MODEL|" -e "s|SODA_MODEL|$SODA_MODEL|" benchmarks/cascade.yaml > "$policy"
datasets=("$@")
[ ${#datasets[@]} -gt 0 ] || datasets=(../shared/datasets/rjudge.json ../shared/datasets/agentharm_trajectories.json)
for dataset in "${datasets[@]}"; do
    name="$(basename "$dataset" .json)"
    python -m soda_guard eval "$dataset" --policy "$policy" --per-step --out "$out/$name" --quiet
done
