"""A run's history of attempts, read from its events.jsonl, and the restart policy that judges it.

Torch-free: `gpt-train status` and the launchers read the same history the trainer decides from.

Every start or resume of the trainer appends a start event; whatever ends the attempt appends its end event
with the cause and the evidence. An attempt that died before it could write one (SIGKILL, a lost node, a rank
wedged in C code) gets its end written by the next start, from the exit code the launcher saw
(protocol.PREVIOUS_EXIT_VAR) and the last step its metrics reached.

The restart policy runs at each start, before the model is built (a refusal costs a second):

* A crash or a hang is restarted inside the allocation (a new srun, or torchrun again locally) at most
  fault.in_job_restarts times; then the start exits protocol.EXIT_REQUEUE and the job goes back to the queue.
* The same failure again and again (fault.max_restarts_without_progress restarts that each failed at the same
  step, having resumed from the same step) stops the job with protocol.EXIT_GAVE_UP: a deterministic bug must
  not burn the allocation forever.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from gpt_train import protocol

STARTS = ("start", "resume")
# What ended an attempt, and the events that record it.
ENDS = {
    "finish": "finished",
    "preempted": "checkpointed and stopped to be requeued",
    "crash": "crashed",
    "hang": "hung",
    "bad_node": "a node failed its start-up check",
    "diverged": "the loss diverged",
    "requeue": "in-job restarts spent: requeued",
    "gave_up": "stopped by the restart policy",
}
FAILURES = ("crash", "hang")  # restarted in the allocation
# Ends written without a start of their own: the start-up refused to train.
REFUSALS = ("bad_node", "requeue", "gave_up")


@dataclass
class Attempt:
    """One process lifetime of the run: from a start/resume event to whatever ended it."""

    kind: str  # start | resume
    start_time: float
    start_step: int
    slurm_job: str | None
    end: str | None = None  # a key of ENDS, or None (still running, or died with no record yet)
    end_cause: str | None = None
    end_time: float | None = None  # the end event's time, else the last metric's
    last_step: int | None = None
    number: int = 0  # the attempt: the run's Nth start
    allocation: str | None = None  # the SLURM job and restart count, or the local launch: in-job restarts share it
    hosts: list[str] | None = None


def attempts(events: list[dict], metrics: list[dict]) -> list[Attempt]:
    out: list[Attempt] = []
    for e in events:
        kind = e.get("event")
        if kind in STARTS:
            out.append(Attempt(kind=kind, number=int(e.get("attempt") or len(out) + 1),
                               start_time=float(e.get("time", 0)), start_step=int(e.get("step", 0)),
                               slurm_job=e.get("slurm_job"), allocation=e.get("allocation"), hosts=e.get("hosts")))
        elif kind in ENDS and kind not in REFUSALS and out and out[-1].end is None:
            out[-1].end, out[-1].end_cause = kind, e.get("cause")
            out[-1].end_time, out[-1].last_step = float(e.get("time", 0)), e.get("step")
    # Attempts without an end record: their last metric before the next attempt started.
    times = [(m.get("time"), m.get("step")) for m in metrics if isinstance(m.get("time"), (int, float))]
    for i, a in enumerate(out):
        if a.end is not None:
            continue
        until = out[i + 1].start_time if i + 1 < len(out) else math.inf
        mine = [(t, s) for t, s in times if a.start_time <= t < until]
        a.end_time = max((t for t, _ in mine), default=a.start_time)
        a.last_step = max((s for _, s in mine if isinstance(s, int)), default=a.start_step)
        if i + 1 < len(out):  # a later attempt started: this one is over, with no record of how
            a.end, a.end_cause = "crash", "no end recorded (killed, or its node was lost)"
    return out


def allocation(env: dict[str, str] | None = None) -> str | None:
    """What in-job restarts share: the SLURM job and its requeue count, or the local launcher's run."""
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}:{env.get('SLURM_RESTART_COUNT', '0')}"
    return f"local:{env[protocol.LAUNCH_VAR]}" if env.get(protocol.LAUNCH_VAR) else None


def unrecorded_end(events: list[dict], metrics: list[dict], previous_exit: str | None) -> dict | None:
    """The end event of the newest attempt when it has none: it died before it could write one. None when it
    has one (or there is no attempt)."""
    history = attempts(events, metrics)
    if not history or any(e.get("event") in ENDS for e in events[_index_of_last_start(events) + 1:]):
        return None
    last = history[-1]
    code = int(previous_exit) if previous_exit and previous_exit.lstrip("-").isdigit() else None
    kind = "hang" if code == protocol.EXIT_HANG else "crash"
    if code is None:
        cause = "no end recorded (killed, or its node was lost)"
    elif code > 128:
        cause = f"exit {code} (killed by signal {code - 128})"
    else:
        cause = f"exit {code}"
    return {"event": kind, "step": last.last_step, "attempt": last.number, "cause": cause, "exit_code": code,
            "recorded_by": "the next start"}


def _index_of_last_start(events: list[dict]) -> int:
    return max((i for i, e in enumerate(events) if e.get("event") in STARTS), default=-1)


def judge(events: list[dict], metrics: list[dict], here: str | None, in_job_restarts: int,
          max_without_progress: int) -> tuple[str, str] | None:
    """("requeue" | "gave_up", why) when this start must not train, None when it may. A start after the policy
    gave up is someone's deliberate new try: the failures before it no longer count."""
    after = max((i for i, e in enumerate(events) if e.get("event") == "gave_up"), default=-1) + 1
    return decide(attempts(events[after:], metrics), here, in_job_restarts, max_without_progress)


def decide(history: list[Attempt], here: str | None, in_job_restarts: int, max_without_progress: int,
           ) -> tuple[str, str] | None:
    failed = []
    for a in reversed(history):
        if a.end not in FAILURES:
            break
        failed.append(a)
    if not failed:
        return None
    last = failed[0]
    same = [a for a in failed if a.start_step == last.start_step and a.last_step == last.last_step]
    # consecutive failures at one point: the first try and the restarts after it
    run = 0
    for a in failed:
        if a not in same:
            break
        run += 1
    if max_without_progress and run > max_without_progress:
        return "gave_up", (f"{run} attempts in a row failed at step {last.last_step}, each resumed from step "
                           f"{last.start_step} ({last.end}: {last.end_cause}): the same failure every time, so "
                           f"restarting cannot help (fault.max_restarts_without_progress={max_without_progress}); "
                           "see the events and RUN/diagnostics/, fix the cause, then start the run again")
    here_failed = sum(1 for a in failed if here is not None and a.allocation == here)
    if here is not None and here_failed > in_job_restarts:
        return "requeue", (f"{here_failed} failures in this allocation, more than fault.in_job_restarts="
                           f"{in_job_restarts}: back to the queue, where the job may get other nodes")
    return None
