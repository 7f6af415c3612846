#!/usr/bin/env bash
# local_cluster.sh - a throwaway Slurm cluster on this one machine, for the `slurm` tests (tests/test_slurm.py) and
# for trying the sbatch templates without a real cluster. It uses the distribution's packages (Debian 12: Slurm
# 22.05) and runs every daemon as root, without systemd, cgroups or an accounting database.
#
# Usage (as root, from anywhere):
#   local_cluster.sh install          apt-get install slurmctld slurmd slurm-client munge (skipped when installed)
#   local_cluster.sh start [N]        write slurm.conf, start munged (unless one already runs), slurmctld and N
#                                     slurmd (default 1), wait until all N nodes are idle. With N > 1 the nodes are
#                                     n1..nN, simulated by N slurmd processes on this host, one port each.
#                                     Starting a cluster that already runs with the same settings does nothing.
#   local_cluster.sh stop [--purge]   cancel all jobs, stop the daemons this script started (never others);
#                                     --purge also removes the state directory and the slurm.conf it wrote.
#                                     Stopping a cluster that does not run does nothing.
#   local_cluster.sh status           daemons, nodes and jobs; exit status 0 when the cluster runs, 3 when not.
#
# Settings (environment variables; start reads all of them, stop/status only the first two):
#   JOINTSSL_SLURM_DIR           state, logs and PID files                 (default /tmp/jointssl-slurm)
#   SLURM_CONF                   where slurm.conf is written               (default /etc/slurm/slurm.conf, where
#                                Slurm's commands look; elsewhere, export SLURM_CONF for sbatch/sinfo too)
#   JOINTSSL_SLURM_HOSTS=1       with N > 1, map n1..nN to 127.0.0.1 in /etc/hosts (stop removes the line) so
#                                the node names resolve: Lightning connects to the first node of SLURM_NODELIST.
#                                Without it, a job script must export MASTER_ADDR=127.0.0.1.   (default 0)
#   JOINTSSL_SLURM_CRED_EXPIRE   AuthInfo=cred_expire in seconds. A requeued job becomes eligible to start again
#                                cred_expire + 1 s after the requeue.      (default 10; Slurm's own default: 120)
#   JOINTSSL_SLURM_SCHED_PARAMS  SchedulerParameters. .ci/run uses batch_sched_delay=0,sched_interval=1,bf_interval=1
#                                so that a pending job is looked at every second (Slurm: every 60 s / 30 s).
#                                                                          (default batch_sched_delay=0)
#   JOINTSSL_SLURM_CPUS          CPUs per node                             (default nproc / N, at least 1)
#   JOINTSSL_SLURM_MEM           RealMemory per node in MB                 (default 80% of MemTotal / N)
#
# Log lines go to stderr, prefixed "[local_cluster]"; daemon logs are in $JOINTSSL_SLURM_DIR/log (the previous
# cluster's in log.prev).
set -euo pipefail

