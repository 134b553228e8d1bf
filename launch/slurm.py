"""SLURM through submitit: one task per GPU (or per CPU rank), each running `gpt_train.train.train` in-process.

Who does what when the job must stop (measured on SLURM 22.05, see docs/launching.md):

* The trainer (gpt_train/preemption.py) turns SIGTERM, SIGUSR1, SIGUSR2 and the job's end time into a
  checkpoint at a step boundary, agreed by every rank, and returns 75 ("requeue me", protocol.EXIT_REQUEUE).
  `Trainer` below exits the task with it.
* The requeue is issued by the *batch shell*, after srun returns (the teardown lines below), never from inside
  the step: inside a container there is usually no `scontrol`, and a job that ends by itself during a
  preemption's grace time is not requeued by SLURM (it ends FAILED or COMPLETED). The rule of when (at most
  --max-restarts times, counted by SLURM_RESTART_COUNT) is gpt_train/protocol.py's shell text, which
  slurm/pretrain.sbatch carries as well.
* SLURM sends USR2 to the ranks `signal_delay_s` before the time limit (`--signal=USR2@N`); submitit's own
  USR2 handler (checkpoint() then `scontrol requeue` from rank 0) only acts before the trainer has installed
  its handlers, i.e. while a restart is still loading. `Trainer` inherits `Checkpointable.checkpoint`, which
  resubmits the same callable: the state is in the run directory. submitit's `max_num_timeout` is set to
  --max-restarts as well.
* A requeue after the run finished runs `train()` again, which sees step >= max_steps and returns 0 at once.

A sweep is one job array (`Resources.array` tasks, one pickled `Trainer` each, one batch script for all). In an
array task SLURM_JOB_ID is the task's own id, but one task gets the array's id itself, which scontrol and
squeue read as the whole array: `scontrol requeue` from that task would requeue every task. So the batch
script of an array names its task as ARRAYID_TASKID (GPT_TRAIN_SLURM_JOB) wherever the protocol's functions
pass SLURM_JOB_ID to scontrol or squeue (measured on SLURM 22.05: the last task gets the array's id).
MASTER_PORT and the node report stay per task: they use the task's own SLURM_JOB_ID.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable

from gpt_train import protocol
from gpt_train.errors import UserError
from launch import snapshot
from launch import spec as specs
from launch.snapshot import Snapshot
from launch.spec import JobSpec, job_python

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
            "REVOKED", "SPECIAL_EXIT"}


@dataclass
class Resources:
    partition: str = ""
    account: str = ""
    qos: str = ""
    time_min: int = 24 * 60
    constraint: str = ""
    mem: str = ""
    exclusive: bool = False
    cpus_per_task: int = 0
    gpus: bool = True  # False: the ranks are CPU processes (no GPU request)
    signal_delay_s: int = 180
    max_restarts: int = 10
    sbatch_args: list[str] = field(default_factory=list)  # "--key=value" or "--flag"
    log_dir: str = ""
    container_image: str = ""  # pyxis
    container_mounts: str = ""
    apptainer: str = ""
    container_python: str = "python3"
    array: int = 0  # a job array of this many tasks (a sweep); 0: one job
    max_parallel: int = 0  # an array's tasks running at once (0: all)
    dependency: str = ""  # sbatch --dependency (--after)
    code: Snapshot | None = None  # the code the ranks import (launch/snapshot.py)


# -- resources -----------------------------------------------------------------------------------------------

def parse_time(text: str) -> int:
    """SLURM's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) as whole minutes, rounded up."""
    text = str(text).strip()
    days, _, rest = text.rpartition("-") if "-" in text else ("0", "", text)
    try:
        parts = [int(p) for p in rest.split(":")]
        d = int(days)
    except ValueError:
        raise ValueError(f"--time '{text}' is not a SLURM time (MM, HH:MM:SS or D-HH:MM:SS)") from None
    if "-" in text:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        h, m, s = parts
    elif len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    elif len(parts) == 3:
        h, m, s = parts
    else:
        raise ValueError(f"--time '{text}' is not a SLURM time (MM, HH:MM:SS or D-HH:MM:SS)")
    total_s = ((d * 24 + h) * 60 + m) * 60 + s
    if total_s <= 0:
        raise ValueError(f"--time '{text}' must be positive")
    return -(-total_s // 60)


def partition_has_gpus(partition: str = "", env: dict | None = None) -> bool | None:
    """Whether the partition (the default one if empty) has GPU gres, from sinfo; None when sinfo cannot say."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %G"], capture_output=True, text=True, timeout=15, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    rows = [line.split(None, 1) for line in out.stdout.splitlines() if line.strip()]
    wanted = [r for r in rows if (r[0].rstrip("*") == partition if partition else r[0].endswith("*"))] or rows
    return any("gpu" in (r[1] if len(r) > 1 else "") for r in wanted)


def _sbatch_arg(arg: str) -> tuple[str, object]:
    if not arg.startswith("--") or len(arg) < 3:
        raise ValueError(f"--sbatch-arg '{arg}': give sbatch's long form, --name=value or --flag")
    key, sep, value = arg[2:].partition("=")
    return key, (value if sep else True)


def executor_parameters(spec: JobSpec, res: Resources) -> dict:
    """SlurmExecutor.update_parameters(**this): every #SBATCH line of the job comes from here."""
    extra = dict(_sbatch_arg(a) for a in res.sbatch_args)
    params: dict = {
        "job_name": spec.job_name,
        "nodes": spec.nodes,
        "ntasks_per_node": spec.ranks_per_node,  # one task per GPU (or per CPU rank)
        "time": res.time_min,
        "signal_delay_s": res.signal_delay_s,  # --signal=USR2@N, to the ranks
        "wckey": None,  # submitit's default "submitit" is rejected where wckeys are enforced
        "setup": setup_lines(spec, res),
        "teardown": teardown_lines(res),
        "additional_parameters": {"requeue": True, "chdir": os.getcwd(),
                                  **({"kill-on-invalid-dep": "yes"} if res.dependency else {}), **extra},
    }
    if res.array:
        params["array_parallelism"] = res.max_parallel or res.array
    if res.dependency:
        params["dependency"] = res.dependency
    if res.gpus and not ({"gres", "gpus-per-node", "gpus_per_node", "gpus"} & set(extra)):
        params["gpus_per_node"] = spec.ranks_per_node
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(res, key):
            params[key] = getattr(res, key)
    if res.cpus_per_task:
        params["cpus_per_task"] = res.cpus_per_task
    if res.exclusive:
        params["exclusive"] = True
    # The batch shell runs srun itself (launch_command), so that it can start the ranks again after a crash.
    params["use_srun"] = False
    return params


def srun_words(spec: JobSpec, res: Resources) -> list[str]:
    """srun as submitit would run it (each task's output in FOLDER/JOBID_RANK_log.out), and our options."""
    paths = submitit.core.utils.JobPaths(folder(spec, res))
    # An array task's files are ARRAYID_TASKID_..., as submitit reads them; srun's %j would be the task's own id.
    out, err = (str(p).replace("%j", "%A_%a") if res.array else str(p) for p in (paths.stdout, paths.stderr))
    # Not --kill-on-bad-exit: the ranks exit 75 a moment apart, and srun would kill the later ones, turning the
    # step's 75 into 143. --wait: once one rank has ended, the others get 60 s, then srun kills them.
    words = ["srun", "--unbuffered", "--output", out, "--error", err, "--wait=60"]
    if res.container_image:
        words += [f"--container-image={res.container_image}", f"--container-mounts={mounts(spec, res)}",
                  f"--container-workdir={os.getcwd()}"]
    return words


def launch_command(spec: JobSpec, res: Resources) -> str:
    """The batch shell's command before `-u -m submitit.core._submit FOLDER`: the protocol's gpt_train_launch
    (restarts in the allocation), srun, and the python of each task."""
    return " ".join(["gpt_train_launch", shlex.join(srun_words(spec, res)), python_command(spec, res)])


CACHE = "/cache"  # the image's caches (docker/Dockerfile): torch.compile and Triton kernels, HF, wandb


def mounts(spec: JobSpec, res: Resources) -> str:
    """Binds of a container (pyxis --container-mounts, apptainer --bind): --container-mounts, else the working
    directory, the logs (submitit's pickles), a local run_dir's parent and the local paths the config reads that
    exist here (read-only; launch.spec.mounts); then, unless those bind /cache already, cache_dir() onto /cache."""
    if res.container_mounts:
        binds = [b for b in res.container_mounts.split(",") if b]
    else:
        binds = [f"{p}:{p}" + ("" if rw else ":ro") for p, rw in specs.mounts(spec, os.getcwd(), (log_dir(spec, res),))]
    if not any(b.split(":")[1:2] in ([CACHE], [CACHE + "/"]) for b in binds):
        binds.append(f"{cache_dir(spec, res)}:{CACHE}")
    return ",".join(binds)


def log_dir(spec: JobSpec, res: Resources) -> str:
    return specs.log_dir(spec, res.log_dir)


def cache_dir(spec: JobSpec, res: Resources) -> str:
    """The host folder bound onto the image's /cache: an Apptainer image is read-only (an enroot one unless made
    writable), and torch.compile writes its kernels there at the first step. LOG_DIR/cache, kept across
    requeues and resubmissions of the run; slurm/pretrain.sbatch binds logs/JOB_NAME/cache, the same folder."""
    return os.path.join(log_dir(spec, res), "cache")


def python_command(spec: JobSpec, res: Resources) -> str:
    """The shell words that start python in each task (submitit appends `-u -m submitit.core._submit DIR`)."""
    if res.apptainer:
        nv = ["--nv"] if res.gpus else []
        return shlex.join(["apptainer", "exec", *nv, "--bind", mounts(spec, res), res.apptainer, res.container_python])
    if res.container_image:
        return shlex.quote(res.container_python)
    return shlex.quote(job_python())


# -- the job script around srun --------------------------------------------------------------------------------

# See the module's docstring: an array task's scontrol and squeue calls name the task, not the array.
_ARRAY_TASK_CALLS = r"""# gpt-train (launch/slurm.py): in a job array one task's SLURM_JOB_ID is the array's own id, which
# scontrol and squeue read as every task: the protocol's calls name this task instead (ARRAYID_TASKID)
gpt_train_as_task() {
  local tool=$1 w words=()
  shift
  for w in "$@"; do
    case $w in
      "$SLURM_JOB_ID") words+=("$GPT_TRAIN_SLURM_JOB") ;;
      "JobId=$SLURM_JOB_ID") words+=("JobId=$GPT_TRAIN_SLURM_JOB") ;;
      *) words+=("$w") ;;
    esac
  done
  command "$tool" "${words[@]}"
}
scontrol() { gpt_train_as_task scontrol "$@"; }
squeue() { gpt_train_as_task squeue "$@"; }"""


def _shell_path(template: str, id_word: str) -> str:
    """A path with %j as one bash word, %j being the value of ID_WORD (a "$VAR" expansion)."""
    return id_word.join(shlex.quote(part) if part else "" for part in template.split("%j"))


def setup_lines(spec: JobSpec, res: Resources) -> list[str]:
    """Batch-shell lines before srun: the protocol's functions, the job's own id and log, the code to import,
    the rendezvous, the NCCL settings."""
    log = str(submitit.core.utils.JobPaths(folder(spec, res)).stdout).replace("%t", "0")
    lines = [
        "# gpt-train (launch/slurm.py): the job protocol's functions (gpt_train/protocol.py)",
        *protocol.shell_text().splitlines(),
    ]
    if res.array:
        lines += [*_ARRAY_TASK_CALLS.splitlines(),
                  'export GPT_TRAIN_SLURM_JOB="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"']
    else:
        lines.append('export GPT_TRAIN_SLURM_JOB="$SLURM_JOB_ID"')
    lines += [
        "# rank 0's output, every attempt's (submitit's JOBID_0_log.out; an array task's JOBID is ARRAYID_TASKID)",
        "export GPT_TRAIN_LOG=" + _shell_path(log, '"$GPT_TRAIN_SLURM_JOB"'),
        *(snapshot.shell_lines(res.code) if res.code else []),
        "gpt_train_traps",
        "gpt_train_rendezvous",
    ]
    if res.code:
        lines.append(f'echo "gpt-train: code ${snapshot.COMMIT_VAR} from ${snapshot.DIR_VAR}; log $GPT_TRAIN_LOG"')
    if (res.apptainer or res.container_image) and f"{cache_dir(spec, res)}:{CACHE}" in mounts(spec, res).split(","):
        lines.append(f"mkdir -p {shlex.quote(cache_dir(spec, res))}  # bound onto the image's {CACHE}, writable")
    return lines + [f"export {k}={shlex.quote(v)}" for k, v in spec.env.items()]


def teardown_lines(res: Resources) -> list[str]:
    """Batch-shell lines after the ranks ended: requeue the job when they asked for it (or were preempted)."""
    return [
        'gpt_train_job=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null)',
        "# USR2 goes to the ranks (--signal=USR2@N), not to this shell: one that came too early shows as exit "
        f"{protocol.EXIT_USR2}",
        'gpt_train_requeue "$(gpt_train_requeue_why "$gpt_train_rc" "$gpt_train_term" 0 "$gpt_train_job")" '
        f'"${{SLURM_RESTART_COUNT:-0}}" {int(res.max_restarts)}',
        'exit "$gpt_train_rc"',
    ]


# -- what each task runs ---------------------------------------------------------------------------------------

class Trainer(Checkpointable):
    """The submitted callable: once per task. Sets the c10d variables from submitit's JobEnvironment (as
    submitit.helpers.TorchDistributedEnvironment does) and runs the training loop in this process."""

    def __init__(self, config: str, overrides: list[str], env: dict[str, str] | None = None):
        self.config = config
        self.overrides = list(overrides)
        self.env = dict(env or {})

    def world_env(self) -> dict[str, str]:
        job = submitit.JobEnvironment()
        return {
            "RANK": str(job.global_rank),
            "LOCAL_RANK": str(job.local_rank),
            "WORLD_SIZE": str(job.num_tasks),
            "LOCAL_WORLD_SIZE": str(max(1, job.num_tasks // max(1, job.num_nodes))),
            "MASTER_ADDR": os.environ.get("MASTER_ADDR") or job.hostnames[0],
            "MASTER_PORT": os.environ.get("MASTER_PORT") or str(protocol.master_port(job.raw_job_id)),
        }

    def __call__(self) -> dict:
        os.environ.update(self.env)
        world = self.world_env()
        os.environ.update(world)  # overwrite: a submission from inside another job must not leak its ranks
        code = os.environ.get(snapshot.DIR_VAR)
        if code and world["RANK"] == "0" and not Path(__file__).resolve().is_relative_to(Path(code).resolve()):
            print(f"gpt-train: warning: this job runs {Path(__file__).resolve().parent.parent}, not the code "
                  f"submitted ({code}): its python puts the working directory first (PYTHONSAFEPATH needs "
                  "Python 3.11)", file=sys.stderr, flush=True)
        from gpt_train.config import load_config
        from gpt_train.train import train

        try:
            rc = train(load_config(self.config, self.overrides))
        except UserError as e:  # not an exception for submitit: its exit code tells the batch shell not to retry
            print(f"gpt-train train: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(e.exit_code) from None
        sys.stdout.flush()
        if rc == protocol.EXIT_REQUEUE:
            if world["RANK"] == "0":
                print(f"gpt-train: the ranks stopped to be requeued (exit {rc}); the batch shell requeues", flush=True)
            raise SystemExit(rc)  # no result pickle: the job is not over
        if rc:
            raise SystemExit(rc)
        return {"rank": int(world["RANK"]), "restarts": int(os.environ.get("SLURM_RESTART_COUNT", 0))}


# -- submit, print, follow ---------------------------------------------------------------------------------------

def folder(spec: JobSpec, res: Resources) -> str:
    return os.path.join(log_dir(spec, res), "%j")


def script_text(spec: JobSpec, res: Resources) -> str:
    """The sbatch script submitit writes for this job (the same function it calls at submission)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([launch_command(spec, res), "-u -m submitit.core._submit", shlex.quote(folder(spec, res))])
    return _make_sbatch_string(command=command, folder=folder(spec, res), map_count=res.array or None,
                               **executor_parameters(spec, res))


def make_executor(spec: JobSpec, res: Resources) -> submitit.SlurmExecutor:
    ex = submitit.SlurmExecutor(folder=folder(spec, res), max_num_timeout=res.max_restarts,
                                python=launch_command(spec, res))
    ex.update_parameters(**executor_parameters(spec, res))
    return ex


def submit(spec: JobSpec, res: Resources) -> submitit.Job:
    return make_executor(spec, res).submit(Trainer(spec.config, spec.overrides, spec.env))


def submit_array(elements: list[JobSpec], res: Resources) -> list[submitit.Job]:
    """One job array, task i running ELEMENTS[i] (res.array == len(ELEMENTS)): submitit pickles one Trainer per
    task, and the batch script, made from the first element, is the same for all (they differ in overrides)."""
    assert res.array == len(elements) > 1
    return make_executor(elements[0], res).submit_array([Trainer(s.config, s.overrides, s.env) for s in elements])


# -- the follow-up job (--then) ------------------------------------------------------------------------------

def then_path(spec: JobSpec, res: Resources, job_id: str) -> str:
    return os.path.join(log_dir(spec, res), f"then-{job_id}.sh")


def then_script(commands: list[str], job_id: str, spec: JobSpec, res: Resources) -> str:
    """The follow-up's sbatch script (launch/chain.py): one task, on the training job's partition, account and
    qos (one GPU if it had GPUs), after job JOB_ID succeeded; for a sweep an array, task i running COMMANDS[i]
    after training task i. It imports the submitted code too, and finds `gpt-train` next to the job's python."""
    array = len(commands) > 1
    flags: dict[str, object] = {
        "job-name": f"{spec.job_name}-then", "dependency": f"{'aftercorr' if array else 'afterok'}:{job_id}",
        "kill-on-invalid-dep": "yes", "nodes": 1, "ntasks": 1, "time": res.time_min, "open-mode": "append",
        "output": os.path.join(log_dir(spec, res), "then-%A_%a.out" if array else "then-%j.out"),
        "chdir": os.getcwd(),
    }
    if array:
        flags["array"] = f"0-{len(commands) - 1}%{res.max_parallel or len(commands)}"
    for key in ("partition", "account", "qos"):
        if getattr(res, key):
            flags[key] = getattr(res, key)
    if res.gpus:
        flags["gpus-per-node"] = 1
    if res.cpus_per_task:
        flags["cpus-per-task"] = res.cpus_per_task
    lines = ["#!/bin/bash", f"# gpt-train-submit --then: after job {job_id} (launch/chain.py)",
             *(f"#SBATCH --{k}={shlex.quote(str(v))}" for k, v in flags.items()), ""]
    lines += snapshot.shell_lines(res.code) if res.code else []
    bindir = os.path.dirname(job_python())
    if bindir:
        lines.append(f'export PATH={shlex.quote(bindir)}"${{PATH:+:$PATH}}"  # gpt-train of the job\'s python')
    if array:
        lines += ["case $SLURM_ARRAY_TASK_ID in", *(f"  {i}) {c} ;;" for i, c in enumerate(commands)), "esac"]
    else:
        lines.append(commands[0])
    return "\n".join(lines) + "\n"


def submit_then(commands: list[str], job_id: str, spec: JobSpec, res: Resources) -> tuple[str, list[str]]:
    """sbatch the follow-up of job JOB_ID; (its job id, the log of each command)."""
    path = then_path(spec, res, job_id)
    Path(path).write_text(then_script(commands, job_id, spec, res))
    p = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise UserError(f"job {job_id} is queued, but sbatch refused its follow-up ({path}): "
                        + " ".join(p.stderr.split()))
    then_id = p.stdout.strip().split(";")[0]
    names = [f"then-{then_id}_{i}.out" for i in range(len(commands))] if len(commands) > 1 else [f"then-{then_id}.out"]
    return then_id, [os.path.join(log_dir(spec, res), n) for n in names]


def log_paths(job_id: str, spec: JobSpec, res: Resources) -> tuple[Path, Path]:
    paths = submitit.core.utils.JobPaths(folder(spec, res), job_id=job_id, task_id=0)
    return paths.stdout, paths.stderr


def job_state(job_id: str) -> str | None:
    """The live state from squeue, else the final one from sacct (None while neither knows the job)."""
    q = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    if q.returncode == 0 and q.stdout.strip():
        return q.stdout.split()[0]
    a = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True,
                       timeout=30)
    rows = [r.split()[0] for r in a.stdout.splitlines() if r.strip()]
    return rows[-1] if rows else None


def wait_all(job_ids: list[str], say: Callable[[str], None], poll_s: float = 2.0) -> dict[str, str]:
    """Until every job (an array's tasks) has ended, saying each end as it comes; their final states."""
    ended: dict[str, str] = {}
    while len(ended) < len(job_ids):
        for job_id in job_ids:
            if job_id not in ended:
                state = job_state(job_id)
                if state in TERMINAL:
                    ended[job_id] = state
                    say(f"job {job_id} ended {state}")
        if len(ended) < len(job_ids):
            time.sleep(poll_s)
    return ended


def follow(job_id: str, out_path: Path, err_path: Path, poll_s: float = 1.0, timeout_s: float | None = None) -> str:
    """Stream rank 0's stdout and stderr (every restart appends to them) until the job ends; its final state."""
    offsets = {out_path: 0, err_path: 0}
    streams = {out_path: sys.stdout, err_path: sys.stderr}
    deadline = time.monotonic() + timeout_s if timeout_s else None
    gone_since = None
    while True:
        for path, stream in streams.items():
            try:
                with open(path, "rb") as f:
                    f.seek(offsets[path])
                    data = f.read()
            except FileNotFoundError:
                continue
            if data:
                offsets[path] += len(data)
                stream.write(data.decode(errors="replace"))
                stream.flush()
        state = job_state(job_id)
        if state in TERMINAL:
            if gone_since is None:  # one more pass: the last lines of the log may land after the state
                gone_since = time.monotonic()
            elif time.monotonic() - gone_since > 1.5:
                return state
        if deadline and time.monotonic() > deadline:
            return state or "UNKNOWN"
        time.sleep(poll_s)
