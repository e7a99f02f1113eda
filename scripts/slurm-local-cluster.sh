#!/bin/bash
# A single-node Slurm cluster on this machine (localhost), for trying and testing
# `cargo xtask sweep --slurm` without a real cluster. Needs root and Debian/Ubuntu's
# packages (installed with `install`). Everything Slurm writes goes under STATE_DIR.
#
#   scripts/slurm-local-cluster.sh install            # apt-get install slurm-wlm munge
#   scripts/slurm-local-cluster.sh start [STATE_DIR]  # munged, slurmctld, slurmd
#   export SLURM_CONF=STATE_DIR/slurm.conf            # what start prints: for sbatch & co.
#   scripts/slurm-local-cluster.sh stop [STATE_DIR]   # stops slurmd and slurmctld
#
# STATE_DIR defaults to ${TMPDIR:-/tmp}/slurm-local. Jobs run as the submitting user on
# this node; the time, memory and CPU limits of the node are those `slurmd -C` reports.
set -euo pipefail

cmd=${1:-}
state=${2:-${TMPDIR:-/tmp}/slurm-local}

die() { echo "error: $*" >&2; exit 1; }

case "$cmd" in
install)
  [ "$(id -u)" = 0 ] || die "installing needs root"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge
  ;;
start)
  [ "$(id -u)" = 0 ] || die "starting slurmd needs root"
  command -v slurmctld >/dev/null || die "no slurmctld on PATH: run \`$0 install\` first"
  mkdir -p "$state/state" "$state/spool"
  # munge: the key Debian's package made, its socket folder with mode 711.
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  if id munge >/dev/null 2>&1; then
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; chown munge:munge /etc/munge/munge.key; }
  fi
  chmod 711 /run/munge
  if ! pgrep -x munged >/dev/null; then
    if id munge >/dev/null 2>&1; then
      runuser -u munge -- munged
    else
      munged --force
    fi
  fi
  node=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]*/NodeName=localhost/' -e 's/ UpTime=.*//')
  cat >"$state/slurm.conf" <<CONF
# A single-node cluster on localhost, written by scripts/slurm-local-cluster.sh.
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/state
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=30
# Keep ended jobs in scontrol for an hour (there is no accounting database for sacct).
MinJobAge=3600
$node State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF="$state/slurm.conf"
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF" -N localhost
  for _ in $(seq 1 30); do
    if sinfo -h -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
      sinfo
      echo "Slurm is up. Use it with: export SLURM_CONF=$SLURM_CONF"
      exit 0
    fi
    sleep 1
  done
  die "the node did not come up; see $state/slurmctld.log and $state/slurmd.log"
  ;;
stop)
  for d in slurmd slurmctld; do
    if [ -f "$state/$d.pid" ]; then
      pid=$(cat "$state/$d.pid")
      kill "$pid" 2>/dev/null && echo "stopped $d ($pid)" || true
      rm -f "$state/$d.pid"
    fi
  done
  ;;
*)
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
  ;;
esac
