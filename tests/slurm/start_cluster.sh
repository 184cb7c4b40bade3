#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (Debian 12: slurm-wlm 22.05 + munge), for tests/slurm/.
# Needs root and apt. Installs the packages if missing, writes /etc/slurm/slurm.conf (one node with this
# machine's CPUs and memory, no cgroups, no accounting), starts munged, slurmctld and slurmd, and waits
# until the node is idle. The daemons' pids go to $STATE/pids (stop them with stop_cluster.sh).
# Exit 0: cluster up; exit 2: cannot be had here (not root, no apt, install failed), with the reason on stderr.
set -euo pipefail
STATE=${SLURM_TEST_STATE:-/tmp/fusion-slurm}
mkdir -p "$STATE"

if [ "$(id -u)" != 0 ]; then echo "start_cluster: needs root" >&2; exit 2; fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  if ! command -v apt-get >/dev/null; then echo "start_cluster: no apt-get to install slurm" >&2; exit 2; fi
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client; } \
       >"$STATE/apt.log" 2>&1; then
    echo "start_cluster: apt-get install of munge/slurm failed (see $STATE/apt.log)" >&2; exit 2
  fi
fi

if scontrol ping 2>/dev/null | grep -q "is UP"; then echo "start_cluster: a cluster is already up"; exit 0; fi

install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
  # munged daemonizes: its own pid file names the daemon (pgrep may catch the exiting parent).
  cat /run/munge/munged.pid > "$STATE/munged.pid" 2>/dev/null || pgrep -u munge -x munged > "$STATE/munged.pid" || true
fi

install -d -o slurm -g slurm /var/lib/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
NODE=$(slurmd -C | head -1)
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=fusion-test
SlurmctldHost=localhost
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
SlurmUser=slurm
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
KillWait=10
MinJobAge=600
$NODE
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF

slurmctld -D -c >"$STATE/slurmctld.out" 2>&1 &
echo $! > "$STATE/slurmctld.pid"
slurmd -D >"$STATE/slurmd.out" 2>&1 &
echo $! > "$STATE/slurmd.pid"
for _ in $(seq 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qE "^idle"; then echo "start_cluster: up ($(sinfo -h -o '%P %D %c %t'))"; exit 0; fi
  sleep 1
done
echo "start_cluster: node not idle after 60 s: $(sinfo 2>&1 | tail -2)" >&2
exit 1
