#!/usr/bin/env bash
# Train on one node with the DeepSpeed launcher, one rank per GPU (or per CPU "slot"):
#   bash launchers/train_node.sh RECIPE [a.b=c ...]
#   NGPU=8 bash launchers/train_node.sh recipes/flux_tdlora_zero2.yaml optim.lr=5e-5
# Runs `deepspeed --num_gpus $NGPU --master_port $MASTER_PORT --module dydit_scale.train RECIPE ...`.
# Knobs (env): NGPU ranks (default: visible GPUs, else 1), MASTER_PORT (default 29500; give each
# concurrent run its own), DEEPSPEED (launcher command, default `deepspeed` on PATH: activate the
# venv first), OMP_NUM_THREADS (default 1). On CPU set DS_ACCELERATOR=cpu, e.g.
#   DS_ACCELERATOR=cpu NGPU=2 bash launchers/train_node.sh recipes/tiny_cpu.yaml
# Checkpoints and resume follow the recipe (checkpoint.resume: auto continues the run's newest step).
set -euo pipefail
if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,11p' "$0" | cut -c3-; exit 2
fi
cd "$(dirname "$0")/.."
if [ -z "${NGPU:-}" ]; then
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NGPU:-0}" -gt 0 ] || NGPU=1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec ${DEEPSPEED:-deepspeed} --num_gpus "$NGPU" --master_port "${MASTER_PORT:-29500}" \
  --module dydit_scale.train "$@"
