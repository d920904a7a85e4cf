#!/usr/bin/env bash
# Submit a training run to SLURM as one job over NODES nodes (launchers/slurm.sbatch):
#   bash launchers/submit.sh RECIPE NODES [a.b=c ...]
#   GPUS_PER_NODE=8 TIME=24:00:00 bash launchers/submit.sh recipes/flux_tdlora_zero2.yaml 4
# Validates the recipe first (one line per problem), prints the job id; the job's log is
# <run.output_dir>/<run.name>/slurm/<job>-<id>.out (appended across requeues). Before the time limit
# (SIGNAL_SECONDS, default 300) or on `scancel --signal=USR1 --batch JOBID` the job checkpoints and
# requeues itself; the requeued job resumes from the newest checkpoint.
# Knobs (env): GPUS_PER_NODE (→ --gpus-per-node; unset on CPU), NPROC_PER_NODE (ranks per node,
# default GPUS_PER_NODE or 1), LAUNCHER torchrun|deepspeed, TIME (--time), PARTITION, ACCOUNT,
# CPUS_PER_TASK, SIGNAL_SECONDS, RDZV_PORT, VENV, PYTHON (default python), SBATCH_EXTRA (more sbatch
# options, split on spaces), LAMBDAS (job array, see sweep.sh), DRY_RUN=1 (print the sbatch command).
# Environment variables of this shell reach the job (sbatch --export=ALL): e.g. DS_ACCELERATOR=cpu.
set -euo pipefail
if [ $# -lt 2 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,14p' "$0" | cut -c3-; exit 2
fi
cd "$(dirname "$0")/.."
RECIPE=$1; NODES=$2; shift 2
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || { echo "submit.sh: NODES must be a positive integer, got '$NODES'" >&2; exit 2; }
[ -z "${VENV:-}" ] || . "$VENV/bin/activate"
# The run folder from the recipe + overrides (this also validates them: exit 2, one line per problem).
run_dir=$(${PYTHON:-python} - "$RECIPE" "$@" <<'PY'
import sys
from dydit_scale.config import RecipeError, load_recipe
try:
    recipe = load_recipe(sys.argv[1], sys.argv[2:])
except RecipeError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
print(f"{recipe.run.output_dir}/{recipe.run.name}")
PY
)
opts=(--nodes="$NODES" --ntasks-per-node=1 --requeue --open-mode=append --export=ALL
      --signal="B:USR1@${SIGNAL_SECONDS:-300}")
if [ -n "${LAMBDAS:-}" ]; then  # job array: one task per λ, each its own run folder
  read -r -a lambdas <<< "$LAMBDAS"
  export SWEEP_NAME=${SWEEP_NAME:-$(basename "$run_dir")}
  log_dir="$(dirname "$run_dir")/$SWEEP_NAME-sweep/slurm"
  opts+=(--array="0-$((${#lambdas[@]} - 1))${ARRAY_LIMIT:+%$ARRAY_LIMIT}" --job-name="dydit-$SWEEP_NAME"
         --output="$log_dir/%x-%A_%a.out")
else
  log_dir="$run_dir/slurm"
  opts+=(--job-name="dydit-$(basename "$run_dir")" --output="$log_dir/%x-%j.out")
fi
[ -z "${GPUS_PER_NODE:-}" ] || opts+=(--gpus-per-node="$GPUS_PER_NODE")
[ -z "${TIME:-}" ] || opts+=(--time="$TIME")
[ -z "${PARTITION:-}" ] || opts+=(--partition="$PARTITION")
[ -z "${ACCOUNT:-}" ] || opts+=(--account="$ACCOUNT")
[ -z "${CPUS_PER_TASK:-}" ] || opts+=(--cpus-per-task="$CPUS_PER_TASK")
# shellcheck disable=SC2206
[ -z "${SBATCH_EXTRA:-}" ] || opts+=($SBATCH_EXTRA)
export NPROC_PER_NODE=${NPROC_PER_NODE:-${GPUS_PER_NODE:-1}}
command=(sbatch --parsable "${opts[@]}" launchers/slurm.sbatch "$RECIPE" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${command[@]}"; echo; exit 0; fi
mkdir -p "$log_dir"  # SLURM does not create the folder of --output
job=$("${command[@]}")
echo "submitted job $job; log: $log_dir/"
echo "$job"
