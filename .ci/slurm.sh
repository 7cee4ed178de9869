#!/usr/bin/env bash
# A real one-node slurm on this (Debian, root) machine, for tests/test_slurm.py.
#
#   bash .ci/slurm.sh start        # install slurm-wlm + munge if missing, write slurm.conf, start munged,
#                                  # slurmctld, slurmd; wait until `sinfo` shows the node idle
#   bash .ci/slurm.sh stop         # stop the daemons this script started
#   bash .ci/slurm.sh run CMD...   # start, run CMD, stop on exit (what CI calls)
#
# No systemd and no cgroups: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none. State and logs live in
# $SLURM_CI_DIR (default /tmp/ci-slurm). An /etc/slurm/slurm.conf that this script did not write is never
# touched (a real cluster's config): then `start` stops with a message.
set -euo pipefail

STATE=${SLURM_CI_DIR:-/tmp/ci-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by .ci/slurm.sh"

log() { echo "[slurm.sh] $*" >&2; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || { log "slurm is not installed and this is not root: apt-get install slurm-wlm munge"; exit 1; }
    log "installing slurm-wlm and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurm-wlm munge >"$STATE/apt.log" 2>&1 \
        || { apt-get update -qq >>"$STATE/apt.log" 2>&1 && apt-get install -y -qq slurm-wlm munge >>"$STATE/apt.log" 2>&1; } \
        || { log "apt-get install slurm-wlm munge failed; see $STATE/apt.log"; exit 1; }
}

write_conf() {
    if [ -f "$CONF" ] && ! grep -q "^$MARK" "$CONF"; then
        log "$CONF exists and was not written by this script; refusing to replace it"; exit 1
    fi
    local host node_hw
    host=$(hostname -s)
    # The node's real hardware (CPUs, sockets, cores, memory) as slurmd sees it, so it is not drained.
    node_hw=$(slurmd -C | head -n 1 | sed -e "s/^NodeName=[^ ]*//")
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d"
    cat >"$CONF" <<EOF
$MARK for a one-node test cluster; remove it with .ci/slurm.sh stop
ClusterName=ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=30
NodeName=$host NodeAddr=127.0.0.1 $node_hw State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if pgrep -x munged >/dev/null; then return; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [ -s /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 || /usr/sbin/create-munge-key -f; }
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE/started-munged"
}

wait_idle() {
    local host=$1
    for _ in $(seq 1 60); do
        if sinfo -h -n "$host" -o "%t" 2>/dev/null | grep -qx "idle"; then return 0; fi
        sleep 0.5
    done
    log "node $host did not become idle in 30 s: $(sinfo -h -N -o '%N %t %E' 2>&1)"
    log "logs: $STATE/slurmctld.log $STATE/slurmd.log"
    exit 1
}

start() {
    mkdir -p "$STATE"
    install_packages
    write_conf
    start_munge
    # -c: start clean (no job state from an earlier run); the daemons fork into the background.
    pgrep -x slurmctld >/dev/null || slurmctld -c
    pgrep -x slurmd >/dev/null || slurmd -c
    wait_idle "$(hostname -s)"
    log "slurm is up: $(sinfo -h -o '%P %D %t %N')"
}

stop_pidfile() {
    local f=$1
    [ -f "$f" ] || return 0
    local pid
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    rm -f "$f"
}

stop() {
    stop_pidfile "$STATE/slurmd.pid"
    stop_pidfile "$STATE/slurmctld.pid"
    if [ -f "$STATE/started-munged" ]; then
        stop_pidfile /run/munge/munged.pid
        rm -f "$STATE/started-munged"
    fi
    if [ -f "$CONF" ] && grep -q "^$MARK" "$CONF"; then rm -f "$CONF"; fi
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    run)
        shift
        [ $# -gt 0 ] || { log "usage: $0 run CMD..."; exit 2; }
        trap stop EXIT
        start
        "$@"
        ;;
    *) echo "usage: $0 start|stop|run CMD..." >&2; exit 2 ;;
esac
