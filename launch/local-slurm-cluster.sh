#!/usr/bin/env bash
# A real SLURM cluster on this one host, for the launch tests (Debian 12, root, no systemd):
# munged, slurmctld and one slurmd per emulated node n1..nN, all on 127.0.0.1.
#   launch/local-slurm-cluster.sh start|stop
# Env: SLURM_NODES (default 2), SLURM_CPUS per node (default 4; may exceed the real cores).
set -euo pipefail
NODES=${SLURM_NODES:-2}
CPUS=${SLURM_CPUS:-4}
CONF=/etc/slurm/slurm.conf
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
HOST=$(hostname -s)
NAMES=$(seq -f 'n%g' 1 "$NODES")

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pid() {
  running "$1" || { rm -f "$1"; return 0; }
  local pid; pid=$(cat "$1"); kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true; rm -f "$1"
}

stop() {
  if command -v scontrol >/dev/null && scontrol ping >/dev/null 2>&1; then
    squeue -h -o %A | xargs -r scancel || true
  fi
  for pidfile in /run/slurmd-*.pid /run/slurmctld.pid /run/munge/munged.pid; do
    [ -e "$pidfile" ] && stop_pid "$pidfile"
  done
  return 0
}

start() {
  [ "$(id -u)" = 0 ] || { echo "needs root (installs and runs the SLURM daemons)" >&2; exit 1; }
  local missing="" package
  for package in slurmctld slurmd slurm-client munge; do
    dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
  done
  if [ -n "$missing" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
  # torch's rendezvous and srun resolve the node names: all of them are this host
  for name in $HOST $NAMES; do getent hosts "$name" >/dev/null || echo "127.0.0.1 $name" >> /etc/hosts; done

  # munge needs a key and a run directory (no systemd to make it)
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  fi

  mkdir -p /etc/slurm "$STATE" "$LOGS"
  local memory port=17000 nodes="" name config
  memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  for name in $NAMES; do
    mkdir -p "$SPOOL/$name" "/tmp/slurm-$name"
    port=$((port + 1))
    nodes+="NodeName=$name NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS RealMemory=$memory State=UNKNOWN"$'\n'
  done
  config="ClusterName=sharpness
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
TmpFS=/tmp/slurm-%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
MinJobAge=30
${nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$config" ]; then
    for pidfile in /run/slurmd-*.pid /run/slurmctld.pid; do [ -e "$pidfile" ] && stop_pid "$pidfile"; done
    rm -rf "${STATE:?}"/*  # state of another cluster configuration makes slurmctld refuse to start
    printf '%s\n' "$config" > "$CONF"
  fi
  running /run/slurmctld.pid || slurmctld -c -i
  for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
  for name in $NAMES; do running "/run/slurmd-$name.pid" || slurmd -N "$name"; done

  local states
  for _ in $(seq 120); do
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
    if [ "$(grep -cw idle <<<"$states")" -ge "$NODES" ]; then sinfo; return 0; fi
    for name in $(awk '$2 ~ /down|drain/ {print $1}' <<<"$states"); do
      scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 || true
    done
    sleep 0.5
  done
  echo "SLURM did not come up; node states:" >&2; sinfo -N -l >&2 || true
  tail -n 20 "$LOGS"/*.log >&2 || true
  return 1
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
