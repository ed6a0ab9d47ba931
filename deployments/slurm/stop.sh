#!/usr/bin/env bash
# Stop the single-node SLURM started by start.sh DIR: cancel every job first (so slurmd can clean
# up its steps), then stop slurmd, slurmctld and munged by their PIDs. Safe to run twice.
set -uo pipefail
DIR=$(realpath -m "${1:?usage: stop.sh DIR}")
export SLURM_CONF="$DIR/slurm.conf"

if [ -f "$SLURM_CONF" ] && [ -f "$DIR/slurmctld.pid.launch" ]; then
  scancel --full --partition="$(sed -nE 's/^PartitionName=([^ ]+).*/\1/p' "$SLURM_CONF")" 2>/dev/null || true
  for _ in $(seq 1 50); do
    [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
    sleep 0.2
  done
fi

stop_pid() {  # stop_pid FILE: TERM the process in FILE, wait, then KILL if it lingers
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$file"
}
stop_pid "$DIR/slurmd.pid.launch"
stop_pid "$DIR/slurmctld.pid.launch"
stop_pid "$DIR/munge/munged.pid"
