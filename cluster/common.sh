# Shared by the batch scripts in cluster/ (sourced from the repository root inside a job).

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON
export PYTHONUNBUFFERED=1
# SLURM 22.05+ no longer passes sbatch's --cpus-per-task on to srun: without this, each rank could
# be bound to one core, starving DALI's decoding threads.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi


check_one_task_per_gpu() {
    # One rank per GPU: more tasks than GPUs would share devices, fewer would leave some idle.
    local gpus=${SLURM_GPUS_PER_NODE:-0} tasks=${SLURM_NTASKS_PER_NODE:-}
    gpus=${gpus##*:}  # "a100:8" -> 8
    if [ "$gpus" != 0 ] && [ -n "$tasks" ] && [ "$gpus" != "$tasks" ]; then
        echo "error: --gpus-per-node=$gpus but --ntasks-per-node=$tasks; one task per GPU" \
             "(set both to the same number)" >&2
        exit 2
    fi
}

set_rendezvous() {
    # Ranks come from SLURM's variables only: rank variables inherited from the submitting shell
    # (say, sbatch called from inside a torchrun job) would override them in launcher/dist.py.
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE LOCAL_SIZE TORCHELASTIC_RUN_ID
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    # Not an inherited MASTER_PORT: a stale one from the submitting shell may be taken. The batch
    # script runs on the allocation's first node (MASTER_ADDR), so a port free there now is the
    # one for rank 0; two jobs sharing a node then never pick the same one. Fallback: the job id.
    local free
    free=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])' \
           2>/dev/null) || free=$((20000 + SLURM_JOB_ID % 20000))
    MASTER_PORT=${RMS_MASTER_PORT:-$free}
    export MASTER_ADDR MASTER_PORT
}

run_dir_of() {  # the run directory a config + overrides resolve to (one place decides it)
    local config=$1; shift
    "$PYTHON" - "$config" "$@" <<'EOF'
import sys
from launcher.config import ConfigError, load_config
args, sets = sys.argv[2:], []
while args:
    flag, value, *args = args
    sets.append(value)
try:
    print(load_config(sys.argv[1], sets).run_dir.resolve())
except (ConfigError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
EOF
}

requeue_or_exit() {  # $1 = the step's exit code, $2 = the run directory
    local rc=$1 run_dir=$2
    # Requeue only on the marker rank 0 writes after every rank has checkpointed: a rank's exit
    # code alone could be 75 while another failed for real (srun reports the highest code), and
    # requeueing that would loop.
    if [ -f "$run_dir/PREEMPTED" ]; then
        echo "$(date -Is) job $SLURM_JOB_ID checkpointed on request ($(cat "$run_dir/PREEMPTED"));" \
             "requeueing (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "$(date -Is) job $SLURM_JOB_ID step ended with exit code $rc"
    exit "$rc"
}
