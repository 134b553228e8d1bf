"""Who runs a run now, read from its newest start event, whether it is still there, and how to stop it cleanly.

    launcher   owner                                     alive when                              clean stop
    slurm      the SLURM job (slurm_job)                 its state is not terminal               scancel JOB
    local      the launcher process (supervisor_pid)     the pid exists and runs gpt-train       SIGTERM to it
    docker     the container (container)                 docker inspect says it runs             docker stop NAME

Every clean stop ends the same way: the ranks get SIGTERM, checkpoint and exit 75, and nothing starts them again
(scancel's SIGTERM also reaches the batch shell, which then does not requeue; see docs/launching.md).

Torch-free, and the scheduler is asked once for all jobs: `gpt-train runs` shows ten runs with one squeue call.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass

from gpt_train.errors import UserError

# States after which a SLURM job never runs again (a requeued job is PENDING or REQUEUED, not one of these).
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
            "REVOKED", "SPECIAL_EXIT", "PREEMPTED"}
# Words of a launcher's command line: gpt-train-submit, launch/submit.py, python -m gpt_train.supervise.
OURS = ("gpt_train", "gpt-train", "launch/submit.py", "launch.submit")


@dataclass(frozen=True)
class Owner:
    launcher: str | None  # slurm | local | docker | None (not recorded: an older trainer, or a bare command)
    slurm_job: str | None = None
    pid: int | None = None
    hosts: tuple[str, ...] = ()
    container: str | None = None

    def describe(self) -> str:
        if self.launcher == "slurm":
            return f"SLURM job {self.slurm_job}"
        if self.launcher == "local":
            return f"launcher pid {self.pid}" + (f" on {', '.join(self.hosts)}" if self.hosts else "")
        if self.launcher == "docker":
            return f"docker container {self.container}"
        return "an unrecorded launcher"


def of(start: dict) -> Owner:
    """The owner a start event (or a refusal that names a SLURM job) names. Events written before the launcher
    fields existed still name a SLURM job."""
    launcher = start.get("launcher")
    if launcher is None:
        launcher = "slurm" if start.get("slurm_job") else "docker" if start.get("container") else \
            "local" if start.get("supervisor_pid") else None
    pid = start.get("supervisor_pid")
    return Owner(launcher=launcher, slurm_job=start.get("slurm_job") or None,
                 pid=pid if isinstance(pid, int) and pid > 0 else None, hosts=tuple(start.get("hosts") or ()),
                 container=start.get("container") or None)


# -- SLURM -----------------------------------------------------------------------------------------------------

def _lines(argv: list[str]) -> list[str]:
    """A client command's output lines; none when it is missing, fails or does not answer (no scheduler here)."""
    if shutil.which(argv[0]) is None:
        return []
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return p.stdout.splitlines() if p.returncode == 0 else []


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """The state of each job that SLURM knows: squeue for the jobs the controller holds (their live state: a
    requeued job is PENDING there), sacct for those it has forgotten (finished longer than MinJobAge ago). squeue
    answers for every job the controller holds where accounting is off. Jobs that neither knows are left out."""
    wanted = sorted({j for j in job_ids if j})
    if not wanted:
        return {}
    states = {}
    for line in _lines(["squeue", "-h", "-j", ",".join(wanted), "-o", "%i %T"]):
        parts = line.split()
        if len(parts) == 2 and parts[0] in wanted:
            states[parts[0]] = parts[1]
    missing = [j for j in wanted if j not in states]
    if missing:
        for line in _lines(["sacct", "-n", "-X", "-P", "-o", "JobIDRaw,State", "-j", ",".join(missing)]):
            job, _, state = line.partition("|")
            if job in missing and state:
                states[job] = state.split()[0]  # "CANCELLED by 1000" -> "CANCELLED"; the newest record last
    return states


# -- is it there, and stopping it --------------------------------------------------------------------------------

def _here(owner: Owner) -> bool:
    return not owner.hosts or socket.gethostname() in owner.hosts


def _command_line(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def _container_running(name: str) -> bool | None:
    if shutil.which("docker") is None:
        return None
    try:
        p = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.returncode == 0 and p.stdout.strip() == "true"  # not found: removed (--rm) after it stopped


def alive(owner: Owner, states: dict[str, str] | None = None) -> bool | None:
    """Whether the owner can still train (or requeue) the run; None when that cannot be told from here: another
    host's pid, a job SLURM does not know, no docker client, no launcher recorded. `states`: slurm_states()."""
    if owner.launcher == "slurm" and owner.slurm_job:
        state = (slurm_states([owner.slurm_job]) if states is None else states).get(owner.slurm_job)
        return None if state is None else state not in TERMINAL
    if owner.launcher == "local" and owner.pid and _here(owner):
        line = _command_line(owner.pid)
        return line is not None and any(word in line for word in OURS)
    if owner.launcher == "docker" and owner.container:
        return _container_running(owner.container)
    return None


def stop(owner: Owner, timeout_s: float) -> str:
    """Ask the owner for a clean stop; what was done, as a phrase. UserError when it cannot be asked from here."""
    if owner.launcher == "slurm" and owner.slurm_job:
        argv = ["scancel", owner.slurm_job]
    elif owner.launcher == "local" and owner.pid:
        if not _here(owner):
            raise UserError(f"the run's launcher is pid {owner.pid} on {', '.join(owner.hosts)}, not on "
                            f"{socket.gethostname()}: run gpt-train cancel there")
        line = _command_line(owner.pid)
        if line is None or not any(word in line for word in OURS):
            what = "gone" if line is None else f"not a gpt-train launcher ({line[:80]!r})"
            raise UserError(f"pid {owner.pid} is {what}: not signalling it")
        try:  # the launcher passes SIGTERM to the ranks, which checkpoint and exit 75 (gpt_train/supervise.py)
            os.kill(owner.pid, signal.SIGTERM)
        except OSError as e:
            raise UserError(f"cannot signal pid {owner.pid}: {e.strerror}") from None
        return f"sent SIGTERM to {owner.describe()} ({line[:80]})"
    elif owner.launcher == "docker" and owner.container:
        argv = ["docker", "stop", owner.container]  # SIGTERM, then waits; SIGKILL after the container's stop timeout
    else:
        raise UserError("the run's start event names no launcher (no slurm_job, supervisor_pid or container): "
                        "stop it where it was started")
    if shutil.which(argv[0]) is None:
        raise UserError(f"{argv[0]} is not on PATH here: cannot stop {owner.describe()}")
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=max(30.0, timeout_s))
    except subprocess.TimeoutExpired:
        raise UserError(f"{' '.join(argv)} did not return within {max(30.0, timeout_s):.0f}s") from None
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        raise UserError(f"{' '.join(argv)} failed: {why}")
    return f"ran {' '.join(argv)}"

