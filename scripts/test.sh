#!/usr/bin/env bash
# The README's test command: set up the environment, then run the whole suite (slow tests included).
#
# As root on a Debian machine it also starts a local SLURM (cluster/local/slurm.sh: two nodes in
# network namespaces, or one node where namespaces are not allowed) for tests/test_slurm.py, and
# stops it afterwards; it never touches a SLURM it did not configure (a real cluster node's).
# RMS_SLURM=off leaves SLURM alone (those tests then skip). RMS_REQUIRE_SLURM=1 (set by .ci/run)
# makes a SLURM that cannot be started a failure instead of a skip.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh || exit 1
. "${VENV:-.venv}/bin/activate"
if [ "${RMS_SLURM:-on}" != off ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  if bash cluster/local/slurm.sh up --nodes 2 || { [ $? -ne 3 ] && bash cluster/local/slurm.sh up; }; then
    slurm_started=1
    trap 'bash cluster/local/slurm.sh down' EXIT  # leave no daemon behind, even on Ctrl-C
  else
    echo "warning: could not start a local SLURM; tests/test_slurm.py will skip" >&2
  fi
fi
# DeepSpeed's CPU all-reduce segments that no process maps any more (left by runs before
# launcher.dist.release_shm_names, or killed during start-up) hold ~69 MB of RAM each in /dev/shm.
stale=0
for f in /dev/shm/deepspeed_allreduce_buffer_*; do
  [ -O "$f" ] || continue
  grep -qsF "$f" /proc/[0-9]*/maps || { rm -f "$f" && stale=$((stale + 1)); }
done
[ "$stale" -eq 0 ] || echo "removed $stale stale DeepSpeed shared-memory segments from /dev/shm" >&2
python -m pytest "$@"
rc=$?
if [ -n "${slurm_started:-}" ]; then
  trap - EXIT
  # A daemon the suite started that outlives it fails the run (slurm.sh down names it).
  bash cluster/local/slurm.sh down || { echo "error: SLURM daemons outlived the test suite" >&2; [ "$rc" -ne 0 ] || rc=1; }
fi
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
