#!/usr/bin/env bash
# One-node SLURM 22.05 test cluster "gpttrain" (Debian slurm-wlm), as root, no systemd, no cgroups:
# munged + MariaDB + slurmdbd (so `sacct` works) + slurmctld + slurmd, all private to this harness:
#   own munge socket/key, own MariaDB datadir on 127.0.0.1:3327, own ports (ctld 6827, slurmd 6828, dbd 6829),
#   own config dir, so it runs beside a system SLURM or the recipes' cluster without touching /etc/slurm.
# Partitions: debug (default, PriorityTier=1, preempted with REQUEUE, GraceTime=10)
#             urgent (PriorityTier=10): a job there requeues debug jobs holding the CPUs it needs.
# The node advertises GPT_TRAIN_SLURM_CPUS (default 4) CPUs on a 2-core machine (overcommit), so two
# 2-task jobs run at once; to preempt, the urgent job must need CPUs that debug jobs hold (e.g. --exclusive).
#
# Usage:  tests/infra/slurm_up.sh ; export SLURM_CONF=/tmp/gpt-train-infra/slurm/etc/slurm.conf
#         (or: source /tmp/gpt-train-infra/slurm/env.sh). Stop with tests/infra/slurm_down.sh.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$H/lib.sh"
need_root

D=$INFRA_DIR/slurm
MD=$D/munge                                # munged: key, socket, log (owned by the munge user)
MY=$D/mysql                                # MariaDB datadir (owned by mysql)
NCPU=${GPT_TRAIN_SLURM_CPUS:-4}
CTLD_PORT=6827 SLURMD_PORT=6828 DBD_PORT=6829 DB_PORT=3327
export SLURM_CONF=$D/etc/slurm.conf
mkdir -p "$D"/{etc,log,state,spool,run}
started=()

# 1. packages (~12 s on a fresh machine, skipped when the binaries exist)
have slurmctld slurmd slurmdbd sbatch sacct munged mariadbd mariadb-install-db setpriv ||
  apt_install "$D/log/apt.log" slurmctld slurmd slurmdbd slurm-client munge mariadb-server util-linux
export PATH=$PATH:/usr/sbin

# 2. munged with its own key and socket; it refuses to run as root -> setpriv (execs, so $! is munged)
munge_ok() { munge -S "$MD/munge.socket" -n | unmunge -S "$MD/munge.socket"; }
install -d -o munge -g munge -m 0755 "$MD"   # munged: socket dir must be a+x
if [ ! -s "$MD/munge.key" ]; then
  dd if=/dev/urandom bs=1024 count=1 of="$MD/munge.key" 2>/dev/null
  chown munge:munge "$MD/munge.key"; chmod 0400 "$MD/munge.key"
fi
if ! alive "$D/run/munged.pid"; then
  rm -f "$MD/munge.socket" "$MD/munge.socket.lock"
  setsid setpriv --reuid=munge --regid=munge --init-groups -- /usr/sbin/munged -F \
    --socket="$MD/munge.socket" --key-file="$MD/munge.key" --pid-file="$MD/munged.pid" \
    --log-file="$MD/munged.log" --seed-file="$MD/munged.seed" >"$D/log/munged.out" 2>&1 </dev/null &
  echo $! >"$D/run/munged.pid"; started+=("munged=$!")
fi
wait_for 20 munge_ok || die "munged did not start: $(tail -3 "$D/log/munged.out" "$MD/munged.log" 2>/dev/null)"

# 3. config (rewritten each time: it is cheap and keeps a running cluster in sync with this script)
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
cat >"$D/etc/slurm.conf.new" <<EOF
# written by tests/infra/slurm_up.sh
ClusterName=gpttrain
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job is held (BeginTime) before it may restart: default 120 s
AuthInfo=cred_expire=10,socket=$MD/munge.socket
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid.internal
SlurmdPidFile=$D/run/slurmd.pid.internal
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# with auth/munge this names the munged socket used to talk to slurmdbd (AuthInfo socket= is not used for it)
AccountingStoragePass=$MD/munge.socket
$(slurm_common_conf)
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$MEM_MB State=UNKNOWN
# real preemption: a job in 'urgent' requeues the 'debug' jobs that hold the CPUs it needs
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10
PartitionName=urgent Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
if cmp -s "$D/etc/slurm.conf.new" "$SLURM_CONF"; then rm "$D/etc/slurm.conf.new"
else
  mv "$D/etc/slurm.conf.new" "$SLURM_CONF"
  if alive "$D/run/slurmctld.pid"; then scontrol reconfigure 2>/dev/null || true; fi   # config changed under a live cluster
