"""The job protocol: what a training process and whatever launched it (the sbatch script, submitit's batch
script, torchrun, docker) agree on. It imports no torch, so that a login node, a batch shell's helper or the
launcher can use it in a fraction of a second.

Each rule is written here once: the exit codes, the rendezvous address and port of a SLURM job, the
communication variables that the NCCL/Gloo settings become, and the batch shell's part (its rendezvous lines
and when it requeues the job) as one bash text, `shell_text()`. submitit's job script gets that text from
launch/slurm.py; slurm/pretrain.sbatch, which users sbatch without Python, carries a copy between marker lines
that `python -m gpt_train.protocol sync` rewrites (a test fails when the copy differs).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

# -- exit codes --------------------------------------------------------------------------------------------
EXIT_OK = 0
EXIT_USER_ERROR = 2  # bad config, missing data, a checkpoint of another model: retrying cannot help
EXIT_REQUEUE = 75  # EX_TEMPFAIL: the ranks checkpointed and stopped; requeue (or rerun) to continue
EXIT_HANG = 76  # the hang watchdog saw no progress: stacks dumped in RUN/diagnostics/; restart
EXIT_BAD_NODE = 77  # the start-up check failed on a node: requeue without it (NODE_REPORT_VAR names it)
EXIT_GAVE_UP = 78  # the restart policy stopped the job: the same failure again and again; do not retry
# Anything else (1, 128+signal) is a crash: restart.
EXIT_USR2 = 128 + 12  # killed by SIGUSR2 (12 on Linux, where SLURM runs; not signal.SIGUSR2 of this machine)

DEADLINE_VAR = "GPT_TRAIN_DEADLINE"  # the job's end time (epoch seconds), from the batch shell to the trainer
# A file on a file system that the batch shell and every node share: one line "HOST<TAB>why" per node that a
# rank found unhealthy; the batch shell excludes those nodes when it requeues the job.
NODE_REPORT_VAR = "GPT_TRAIN_NODE_REPORT"
# The exit code of the ranks' previous attempt in this allocation, from the batch shell or the local launcher:
# the trainer records the end of an attempt that died before it could (a SIGKILL, a lost node).
PREVIOUS_EXIT_VAR = "GPT_TRAIN_PREVIOUS_EXIT"
# The local launcher's run (torchrun, docker): the restarts it makes share it, as a SLURM allocation's do.
LAUNCH_VAR = "GPT_TRAIN_LAUNCH_ID"
# A folder where each rank writes its exit code as it ends (rank-K): torchrun reports any failure as 1, and
# the launcher must tell a checkpointed stop (75) from a hang, a bad node or a user error.
EXIT_DIR_VAR = "GPT_TRAIN_EXIT_DIR"
# The order in which the ranks' codes decide the job's: what must not be retried first, a clean exit last.
_PRECEDENCE = (EXIT_USER_ERROR, EXIT_GAVE_UP, EXIT_BAD_NODE, EXIT_HANG)
# Exits after which the ranks are not started again in the same allocation (everything else is a crash or a
# hang): done, a user error, checkpointed for a requeue, a node to leave behind, the restart policy's verdict,
# the time limit's USR2.
NO_RESTART = (EXIT_OK, EXIT_USER_ERROR, EXIT_REQUEUE, EXIT_BAD_NODE, EXIT_GAVE_UP, EXIT_USR2)


def restartable(code: int) -> bool:
    return code not in NO_RESTART


def record_exit(code: int, rank: int | str | None = None, env: dict[str, str] | None = None) -> None:
    """Write this rank's exit code into EXIT_DIR_VAR's folder, if the launcher set one: as rank-LOCAL_RANK,
    since each node's launcher reads its own ranks (0 .. ranks per node - 1)."""
    env = os.environ if env is None else env
    folder = env.get(EXIT_DIR_VAR)
    if not folder:
        return
    rank = env.get("LOCAL_RANK", env.get("RANK", "0")) if rank is None else rank
    try:
        with open(os.path.join(folder, f"rank-{rank}"), "w") as f:
            f.write(f"{int(code)}\n")
    except OSError:
        pass  # the launcher then sees the process's own exit code


def outcome(launcher_rc: int, folder: str | None, ranks: int) -> int:
    """The node's exit code from its ranks' recorded codes: a rank with no record (killed) or a crash makes it a
    crash (the launcher's code, or 1), unless a code that must not be retried, a bad node or a hang came."""
    if folder is None:  # the ranks' codes were resolved where they ran (a container's own supervisor)
        return launcher_rc
    codes = []
    for rank in range(ranks):
        try:
            with open(os.path.join(folder or "", f"rank-{rank}")) as f:
                codes.append(int(f.read().strip()))
        except (OSError, ValueError):
            codes.append(None)
    for code in _PRECEDENCE:
        if code in codes:
            return code
    if any(c is None or c not in (EXIT_OK, EXIT_REQUEUE) for c in codes):
        return launcher_rc or 1
    return EXIT_REQUEUE if EXIT_REQUEUE in codes else launcher_rc


