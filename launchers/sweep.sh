#!/usr/bin/env bash
# A λ sweep as one SLURM job array: task i trains dynamic.target_flops_ratio = the i-th λ into its own
# run folder <run.output_dir>/<run.name>-lam<λ> (checkpoints, requeue and resume as in submit.sh):
#   bash launchers/sweep.sh RECIPE NODES "0.4 0.5 0.6 0.7" [a.b=c ...]
#   ARRAY_LIMIT=2 bash launchers/sweep.sh recipes/flux_tdlora_zero2.yaml 2 "0.5 0.7"   # 2 at a time
# Logs: <run.output_dir>/<run.name>-sweep/slurm/<job>-<array job>_<task>.out. Same knobs as submit.sh.
set -euo pipefail
if [ $# -lt 3 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,6p' "$0" | cut -c3-; exit 2
fi
RECIPE=$1; NODES=$2; LAMBDAS=$3; shift 3
for lam in $LAMBDAS; do
  [[ "$lam" =~ ^(0(\.[0-9]+)?|1(\.0+)?)$ ]] || { echo "sweep.sh: λ must be a number in [0, 1], got '$lam'" >&2; exit 2; }
done
LAMBDAS=$LAMBDAS exec bash "$(dirname "$0")/submit.sh" "$RECIPE" "$NODES" "$@"
