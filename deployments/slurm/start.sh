#!/usr/bin/env bash
# Start a single-node SLURM (munged, slurmctld -D, slurmd -D) on this machine, all state under DIR.
#   deployments/slurm/start.sh DIR [PARTITION]
# Needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge) and root (slurmd runs jobs
# as their users). Prints "export SLURM_CONF=DIR/slurm.conf"; clients (sbatch, squeue, dask-jobqueue)
# need that variable. Stop with deployments/slurm/stop.sh DIR (cancels jobs first, then daemons by PID).
set -euo pipefail
DIR=$(realpath -m "${1:?usage: start.sh DIR [PARTITION]}")
PARTITION=${2:-debug}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$DIR"/{munge,ctld,slurmd,log}
chmod 700 "$DIR/munge"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# munge: a private key and socket in DIR, so this never touches a system munged.
KEY="$DIR/munge/munge.key"
if [ ! -s "$KEY" ]; then
  if [ -r /etc/munge/munge.key ]; then cp /etc/munge/munge.key "$KEY"; else dd if=/dev/urandom of="$KEY" bs=1 count=1024 status=none; fi
fi
chmod 400 "$KEY"
munged --force --key-file="$KEY" --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
  --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"

NODE_LINE=$(slurmd -C | head -n 1)
NODENAME=$(sed -E 's/^NodeName=([^ ]+).*/\1/' <<<"$NODE_LINE")
# The controller runs on this host; the node name from slurmd -C is this host's short name.
sed -e "s|@HOST@|$NODENAME|" -e "s|@STATE@|$DIR|g" -e "s|@USER@|$(id -un)|" \
    -e "s|@CTLD_PORT@|$(free_port)|" -e "s|@SLURMD_PORT@|$(free_port)|" \
    -e "s|@NODE@|$NODE_LINE NodeAddr=127.0.0.1|" -e "s|@NODENAME@|$NODENAME|" -e "s|@PARTITION@|$PARTITION|" \
    "$HERE/slurm.conf.in" > "$DIR/slurm.conf"
export SLURM_CONF="$DIR/slurm.conf"

slurmctld -D -i -f "$SLURM_CONF" >"$DIR/log/slurmctld.out" 2>&1 &
echo $! > "$DIR/slurmctld.pid.launch"
slurmd -D -f "$SLURM_CONF" -N "$NODENAME" >"$DIR/log/slurmd.out" 2>&1 &
echo $! > "$DIR/slurmd.pid.launch"

for _ in $(seq 1 100); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.2
done
echo "SLURM did not come up; logs in $DIR" >&2
tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" "$DIR/log/"*.out >&2 || true
exit 1
