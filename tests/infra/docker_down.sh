#!/usr/bin/env bash
# Stop what docker_up.sh started: kill this engine's containers, then dockerd (by pid file; it stops its own
# containerd). Images stay in the data root for the next run; --purge deletes them and the caches too.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$H/lib.sh"
D=$INFRA_DIR/docker
export DOCKER_HOST=unix://$D/docker.sock PATH=$PATH:/usr/sbin
stopped=()
if alive "$D/dockerd.pid"; then
  ids=$(docker ps -q 2>/dev/null || true)
  if [ -n "$ids" ]; then
    # shellcheck disable=SC2086  # one id per word
    docker kill $ids >/dev/null 2>&1 || true
    stopped+=("containers: $(echo "$ids" | tr '\n' ' ')")
  fi
  stopped+=("dockerd=$(cat "$D/dockerd.pid")")
fi
stop_pidfile "$D/dockerd.pid" 30
# dockerd leaves its default netns mount (exec/netns/default) behind: unmount what is left under $D, deepest first
awk -v d="$D/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" || true; done
if [ "${1:-}" = --purge ]; then rm -rf "$D"; stopped+=("(images and caches purged)"); fi
echo "docker: stopped: ${stopped[*]:-nothing was running}"
