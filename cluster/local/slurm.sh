#!/usr/bin/env bash
# A real SLURM on this machine, for testing the templates in cluster/ (run as root).
#
#   bash cluster/local/slurm.sh up [--nodes N]   install (Debian: slurm-wlm, munge), configure, start
#   bash cluster/local/slurm.sh down             stop every daemon this script started (munged
#                                                only if it was not running before `up`); exit 1
#                                                naming any that is still running
#   bash cluster/local/slurm.sh status           sinfo
#
# --nodes 1 (default): one node named after `hostname -s`, slurmctld and slurmd on the host.
# --nodes N > 1: N nodes node1..nodeN, each slurmd in its own network and UTS namespace (its own
#   IP address on a bridge, its own host name), the controller on the host; they share the host's
#   filesystem, as cluster nodes share a network filesystem. Jobs then really span hosts as far as
#   the network is concerned: srun starts tasks through each node's slurmd, and torch.distributed
#   connects the ranks over the bridge. Needs CAP_NET_ADMIN (ip netns, veth, bridge).
#
# Settings (docs/design.md, "Local SLURM for tests"): munge authentication, select/cons_tres, proctrack/linuxproc, task/none,
# SlurmUser=root, JobRequeue=1 (the preemption test requeues jobs). No accounting daemon: job
# history comes from `scontrol show job` and the jobs' own logs.
set -euo pipefail

CONF_DIR=${RMS_SLURM_CONF_DIR:-/etc/slurm}  # overridable for the script's own tests only
STATE=/var/spool/rmsdistill-slurm
BRIDGE=rmsbr0
SUBNET=10.77.0

log() { echo "[slurm.sh] $*" >&2; }

MARKER="# Written by cluster/local/slurm.sh"

refuse_foreign() {  # never touch a SLURM this script did not configure (a real cluster node)
    if [ -e "$CONF_DIR/slurm.conf" ] && [ "$(head -c ${#MARKER} "$CONF_DIR/slurm.conf")" != "$MARKER" ]; then
        log "$CONF_DIR/slurm.conf was not written by this script: refusing to replace it or to stop"
        log "its daemons (this script is for test machines; RMS_SLURM=off skips it in scripts/test.sh)"
        exit 3
    fi
    if [ ! -e "$CONF_DIR/slurm.conf" ] && { pgrep -x slurmctld || pgrep -x slurmd; } >/dev/null 2>&1; then
        log "SLURM daemons are running with no configuration of this script's: refusing to stop them"
        exit 3
    fi
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || {
        apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }
}

start_munge() {
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
    chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
    if ! munge -n >/dev/null 2>&1; then
        mkdir -p "$STATE" && touch "$STATE/munged.ours"  # started here: `down` stops it again
        if id munge >/dev/null 2>&1; then
            runuser -u munge -- /usr/sbin/munged
        else
            /usr/sbin/munged --force
        fi
        for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
    fi
    munge -n | unmunge >/dev/null
}

node_hw() {  # "CPUs=2 Boards=1 ... RealMemory=24105" from slurmd -C, minus the node name
    slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //'
}

write_conf() {  # $1 = number of nodes
    local n=$1 hw ctl_host nodes
    hw=$(node_hw)
    mkdir -p "$CONF_DIR" "$STATE"/ctld "$STATE"/log
    if [ "$n" -eq 1 ]; then
        ctl_host=$(hostname -s)
        nodes="NodeName=$(hostname -s) $hw State=UNKNOWN"
    else
        ctl_host="$(hostname -s)($SUBNET.1)"
        nodes=""
        for i in $(seq "$n"); do
            nodes+="NodeName=node$i NodeAddr=$SUBNET.$((10 + i)) $hw State=UNKNOWN"$'\n'
        done
    fi
    cat > "$CONF_DIR/slurm.conf.tmp" <<EOF
$MARKER: a local test cluster of $n node(s).
ClusterName=rmsdistill
SlurmctldHost=$ctl_host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Step credentials live 20 s (default 120); it is also the delay before a requeued job may start
# again, which the requeue test waits out.
AuthInfo=cred_expire=20
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=3600
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=60
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
$nodes
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$CONF_DIR/slurm.conf.tmp" "$CONF_DIR/slurm.conf"
    if [ "$n" -eq 1 ]; then mkdir -p "$STATE/slurmd-$(hostname -s)"; else
        for i in $(seq "$n"); do mkdir -p "$STATE/slurmd-node$i"; done; fi
}

