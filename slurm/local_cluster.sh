#!/usr/bin/env bash
# A real SLURM cluster on this one machine: slurmctld and two slurmd daemons (nodes n1 and n2, both at 127.0.0.1,
# each on its own port), authenticated by munge with a key made for it. Everything lives in one folder; nothing
# outside it is touched except installing Debian's packages when they are missing (root only).
#
#   slurm/local_cluster.sh up DIR      start it; waits until both nodes are idle, then prints the line to run:
#   export SLURM_CONF=DIR/slurm.conf   then sinfo, sbatch, squeue, scontrol talk to this cluster
#   slurm/local_cluster.sh down DIR    stop it
#
# Used by tests/test_slurm.py; handy for trying slurm/dpo.sbatch by hand. Each node offers CPUS_PER_NODE CPUs
# (default 1) and KILL_WAIT seconds (default 120) between SIGTERM and SIGKILL when a job is requeued or cancelled.
# No GPUs: slurm/qlora.sbatch runs here as the tests run it, on the CPU, with the built-in model and data:
#   sbatch --gpus-per-node=0 --export=ALL,RECIPE= slurm/qlora.sbatch model.quantization=4bit train.max_steps=2
# No accounting (it needs slurmdbd and a MySQL server): `sacct` answers "Slurm accounting storage is disabled".
# Instead: squeue; `scontrol show job ID` (kept an hour after the job ends: MinJobAge); DIR/log/jobcomp.txt (one
# line per finished job: JobId, JobState, ExitCode, times, nodes); the job's slurm-ID.out.
set -euo pipefail

command=${1:?usage: $0 up|down DIR}
dir=$(mkdir -p "${2:?usage: $0 up|down DIR}" && cd "$2" && pwd)
cpus=${CPUS_PER_NODE:-1}
nodes=(n1 n2)

stop_pidfile() {
  local pidfile=$1
  [ -f "$pidfile" ] || return 0
  local pid
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

down() {
  for node in "${nodes[@]}"; do stop_pidfile "$dir/slurmd-$node.pid"; done
  stop_pidfile "$dir/slurmctld.pid"
  stop_pidfile "$dir/munged.pid"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "local_cluster: slurmctld, slurmd, slurm-client and munge are not installed, and installing them needs root" >&2
    exit 3
  fi
  echo "local_cluster: installing Debian's slurmctld slurmd slurm-client munge" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >&2
}

up() {
  install_packages
  down
  mkdir -p "$dir/state" "$dir/munge" "$dir/spool" "$dir/log"
  chmod 700 "$dir/munge"
  head -c 1024 /dev/urandom > "$dir/munge/munge.key"
  chmod 400 "$dir/munge/munge.key"
  local socket="$dir/munge/munge.socket"
  munged --force --key-file="$dir/munge/munge.key" --socket="$socket" --pid-file="$dir/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed"
  local ctld_port
  ctld_port=$(free_port)
  cat > "$dir/slurm.conf" <<EOF
ClusterName=dpodist
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=${KILL_WAIT:-120}
MinJobAge=3600
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
EOF
  for node in "${nodes[@]}"; do
    echo "NodeName=$node NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$cpus RealMemory=4000 State=UNKNOWN" >> "$dir/slurm.conf"
  done
  echo "PartitionName=debug Nodes=$(IFS=,; echo "${nodes[*]}") Default=YES MaxTime=INFINITE State=UP" >> "$dir/slurm.conf"
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -i
  for node in "${nodes[@]}"; do slurmd -N "$node"; done
  for _ in $(seq 120); do
    if [ "$(sinfo -h -o '%T' -N 2>/dev/null | grep -c '^idle$')" = "${#nodes[@]}" ]; then
      echo "local_cluster: up, nodes ${nodes[*]} with $cpus CPU(s) each, no GPUs; no accounting: sacct answers nothing," \
        "use squeue, scontrol show job ID, $dir/log/jobcomp.txt and the job's .out"
      echo "export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.5
  done
  echo "local_cluster: the nodes did not become idle; see $dir/log" >&2
  sinfo -N >&2 || true
  exit 1
}

case "$command" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down DIR" >&2; exit 2 ;;
esac
