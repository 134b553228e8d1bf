#!/usr/bin/env bash
# Remove what netns_up.sh made. Stops the two-node SLURM cluster first: its slurmd run in these namespaces.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$H/lib.sh"
D=$INFRA_DIR/netns
BR=gtt-br0
"$H/slurm2_down.sh" >/dev/null
removed=()
for i in 1 2; do
  ns=gtt-n$i
  if [ -e "/var/run/netns/$ns" ]; then
    left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    [ -z "$left" ] || echo "warning: processes still in $ns (not ours to end): $left" >&2
    ip netns del "$ns"; removed+=("$ns")
  fi
  if ip link show "gtt-v$i" >/dev/null 2>&1; then ip link del "gtt-v$i"; fi
done
if ip link show "$BR" >/dev/null 2>&1; then ip link del "$BR"; removed+=("$BR"); fi
if [ -e "$D/iptables-rule" ]; then
  iptables -D FORWARD -i "$BR" -o "$BR" -j ACCEPT 2>/dev/null || true
  rm -f "$D/iptables-rule"
fi
if grep -q '# gpt-train-infra$' /etc/hosts; then
  hosts=$(grep -v '# gpt-train-infra$' /etc/hosts)
  printf '%s\n' "$hosts" >/etc/hosts   # rewrite in place: /etc/hosts may be a bind mount
  removed+=("/etc/hosts entries")
fi
echo "netns: removed: ${removed[*]:-nothing was there}"
