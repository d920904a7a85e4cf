#!/usr/bin/env bash
# Train on several nodes listed in a DeepSpeed hostfile (format: hostfile.example, one
# `host slots=N` line per node). The run folder (run.output_dir) must be on a shared filesystem.
#
# A) over ssh (DeepSpeed's default pdsh launcher), started once, on the first host:
#      HOSTFILE=hostfile bash launchers/train_hostfile.sh RECIPE [a.b=c ...]
#    needs passwordless ssh to every host and pdsh; the same checkout and venv path on every host.
#    pdsh forwards only a few env prefixes: this script writes the others (DS_ACCELERATOR,
#    OMP_NUM_THREADS, TORCH_EXTENSIONS_DIR, HF_*, GLOO_*, NCCL_*, DYDIT_* ... when set) into a
#    .deepspeed_env file (DS_ENV_FILE, default a temp file) which the runner exports on every host, and
#    passes --venv_script $VENV/bin/activate when VENV is set. Stop it with Ctrl-C on the first host
#    (the runner then runs `pkill -f <its command>` on every host).
# B) without ssh (--no_ssh): start it on every host yourself, with that host's NODE_RANK:
#      NO_SSH=1 NODE_RANK=0 MASTER_ADDR=10.0.0.1 HOSTFILE=hostfile bash launchers/train_hostfile.sh RECIPE ...
#      NO_SSH=1 NODE_RANK=1 MASTER_ADDR=10.0.0.1 HOSTFILE=hostfile bash launchers/train_hostfile.sh RECIPE ...
#    MASTER_ADDR is node 0's address as the others reach it (required); host names in the
#    hostfile must differ but need not resolve.
# Knobs (env): HOSTFILE (default ./hostfile), MASTER_ADDR (pdsh: default the first host), MASTER_PORT
# (default 29500), NUM_NODES (default: hosts in the hostfile), NGPU (ranks per node; default the
# hostfile's slots), NO_SSH, NODE_RANK, VENV, DEEPSPEED (launcher command), OMP_NUM_THREADS (default 1).
# On CPU also DS_ACCELERATOR=cpu; between network namespaces or multi-homed hosts GLOO_SOCKET_IFNAME
# (CPU) / NCCL_SOCKET_IFNAME (GPU) name the interface to use.
set -euo pipefail
if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,26p' "$0" | cut -c3-; exit 2
fi
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:-hostfile}
[ -f "$HOSTFILE" ] || { echo "train_hostfile.sh: no hostfile at $HOSTFILE (see hostfile.example)" >&2; exit 2; }
HOSTS=$(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF {print $1}')
NUM_NODES=${NUM_NODES:-$(echo "$HOSTS" | grep -c .)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
args=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
[ -z "${NGPU:-}" ] || args+=(--num_gpus "$NGPU")
if [ "${NO_SSH:-0}" = 1 ]; then
  [ -n "${NODE_RANK:-}" ] || { echo "train_hostfile.sh: NO_SSH=1 needs NODE_RANK (0..$((NUM_NODES - 1)))" >&2; exit 2; }
  [ -n "${MASTER_ADDR:-}" ] || { echo "train_hostfile.sh: NO_SSH=1 needs MASTER_ADDR (node 0's address)" >&2; exit 2; }
  if [ -z "${NGPU:-}" ]; then  # --no_ssh with --num_nodes needs --num_gpus: take this node's slots
    NGPU=$(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF' | sed -n "$((NODE_RANK + 1))p" | sed -n 's/.*slots=\([0-9]*\).*/\1/p')
    args+=(--num_gpus "${NGPU:-1}")
  fi
  args+=(--no_ssh --num_nodes "$NUM_NODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
else
  args+=(--master_addr "${MASTER_ADDR:-$(echo "$HOSTS" | head -n1)}")
  [ -z "${VENV:-}" ] || args+=(--venv_script "$VENV/bin/activate")
  if [ -z "${DS_ENV_FILE:-}" ] && [ ! -f .deepspeed_env ] && [ ! -f "$HOME/.deepspeed_env" ]; then
    DS_ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/dydit-deepspeed_env.XXXXXX")
    env | grep -E '^(DS_ACCELERATOR|OMP_NUM_THREADS|TORCH_EXTENSIONS_DIR|HF_[A-Z_]+|TRANSFORMERS_OFFLINE|GLOO_[A-Z_]+|NCCL_[A-Z_]+|DYDIT_[A-Z_]+|CUDA_VISIBLE_DEVICES)=' \
      > "$DS_ENV_FILE" || true
    export DS_ENV_FILE
    echo "train_hostfile.sh: exporting to every host via $DS_ENV_FILE: $(cut -d= -f1 "$DS_ENV_FILE" | tr '\n' ' ')" >&2
  fi
fi
exec ${DEEPSPEED:-deepspeed} "${args[@]}" --module dydit_scale.train "$@"
