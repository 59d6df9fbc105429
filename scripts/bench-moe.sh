#!/bin/bash
# Mixture-of-experts training speed, ferrotune against PyTorch + PEFT on tiny-mixtral (made by
# scripts/make_moe_bench_model.py: tiny-llama's dimensions, 8 experts of its MLP width, top 2).
# Rounds alternate torch, ferrotune, ferrotune, torch (ABBA), per configuration. Needs
# target/release/ferrotune and a Python with torch, transformers and peft (PY, default the
# fixtures venv). Prints one JSON line per run; the ferrotune lines carry the forward time of
# routing and dispatch as a share of the step, the torch lines (--profile) the router's and the
# experts' forward shares. Usage: bash scripts/bench-moe.sh [steps]
set -eu
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 RAYON_NUM_THREADS=2
PY=${PY:-$HOME/.cache/ferrotune/fixtures-venv/bin/python}
M=${MODEL:-$HOME/.cache/ferrotune-perf/models/tiny-mixtral}
STEPS=${1:-10}
FERROTUNE=${FERROTUNE:-target/release/ferrotune}
[ -f "$M/config.json" ] || $PY scripts/make_moe_bench_model.py "$M" >&2
run_t() { $PY scripts/bench_moe_torch.py --model "$M" --method "$1" --steps "$STEPS" --profile $2 2>/dev/null | tail -1; }
run_f() { "$FERROTUNE" bench train --model "$M" --method "$1" --steps "$STEPS" $2 | tail -1; }
cfg() { # method extra-args
  for r in 1 2; do
    if [ $r = 1 ]; then run_t "$@"; run_f "$@"; else run_f "$@"; run_t "$@"; fi
  done
}
cfg lora ""
cfg lora "--target-parameters gate_up_proj,down_proj"
cfg full ""
