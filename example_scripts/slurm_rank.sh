#!/usr/bin/env bash
# One rank of a SLURM job (srun runs this once per task): SLURM's task ids become the trainer's
# rank, world size and local GPU, and MASTER_ADDR/MASTER_PORT the rendezvous (env://), as
# under torchrun. Flags pass through to dist_clm_train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
exec python dist_clm_train.py "$@"
