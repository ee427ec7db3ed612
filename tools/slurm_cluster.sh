#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for the tests of slurm/*.sh.
#
#   bash tools/slurm_cluster.sh start    # install (Debian packages) if needed, configure, start
#   bash tools/slurm_cluster.sh status
#   bash tools/slurm_cluster.sh stop     # stop exactly what start started, undo /etc/hosts
#
# Everything lives in $GALA_SLURM_DIR (default /tmp/gala-slurm): munge key and socket, slurm.conf,
# state, spool, logs, pid files, and `env` (source it: SLURM_CONF for the clients). Daemons:
# munged, slurmctld and two slurmd "nodes" n1 and n2 on 127.0.0.1 with private ports. The node
# names must resolve for gloo, so start adds one marked line to /etc/hosts and stop removes it.
# When the cluster cannot start, start exits non-zero and writes the reason to $DIR/unavailable.
set -uo pipefail
DIR="${GALA_SLURM_DIR:-/tmp/gala-slurm}"
PORT_BASE="${GALA_SLURM_PORT:-16817}"
HOSTS_MARK="# gala-slurm test nodes"

fail() {
    mkdir -p "$DIR"
    echo "$*" > "$DIR/unavailable"
    echo "[slurm] cannot start: $*" >&2
    exit 3
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && return 0
    [ "$(id -u)" = 0 ] || fail "Slurm is not installed and installing it needs root"
    echo "[slurm] installing Debian's slurm-wlm and munge" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        slurm-wlm slurmctld slurmd slurm-client munge; } > "$DIR/apt.log" 2>&1 \
        || fail "apt-get install of slurm-wlm/munge failed (see $DIR/apt.log)"
}

write_config() {
    local conf="$DIR/etc/slurm.conf" cpus
    cpus=$(nproc)
    cat > "$conf" <<CONF
ClusterName=gala-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT_BASE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MailProg=/bin/true
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
KillWait=10
MinJobAge=300
NodeName=n1 NodeAddr=127.0.0.1 Port=$((PORT_BASE + 1)) CPUs=$cpus RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=$((PORT_BASE + 2)) CPUs=$cpus RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    echo "export SLURM_CONF=$conf" > "$DIR/env"
}

start_munge() {
    mkdir -p "$DIR/munge" && chmod 0755 "$DIR/munge"
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$DIR/munge/munge.key"
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket.2" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munge.seed" > "$DIR/log/munged.out" 2>&1 \
        || fail "munged did not start (see $DIR/log/munged.log)"
}

add_hosts() {
    grep -q "$HOSTS_MARK" /etc/hosts 2>/dev/null && return 0
    if echo "127.0.0.1 n1 n2 $HOSTS_MARK" >> /etc/hosts 2>/dev/null; then
        touch "$DIR/run/hosts-added"
    else
        fail "cannot add the node names n1 n2 to /etc/hosts"
    fi
}

wait_idle() {
    for _ in $(seq 60); do
        if [ "$(SLURM_CONF="$DIR/etc/slurm.conf" sinfo -h -N -o '%T' 2>/dev/null | grep -c idle)" = 2 ]; then
            return 0
        fi
        sleep 0.5
    done
    fail "nodes did not become idle within 30 s (see $DIR/log/)"
}

start() {
    if [ -f "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
        echo "[slurm] already running ($DIR)" >&2
        return 0
    fi
    rm -rf "$DIR" && mkdir -p "$DIR"/{etc,state,spool/n1,spool/n2,log,run}
    install_packages
    write_config
    start_munge
    add_hosts
    export SLURM_CONF="$DIR/etc/slurm.conf"
    slurmctld -i > "$DIR/log/slurmctld.out" 2>&1 || fail "slurmctld did not start (see $DIR/log/)"
    for node in n1 n2; do
        slurmd -N "$node" > "$DIR/log/slurmd-$node.out" 2>&1 \
            || fail "slurmd $node did not start (see $DIR/log/)"
    done
    wait_idle
    rm -f "$DIR/unavailable"
    echo "[slurm] two nodes idle; source $DIR/env" >&2
}

stop() {
    # Jobs first, while slurmctld can still end them: a job step left running outlives the daemons.
    if [ -f "$DIR/run/slurmctld.pid" ]; then
        export SLURM_CONF="$DIR/etc/slurm.conf"
        scancel --full --quiet --user="$(id -un)" 2>/dev/null
        for _ in $(seq 40); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    for pidfile in "$DIR"/run/slurmd-n1.pid "$DIR"/run/slurmd-n2.pid "$DIR"/run/slurmctld.pid \
                   "$DIR"/run/munged.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null
        rm -f "$pidfile"
    done
    pkill -9 -f "slurmstepd: \[" 2>/dev/null  # any step the daemons left behind
    if [ -f "$DIR/run/hosts-added" ]; then
        grep -v "$HOSTS_MARK" /etc/hosts > "$DIR/hosts.new" && cat "$DIR/hosts.new" > /etc/hosts
        rm -f "$DIR/run/hosts-added" "$DIR/hosts.new"
    fi
    echo "[slurm] stopped" >&2
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF="$DIR/etc/slurm.conf" sinfo -N ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
