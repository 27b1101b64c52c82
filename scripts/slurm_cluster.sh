#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the SLURM tests and CI (tests/test_slurm.py).
#
#   scripts/slurm_cluster.sh start    install what is missing, write the configs, start every daemon, wait
#   scripts/slurm_cluster.sh status   say what runs; exit status 0 when the node takes jobs and sacct answers
#   scripts/slurm_cluster.sh stop     stop the daemons that `start` started
#
# `start` is idempotent: a second call finds everything running and returns in about a second. It needs root
# and apt-get (Debian 12: SLURM 22.05). Daemons: munged (authentication), MariaDB + slurmdbd (accounting,
# which `sacct` and so snakemake-executor-plugin-slurm need), slurmctld, and slurmd as node `localhost`.
# The node has the machine's CPUs, most of its memory and a `gpu` GRES of placeholder devices (gres_conf), so
# a job that asks for a GPU is accepted and accounted (gres/gpu in sacct's AllocTRES) although there is none.
#
# Configs go to /etc/slurm, where the SLURM commands look for them; a slurm.conf there that this script did
# not write is left alone (start refuses). State, logs and pid files go to $PATHMIL_SLURM_STATE.
set -euo pipefail

CLUSTER=pathmil
PARTITION=main
GPUS=2 # placeholder GPUs on the test node (see gres_conf)
CONF=/etc/slurm
STATE="${PATHMIL_SLURM_STATE:-/var/lib/pathmil-slurm}"
MARKER="# written by pathmil scripts/slurm_cluster.sh"
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

say() { echo "[slurm] $*"; }
die() {
    echo "[slurm] error: $*" >&2
    exit 1
}

# --- process helpers -----------------------------------------------------------------------------------

pid_alive() { # PIDFILE: the process it names exists
    local pid
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [ -n "$pid" ] && [ -d "/proc/$pid" ]
}

wait_until() { # SECONDS WHAT COMMAND...: retry COMMAND every 0.5 s, fail naming WHAT after SECONDS
    local seconds="$1" what="$2" i
    shift 2
    for ((i = 0; i < seconds * 2; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    die "$what did not come up within ${seconds}s (logs: $STATE/log/)"
}

stop_pidfile() { # NAME PIDFILE: SIGTERM, then wait for the process to go
    local name="$1" pidfile="$2" pid i
    pid_alive "$pidfile" || return 0
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 60; i++)); do
        [ -d "/proc/$pid" ] || {
            say "stopped $name"
            return 0
        }
        sleep 0.5
    done
    die "$name (pid $pid) did not stop within 30 s"
}

# --- install -------------------------------------------------------------------------------------------

missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}