def report_bad_node(host: str, why: str, env: dict[str, str] | None = None) -> str | None:
    """Append HOST to the job's node report (NODE_REPORT_VAR), if the launcher set one; the file's path."""
    path = (os.environ if env is None else env).get(NODE_REPORT_VAR)
    if not path:
        return None
    with open(path, "a") as f:  # one short line: appends from several nodes do not interleave
        f.write(f"{host}\t{' '.join(why.split())}\n")
    return path


# -- rendezvous of a SLURM job ---------------------------------------------------------------------------
PORT_BASE, PORT_SPAN = 20000, 20000


def master_port(job_id: int | str) -> int:
    """A port derived from the job id, so that two jobs sharing a node do not collide."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list ("gpu[01-03,07],login1") as host names, without calling scontrol:
    inside a container `scontrol` is usually missing."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{len(lo)}d}")
    return hosts


def master_address(nodelist: str) -> str:
    """The first node of the allocation hosts the rendezvous."""
    hosts = expand_nodelist(nodelist)
    return hosts[0] if hosts else "localhost"


# -- the communication environment ---------------------------------------------------------------------------

def comm_env(socket_ifname: str = "", ib: str = "auto", nccl_debug: str = "", async_error_handling: str = "auto",
             ) -> dict[str, str]:
    """The variables that the NCCL/Gloo settings become, name -> value; an unset setting ("", auto) gives none.
    ib is auto | on | off."""
    out = {}
    if socket_ifname:
        out["NCCL_SOCKET_IFNAME"] = socket_ifname
        if not socket_ifname.startswith(("^", "=")):  # gloo takes a plain interface name only
            out["GLOO_SOCKET_IFNAME"] = socket_ifname
    if ib != "auto":
        out["NCCL_IB_DISABLE"] = "0" if ib == "on" else "1"
    if nccl_debug:
        out["NCCL_DEBUG"] = nccl_debug
    if async_error_handling != "auto":
        out["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = async_error_handling
    return out


# -- the batch shell (bash) ----------------------------------------------------------------------------------

MAX_IN_JOB = 10  # restarts inside one allocation however the ranks die (the trainer's own limit is lower)

_SHELL = r"""# gpt_train_rendezvous: MASTER_ADDR, the allocation's first node (master_address() in Python);
# MASTER_PORT from the job id, so that two jobs sharing a node differ; OMP_NUM_THREADS, the task's CPUs unless set;
# SRUN_CPUS_PER_TASK, the same CPUs for srun, which since SLURM 22.05 no longer takes --cpus-per-task from the
# allocation (without it each rank gets one core: compile workers and the checkpoint thread starve);
# @DEADLINE@, the job's end time (the trainer stops preemption.deadline_margin_s before it), asked here
# since a container has no squeue; @NODE_REPORT@, where ranks name unhealthy nodes (in the submit folder, which
# every node and this shell see). Then the line that starts each run's output.
gpt_train_rendezvous() {
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)
  export MASTER_ADDR=${MASTER_ADDR:-$SLURMD_NODENAME}
  export MASTER_PORT=$((@PORT_BASE@ + SLURM_JOB_ID % @PORT_SPAN@))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
  unset @DEADLINE@
  gpt_train_end=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null)
  case $gpt_train_end in
    [0-9][0-9][0-9][0-9]-*) @DEADLINE@=$(date -d "$gpt_train_end" +%s) && export @DEADLINE@ ;;
  esac
  export @NODE_REPORT@=${@NODE_REPORT@:-${SLURM_SUBMIT_DIR:-$PWD}/.gpt-train/nodes-$SLURM_JOB_ID}
  mkdir -p "$(dirname "$@NODE_REPORT@")"
  echo "gpt-train: job $SLURM_JOB_ID start $((${SLURM_RESTART_COUNT:-0} + 1)) at $(date '+%F %T')" \
    "on $SLURM_JOB_NODELIST, $SLURM_NTASKS task(s), master $MASTER_ADDR:$MASTER_PORT, ends ${gpt_train_end:-?}"
}

# gpt_train_traps: this shell notes a SIGTERM (scancel, scontrol requeue, preemption, the time limit) in
# gpt_train_term, and a USR2 (the time limit is near: #SBATCH --signal=B:USR2@N) in gpt_train_usr2, passing
# it to the ranks.
gpt_train_traps() {
  gpt_train_term=0 gpt_train_usr2=0 gpt_train_pid=""
  trap 'gpt_train_term=1; echo "gpt-train: batch shell got SIGTERM (scancel, scontrol requeue or the time limit)"' TERM
  trap 'gpt_train_usr2=1; echo "gpt-train: USR2 (time limit near): passing it to the ranks"
        [ -n "$gpt_train_pid" ] && kill -USR2 "$gpt_train_pid" 2>/dev/null' USR2
}

