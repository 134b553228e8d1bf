#!/usr/bin/env bash
# A private Docker engine (Debian's docker.io: dockerd 20.10 + its own containerd + runc) and the local base
# image gpt-train-test-base:latest. No image registry is needed or used.
#   engine: own socket, data root, exec root, pid file and (empty) config file under /tmp/gpt-train-infra/docker;
#           --bridge=none --iptables=false: it creates no docker0 and leaves the firewall alone, so containers get
#           no network by default; use --network host where one is needed (builds here use it).
#   image:  Debian bookworm minbase (debootstrap from this machine's apt mirror, `docker import`), then a small
#           Dockerfile adds python3, python3-venv, pip and the CPU torch wheel and numpy (installed system-wide: `python3 -c
#           'import torch'` works; PIP_BREAK_SYSTEM_PACKAGES=1 lets derived images pip install too).
#           Built once and kept in the data root; rebuilt only when the recipe below changes.
#
# Usage:  tests/infra/docker_up.sh ; export DOCKER_HOST=unix:///tmp/gpt-train-infra/docker/docker.sock DOCKER_BUILDKIT=0
# Env:    GPT_TRAIN_TORCH_VERSION (2.13.0), GPT_TRAIN_TORCH_WHEEL (a local wheel file to use instead of downloading),
#         GPT_TRAIN_TORCH_INDEX_URL (extra index, e.g. https://download.pytorch.org/whl/cpu, where PyPI's
#         default torch wheel is the CUDA one), GPT_TRAIN_DOCKER_BASE=0 (engine only).
# Stop with tests/infra/docker_down.sh (--purge also deletes images and caches).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$H/lib.sh"
need_root
D=$INFRA_DIR/docker
SOCK=$D/docker.sock
IMG=gpt-train-test-base:latest
ROOTFS_IMG=gpt-train-test-rootfs:bookworm
TORCH_VERSION=${GPT_TRAIN_TORCH_VERSION:-2.13.0}
mkdir -p "$D"/{cache,log}
export DOCKER_HOST=unix://$SOCK DOCKER_BUILDKIT=0
started=()

pkgs=()
have dockerd containerd runc docker || pkgs+=(docker.io)   # docker.io brings the client too
have debootstrap || pkgs+=(debootstrap)
[ ${#pkgs[@]} -eq 0 ] || apt_install "$D/log/apt.log" "${pkgs[@]}"
export PATH=$PATH:/usr/sbin

# 1. engine
if ! alive "$D/dockerd.pid"; then
  [ -s "$D/daemon.json" ] || echo '{}' >"$D/daemon.json"
  rm -f "$SOCK"
  setsid dockerd --config-file "$D/daemon.json" --data-root "$D/root" --exec-root "$D/exec" \
    --pidfile "$D/dockerd.pid.internal" -H "unix://$SOCK" --bridge=none --iptables=false --ip-masq=false \
    --ip-forward=false --log-level=warn >"$D/log/dockerd.log" 2>&1 </dev/null &
  echo $! >"$D/dockerd.pid"; started+=("dockerd=$!")
fi
wait_for 60 docker info || die "dockerd did not start: $(tail -5 "$D/log/dockerd.log")"

# 2. base image
if [ "${GPT_TRAIN_DOCKER_BASE:-1}" = 1 ]; then
  B=$D/build
  rm -rf "$B"; mkdir -p "$B/wheels" "$B/certs"
  # extra CA certificates of this machine (a TLS-intercepting proxy) so pip/apt inside containers work here too
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then cp /usr/local/share/ca-certificates/*.crt "$B/certs/"; fi
  cat >"$B/Dockerfile" <<EOF
FROM $ROOTFS_IMG
ENV LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update -q && apt-get install -y -q --no-install-recommends python3 python3-venv python3-pip ca-certificates \\
 && rm -rf /var/lib/apt/lists/*
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null
COPY wheels/ /tmp/wheels/
RUN pip install -q --no-index --find-links /tmp/wheels torch==$TORCH_VERSION numpy && rm -rf /tmp/wheels \\
 && python3 -c 'import torch; print("torch", torch.__version__)'
EOF
  recipe=$( { cat "$B/Dockerfile"; ls "$B/certs"; echo "$TORCH_VERSION"; } | sha256sum | cut -c1-16)
  have_img=$(docker image inspect -f '{{ index .Config.Labels "gpt-train.recipe" }}' "$IMG" 2>/dev/null || true)
  if [ "$have_img" != "$recipe" ]; then
    # 2a. rootfs: debootstrap (~30 s) from the machine's own apt mirror, cached as a tarball
    if ! docker image inspect "$ROOTFS_IMG" >/dev/null 2>&1; then
      if [ ! -s "$D/cache/rootfs.tar" ]; then
        MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        [ -n "$MIRROR" ] || MIRROR=$(awk '$1=="deb" && $2 ~ /^http/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
        MIRROR=${MIRROR:-http://deb.debian.org/debian}
        rm -rf "$D/cache/rootfs"
        debootstrap --variant=minbase bookworm "$D/cache/rootfs" "$MIRROR" >"$D/log/debootstrap.log" 2>&1 ||
          die "debootstrap from $MIRROR failed, see $D/log/debootstrap.log"
        tar -C "$D/cache/rootfs" -c . >"$D/cache/rootfs.tar.tmp" && mv "$D/cache/rootfs.tar.tmp" "$D/cache/rootfs.tar"
        rm -rf "$D/cache/rootfs"
      fi
      docker import "$D/cache/rootfs.tar" "$ROOTFS_IMG" >/dev/null
    fi
    # 2b. wheels for the image's python (cp311, manylinux x86_64), fetched on the host (cached)
    PY=python3; [ -x "$H/../../.venv/bin/python" ] && PY=$H/../../.venv/bin/python
    W=$D/cache/wheels; mkdir -p "$W"
    tags=(--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
    idx=(); [ -z "${GPT_TRAIN_TORCH_INDEX_URL:-}" ] || idx=(--extra-index-url "$GPT_TRAIN_TORCH_INDEX_URL")
    if [ -n "${GPT_TRAIN_TORCH_WHEEL:-}" ]; then cp -n "$GPT_TRAIN_TORCH_WHEEL" "$W/"
    elif ! compgen -G "$W/torch-$TORCH_VERSION*.whl" >/dev/null; then
      "$PY" -m pip download -q --no-deps "${tags[@]}" "${idx[@]}" -d "$W" "torch==$TORCH_VERSION" >>"$D/log/pip.log" 2>&1 ||
        die "pip download torch==$TORCH_VERSION failed, see $D/log/pip.log"
    fi
    # torch's own dependencies (filelock, sympy, jinja2, ...), resolved with the torch wheel from the cache,
    # and numpy (torch warns at import without it)
    "$PY" -m pip download -q "${tags[@]}" --find-links "$W" -d "$W" "torch==$TORCH_VERSION" numpy >>"$D/log/pip.log" 2>&1 ||
      die "pip download of torch's dependencies failed, see $D/log/pip.log"
    ln "$W"/*.whl "$B/wheels/" 2>/dev/null || cp "$W"/*.whl "$B/wheels/"
    docker build --network host --label "gpt-train.recipe=$recipe" -t "$IMG" "$B" >"$D/log/build.log" 2>&1 ||
      die "docker build failed, see $D/log/build.log"
    docker image prune -f >/dev/null 2>&1 || true   # the replaced image, if any
    started+=("image $IMG")
  fi
  rm -rf "$B"
fi
report "docker (DOCKER_HOST=$DOCKER_HOST)" "${started[@]}"
