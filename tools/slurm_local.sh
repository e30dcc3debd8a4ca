#!/usr/bin/env bash
# A real SLURM cluster of N simulated nodes on this one machine, for tests and trying the jobs/ scripts.
#
#   sudo bash tools/slurm_local.sh up             # install (Debian/Ubuntu) if missing; munged, slurmctld, one slurmd
#   sudo bash tools/slurm_local.sh up --nodes 4   # nodes n1..n4: one slurmd each, all on this host
#   sudo bash tools/slurm_local.sh status         # sinfo -N
#   sudo bash tools/slurm_local.sh down           # stop every daemon it started (by their pid files)
#
# Runs as root without systemd; idempotent (up twice is fine, daemons already running are left alone; up with
# another node count restarts them). Each node is a slurmd of its own (NodeHostname this host, NodeAddr
# 127.0.0.1, a port of its own, started as slurmd -N NAME), so srun -N 2 forms one MPI world whose node split
# follows SLURM's nodes (SLURMD_NODENAME tells them apart: the hostname is the same). Every node oversubscribes
# the cores (CPUs=8 whatever the machine has), has no GPUs and no accounting: enough for srun, sbatch, scontrol
# requeue and --signal, not a production setup. Measured recipe: ../shared/NOTES.md.
set -euo pipefail

CONF_DIR=/etc/slurm
RUN_DIR=/run/slurm_local
SPOOL=/var/spool/slurm_local
HOST=$(hostname -s)
CPUS=${SLURM_LOCAL_CPUS:-8}
NODES=1
PORT0=7831  # node i's slurmd listens on PORT0 + i

need_root() { [ "$(id -u)" = 0 ] || { echo "slurm_local.sh: run as root (it starts system daemons)" >&2; exit 2; }; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && [ -x /usr/sbin/munged ] && ls /usr/lib/*/libpmix.so >/dev/null 2>&1; then
    return
  fi
  command -v apt-get >/dev/null || { echo "slurm_local.sh: needs apt-get (Debian/Ubuntu)" >&2; exit 2; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # libpmix-dev too: srun's pmix plugin dlopens the unversioned libpmix.so that only -dev provides.
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge libpmix2 libpmix-dev >/dev/null
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

names() { seq -f "n%g" 1 "$NODES"; }

conf_text() {
  cat <<CONF
# written by essa_mpi tools/slurm_local.sh ($NODES node(s) on $HOST)
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d/%n
SlurmctldLogFile=$RUN_DIR/slurmctld.log
SlurmdLogFile=$RUN_DIR/slurmd-%n.log
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=5
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
CONF
  local i=0 n
  for n in $(names); do
    i=$((i + 1))
    echo "NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT0 + i)) CPUs=$CPUS State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
}

start_munge() {
  if ! [ -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if ! running /run/munge/munged.pid; then
    runuser -u munge -- /usr/sbin/munged --force
  fi
}

wait_idle() {
  local ready
  for _ in $(seq 1 120); do
    ready=$(sinfo -h -N -o "%N %t" 2>/dev/null | grep -c -E " (idle|mix|alloc)" || true)
    if [ "$ready" -ge "$NODES" ]; then echo "slurm_local: $NODES node(s) up: $(names | tr '\n' ' ')"; return 0; fi
    sleep 0.5
  done
  echo "slurm_local.sh: $NODES node(s) did not become idle ($(sinfo -h -N -o '%N %t' | tr '\n' ' ')); see" \
    "$RUN_DIR/slurmctld.log and $RUN_DIR/slurmd-*.log" >&2
  exit 1
}

stop_daemons() {
  local pidfile
  for pidfile in "$RUN_DIR"/slurmd*.pid "$RUN_DIR/slurmctld.pid"; do
    if running "$pidfile"; then kill "$(cat "$pidfile")"; fi
  done
  for pidfile in "$RUN_DIR"/slurmd*.pid "$RUN_DIR/slurmctld.pid"; do  # gone before an up reuses their ports
    for _ in $(seq 1 100); do running "$pidfile" || break; sleep 0.1; done
  done
}

down() {
  stop_daemons
  if running /run/munge/munged.pid; then kill "$(cat /run/munge/munged.pid)"; fi
  echo "slurm_local: stopped"
}

up() {
  need_root
  install_packages
  mkdir -p "$CONF_DIR" "$RUN_DIR" "$SPOOL/ctld"
  local conf n
  conf=$(conf_text)
  if [ "$conf" != "$(cat "$CONF_DIR/slurm.conf" 2>/dev/null)" ]; then
    stop_daemons  # another node count (or an older layout): the daemons must read the new config
    printf '%s\n' "$conf" > "$CONF_DIR/slurm.conf"
  fi
  start_munge
  running "$RUN_DIR/slurmctld.pid" || slurmctld
  for n in $(names); do
    mkdir -p "$SPOOL/d/$n"
    running "$RUN_DIR/slurmd-$n.pid" || slurmd -N "$n"
  done
  scontrol update NodeName="n[1-$NODES]" State=RESUME >/dev/null 2>&1 || true
  wait_idle
}

cmd=${1:-}
shift || true
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=${2:-}; shift; shift || true ;;
    --nodes=*) NODES=${1#--nodes=}; shift ;;
    *) echo "slurm_local.sh: unknown option '$1'; usage: $0 up [--nodes N] | down | status" >&2; exit 2 ;;
  esac
done
case "$NODES" in
  ''|*[!0-9]*|0*) echo "slurm_local.sh: --nodes takes a whole number from 1 up, got '$NODES'" >&2; exit 2 ;;
esac
case "$cmd" in
  up) up ;;
  down) down ;;
  status) sinfo -N ;;
  *) echo "usage: $0 up [--nodes N] | down | status" >&2; exit 2 ;;
esac
