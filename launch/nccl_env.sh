# NCCL settings for multi-node GPU runs, sourced by launch/multinode_deepspeed.sh and
# launch/slurm/train.sbatch. A value already in the environment wins, so a site sets its own.
# The deepspeed launcher forwards NCCL_* variables to the other nodes itself; anything else a
# remote node needs goes into a .deepspeed_env file (one VAR=value per line) in this directory.

# Warnings only (ring / tree set-up, InfiniBand errors); NCCL_DEBUG=INFO shows the topology and
# which transport each peer uses (NVLink, IB with GPUDirect RDMA, or the socket fallback).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Bootstrap and socket traffic on the cluster network, never loopback or container bridges.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
# InfiniBand retries: ride out short fabric hiccups instead of failing a 512-GPU job
# (timeout = 4.096 us x 2^NCCL_IB_TIMEOUT per retry).
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_IB_RETRY_CNT=${NCCL_IB_RETRY_CNT:-7}
# Which HCAs to use: NCCL takes all by default. Pin them where a node has NICs that are not on
# the training fabric (e.g. NCCL_IB_HCA=mlx5_0,mlx5_1,...); leave unset otherwise.
# export NCCL_IB_HCA=mlx5

# Failures: torch >= 2.2 aborts a process whose collective fails or exceeds the recipe's
# cluster.collective_timeout_s (TORCH_NCCL_ASYNC_ERROR_HANDLING=3 is its default), and
# moss-train exits non-zero naming the rank, so the launcher / srun ends the whole job.
