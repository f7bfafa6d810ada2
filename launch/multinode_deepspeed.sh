#!/usr/bin/env bash
# Train on several nodes with the deepspeed launcher and a hostfile. Arguments are moss-train's
# (Hydra overrides, --config-name=RECIPE), passed through unchanged.
#
#   HOSTFILE=hosts MASTER_ADDR=node0 launch/multinode_deepspeed.sh --config-name=moss16b_pretrain
#
# hostfile: one node per line, "hostname slots=GPUS", the first line hosts rank 0.
# With passwordless ssh (and pdsh) between the nodes, run this once, on the first node: the
# launcher starts every node. Without ssh (containers, Kubernetes), run it on every node with
# NODE_RANK=0..N-1 and the same HOSTFILE and MASTER_ADDR: each node starts its own processes.
# A restarted job continues from the run's `latest` checkpoint (trainer.resume=auto, the default).
#
#   HOSTFILE        required
#   MASTER_ADDR     the first node's address as the others reach it (ssh mode: found by deepspeed)
#   MASTER_PORT     default 29500
#   NODE_RANK       this node's line in the hostfile (0-based): no-ssh mode
#   MOSS_VENV       default .venv
#   MOSS_SKIP_PLAN  1: launch without asking moss-plan first whether the recipe fits
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/nccl_env.sh
bin=${MOSS_VENV:-.venv}/bin
hostfile=${HOSTFILE:?set HOSTFILE to a deepspeed hostfile (\"hostname slots=GPUS\" per line)}
[ -f "$hostfile" ] || { echo "multinode_deepspeed: no hostfile at $hostfile" >&2; exit 2; }

launcher=(--hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}")
[ -n "${MASTER_ADDR:-}" ] && launcher+=(--master_addr "$MASTER_ADDR")
[ -n "${NODE_RANK:-}" ] && launcher+=(--no_ssh --node_rank "$NODE_RANK")

# Before taking the nodes: does the recipe fit on them? (moss-plan exits 1 if not, 2 on a bad recipe)
if [ "${NODE_RANK:-0}" = 0 ] && [ "${MOSS_SKIP_PLAN:-0}" != 1 ]; then
  nodes=$(grep -cE '^[[:space:]]*[^#[:space:]]' "$hostfile")
  gpus=$(grep -m1 -oE 'slots=[0-9]+' "$hostfile" | cut -d= -f2)
  "$bin/moss-plan" "$@" cluster.nodes="$nodes" cluster.gpus_per_node="$gpus" || {
    echo "multinode_deepspeed: moss-plan rejected the recipe (MOSS_SKIP_PLAN=1 launches anyway)" >&2
    exit 1
  }
fi
exec "$bin/deepspeed" "${launcher[@]}" --module moss_train "$@"
