#!/usr/bin/env bash
# Stop what slurm_up.sh started (by pid file only). Cancels all jobs first so no slurmstepd is left behind.
# Stops the two-node cluster first (slurm2 uses this cluster's munged and slurmdbd).
# --purge also deletes the state: job ids, accounting database, munge key, logs.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$H/lib.sh"
D=$INFRA_DIR/slurm
export SLURM_CONF=$D/etc/slurm.conf PATH=$PATH:/usr/sbin
"$H/slurm2_down.sh" >/dev/null

stopped=()
if alive "$D/run/slurmctld.pid" && scontrol ping 2>/dev/null | grep -q UP; then
  squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
  for _ in $(seq 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.3; done
fi
for p in slurmd slurmctld slurmdbd mariadb munged; do
  if alive "$D/run/$p.pid"; then stopped+=("$p=$(cat "$D/run/$p.pid")"); fi
  stop_pidfile "$D/run/$p.pid" 20
done
if [ "${1:-}" = --purge ]; then rm -rf "$D"; stopped+=("(state purged)"); fi
echo "slurm: stopped: ${stopped[*]:-nothing was running}"