# gpt_train_launch COMMAND...: run the ranks (srun ...) in the background, so that this shell takes signals
# while they train, and start them again inside the allocation (a new srun takes seconds, a requeue waits in the
# queue) when they crashed or hung: any exit but @EXIT_OK@, @EXIT_USER_ERROR@ (user error), @EXIT_REQUEUE@ (checkpointed,
# requeue), @EXIT_BAD_NODE@ (bad node, requeue without it), @EXIT_GAVE_UP@ (the restart policy gave up) and @EXIT_USR2@
# (killed by the time limit's USR2), unless SLURM is ending, preempting or timing out the job. The trainer keeps the count (fault.in_job_restarts: past it a start exits @EXIT_REQUEUE@);
# GPT_TRAIN_MAX_IN_JOB (default @MAX_IN_JOB@) caps it here too, for ranks that die before they can decide. The ranks
# learn the previous exit from @PREVIOUS_EXIT@. Sets gpt_train_rc.
gpt_train_launch() {
  local n=0
  unset @PREVIOUS_EXIT@
  while true; do
    "$@" &
    gpt_train_pid=$!
    while kill -0 "$gpt_train_pid" 2>/dev/null; do wait "$gpt_train_pid"; done
    wait "$gpt_train_pid"
    gpt_train_rc=$?
    gpt_train_pid=""
    case $gpt_train_rc in
      @NO_RESTART@) return ;;
    esac
    # SLURM ends, preempts or times out the job: not the moment to start the ranks again
    [ "${gpt_train_term:-0}" = 1 ] || [ "${gpt_train_usr2:-0}" = 1 ] && return
    case $(scontrol show job "$SLURM_JOB_ID" 2>/dev/null) in *PreemptTime=[0-9]*) return ;; esac
    if [ "$n" -ge "${GPT_TRAIN_MAX_IN_JOB:-@MAX_IN_JOB@}" ]; then
      echo "gpt-train: the ranks ended with exit $gpt_train_rc after $n restart(s) in this allocation (the most," \
        "GPT_TRAIN_MAX_IN_JOB): not starting them again"
      return
    fi
    n=$((n + 1))
    export @PREVIOUS_EXIT@=$gpt_train_rc
    if [ "$gpt_train_rc" = @EXIT_HANG@ ]; then
      echo "gpt-train: the ranks hung (exit $gpt_train_rc; stacks in RUN/diagnostics/): restart $n in this allocation"
    else
      echo "gpt-train: the ranks crashed (exit $gpt_train_rc): restart $n in this allocation"
    fi
  done
}

# gpt_train_requeue_why RC TERMED USR2ED JOBINFO: why the job must run again now that the ranks ended with RC,
# or nothing. TERMED, USR2ED: 1 when this shell got SIGTERM, USR2; JOBINFO: `scontrol show job` of the job.
# A SIGTERM here means that SLURM ends the job (scancel; scontrol requeue requeues it by itself), unless the
# time limit came. SLURM does not requeue a job whose ranks end during a preemption's grace time: this shell
# does, also when they died before they could checkpoint, or when the time limit's USR2 killed them
# (exit @EXIT_USR2@: submitit sends it to the ranks; slurm/pretrain.sbatch gets it itself and passes it on).
gpt_train_requeue_why() {
  local rc=$1 termed=$2 usr2ed=$3 job=$4
  if [ "$rc" = @EXIT_OK@ ]; then
    return 0
  elif [ "$termed" = 1 ]; then
    case "$rc $job" in "@EXIT_REQUEUE@ "*Reason=TimeLimit*) echo "the time limit came" ;; esac
  elif [ "$rc" = @EXIT_REQUEUE@ ]; then
    echo "the ranks checkpointed and exited @EXIT_REQUEUE@"
  elif [ "$rc" = @EXIT_BAD_NODE@ ]; then
    echo "a node failed the start-up check (exit @EXIT_BAD_NODE@)"
  else
    case $job in *PreemptTime=[0-9]*) echo "preempted (exit $rc)"; return 0 ;; esac
    if [ "$usr2ed" = 1 ] || [ "$rc" = @EXIT_USR2@ ]; then
      echo "USR2 (time limit near) came before the ranks listened (exit $rc)"
    fi
  fi
}

