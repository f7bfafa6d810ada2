# Rendezvous for one srun task per GPU, taken from the SLURM allocation (sourced by train.sbatch).
# Rank 0 lives on the allocation's first node; the port is derived from the job id, so two jobs
# that share a node do not collide, and a requeued job (same id) uses the same one.
# Each task then turns SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NTASKS_PER_NODE into
# RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (moss_train/distributed.py).
: "${SLURM_JOB_ID:?not inside a SLURM allocation (sbatch / salloc)}"
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
