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
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable

from gpt_train import protocol
from launch import spec as specs
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
        "additional_parameters": {"requeue": True, "chdir": os.getcwd(), **extra},
    }
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
    # Not --kill-on-bad-exit: the ranks exit 75 a moment apart, and srun would kill the later ones, turning the
    # step's 75 into 143. --wait: once one rank has ended, the others get 60 s, then srun kills them.
    words = ["srun", "--unbuffered", "--output", str(paths.stdout), "--error", str(paths.stderr), "--wait=60"]
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
    return os.path.abspath(res.log_dir or os.path.join("logs", spec.job_name))


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

def setup_lines(spec: JobSpec, res: Resources) -> list[str]:
    """Batch-shell lines before srun: the protocol's functions, the rendezvous, the NCCL settings."""
    lines = [
        "# gpt-train (launch/slurm.py): the job protocol's functions (gpt_train/protocol.py)",
        *protocol.shell_text().splitlines(),
        "gpt_train_traps",
        "gpt_train_rendezvous",
    ]
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
        from gpt_train.config import load_config
        from gpt_train.errors import UserError
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
    return _make_sbatch_string(command=command, folder=folder(spec, res), **executor_parameters(spec, res))


def make_executor(spec: JobSpec, res: Resources) -> submitit.SlurmExecutor:
    ex = submitit.SlurmExecutor(folder=folder(spec, res), max_num_timeout=res.max_restarts,
                                python=launch_command(spec, res))
    ex.update_parameters(**executor_parameters(spec, res))
    return ex


def submit(spec: JobSpec, res: Resources) -> submitit.Job:
    return make_executor(spec, res).submit(Trainer(spec.config, spec.overrides, spec.env))


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
