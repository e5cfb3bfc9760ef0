#!/usr/bin/env bash
# One node, all of its GPUs (or NPROC of them): every argument goes to train.py.
#
#   bash launch/torchrun.sh --model meta-llama/Llama-3.1-8B --dataset my.jsonl --packing
#   NPROC=4 bash launch/torchrun.sh --lora --output-dir runs/x --resume auto
#
# SIGTERM / SIGUSR1 sent to this script reach every rank: train.py saves a checkpoint, and the launcher
# exits 0 once it has (1 when no rank saved); rerun with --resume auto.
# torchrun runs through launch/torchrun.py: a failed rank ends the run in one line, with its exit code.
# Multi-node: launch/slurm.sbatch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    (( NPROC > 0 )) || NPROC=1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# torchrun forwards these to the workers (torch >= 2.8; older versions ignore the variable)
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}  # seconds to save before SIGKILL
if [[ -n "${TORCHRUN:-}" ]]; then launcher=("$TORCHRUN"); else launcher=("${PYTHON:-python}" launch/torchrun.py); fi
exec "${launcher[@]}" --standalone --nproc_per_node "$NPROC" train.py "$@"