STATE_DIR=${JOINTSSL_SLURM_DIR:-/tmp/jointssl-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
export SLURM_CONF=$CONF          # for the sinfo/squeue/scancel this script runs
RUN_DIR=$STATE_DIR/run
LOG_DIR=$STATE_DIR/log
# The first line of every slurm.conf this script writes; stop --purge and start only touch files that carry it.
CONF_MARKER="# written by jointssl scripts/slurm/local_cluster.sh"
# The comment that marks this script's line in /etc/hosts.
HOSTS_MARKER="# jointssl-local-slurm"
PACKAGES=(slurmctld slurmd slurm-client munge)
START_TIMEOUT_S=30
SHORT_HOST=$(uname -n)
SHORT_HOST=${SHORT_HOST%%.*}
SELF=$0

log() { echo "[local_cluster] $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,/^set -euo pipefail$/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'
}

# need_root COMMAND-LINE WHY
need_root() {
    [ "$(id -u)" -eq 0 ] || die "'$1' must run as root ($2). Try: sudo $SELF $1"
}

# is_running NAME PIDFILE: the PID in PIDFILE is alive and is a process called NAME (a stale file whose PID now
# belongs to something else does not count, so stop never signals a stranger).
is_running() {
    local name=$1 file=$2 pid
    [ -s "$file" ] || return 1
    pid=$(cat "$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}

# stop_daemon NAME PIDFILE: SIGTERM, up to 15 s to exit, then SIGKILL; removes PIDFILE.
stop_daemon() {
    local name=$1 file=$2 pid i
    if is_running "$name" "$file"; then
        pid=$(cat "$file")
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            [ -d "/proc/$pid" ] || break
            sleep 0.1
        done
        if [ -d "/proc/$pid" ]; then
            log "$name (pid $pid) still runs 15 s after SIGTERM: sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$file"
}

ctld_running() { is_running slurmctld "$RUN_DIR/slurmctld.pid"; }

# Rewrites /etc/hosts without this script's line, in place (in containers /etc/hosts is often a bind mount, which
# cannot be replaced by a rename).
remove_hosts_line() {
    grep -q -- "$HOSTS_MARKER\$" /etc/hosts 2>/dev/null || return 0
    local kept
    kept=$(grep -v -- "$HOSTS_MARKER\$" /etc/hosts || true)
    printf '%s\n' "$kept" > /etc/hosts
    log "removed the simulated node names from /etc/hosts"
}

elapsed_since() { awk -v now="$(date +%s.%N)" -v t0="$1" 'BEGIN { printf "%.2f", now - t0 }'; }

# ------------------------------------------------------------------------------------------------------ install
cmd_install() {
    need_root install "it installs packages"
    command -v apt-get >/dev/null || die "'install' needs apt-get (Debian/Ubuntu). Elsewhere install Slurm's" \
        "controller, node daemon, client commands and MUNGE with the system's package manager; start/stop only" \
        "need the commands slurmctld, slurmd, sinfo, squeue, scancel, munge, unmunge and munged."
    local pkg missing=()
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "already installed: ${PACKAGES[*]}"
    else
        log "installing ${missing[*]}"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}"
    fi
    slurmd -V
}

# -------------------------------------------------------------------------------------------------------- start
# write_conf N FILE: the cluster's slurm.conf for N nodes.
write_conf() {
    local n=$1 file=$2 cpus mem i
    cpus=${JOINTSSL_SLURM_CPUS:-$(( $(nproc) / n ))}
    (( cpus >= 1 )) || cpus=1
    mem=${JOINTSSL_SLURM_MEM:-$(awk -v n="$n" '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.8 / n }' /proc/meminfo)}
    {
        echo "$CONF_MARKER"
        echo "# nodes=$n hosts=${JOINTSSL_SLURM_HOSTS:-0}"
        cat <<EOF
ClusterName=jointssl-local
SlurmctldHost=$SHORT_HOST
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Slurm holds a requeued job for cred_expire + 1 s. Forcing it to start earlier (scontrol update StartTime=now)
# makes the job fail with "Job credential revoked", so the only lever is this value.
AuthInfo=cred_expire=${JOINTSSL_SLURM_CRED_EXPIRE:-10}
SchedulerType=sched/backfill
SchedulerParameters=${JOINTSSL_SLURM_SCHED_PARAMS:-batch_sched_delay=0}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No cgroups on small VMs and containers: track processes by parent PID, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=10
MinJobAge=300
StateSaveLocation=$STATE_DIR/spool/ctld
SlurmdSpoolDir=$STATE_DIR/spool/slurmd-%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
EOF
        if (( n == 1 )); then
            echo "NodeName=$SHORT_HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        else
            # One slurmd per simulated node, all on this host (Debian builds Slurm with multiple-slurmd support);
            # each needs its own port.
            for ((i = 1; i <= n; i++)); do
                echo "NodeName=n$i NodeHostname=$SHORT_HOST NodeAddr=127.0.0.1 Port=$((17000 + i))" \
                    "CPUs=$cpus RealMemory=$mem State=UNKNOWN"
            done
        fi
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } > "$file"
}

# Reuses a munged that already answers (e.g. the system's); otherwise starts one as user munge and records its PID
# in $RUN_DIR/munged.pid, which is what makes stop stop it.
start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already runs: using it"
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        log "no /etc/munge/munge.key: creating one"
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 600 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 755 /run/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid \
        || die "munged did not start (see /var/log/munge/munged.log)"
    local i
    for ((i = 0; i < 50; i++)); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$RUN_DIR/munged.pid"
    log "started munged (pid $(cat "$RUN_DIR/munged.pid"))"
}

show_logs() {
    local f
    for f in "$LOG_DIR"/*.log; do
        [ -e "$f" ] || continue
        echo "--- $f (last 20 lines)" >&2
        tail -n 20 "$f" >&2
    done
}

cmd_start() {
    local n=${1:-1} t0 names="" i
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "start takes a node count (a positive integer), got '$n'"
    need_root "start $n" "the Slurm daemons run as root, and it writes $CONF and /etc/hosts"
    t0=$(date +%s.%N)
    for i in slurmctld slurmd sinfo munge munged; do
        command -v "$i" >/dev/null || [ -x "/usr/sbin/$i" ] || die "$i not found: run '$SELF install' first"
    done

    NEW_CONF=$(mktemp)
    trap 'rm -f "$NEW_CONF"' EXIT
    write_conf "$n" "$NEW_CONF"

    if ctld_running; then
        if cmp -s "$NEW_CONF" "$CONF"; then
            log "already running with these settings ($n node(s)): nothing to do"
            sinfo
            return 0
        fi
        die "a cluster started by this script already runs with other settings (differences below); run" \
            "'$SELF stop' first$(echo; diff "$CONF" "$NEW_CONF" | sed 's/^/    /' || true)"
    fi
    local f other
    for f in "$RUN_DIR"/slurmd-*.pid; do
        [ -e "$f" ] || continue
        ! is_running slurmd "$f" || die "slurmd (pid $(cat "$f")) of an earlier start still runs; run '$SELF stop' first"
    done
    for i in slurmctld slurmd; do
        other=$(pgrep -x "$i" || true)
        [ -z "$other" ] || die "a $i not started by this script runs (pid $(echo "$other" | xargs)); stop it first"
    done
    if [ -e "$CONF" ] && [ "$(head -n 1 "$CONF")" != "$CONF_MARKER" ]; then
        die "$CONF exists and was not written by this script; move it away, or set SLURM_CONF to another path" \
            "(and export it for sbatch/sinfo too)"
    fi

    # A fresh cluster every time: no jobs or node state survive a stop. The last cluster's logs go to log.prev.
    rm -rf "$STATE_DIR/spool" "$STATE_DIR/log.prev"
    [ ! -d "$LOG_DIR" ] || mv "$LOG_DIR" "$STATE_DIR/log.prev"
    mkdir -p "$STATE_DIR/spool/ctld" "$LOG_DIR" "$RUN_DIR"
    rm -f "$RUN_DIR"/slurmd-*.pid "$RUN_DIR/slurmctld.pid"
    mkdir -p "$(dirname "$CONF")"
    cp "$NEW_CONF" "$CONF"
    log "wrote $CONF: $n node(s), $(grep -o 'CPUs=[0-9]* RealMemory=[0-9]*' "$CONF" | head -n 1) each"

    start_munge
    slurmctld -f "$CONF" || { show_logs; die "slurmctld did not start"; }   # daemonizes
    if (( n == 1 )); then
        slurmd -f "$CONF" || { show_logs; die "slurmd did not start"; }
        names=$SHORT_HOST
    else
        for ((i = 1; i <= n; i++)); do
            slurmd -f "$CONF" -N "n$i" || { show_logs; die "slurmd for node n$i did not start"; }
            names+="${names:+ }n$i"
        done
        remove_hosts_line
        if [ "${JOINTSSL_SLURM_HOSTS:-0}" = 1 ]; then
            echo "127.0.0.1 $names  $HOSTS_MARKER" >> /etc/hosts
            log "/etc/hosts: $names -> 127.0.0.1"
            for i in $names; do
                getent hosts "$i" | grep -q '^127\.0\.0\.1 ' \
                    || log "warning: $i does not resolve to 127.0.0.1 (another /etc/hosts line wins?)"
            done
        fi
    fi

    # Ready when every node reports idle.
    for ((i = 0; i < START_TIMEOUT_S * 10; i++)); do
        if [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" -eq "$n" ]; then
            log "cluster up in $(elapsed_since "$t0") s: node(s) $names"
            sinfo
            return 0
        fi
        sleep 0.1
    done
    sinfo -N -l >&2 || true
    show_logs
    die "the nodes were not all idle after $START_TIMEOUT_S s; the daemons still run for inspection" \
        "('$SELF stop' stops them)"
}

# --------------------------------------------------------------------------------------------------------- stop
cmd_stop() {
    local purge=0 f stopped=0 i
    case "${1:-}" in
        "") ;;
        --purge) purge=1 ;;
        *) die "stop takes only --purge, got '$1'" ;;
    esac
    need_root "stop${1:+ $1}" "it signals the daemons it started as root and edits /etc/hosts"
    if ctld_running; then
        local jobs=()
        mapfile -t jobs < <(squeue -h -o %A 2>/dev/null | sort -u)
        if [ ${#jobs[@]} -gt 0 ]; then
            log "cancelling job(s) ${jobs[*]}"
            scancel "${jobs[@]}" || true
            # Give the jobs' processes up to 15 s to end while the node daemons still run.
            for ((i = 0; i < 150; i++)); do
                [ -n "$(squeue -h -t RUNNING,COMPLETING -o %A 2>/dev/null)" ] || break
                sleep 0.1
            done
        fi
    fi
    for f in "$RUN_DIR"/slurmd-*.pid; do
        [ -e "$f" ] || continue
        if is_running slurmd "$f"; then stopped=1; fi
        stop_daemon slurmd "$f"
    done
    if is_running slurmctld "$RUN_DIR/slurmctld.pid"; then stopped=1; fi
    stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
    stop_daemon munged "$RUN_DIR/munged.pid"       # the file exists only when start started munged
    remove_hosts_line
    local leftovers
    leftovers=$(pgrep -x slurmstepd || true)
    [ -z "$leftovers" ] || log "warning: slurmstepd process(es) still run: $(echo "$leftovers" | xargs)"
    (( stopped )) || log "no cluster of this script was running"
    if (( purge )); then
        rm -rf "$STATE_DIR"
        if [ -f "$CONF" ] && [ "$(head -n 1 "$CONF")" = "$CONF_MARKER" ]; then rm -f "$CONF"; fi
        log "removed $STATE_DIR and the slurm.conf this script wrote"
    fi
}

# ------------------------------------------------------------------------------------------------------- status
cmd_status() {
    local f
    for f in "$RUN_DIR"/*.pid; do
        [ -e "$f" ] || continue
        local base name
        base=$(basename "$f" .pid)
        name=${base%%-*}
        echo "$base: pid $(cat "$f") $(is_running "$name" "$f" && echo running || echo 'not running')"
    done
    if ctld_running; then
        sinfo -N || true
        squeue || true
        return 0
    fi
    echo "no cluster of this script is running (state directory $STATE_DIR)"
    return 3
}

case "${1:-}" in
    install) cmd_install ;;
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    status) cmd_status ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
