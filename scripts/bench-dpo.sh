#!/bin/bash
# DPO training speed, ferrotune against PyTorch + PEFT, alternating torch, ferrotune, ferrotune, torch
# per configuration. Needs target/release/ferrotune and the perf venv and models
# (bash ../shared/perf/setup.sh). Prints one JSON line per run (BENCHMARKS.md has the figures).
# ABBA: torch, ferrotune, ferrotune, torch per round.
set -eu
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 RAYON_NUM_THREADS=2
PY=$HOME/.cache/ferrotune-perf/.venv/bin/python
M=$HOME/.cache/ferrotune-perf/models
run_t() { $PY scripts/bench_dpo_torch.py --model $M/$1 --method $2 --batch $3 --seq $4 --steps $5 | tail -1; }
run_f() { target/release/ferrotune bench train --model $M/$1 --method $6 --batch $3 --seq $4 --steps $5 | tail -1; }
cfg() { # model torch_method batch seq steps ferrotune_method
  for r in 1 2; do
    if [ $r = 1 ]; then run_t "$@"; run_f "$@"; else run_f "$@"; run_t "$@"; fi
  done
}
cfg tiny-llama lora 4 128 20 dpo
cfg tiny-llama full 4 128 20 dpo-full
cfg small-llama lora 2 256 5 dpo
