#!/usr/bin/env bash
# Two "hosts" with their own network stacks: namespaces gtt-n1 (10.200.0.1) and gtt-n2 (10.200.0.2), each
# with an eth0 (veth) on the bridge gtt-br0 in the root namespace (10.200.0.254/24). The addresses exist only
# inside this machine. /etc/hosts gets "n1" and "n2" (marked "# gpt-train-infra") so that both names resolve
# everywhere (submitit/torchrun use the first node's name as MASTER_ADDR).
# The two-node SLURM cluster (slurm2_up.sh) runs its slurmd inside these same namespaces.
#
# Run a command "on host 1":  nsenter --net=/var/run/netns/gtt-n1 CMD   (or: ip netns exec gtt-n1 CMD)
# Stop with tests/infra/netns_down.sh.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$H/lib.sh"
need_root
D=$INFRA_DIR/netns
mkdir -p "$D"
have ip || apt_install "$D/apt.log" iproute2
have ping || apt_install "$D/apt.log" iputils-ping
BR=gtt-br0
started=()

# refuse to shadow someone else's 10.200.0.0/24 (e.g. the recipes' rcp-br0)
other=$(ip -o -4 addr show to 10.200.0.0/24 | awk -v br="$BR" '$2 != br {print $2}' | head -1)
[ -z "$other" ] || die "10.200.0.0/24 is already used by interface $other; bring that down first"

if ! ip link show "$BR" >/dev/null 2>&1; then
  ip link add "$BR" type bridge; started+=("bridge $BR")
fi
ip addr replace 10.200.0.254/24 dev "$BR"
ip link set "$BR" up
for i in 1 2; do
  ns=gtt-n$i
  if [ ! -e "/var/run/netns/$ns" ]; then ip netns add "$ns"; started+=("netns $ns=10.200.0.$i"); fi
  if ! ip link show "gtt-v$i" >/dev/null 2>&1; then
    ip -n "$ns" link del eth0 2>/dev/null || true
    ip link add "gtt-v$i" type veth peer name eth0 netns "$ns"
  fi
  ip link set "gtt-v$i" master "$BR" up
  ip -n "$ns" addr replace "10.200.0.$i/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
done
# A FORWARD policy of DROP (set by a Docker engine that manages iptables) would also drop bridged traffic
# when br_netfilter is loaded: allow traffic within the bridge. Removed by netns_down.sh.
if have iptables && ! iptables -C FORWARD -i "$BR" -o "$BR" -j ACCEPT 2>/dev/null; then
  iptables -I FORWARD -i "$BR" -o "$BR" -j ACCEPT 2>/dev/null && touch "$D/iptables-rule" || true
fi
if ! grep -q '# gpt-train-infra$' /etc/hosts; then
  # append in place (not sed -i): /etc/hosts may be a bind mount
  printf '10.200.0.1 n1 gtt-n1 # gpt-train-infra\n10.200.0.2 n2 gtt-n2 # gpt-train-infra\n' >>/etc/hosts
fi
wait_for 10 ip netns exec gtt-n1 ping -c1 -W1 10.200.0.2 || die "gtt-n1 cannot reach 10.200.0.2"
report "netns (gtt-n1=10.200.0.1 gtt-n2=10.200.0.2 bridge $BR=10.200.0.254)" "${started[@]}"
