#!/usr/bin/env bash
# First check on one CUDA GPU, in at most 8 minutes: fast-path parity with SDPA and xformers (bf16),
# `dydit-bench infer` of the released-width presets with each attention backend, and one DeepSpeed
# TD-LoRA step of a random-weight FLUX.1-dev replica at 1024², printed as one table:
#   bash launchers/gpu_check.sh [--out DIR] [--json] [--skip parity|infer|train] [--budget SECONDS]
#   bash launchers/gpu_check.sh --allow-cpu        # no GPU: the same steps at tiny sizes on CPU
# Runs `dydit-bench gpu-check "$@"` (all options: dydit-bench gpu-check --help). Logs, summary.json, the
# replica, shards and training run go under --out (default runs/gpu_check). Exit 0: no check failed;
# 1: a check failed; 2: no CUDA device (without --allow-cpu).
# Knobs (env): VENV (activated if set; else .venv when present and no venv is active), TIMEOUT (hard
# limit in seconds for the whole check, default 480; the sub-steps share --budget, 450 s by default,
# each within its own limit), TORCH_EXTENSIONS_DIR (default .torch_extensions).
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,12p' "$0" | cut -c3-; exit 0
fi
cd "$(dirname "$0")/.."
if [ -n "${VENV:-}" ]; then
  . "$VENV/bin/activate"
elif [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  . .venv/bin/activate
fi
: "${TORCH_EXTENSIONS_DIR:=$PWD/.torch_extensions}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR
# SIGTERM at TIMEOUT lets gpu-check stop the running step's process group; SIGKILL 30 s later.
exec timeout --kill-after=30 "${TIMEOUT:-480}" dydit-bench gpu-check "$@"
