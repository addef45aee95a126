# Shared by the batch scripts in cluster/ (sourced from the repository root inside a job).

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON
export PYTHONUNBUFFERED=1

EXIT_PREEMPTED=75  # launcher/preemption.py: checkpoint written, run me again

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

run_dir_of() {  # the run directory a config + overrides resolve to (one place decides it)
    local config=$1; shift
    "$PYTHON" - "$config" "$@" <<'EOF'
import sys
from launcher.config import load_config
args, sets = sys.argv[2:], []
while args:
    flag, value, *args = args
    sets.append(value)
print(load_config(sys.argv[1], sets).run_dir.resolve())
EOF
}

requeue_or_exit() {  # $1 = the step's exit code, $2 = the run directory
    local rc=$1 run_dir=$2
    # The marker, not only the code: srun reports the highest task exit code, and the first rank
    # to leave with 75 can get a slower one killed (143) by --kill-on-bad-exit.
    if [ "$rc" -eq "$EXIT_PREEMPTED" ] || { [ "$rc" -ne 0 ] && [ -f "$run_dir/PREEMPTED" ]; }; then
        echo "$(date -Is) job $SLURM_JOB_ID checkpointed on request; requeueing" \
             "(restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "$(date -Is) job $SLURM_JOB_ID step ended with exit code $rc"
    exit "$rc"
}
