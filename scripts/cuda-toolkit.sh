#!/usr/bin/env bash
# scripts/cuda-toolkit.sh - the CUDA compiler for building ferrotune's `cuda` feature on a machine
# without a system CUDA (CI, this project's build machines), from PyPI.
#
#   eval "$(scripts/cuda-toolkit.sh)"        # installs once, then prints the exports below
#   cargo check --features cuda --bin ferrotune
#
# Prints (for eval):
#   PATH=<toolkit>/bin:$PATH  CUDA_ROOT=CUDA_PATH=<toolkit>  CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
#
# The pins are the set seen to compile sm_90 code that an H200 with driver 580 (CUDA 13.0)
# accepts: an unpinned nvidia-cuda-nvcc pulls nvidia-nvvm 13.5, whose PTX ISA 9.5 ptxas 13.0
# and that driver reject (shared/notes/gpu.md). Installed into $FERROTUNE_CACHE/cuda-venv
# (default ~/.cache/ferrotune/cuda-venv), ~270 MB; a second run only checks the stamp.
# A self-hoster with a system CUDA 12/13 toolkit does not need this: nvcc on PATH is enough.
set -euo pipefail

cache=${FERROTUNE_CACHE:-$HOME/.cache/ferrotune}
venv=$cache/cuda-venv
pins=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
stamp=$(printf '%s\n' "${pins[@]}")

log() { printf 'cuda-toolkit: %s\n' "$*" >&2; }

toolkit_dir() {
    "$venv/bin/python" - <<'PY'
import os, nvidia
base = os.path.join(list(nvidia.__path__)[0], "cu13")
print(base)
PY
}

ok() {
    [[ -x "$venv/bin/python" && -r "$venv/.ferrotune-pins" ]] || return 1
    [[ "$(cat "$venv/.ferrotune-pins")" == "$stamp" ]] || return 1
    local dir
    dir=$(toolkit_dir 2>/dev/null) || return 1
    "$dir/bin/nvcc" --version >/dev/null 2>&1
}

if ! ok; then
    mkdir -p "$cache"
    (
        flock -w 900 9 || { log "timed out waiting for $cache/cuda-venv.lock"; exit 1; }
        if ok; then exit 0; fi
        t0=$SECONDS
        rm -rf -- "$venv"
        log "installing ${pins[*]} into $venv"
        "${FERROTUNE_BOOTSTRAP_PYTHON:-python3}" -m venv "$venv"
        "$venv/bin/python" -m pip install --require-virtualenv --disable-pip-version-check --quiet "${pins[@]}" >&2
        printf '%s\n' "$stamp" >"$venv/.ferrotune-pins"
        ok || { log "the toolkit in $venv does not run nvcc"; exit 1; }
        log "ready ($((SECONDS - t0)) s)"
    ) 9>"$cache/cuda-venv.lock"
fi

dir=$(toolkit_dir)
printf 'export PATH=%q:"$PATH"\n' "$dir/bin"
printf 'export CUDA_ROOT=%q\n' "$dir"
printf 'export CUDA_PATH=%q\n' "$dir"
printf 'export CUDA_COMPUTE_CAP=%q\n' "${CUDA_COMPUTE_CAP:-90}"
