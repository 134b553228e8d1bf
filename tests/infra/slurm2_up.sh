#!/usr/bin/env bash
# Second SLURM cluster "gpttrain2": two nodes n1 (10.200.0.1) and n2 (10.200.0.2), 2 CPUs each, partition
# "multi" (default). Each slurmd runs in the network namespace of netns_up.sh (gtt-n1, gtt-n2) and in its own
# UTS namespace, so `hostname` in a job step prints n1 / n2. slurmctld runs in the root namespace on
# 10.200.0.254 (the bridge), ports 6837 (ctld) and 6838 (slurmd), so it runs beside the one-node cluster.
# It shares that cluster's munged and slurmdbd: this script runs slurm_up.sh and netns_up.sh first.
#
# Clients address it with:  export SLURM_CONF=/tmp/gpt-train-infra/slurm2/etc/slurm.conf
# Stop with tests/infra/slurm2_down.sh (netns_down.sh and slurm_down.sh also stop it).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$H/lib.sh"
need_root
"$H/slurm_up.sh" | tail -1 | sed 's/^/  /'
"$H/netns_up.sh" | tail -1 | sed 's/^/  /'
export PATH=$PATH:/usr/sbin

D=$INFRA_DIR/slurm2
MD=$INFRA_DIR/slurm/munge
export SLURM_CONF=$D/etc/slurm.conf
mkdir -p "$D"/{etc,log,state,spool/n1,spool/n2,run}
started=()
cat >"$D/etc/slurm.conf.new" <<EOF
# written by tests/infra/slurm2_up.sh
ClusterName=gpttrain2
SlurmctldHost=localhost(10.200.0.254)
SlurmctldPort=6837
SlurmdPort=6838
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10,socket=$MD/munge.socket
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid.internal
SlurmdPidFile=$D/run/slurmd.%n.pid.internal
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6829
AccountingStoragePass=$MD/munge.socket
$(slurm_common_conf)
NodeName=n1 NodeAddr=10.200.0.1 CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeAddr=10.200.0.2 CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=multi Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
if cmp -s "$D/etc/slurm.conf.new" "$SLURM_CONF"; then rm "$D/etc/slurm.conf.new"
else
  mv "$D/etc/slurm.conf.new" "$SLURM_CONF"
  if alive "$D/run/slurmctld.pid"; then scontrol reconfigure 2>/dev/null || true; fi
fi
printf 'export SLURM_CONF=%s\n' "$SLURM_CONF" >"$D/env.sh"

fresh=0
alive "$D/run/slurmctld.pid" || fresh=1
if [ "$fresh" = 1 ]; then
  setsid /usr/sbin/slurmctld -D -i -f "$SLURM_CONF" >"$D/log/slurmctld.out" 2>&1 </dev/null &
  echo $! >"$D/run/slurmctld.pid"; started+=("slurmctld=$!")
fi
wait_for 30 sh -c 'scontrol ping | grep -q UP' || die "slurmctld did not start: $(tail -5 "$D/log/slurmctld.log")"
if [ "$fresh" = 1 ]; then squeue -h -o %i | xargs -r scancel 2>/dev/null || true; fi
for n in n1 n2; do
  alive "$D/run/slurmd.$n.pid" && continue
  # nsenter --net, NOT `ip netns exec`: the latter remounts /sys, so slurmd finds no /sys/fs/cgroup and exits
  # ("error: No filesystem mounted on /sys/fs/cgroup ... slurmd initialization failed").
  # nsenter, unshare and sh all exec, so $! is slurmd's pid.
  # shellcheck disable=SC2016  # $1/$@ belong to the inner sh
  setsid nsenter --net="/var/run/netns/gtt-$n" unshare --uts \
    sh -c 'echo "$1" >/proc/sys/kernel/hostname && shift && exec "$@"' sh "$n" \
    /usr/sbin/slurmd -D -N "$n" -f "$SLURM_CONF" >"$D/log/slurmd.$n.out" 2>&1 </dev/null &
  echo $! >"$D/run/slurmd.$n.pid"; started+=("slurmd.$n=$!")
done
nodes_ok() { [ "$(sinfo -h -N -o %T | grep -cE '^(idle|mixed|allocated|completing)')" = 2 ]; }
if ! wait_for 30 nodes_ok; then
  scontrol update nodename=n1,n2 state=resume 2>/dev/null || true
  wait_for 15 nodes_ok || die "nodes did not come up: $(sinfo -h -N -o '%N %T %E'; tail -3 "$D"/log/slurmd.n*.log)"
fi
wait_for 30 sh -c 'sacctmgr -n -P show cluster format=cluster | grep -qx gpttrain2' ||
  die "cluster gpttrain2 not registered in slurmdbd"
report "slurm2 (SLURM_CONF=$SLURM_CONF)" "${started[@]}"