fi
printf 'export SLURM_CONF=%s\n' "$SLURM_CONF" >"$D/env.sh"

# 4. accounting: private MariaDB (TCP 127.0.0.1:$DB_PORT) + slurmdbd (reads slurmdbd.conf next to $SLURM_CONF)
fresh=0
alive "$D/run/slurmdbd.pid" || alive "$D/run/slurmctld.pid" || fresh=1
sql() { mariadb --no-defaults --socket="$MY/mysqld.sock" -u root "$@"; }
if ! alive "$D/run/mariadb.pid"; then
  if [ ! -d "$MY/mysql" ]; then
    rm -rf "$MY"; install -d -o mysql -g mysql "$MY"
    mariadb-install-db --no-defaults --user=mysql --datadir="$MY" --skip-test-db \
      >"$D/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed, see $D/log/mariadb-install.log"
  fi
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$MY" --socket="$MY/mysqld.sock" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$MY/mariadbd.pid" \
    --log-error="$MY/mariadb.err" --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
    --skip-log-bin >"$D/log/mariadb.out" 2>&1 </dev/null &
  echo $! >"$D/run/mariadb.pid"; started+=("mariadb=$!")
fi
wait_for 30 sql -e "select 1" || die "mariadb did not start: $(tail -5 "$MY/mariadb.err")"
sql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
cat >"$D/etc/slurmdbd.conf" <<EOF
# written by tests/infra/slurm_up.sh
AuthType=auth/munge
AuthInfo=socket=$MD/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.pid.internal
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
chmod 600 "$D/etc/slurmdbd.conf"   # slurmdbd refuses a world-readable conf
if ! alive "$D/run/slurmdbd.pid"; then
  setsid /usr/sbin/slurmdbd -D >"$D/log/slurmdbd.out" 2>&1 </dev/null &
  echo $! >"$D/run/slurmdbd.pid"; started+=("slurmdbd=$!")
fi
wait_for 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT" || die "slurmdbd did not start: $(tail -5 "$D/log/slurmdbd.log")"

# 5. slurmctld + slurmd in the foreground (-D), detached with setsid
if ! alive "$D/run/slurmctld.pid"; then
  setsid /usr/sbin/slurmctld -D -i -f "$SLURM_CONF" >"$D/log/slurmctld.out" 2>&1 </dev/null &
  echo $! >"$D/run/slurmctld.pid"; started+=("slurmctld=$!")
fi
wait_for 30 sh -c 'scontrol ping | grep -q UP' || die "slurmctld did not start: $(tail -5 "$D/log/slurmctld.log")"
if [ "$fresh" = 1 ]; then
  # jobs recovered from an earlier session's state (a crash, a killed test run) must not run again
  squeue -h -o %i | xargs -r scancel 2>/dev/null || true
fi
if ! alive "$D/run/slurmd.pid"; then
  setsid /usr/sbin/slurmd -D -N localhost -f "$SLURM_CONF" >"$D/log/slurmd.out" 2>&1 </dev/null &
  echo $! >"$D/run/slurmd.pid"; started+=("slurmd=$!")
fi
node_ok() { sinfo -h -n localhost -o %T | grep -qE '^(idle|mixed|allocated|completing)'; }
if ! wait_for 30 node_ok; then
  scontrol update nodename=localhost state=resume 2>/dev/null || true
  wait_for 15 node_ok || die "node did not come up: $(sinfo -h -o '%T %E'; tail -5 "$D/log/slurmd.log")"
fi
wait_for 30 sh -c 'sacctmgr -n -P show cluster format=cluster | grep -qx gpttrain' ||
  die "cluster not registered in slurmdbd: $(tail -5 "$D/log/slurmdbd.log")"
report "slurm (SLURM_CONF=$SLURM_CONF)" "${started[@]}"
