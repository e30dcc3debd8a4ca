#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and trying the jobs/ scripts.
#
#   sudo bash tools/slurm_local.sh up      # install (Debian/Ubuntu) if missing, start munged, slurmctld, slurmd
#   sudo bash tools/slurm_local.sh status  # sinfo
#   sudo bash tools/slurm_local.sh down    # stop the three daemons (by their pid files)
#
# Runs as root without systemd; idempotent (up twice is fine, a daemon already running is left alone).
# The node oversubscribes its cores (CPUs=8 whatever the machine has), has no GPUs and no accounting:
# enough for srun/sbatch/scontrol requeue, not a production setup. Measured recipe: ../shared/NOTES.md.
set -euo pipefail

CONF_DIR=/etc/slurm
RUN_DIR=/run/slurm_local
SPOOL=/var/spool/slurm_local
NODE=$(hostname -s)
CPUS=${SLURM_LOCAL_CPUS:-8}

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

write_conf() {
  mkdir -p "$CONF_DIR" "$RUN_DIR" "$SPOOL/ctld" "$SPOOL/d"
  cat > "$CONF_DIR/slurm.conf" <<EOF
# written by essa_mpi tools/slurm_local.sh
ClusterName=local
SlurmctldHost=$NODE
SlurmUser=root
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldLogFile=$RUN_DIR/slurmctld.log
SlurmdLogFile=$RUN_DIR/slurmd.log
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
NodeName=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
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
  for _ in $(seq 1 120); do
    state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
    case "$state" in idle*|mix*|alloc*) echo "slurm_local: node $NODE $state"; return 0 ;; esac
    sleep 0.5
  done
  echo "slurm_local.sh: node $NODE did not become idle; see $RUN_DIR/slurmctld.log and slurmd.log" >&2
  exit 1
}

up() {
  need_root
  install_packages
  write_conf
  start_munge
  running "$RUN_DIR/slurmctld.pid" || slurmctld
  running "$RUN_DIR/slurmd.pid" || slurmd
  scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
  wait_idle
}

down() {
  for pidfile in "$RUN_DIR/slurmd.pid" "$RUN_DIR/slurmctld.pid"; do
    if running "$pidfile"; then kill "$(cat "$pidfile")"; fi
  done
  if running /run/munge/munged.pid; then kill "$(cat /run/munge/munged.pid)"; fi
  echo "slurm_local: stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) sinfo ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
