#!/usr/bin/env bash
# Peak resident memory of 'gammamod export' for the bench-size checkpoint and a 7B-shaped random
# checkpoint (p-MoD layout, Vicuna-7B + CLIP-L/336, fp16). Needs about 30 GB of free disk.
#   bash scripts/measure_export_rss.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-rss-work}
mkdir -p "$work"
gm=.venv/bin/gammamod
peak() { /usr/bin/time -f "%M %e" -o "$work/$1.rss" "${@:2}" > "$work/$1.log" 2>&1
         read -r kb secs < "$work/$1.rss"; echo "$1: peak RSS $((kb / 1024)) MiB, ${secs} s"; }
[ -d "$work/bench-p-mod" ] || $gm make-tiny "$work/bench-p-mod" --recipe p-mod --size bench --shard-mb 200
peak export-bench-fp32 $gm export "$work/bench-p-mod" "$work/bench-fp32" --force
peak export-bench-fp16 $gm export "$work/bench-p-mod" "$work/bench-fp16" --dtype fp16 --force
[ -d "$work/p-mod-7b" ] || .venv/bin/python scripts/make_7b_checkpoint.py "$work/p-mod-7b" --tokenizer-from "$work/bench-p-mod"
peak export-7b-fp16 $gm export "$work/p-mod-7b" "$work/7b-fp16" --dtype fp16 --force
du -sh "$work"/bench-p-mod "$work"/bench-fp32 "$work"/bench-fp16 "$work"/p-mod-7b "$work"/7b-fp16
