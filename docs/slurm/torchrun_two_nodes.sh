#!/bin/bash
# The same commands under torchrun, without SLURM: run this on each of 2 machines that see the
# same filesystem (NODE_RANK=0 on the first, 1 on the second; MASTER = the first's address).
#   NODE_RANK=0 MASTER=10.0.0.1 bash docs/slurm/torchrun_two_nodes.sh fit abmil data.manifest=cohort.csv
set -euo pipefail
: "${NODE_RANK:?set NODE_RANK}" "${MASTER:?set MASTER}"
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
source .venv/bin/activate
extra=()
if [ "$1" = fit ]; then extra=(trainer.devices="$GPUS" trainer.num_nodes=2 trainer.strategy=ddp); fi
torchrun --nnodes=2 --nproc-per-node="$GPUS" --node-rank="$NODE_RANK" --master-addr="$MASTER" \
    --master-port=29500 -m wsi_lightning "$@" "${extra[@]}"