install_packages() {
    local missing t0 blocker=""
    mapfile -t missing < <(missing_packages)
    [ "${#missing[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get to install it" \
        "(needs Debian or Ubuntu; missing: ${missing[*]})"
    t0=$SECONDS
    say "installing ${missing[*]}"
    # The packages would start their daemons with default configs; this script starts them itself.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        blocker=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$blocker"
        chmod 755 "$blocker"
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    local log=/tmp/pathmil-slurm-apt.log
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
        say "apt-get install failed; updating the package lists and trying again"
        apt-get update -q >>"$log" 2>&1
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$log" 2>&1 ||
            die "apt-get install ${missing[*]} failed (log: $log)"
    fi
    if [ -n "$blocker" ]; then
        rm -f "$blocker"
        trap - EXIT
    fi
    say "installed in $((SECONDS - t0)) s"
}

# --- configs -------------------------------------------------------------------------------------------

node_line() {
    # The hardware as slurmd sees it, named localhost (slurmd runs as `slurmd -N localhost`), with 90 % of
    # the memory so that slurmd does not drain the node for having less than configured.
    local hw mem
    hw="$(slurmd -C | head -n 1)"
    mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
    hw="$(sed -e 's/^NodeName=[^ ]*/NodeName=localhost/' -e 's/ RealMemory=[0-9]*//' <<<"$hw")"
    echo "$hw RealMemory=$((mem * 9 / 10)) Gres=gpu:$GPUS State=UNKNOWN"
}

slurm_conf() {
    cat <<EOF
$MARKER: a one-node test cluster; edits are overwritten.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default, a job that does not ask for memory takes the whole node
DefMemPerCPU=1000
ReturnToService=2
MinJobAge=300
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
GresTypes=gpu
$(node_line)
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

gres_conf() {
    # SLURM 22.05's gres/gpu plugin drops a GPU without File= ("Removing file-less GPU" in slurmd's debug log,
    # then the node is INVAL), also with Flags=CountOnly. So each GPU names a placeholder device: a character
    # device equal to /dev/null. Nothing opens it, and TaskPlugin=task/none binds no devices to jobs.
    cat <<EOF
$MARKER
NodeName=localhost Name=gpu File=$STATE/dev/gpu[0-$((GPUS - 1))]
EOF
}

make_placeholder_gpus() {
    local i
    mkdir -p "$STATE/dev"
    for ((i = 0; i < GPUS; i++)); do
        [ -c "$STATE/dev/gpu$i" ] || mknod -m 666 "$STATE/dev/gpu$i" c 1 3
    done
}

slurmdbd_conf() { # PASSWORD
    cat <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$1
StorageLoc=slurm_acct_db
EOF
}

write_if_changed() { # FILE CONTENT MODE: write FILE when it differs; return 0 if it changed
    local file="$1" content="$2" mode="$3"
    if [ -f "$file" ] && [ "$(cat "$file")" = "$content" ]; then return 1; fi
    printf '%s\n' "$content" >"$file.tmp"
    chmod "$mode" "$file.tmp"
    chown slurm:slurm "$file.tmp"
    mv "$file.tmp" "$file"
}

write_configs() { # returns 0 if any config changed
    local password changed=1
    if [ -f "$CONF/slurm.conf" ] && ! grep -qF "$MARKER" "$CONF/slurm.conf"; then
        die "$CONF/slurm.conf was not written by this script (a real cluster's?);" \
            "move it away to use the test cluster"
    fi
    mkdir -p "$CONF" "$STATE"/{slurmctld,slurmd,run,log}
    chown slurm:slurm "$STATE"/{slurmctld,run,log}
    make_placeholder_gpus
    password="$(sed -n 's/^StoragePass=//p' "$CONF/slurmdbd.conf" 2>/dev/null || true)"
    [ -n "$password" ] || password="$(head -c 18 /dev/urandom | base64 | tr '+/' 'xy')"
    write_if_changed "$CONF/slurm.conf" "$(slurm_conf)" 644 && changed=0
    write_if_changed "$CONF/gres.conf" "$(gres_conf)" 644 && changed=0
    write_if_changed "$CONF/slurmdbd.conf" "$(slurmdbd_conf "$password")" 600 && changed=0
    return $changed
}

# --- daemons -------------------------------------------------------------------------------------------

db_password() { sed -n 's/^StoragePass=//p' "$CONF/slurmdbd.conf"; }

start_munge() {
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge
    chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
    wait_until 20 munged sh -c 'munge -n </dev/null | unmunge'
    say "munged up"
}

start_mariadb() {
    mariadb-admin ping --silent >/dev/null 2>&1 && return 0
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >"$STATE/log/mariadb-install.log" 2>&1
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld
    setsid -f /usr/sbin/mariadbd --user=mysql >>"$STATE/log/mariadb.log" 2>&1 </dev/null
    wait_until 60 MariaDB mariadb-admin ping --silent
    say "MariaDB up"
}

setup_database() {
    mariadb -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$(db_password)';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$(db_password)';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_slurm() {
    if ! pid_alive "$STATE/run/slurmdbd.pid"; then
        slurmdbd
        wait_until 60 slurmdbd sacctmgr -n list cluster
        say "slurmdbd up"
    fi
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
        say "registered cluster $CLUSTER with the accounting database"
    fi
    if ! pid_alive "$STATE/run/slurmctld.pid"; then
        slurmctld
        wait_until 60 slurmctld scontrol ping
        say "slurmctld up"
    fi
    if ! pid_alive "$STATE/run/slurmd.pid"; then
        slurmd -N localhost
        say "slurmd up"
    fi
}

node_state() { sinfo -h -N -n localhost -o %t 2>/dev/null | head -n 1; }

node_ready() { [[ "$(node_state)" =~ ^(idle|mix|alloc)$ ]]; }

wait_for_node() {
    local i state
    for ((i = 0; i < 120; i++)); do
        state="$(node_state)"
        case "$state" in
        idle | mix | alloc) return 0 ;;
        down* | drain* | drng*) scontrol update NodeName=localhost State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    die "node localhost is '$state', not idle, after 60 s (see $STATE/log/slurmd.log and slurmctld.log)"
}

sacct_answers() { sacct -n -X -S now-1minutes >/dev/null 2>&1; }

# --- commands ------------------------------------------------------------------------------------------

cmd_stop() {
    stop_pidfile slurmd "$STATE/run/slurmd.pid"
    stop_pidfile slurmctld "$STATE/run/slurmctld.pid"
    stop_pidfile slurmdbd "$STATE/run/slurmdbd.pid"
    if command -v mariadb-admin >/dev/null && mariadb-admin ping --silent >/dev/null 2>&1; then
        mariadb-admin shutdown && say "stopped MariaDB"
    fi
    stop_pidfile munged /run/munge/munged.pid
}

cmd_start() {
    local t0=$SECONDS
    if [ "$(id -u)" -ne 0 ]; then
        cmd_status >/dev/null 2>&1 && {
            say "running (started earlier by root)"
            return 0
        }
        die "starting the test cluster needs root (it installs Debian packages and starts system daemons)"
    fi
    install_packages
    local t1=$SECONDS
    if write_configs; then
        say "wrote the configs in $CONF; SLURM daemons that run restart to read them"
        stop_pidfile slurmd "$STATE/run/slurmd.pid"
        stop_pidfile slurmctld "$STATE/run/slurmctld.pid"
        stop_pidfile slurmdbd "$STATE/run/slurmdbd.pid"
    fi
    start_munge
    start_mariadb
    setup_database
    start_slurm
    wait_for_node
    wait_until 30 sacct sacct_answers
    say "cluster $CLUSTER ready: node localhost $(node_state), partition $PARTITION," \
        "started in $((SECONDS - t1)) s ($((SECONDS - t0)) s with installing)"
}

cmd_status() {
    local ok=0 name pidfile
    for name in munged slurmdbd slurmctld slurmd; do
        case $name in
        munged) pidfile=/run/munge/munged.pid ;;
        *) pidfile="$STATE/run/$name.pid" ;;
        esac
        if pid_alive "$pidfile"; then
            echo "$name: running (pid $(cat "$pidfile"))"
        else
            echo "$name: not running"
            ok=1
        fi
    done
    if command -v mariadb-admin >/dev/null && mariadb-admin ping --silent >/dev/null 2>&1; then
        echo "mariadb: running"
    else
        echo "mariadb: not running"
        ok=1
    fi
    if [ $ok -eq 0 ] && node_ready && sacct_answers; then
        echo "node localhost: $(node_state); sacct answers"
    else
        echo "cluster: not ready"
        ok=1
    fi
    return $ok
}

case "${1:-}" in
start) cmd_start ;;
stop)
    [ "$(id -u)" -eq 0 ] || die "stopping the test cluster needs root"
    cmd_stop
    ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
