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
import threading
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


# Signals that came before the trainer knew its config (while Python and torch were still loading).
_early: list[str] = []
_listening: set[str] = set()


def listen_early(signals: tuple[str, ...] = ("TERM", "USR1", "USR2")) -> None:
    """Record the default stopping signals from the first moment of the process: the cluster may signal a job
    during the seconds its imports take, and the default action would kill it with no requeue code."""
    for name in signals:
        signal.signal(_signum(name), lambda signum, frame: _early.append(signal.Signals(signum).name))
        _listening.add(signal.Signals(_signum(name)).name)


def _signum(name: str) -> int:
    name = name.strip().upper()
    return getattr(signal, name if name.startswith("SIG") else "SIG" + name)


class Preemption:
    """The stop request of this process: a signal, or the job's deadline coming near.

    A SIGTERM is followed by the scheduler's SIGKILL (SLURM's KillWait, 30 s by default). The ranks agree on a
    stop a step after it was asked for (no step waits for that all-reduce), so a stop comes within two step
    boundaries: when it has not come within grace_s, the process exits with EXIT_REQUEUE at once, without a new
    checkpoint, so that the job is still requeued and the last checkpoint stands."""

    def __init__(self, signals: list[str], deadline: float | None, margin_s: float, grace_s: float = 0.0):
        self.deadline, self.margin_s, self.grace_s = deadline, margin_s, grace_s
        self._timer: threading.Timer | None = None
        self._acted = False
        wanted = {signal.Signals(_signum(name)).name for name in signals}
        for name in _listening - wanted:  # listened to early, but not a stopping signal of this config: as before
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        for name in wanted:
            signal.signal(getattr(signal, name), self._handle)
        self.received: str | None = None
        early = next((name for name in _early if name in wanted), None)
        if early:
            self._handle(getattr(signal, early), None)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        if signum == signal.SIGTERM and self.grace_s > 0 and self._timer is None:
            self._timer = threading.Timer(self.grace_s, self._give_up)
            self._timer.daemon = True
            self._timer.start()

    def _give_up(self) -> None:
        if self._acted:
            return
        os.write(2, (f"preemption: SIGTERM and the ranks did not reach the step boundary where they stop within "
                     f"preemption.grace_s={self.grace_s:g} s: exiting {protocol.EXIT_REQUEUE} without a new "
                     "checkpoint; the last one stands\n").encode())
        os._exit(protocol.EXIT_REQUEUE)

    def acting(self) -> None:
        """The loop reached a step boundary and stops there: the grace timer has nothing left to do."""
        self._acted = True
        if self._timer is not None:
            self._timer.cancel()

    def reason(self, step_seconds: float = 0.0) -> str | None:
        """Why the run should stop now, or None. Before the deadline's margin three more steps must fit: the
        ranks agree on the flag a step later, and the save takes about a step."""
        if self.received:
            return self.received
        if self.deadline is not None and time.time() + 3 * step_seconds + self.margin_s >= self.deadline:
            return "deadline"
        return None
