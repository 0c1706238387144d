#!/usr/bin/env bash
# A one-node Slurm on this machine from Debian's packages (slurmctld, slurmd, slurm-client,
# munge): for trying `bench slurm` on a laptop, and for the integration tests in CI.
#
#   sudo slurm/local-cluster.sh [start|stop|status]      (idempotent; start is the default)
#
# Configuration known to work as root without systemd: proctrack/linuxproc, task/none,
# select/cons_tres with CR_Core, munge auth, no accounting, one node with all its CPUs in
# a default partition `debug`. Requeued jobs may start again at once (no hold).
#
# It never overwrites a configuration it did not write (the file it writes begins with
# $marker) and never starts a second controller: when a cluster already answers, `start`
# reuses it; when a foreign slurm.conf is there and no cluster answers, it refuses and says
# what to do. It always says on stderr what it did: started, reused, refused or failed.
set -Eeuo pipefail

action=${1:-start}
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
conf=${SLURM_CONF:-/etc/slurm/slurm.conf}
marker="# Written by bench's slurm/local-cluster.sh"
log_dir=/var/log/slurm
run_dir=/run/slurm

say() { echo "local-cluster.sh: $*" >&2; }
trap 'rc=$?; say "failed (exit $rc) at line $LINENO: $BASH_COMMAND"' ERR

need_root() {
    if [ "$(id -u)" -ne 0 ]; then say "refused: run as root (sudo)"; exit 1; fi
}

ours() {  # $conf was written by this script (now or by an earlier version)
    [ -f "$conf" ] && head -n 1 "$conf" | grep -qF "$marker"
}

controller_answers() {
    command -v scontrol >/dev/null && timeout 10 scontrol ping 2>/dev/null | grep -q "is UP"
}

node_usable() {  # some node takes jobs now, or will when the running ones end
    sinfo --noheader -o %T 2>/dev/null | grep -qE "idle|mixed|alloc"
}

foreign_daemons() {  # slurmctld/slurmd processes that this script's pid files do not name
    local name pid
    for name in slurmctld slurmd; do
        for pid in $(pgrep -x "$name" || true); do
            alive "$pid" || continue
            [ "$pid" = "$(cat "$run_dir/$name.pid" 2>/dev/null)" ] || echo "$name (pid $pid)"
        done
    done
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sinfo >/dev/null && command -v munged >/dev/null; then
        return
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
    if [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null >/dev/null 2>&1; then return; fi
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
}

write_config() {
    install -d -m 0755 "$(dirname "$conf")" "$log_dir" "$run_dir" /var/spool/slurmctld /var/spool/slurmd
    cat > "$conf.new" <<CONF
$marker: a single-node cluster on localhost; it rewrites this file.
ClusterName=bench-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmctldPidFile=$run_dir/slurmctld.pid
SlurmdPidFile=$run_dir/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
KillWait=10
MinJobAge=300
JobRequeue=1
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    if ! cmp -s "$conf.new" "$conf"; then
        mv "$conf.new" "$conf"
        return 0  # changed
    fi
    rm -f "$conf.new"
    return 1
}

alive() {  # process $1 exists and is not a zombie (where PID 1 does not reap, they linger)
    kill -0 "$1" 2>/dev/null && ! ps -o stat= -p "$1" | grep -q Z
}
running() {  # the daemon whose pid file is $1 is alive
    [ -s "$1" ] && alive "$(cat "$1")"
}
daemons_up() { running "$run_dir/slurmctld.pid" && running "$run_dir/slurmd.pid"; }

wait_for_node() {
    for _ in $(seq 1 60); do
        if node_usable; then return 0; fi
        sleep 0.5
    done
    say "failed: slurm did not come up (no node idle, mixed or allocated); see $log_dir/*.log"
    sinfo >&2 || true
    tail -n 20 "$log_dir/slurmctld.log" "$log_dir/slurmd.log" >&2 2>/dev/null || true
    exit 1
}

stop() {  # this cluster's daemons, by their pid files
    scontrol shutdown >/dev/null 2>&1 || true
    for _ in $(seq 1 40); do
        running "$run_dir/slurmctld.pid" || running "$run_dir/slurmd.pid" || return 0
        sleep 0.25
    done
    for f in "$run_dir/slurmd.pid" "$run_dir/slurmctld.pid"; do
        if running "$f"; then kill "$(cat "$f")"; fi
    done
}

reuse_running() {  # a cluster this script did not set up: use it as it is, or refuse
    local why=$1 todo=$2
    if controller_answers && node_usable; then
        say "reused: a Slurm controller already answers ($why); left untouched"
        sinfo
        return 0
    fi
    say "refused: $why, and no usable cluster answers (scontrol ping: \
$(timeout 10 scontrol ping 2>&1 | head -n 1 || true)). Nothing changed. $todo"
    exit 1
}

daemon() {  # start daemon $1 unless its pid file names a live process
    if running "$run_dir/$1.pid"; then return 0; fi
    if ! "$1"; then say "failed: $1 did not start; see $log_dir/$1.log"; exit 1; fi
}

start_own() {
    local was_up=no changed=no
    start_munge
    if daemons_up; then was_up=yes; fi
    if write_config; then changed=yes; fi
    if [ "$changed" = yes ] && [ "$was_up" = yes ]; then stop; fi  # restart on a new config
    daemon slurmctld
    daemon slurmd
    sleep 1
    # A node left DOWN or DRAIN by an earlier run comes back.
    if sinfo --noheader -o %T 2>/dev/null | grep -qE "down|drain"; then
        scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
    fi
    wait_for_node
    if [ "$was_up" = no ]; then
        say "started: a one-node cluster ($host, $cpus CPUs, partition debug) from $conf"
    elif [ "$changed" = yes ]; then
        say "restarted: this script's cluster, with a new $conf"
    else
        say "reused: this script's cluster was already running ($conf)"
    fi
    sinfo
}

start() {
    need_root
    install_packages
    if [ -e "$conf" ] && ! ours; then
        reuse_running "$conf exists and was not written by this script" "Either start that \
cluster (slurmctld and slurmd) and rerun, or move the file aside (mv $conf $conf.orig) so \
that this script writes its own one-node cluster there."
    elif [ ! -e "$conf" ] && controller_answers; then
        reuse_running "configured elsewhere than $conf (SLURM_CONF, or configless)" ""
    else
        local others
        others=$(foreign_daemons | paste -sd, - | sed 's/,/, /g')
        if [ -n "$others" ]; then
            reuse_running "$others running, not started by this script" "Stop them, or \
make that cluster answer, then rerun."
        else
            start_own
        fi
    fi
}

case "$action" in
    start) start ;;
    stop)
        need_root
        if [ -e "$conf" ] && ! ours; then
            say "refused: $conf was not written by this script; not stopping that cluster"
            exit 1
        fi
        stop; say "stopped: this script's slurmctld and slurmd (munged left running)" ;;
    status) sinfo && squeue ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
