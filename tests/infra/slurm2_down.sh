#!/usr/bin/env bash
# Stop what slurm2_up.sh started (by pid file only), after cancelling its jobs.
# Leaves the one-node cluster (munged, slurmdbd) and the namespaces up: slurm_down.sh / netns_down.sh stop those.
# --purge also deletes its state (job ids, logs).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$H/lib.sh"
D=$INFRA_DIR/slurm2
export SLURM_CONF=$D/etc/slurm.conf PATH=$PATH:/usr/sbin
stopped=()
if alive "$D/run/slurmctld.pid" && scontrol ping 2>/dev/null | grep -q UP; then
  squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
  for _ in $(seq 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.3; done
fi
for p in slurmd.n1 slurmd.n2 slurmctld; do
  if alive "$D/run/$p.pid"; then stopped+=("$p=$(cat "$D/run/$p.pid")"); fi
  stop_pidfile "$D/run/$p.pid" 20
done
if [ "${1:-}" = --purge ]; then rm -rf "$D"; stopped+=("(state purged)"); fi
echo "slurm2: stopped: ${stopped[*]:-nothing was running}"