hosts_entries() {  # node names must resolve everywhere (MASTER_ADDR is the first node's name)
    local n=$1 tmp
    tmp=$(mktemp)
    grep -v '# rmsdistill-slurm$' /etc/hosts > "$tmp" || true
    for i in $(seq "$n"); do echo "$SUBNET.$((10 + i)) node$i # rmsdistill-slurm" >> "$tmp"; done
    cat "$tmp" > /etc/hosts && rm -f "$tmp"
}

make_network() {  # a bridge on the host and one namespace per node, attached by a veth pair
    local n=$1
    ip link show "$BRIDGE" >/dev/null 2>&1 || {
        ip link add "$BRIDGE" type bridge
        ip addr add "$SUBNET.1/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
    }
    for i in $(seq "$n"); do
        ip netns list | grep -qw "rms-node$i" && continue
        ip netns add "rms-node$i"
        ip link add "rmsh$i" type veth peer name "rmsn$i"
        ip link set "rmsn$i" netns "rms-node$i"
        ip link set "rmsh$i" master "$BRIDGE"
        ip link set "rmsh$i" up
        ip netns exec "rms-node$i" ip addr add "$SUBNET.$((10 + i))/24" dev "rmsn$i"
        ip netns exec "rms-node$i" ip link set "rmsn$i" up
        ip netns exec "rms-node$i" ip link set lo up
    done
}

wait_idle() {  # until every node is idle (or fail with the controller's view and logs)
    local n=$1
    for _ in $(seq 120); do
        if [ "$(sinfo -h -t idle -o '%D' 2>/dev/null | awk '{s+=$1} END {print s+0}')" -ge "$n" ]; then
            sinfo
            return 0
        fi
        sleep 0.5
    done
    sinfo -N -l || true
    tail -n 30 "$STATE"/log/*.log >&2 || true
    log "nodes did not come up"
    return 1
}

up() {
    local n=1
    while [ $# -gt 0 ]; do
        case $1 in
            --nodes) n=$2; shift 2 ;;
            *) log "unknown option $1"; exit 2 ;;
        esac
    done
    down quiet
    install_packages
    start_munge
    write_conf "$n"
    if [ "$n" -gt 1 ]; then
        make_network "$n"
        hosts_entries "$n"
    fi
    slurmctld -i
    if [ "$n" -eq 1 ]; then
        slurmd
    else
        for i in $(seq "$n"); do
            # Its own host name (slurmd finds its NodeName from it; jobs see node$i) and address.
            # nsenter, not `ip netns exec`: the latter remounts /sys, hiding /sys/fs/cgroup from slurmd.
            nsenter --net=/var/run/netns/rms-node$i unshare --uts sh -c "hostname node$i && exec slurmd"
        done
    fi
    wait_idle "$n"
}

down() {
    local quiet=${1:-}
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmstepd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 50); do { pgrep -x slurmd || pgrep -x slurmctld; } >/dev/null || break; sleep 0.1; done
    if [ -e "$STATE/munged.ours" ]; then  # a munged that was running before `up` is left alone
        pkill -x munged 2>/dev/null || true
        for _ in $(seq 50); do pgrep -x munged >/dev/null || break; sleep 0.1; done
        pgrep -x munged >/dev/null || rm -f "$STATE/munged.ours"  # (kept: `leftovers` names it)
    fi
    for ns in $(ip netns list 2>/dev/null | awk '/^rms-node/ {print $1}'); do ip netns del "$ns"; done
    ip link del "$BRIDGE" 2>/dev/null || true
    hosts_entries 0
    rm -rf "$STATE"/ctld "$STATE"/slurmd-*
    [ -n "$quiet" ] || log "stopped"
}

leftovers() {  # daemons of this script's still running after `down`: listed, exit 1
    local left="" name names="slurmctld slurmd slurmstepd"
    [ ! -e "$STATE/munged.ours" ] || names="$names munged"
    for name in $names; do  # one name per pgrep: a pattern over 15 characters matches nothing
        left="$left$(pgrep -a -x "$name" || true)"
    done
    if [ -n "$left" ]; then
        log "still running after down:"; echo "$left" >&2; return 1
    fi
}

case ${1:-} in
    up) shift; refuse_foreign; up "$@" ;;
    down) refuse_foreign; down; leftovers ;;
    status) sinfo -N -l ;;
    *) echo "usage: $0 up [--nodes N] | down | status" >&2; exit 2 ;;
esac
