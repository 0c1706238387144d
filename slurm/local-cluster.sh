#!/usr/bin/env bash
# A one-node Slurm on this machine from Debian's packages (slurmctld, slurmd, slurm-client,
# munge): for trying `bench slurm` on a laptop, and for the integration tests in CI.
#
#   sudo slurm/local-cluster.sh [start|stop|status]      (idempotent; start is the default)
#
# Configuration known to work as root without systemd: proctrack/linuxproc, task/none,
# select/cons_tres with CR_Core, munge auth, no accounting, one node with all its CPUs in
# a default partition `debug`. Requeued jobs may start again at once (no hold).
set -euo pipefail

action=${1:-start}
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
conf=/etc/slurm/slurm.conf
log_dir=/var/log/slurm
run_dir=/run/slurm

need_root() {
    if [ "$(id -u)" -ne 0 ]; then echo "local-cluster.sh: run as root (sudo)" >&2; exit 1; fi
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
    install -d -m 0755 /etc/slurm "$log_dir" "$run_dir" /var/spool/slurmctld /var/spool/slurmd
    cat > "$conf.new" <<CONF
# Written by bench's slurm/local-cluster.sh: a single-node cluster on localhost.
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

running() {  # the daemon whose pid file is $1 is alive
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}
daemons_up() { running "$run_dir/slurmctld.pid" && running "$run_dir/slurmd.pid"; }

wait_for_node() {
    for _ in $(seq 1 60); do
        if sinfo --noheader -o %T 2>/dev/null | grep -qE "idle|mixed|alloc"; then return 0; fi
        sleep 0.5
    done
    echo "local-cluster.sh: slurm did not come up; see $log_dir/*.log" >&2
    sinfo >&2 || true
    return 1
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

start() {
    need_root
    install_packages
    start_munge
    if write_config && daemons_up; then stop; fi  # a new config: restart the daemons
    if ! running "$run_dir/slurmctld.pid"; then slurmctld; fi
    if ! running "$run_dir/slurmd.pid"; then slurmd; fi
    sleep 1
    # A node left DOWN or DRAIN by an earlier run comes back.
    if sinfo --noheader -o %T 2>/dev/null | grep -qE "down|drain"; then
        scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
    fi
    wait_for_node
    sinfo
}

case "$action" in
    start) start ;;
    stop) need_root; stop; echo "slurm stopped (munged left running)" ;;
    status) sinfo && squeue ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