# gpt_train_exclusions JOBINFO: the nodes to leave behind, comma-separated: the job's ExcNodeList and the nodes
# of @NODE_REPORT@; nothing when leaving them would leave fewer nodes in the partition than the job needs.
gpt_train_exclusions() {
  local job=$1 had new all total
  [ -s "${@NODE_REPORT@:-}" ] || return 0
  had=$(printf '%s\n' "$job" | sed -n 's/.*ExcNodeList=\([^ ]*\).*/\1/p' | grep -v '^(null)$')
  new=$(cut -f1 "$@NODE_REPORT@" | sort -u | paste -sd, -)
  all=$(scontrol show hostnames "${had:+$had,}$new" 2>/dev/null | sort -u | paste -sd, -)
  total=$(sinfo -h -p "${SLURM_JOB_PARTITION:-}" -o %D 2>/dev/null | awk '{n += $1} END {print n + 0}')
  if [ -z "$all" ] || [ $(($(echo "$all" | tr , '\n' | wc -l) + ${SLURM_JOB_NUM_NODES:-1})) -gt "$total" ]; then
    echo "gpt-train: not leaving node(s) $new behind: the partition would have too few nodes for the job" >&2
    return 0
  fi
  echo "$all"
}

# gpt_train_requeue WHY RESTARTS CAP: when WHY is set and the job was restarted fewer than CAP times, requeue it
# (leaving the reported nodes behind: requeuehold, ExcNodeList, release, since a running job's ExcNodeList cannot
# change) and end this shell with success; otherwise say why not and return. From the batch shell, never from
# inside the step: a container usually has no scontrol.
gpt_train_requeue() {
  local why=$1 restarts=$2 cap=$3 exclude
  [ -n "$why" ] || return 0
  if [ "$restarts" -ge "$cap" ]; then
    echo "gpt-train: $why, but the job was restarted $restarts times (the cap, --max-restarts or" \
      "MAX_RESTARTS, is $cap): not requeueing"
    return 0
  fi
  exclude=$(gpt_train_exclusions "$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null)")
  if [ -n "$exclude" ]; then
    echo "gpt-train: $why: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $cap) without" \
      "node(s) $exclude:" "$(cut -f2- "$@NODE_REPORT@" | sort -u | paste -sd';' -)"
    # SLURM sends this shell SIGTERM as the hold lands: the three commands must not die with it.
    if (trap '' TERM; scontrol requeuehold "$SLURM_JOB_ID" || exit 1
        scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="$exclude"; scontrol release "$SLURM_JOB_ID"); then
      : >"$@NODE_REPORT@"
      exit 0
    fi
  else
    echo "gpt-train: $why: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $cap)"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
  fi
  echo "gpt-train: scontrol requeue $SLURM_JOB_ID failed"
}
"""


def shell_text() -> str:
    """The bash functions of the batch shell, filled in with the constants above; defining them runs nothing."""
    values = {"EXIT_OK": EXIT_OK, "EXIT_REQUEUE": EXIT_REQUEUE, "EXIT_USR2": EXIT_USR2, "EXIT_HANG": EXIT_HANG,
              "EXIT_BAD_NODE": EXIT_BAD_NODE, "EXIT_GAVE_UP": EXIT_GAVE_UP, "EXIT_USER_ERROR": EXIT_USER_ERROR,
              "PORT_BASE": PORT_BASE, "PORT_SPAN": PORT_SPAN, "DEADLINE": DEADLINE_VAR, "NODE_REPORT": NODE_REPORT_VAR,
              "PREVIOUS_EXIT": PREVIOUS_EXIT_VAR, "MAX_IN_JOB": MAX_IN_JOB,
              "NO_RESTART": " | ".join(map(str, NO_RESTART))}
    return re.sub(r"@([A-Z_0-9]+)@", lambda m: str(values[m.group(1)]), _SHELL)


# -- the copy in slurm/pretrain.sbatch -------------------------------------------------------------------------

BEGIN = "# >>> generated by gpt_train/protocol.py (python -m gpt_train.protocol sync): do not edit"
END = "# <<< end"
SBATCH = Path(__file__).resolve().parent.parent / "slurm" / "pretrain.sbatch"  # in a checkout of the repository


def synced(script: str) -> str:
    """SCRIPT with the text between its marker lines replaced by shell_text()."""
    head, begin, rest = script.partition(BEGIN + "\n")
    _, end, tail = rest.partition(END + "\n")
    if not (begin and end):
        raise ValueError(f"no block between '{BEGIN}' and '{END}' lines")
    return head + begin + shell_text() + end + tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt_train.protocol", description="Job protocol tools.")
    sub = p.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="rewrite the generated block of sbatch scripts from this module")
    sync.add_argument("files", nargs="*", type=Path, default=[SBATCH], metavar="FILE",
                      help=f"default: {SBATCH}")
    args = p.parse_args(argv)
    for path in args.files:
        old = path.read_text()
        try:
            new = synced(old)
        except ValueError as e:
            print(f"{path}: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        if new != old:
            path.write_text(new)
        print(f"{path}: {'updated' if new != old else 'up to date'}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
