# shellcheck shell=bash
# Shared helpers for the tests/infra/*.sh scripts. Source it; do not run it.
#
# Conventions of every script here:
#   - all state, logs and pid files live under $GPT_TRAIN_INFRA_DIR (default /tmp/gpt-train-infra)
#   - a daemon is started with setsid in the foreground (-D/-F style) and its pid goes to <name>.pid;
#     down scripts end only processes named by those pid files
#   - `up` twice is a no-op; the last line of output says what was started ("started: ..." or "already up")

# shellcheck disable=SC2034  # used by the scripts that source this file
INFRA_DIR=${GPT_TRAIN_INFRA_DIR:-/tmp/gpt-train-infra}
INFRA_T0=$(date +%s.%N)

die() { echo "error: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "$(basename "$0") must run as root (it starts system daemons)"; }

elapsed() { awk -v a="$INFRA_T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1fs", b - a }'; }

# running PID: the process exists and is not a zombie (our daemons are reparented to init, which may reap late)
running() {
  kill -0 "$1" 2>/dev/null && [ "$(sed -n 's/^.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# ours PID: the process belongs to this harness (its command line or environment names $INFRA_DIR), so a
# stale pid file whose pid was reused by an unrelated process is never acted on
ours() { grep -qaF "$INFRA_DIR" "/proc/$1/cmdline" "/proc/$1/environ" 2>/dev/null; }

# alive PIDFILE: the pid file exists and names a running process of ours
alive() { [ -s "$1" ] && running "$(cat "$1")" && ours "$(cat "$1")"; }

# wait_for SECONDS CMD...: retry CMD (silenced) every 0.2 s
wait_for() {
  local n=$(( $1 * 5 )); shift
  local _
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "timeout waiting for: $*" >&2
  return 1
}

# stop_pidfile PIDFILE [SECONDS]: TERM the process, wait, then KILL; remove the pid file
stop_pidfile() {
  local f=$1 t=${2:-15} p _
  [ -s "$f" ] || { rm -f "$f"; return 0; }
  p=$(cat "$f")
  if running "$p" && ours "$p"; then
    kill "$p" 2>/dev/null || true
    for _ in $(seq $(( t * 10 ))); do running "$p" || break; sleep 0.1; done
    if running "$p"; then kill -9 "$p" 2>/dev/null || true; sleep 0.2; fi
  fi
  rm -f "$f"
}

# apt_install LOGFILE PKG...: install the Debian packages not yet installed (root only).
# One `apt-get update` per script run; waits for the dpkg lock when another apt is running.
# A temporary policy-rc.d stops package scripts from starting the services (mariadb, munge, docker)
# system-wide: the harness starts its own instances.
APT_UPDATED=0
apt_install() {
  local log=$1; shift
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  need_root
  export DEBIAN_FRONTEND=noninteractive
  local policy_added=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; policy_added=1
  fi
  local rc=0
  {
    if [ "$APT_UPDATED" = 0 ]; then
      apt-get -o DPkg::Lock::Timeout=300 update -q && APT_UPDATED=1
    fi
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}"
  } >>"$log" 2>&1 || rc=$?
  [ "$policy_added" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] || die "apt-get install ${missing[*]} failed (rc=$rc), see $log"
}

# have CMD...: every command is on PATH (or in /usr/sbin, which a non-login PATH may lack)
have() {
  local c
  for c in "$@"; do command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || return 1; done
}

# report NAME STARTED...: the one line every up script ends with
report() {
  local name=$1; shift
  if [ $# -eq 0 ]; then echo "$name: already up ($(elapsed))"
  else echo "$name: started: $* ($(elapsed))"; fi
}

# slurm_common_conf: the slurm.conf lines both test clusters share: scheduling every second (tests wait on it),
# requeue allowed, finished jobs kept in squeue for 5 minutes
slurm_common_conf() {
  cat <<'EOF'
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=10
InactiveLimit=0
EOF
}
