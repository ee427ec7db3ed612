#!/usr/bin/env bash
# GALA on iNaturalist 2018 across several GPU nodes: sbatch slurm/inat_gala.sh
#
# One Slurm task per node runs Accelerate's launcher, which starts one training process per GPU of
# that node; the processes of all nodes meet at the first node of the allocation. Every path and
# size below can be changed through the environment, so the same script runs a tiny CPU job on a
# test cluster (tests/test_slurm.py):
#   CONFIG=configs/debug.yaml GPUS_PER_NODE=1 sbatch --gres=none --cpus-per-task=2 ... slurm/inat_gala.sh
#
#SBATCH --job-name=inat-gala
#SBATCH --nodes=2
# One task per node: the task is the node's launcher, not a training process.
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
# Requeue on node failure or preemption; the rerun resumes from the newest checkpoint.
#SBATCH --requeue
# 5 minutes before the time limit every task gets SIGTERM: accelerate passes it on to the training
# processes, which save a checkpoint at the next step and exit with 99; the job then requeues
# itself below. (Keep checkpoints faster than torch's 30 s grace before SIGKILL.)
#SBATCH --signal=TERM@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

CONFIG="${CONFIG:-configs/inat2018.yaml}"
RUN_DIR="${RUN_DIR:-runs/inat2018}"
SHARDS="${SHARDS:-}"                                   # empty: the config's data.shards
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"                    # training processes per node
# A port of this job's own: jobs sharing a head node must not meet at the same rendezvous.
PORT="${PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 30000))}"
# DDP with bf16 autocast by default (docs/training.md: ZeRO saves nothing worth its collectives
# for a 25 M-parameter CNN); configs/deepspeed/zero2.json for models where it pays.
DEEPSPEED_CONFIG="${DEEPSPEED_CONFIG:-none}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"                      # requeues before giving up
EXTRA_ARGS="${EXTRA_ARGS:-}"                           # more key=value overrides
VENV="${VENV:-.venv}"

# shellcheck disable=SC1091
[ -f "$VENV/bin/activate" ] && source "$VENV/bin/activate"

# Torch builds DeepSpeed's JIT ops under a lock; a build killed by a preemption leaves it, and a
# home folder shared between jobs and venvs would make every later job wait on it. Each job and
# node builds in a folder of its own (node-local; a restart counts as a new job).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${SLURM_TMPDIR:-/tmp}/gala-torch-extensions-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}}"

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
NUM_NODES="${SLURM_NNODES:-1}"
RESTARTS="${SLURM_RESTART_COUNT:-0}"
echo "[inat_gala] job $SLURM_JOB_ID, $NUM_NODES nodes x $GPUS_PER_NODE processes, head $HEAD_NODE," \
     "port $PORT, restart $RESTARTS of at most $MAX_RESTARTS"

OVERRIDES=("run_dir=$RUN_DIR")
[ -n "$SHARDS" ] && OVERRIDES+=("data.shards=$SHARDS")
# shellcheck disable=SC2206
OVERRIDES+=($EXTRA_ARGS)

# Every process runs data.num_workers DALI threads (or DataLoader workers): a task with fewer
# CPUs than that starves the GPUs all run long. A bad config also stops here, not in the queue.
WORKERS=$(python -m gala_scale.train --config "$CONFIG" --get data.num_workers "${OVERRIDES[@]}")
CPUS="${SLURM_CPUS_PER_TASK:-0}"
if [ "$CPUS" -lt $((GPUS_PER_NODE * WORKERS)) ]; then
    echo "[inat_gala] error: --cpus-per-task=$CPUS is fewer than $GPUS_PER_NODE processes x" \
         "$WORKERS data.num_workers = $((GPUS_PER_NODE * WORKERS)) CPUs a node; raise" \
         "--cpus-per-task or lower data.num_workers" >&2
    exit 1
fi

# The config file is named so that a user's default Accelerate config cannot leak in; the
# command line overrides its sizes for this allocation.
ACCELERATE_CONFIG=configs/accelerate/multi_node.yaml
[ "$DEEPSPEED_CONFIG" != "none" ] && ACCELERATE_CONFIG=configs/accelerate/multi_node_deepspeed.yaml
# `python -m accelerate.commands.launch` is `accelerate launch` without the CLI's import of its
# other subcommands (seconds a node, before any process starts).
LAUNCH=(python -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG"
        --num_machines "$NUM_NODES" --num_processes $((NUM_NODES * GPUS_PER_NODE))
        --main_process_ip "$HEAD_NODE" --main_process_port "$PORT" --dynamo_backend no)
if [ "$DEEPSPEED_CONFIG" != "none" ]; then
    # The default multi-node launcher of DeepSpeed is pdsh; Slurm already starts one launcher per
    # node, so each must start only its own processes: "standard".
    LAUNCH+=(--use_deepspeed --deepspeed_config_file "$DEEPSPEED_CONFIG"
             --deepspeed_multinode_launcher standard)
else
    LAUNCH+=(--multi_gpu)
fi

rm -f "$RUN_DIR/exit_status"
# --machine_rank must be each node's own SLURM_NODEID, so the command is expanded in each task.
TASK="$(printf '%q ' "${LAUNCH[@]}") --machine_rank \$SLURM_NODEID -m gala_scale.train \
$(printf '%q ' --config "$CONFIG" --resume auto "${OVERRIDES[@]}")"
set +e
# Since Slurm 22.05 a step does not inherit the job's --cpus-per-task: pass it on, or the node's
# launcher, its processes and their DALI threads share one CPU.
srun --kill-on-bad-exit=1 --cpus-per-task="$CPUS" bash -c "$TASK"
STATUS=$?
set -e

TRAINER_STATUS=$(cat "$RUN_DIR/exit_status" 2>/dev/null || echo "none")
echo "[inat_gala] srun exit $STATUS, trainer exit $TRAINER_STATUS"
if [ "$STATUS" = 0 ] && [ "$TRAINER_STATUS" = 0 ]; then
    exit 0
fi
# 2: a bad config or data set, found at start-up; 3: met while training (a non-finite loss, a
# sample that does not decode, a lost best/). A rerun would fail the same way: do not requeue.
if [ "$TRAINER_STATUS" = 2 ] || [ "$TRAINER_STATUS" = 3 ]; then
    echo "[inat_gala] the trainer failed in a way a restart repeats (exit $TRAINER_STATUS)" >&2
    exit 1
fi
if [ "$RESTARTS" -ge "$MAX_RESTARTS" ]; then
    echo "[inat_gala] stopped after $RESTARTS restarts; not requeueing" >&2
    exit 1
fi
echo "[inat_gala] requeueing (trainer exit $TRAINER_STATUS)"
scontrol requeue "$SLURM_JOB_ID"
