#!/usr/bin/env bash
# Submit a template in cluster/ with the allocation described by environment variables.
#
#   NODES=2 GPUS_PER_NODE=8 PARTITION=gpu TIME=2-00:00:00 CONFIG=... bash cluster/submit.sh distill
#   SLICES=16 DATASET=chestxray14 ROOT=... SHARDS=... bash cluster/submit.sh build_shards
#   RUN=runs/cxr14-rmsnet bash cluster/submit.sh evaluate
#
#   NODES          nodes                                   [1]
#   GPUS_PER_NODE  GPUs per node = tasks per node; 0 runs CPU ranks   [1]
#   TASKS_PER_NODE tasks per node when GPUS_PER_NODE=0     [1]
#   CPUS_PER_TASK  CPU cores per task (data decoding)      [8]
#   PARTITION      partition                               [the cluster's default]
#   TIME           time limit                              [the template's]
#   SLICES         build_shards only: array size           [8]
# Every other variable (CONFIG, OUT_DIR, RUN_NAME, SET, ROOT, SHARDS, RUN, ...) reaches the job
# unchanged (sbatch exports the environment). Extra arguments go to sbatch as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: cluster/submit.sh distill|build_shards|evaluate [sbatch options]}; shift
opts=()
[ -n "${PARTITION:-}" ] && opts+=(--partition "$PARTITION")
[ -n "${TIME:-}" ] && opts+=(--time "$TIME")
opts+=(--cpus-per-task "${CPUS_PER_TASK:-8}")
case $what in
    distill|evaluate)
        gpus=${GPUS_PER_NODE:-1}
        tasks=$gpus; [ "$gpus" -eq 0 ] && tasks=${TASKS_PER_NODE:-1}
        opts+=(--nodes "${NODES:-1}" --ntasks-per-node "$tasks" --gpus-per-node "$gpus") ;;
    build_shards)
        opts+=(--array "0-$((${SLICES:-8} - 1))") ;;
    *) echo "unknown template $what (distill | build_shards | evaluate)" >&2; exit 2 ;;
esac
exec sbatch "${opts[@]}" "$@" "cluster/$what.sbatch"
