#!/usr/bin/env bash
# Stop the daemons start_cluster.sh started, by their recorded pids.
STATE=${SLURM_TEST_STATE:-/tmp/fusion-slurm}
for name in slurmd slurmctld munged; do
  if [ -f "$STATE/$name.pid" ]; then
    pid=$(cat "$STATE/$name.pid")
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    rm -f "$STATE/$name.pid"
  fi
done
