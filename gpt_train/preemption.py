"""Stopping cleanly when the cluster takes the machine away.

A signal handler only records the signal: I/O inside a handler can deadlock (a print, a
collective, a checkpoint write). The training loop looks at the flag at each step boundary;
the ranks agree with one all-reduce, write a checkpoint together and exit with protocol.EXIT_REQUEUE,
which the launcher and slurm/pretrain.sbatch read as "requeue me".

A deadline (the job's end time) is treated like a signal that arrives `margin` seconds early,
so the last checkpoint lands before the scheduler's kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from gpt_train import protocol


def slurm_end_time(env: dict[str, str] | None = None) -> float | None:
    """Unix time at which SLURM kills this job, if it has a time limit."""
    env = dict(os.environ if env is None else env)
    if env.get(protocol.DEADLINE_VAR):  # set by the batch shell, which can ask squeue (a container cannot)
        return float(env[protocol.DEADLINE_VAR])
    if env.get("SLURM_JOB_END_TIME"):  # SLURM >= 23.02
        return float(env["SLURM_JOB_END_TIME"])
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True, timeout=10)
        end = out.stdout.strip()
        if out.returncode != 0 or not end or end in ("N/A", "NONE", "Unknown"):
            return None
        return time.mktime(time.strptime(end, "%Y-%m-%dT%H:%M:%S"))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None  # no squeue (inside a container): only signals stop the run


class Preemption:
    def __init__(self, signals: list[str], deadline: float | None, margin_s: float):
        self.received: str | None = None
        self.deadline = deadline
        self.margin_s = margin_s
        for name in (s.strip().upper() for s in signals):
            signal.signal(getattr(signal, name if name.startswith("SIG") else "SIG" + name), self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def reason(self, step_seconds: float = 0.0) -> str | None:
        """Why the run should stop now, or None. Two more steps must fit before the deadline's margin."""
        if self.received:
            return self.received
        if self.deadline is not None and time.time() + 2 * step_seconds + self.margin_s >= self.deadline:
            return "deadline"
        return None
