"""Faults injected on purpose, so that tests can watch the job detect and survive them.

    GPT_TRAIN_FAULT="raise@step=5,rank=1"                one fault
    GPT_TRAIN_FAULT="kill@step=3,attempt=1;nan@step=7"   several, separated by ';'

Each is `KIND@step=N` with optional `rank=R`, `host=H` and `attempt=A` (only the A-th start of the run,
counted from its events.jsonl, so a fault can happen once and the recovery be watched). A fault fires at the
start of step N (the step that ends with the counter at N) on each matching rank. Inactive unless the variable
is set. H is the SLURM node name where there is one (SLURMD_NODENAME), else the machine's host name: the test
cluster's nodes n1 and n2 may be one machine.

    raise   an exception on that rank
    kill    SIGKILL to itself: no handler, no cleanup, as when a node dies
    hang    stop making progress (sleep) with the other ranks waiting in their next collective
    nan     the loss of that step is NaN (and so are its gradients)
    slow    sleep SLOW_S seconds at every step from N on
    preflight  the start-up check (preflight.py) fails on that host, before any step: `preflight@host=n2`.
            step=N is not needed, and means nothing if given; attempt=A picks the start.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass

from gpt_train.errors import ConfigError

VARIABLE = "GPT_TRAIN_FAULT"
KINDS = ("raise", "kill", "hang", "nan", "slow", "preflight")
UNSTEPPED = ("preflight",)  # happen before any step: step=N optional
SLOW_S = 3.0


class InjectedFault(RuntimeError):
    """What `raise` raises: a crash, not a user error."""


def node_name() -> str:
    """This node's name, as a fault's host=H and a node report name it: SLURM's node name, which is what the
    batch shell can exclude and which differs between slurmd nodes sharing a machine, else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int | None  # None only for the UNSTEPPED kinds
    rank: int | None = None
    host: str | None = None
    attempt: int | None = None

    def applies(self, rank: int, host: str, attempt: int) -> bool:
        return ((self.rank is None or self.rank == rank) and (self.host is None or self.host == host)
                and (self.attempt is None or self.attempt == attempt))


def parse(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, _, where = item.partition("@")
        fields: dict[str, str] = {}
        for pair in filter(None, where.split(",")):
            key, sep, value = pair.partition("=")
            if not sep or key not in ("step", "rank", "host", "attempt") or key in fields:
                raise ConfigError(f"{VARIABLE}: '{pair}' in '{item}' is not step=N, rank=R, host=H or attempt=A")
            fields[key] = value
        if kind not in KINDS or ("step" not in fields and kind not in UNSTEPPED):
            stepped = [k for k in KINDS if k not in UNSTEPPED]
            raise ConfigError(f"{VARIABLE}: '{item}' must be KIND@step=N[,rank=R][,host=H][,attempt=A] with KIND "
                              f"one of {', '.join(stepped)}, or {'|'.join(UNSTEPPED)}[@rank=R][,host=H][,attempt=A]")
        try:
            numbers = {k: int(v) for k, v in fields.items() if k != "host"}
        except ValueError:
            raise ConfigError(f"{VARIABLE}: step, rank and attempt in '{item}' must be integers") from None
        step = None if kind in UNSTEPPED else numbers["step"]  # before any step: a step=N given means nothing
        faults.append(Fault(kind, step, numbers.get("rank"), fields.get("host"), numbers.get("attempt")))
    return faults


class Faults:
    """The faults of this rank in this attempt; the trainer calls in at every step."""

    def __init__(self, faults: list[Fault], rank: int, attempt: int, host: str | None = None):
        self.mine = [f for f in faults if f.applies(rank, host or node_name(), attempt)]
        self.rank = rank

    @classmethod
    def from_env(cls, rank: int, attempt: int) -> "Faults":
        return cls(parse(os.environ.get(VARIABLE, "")), rank, attempt)

    def __bool__(self) -> bool:
        return bool(self.mine)

    def describe(self) -> str:
        return "; ".join(f"{f.kind} at start-up" if f.kind in UNSTEPPED else f"{f.kind} at step {f.step}"
                         for f in self.mine)

    def before_step(self, step: int) -> None:
        """Called when step `step` begins."""
        for f in self.mine:
            if f.kind == "slow" and step >= f.step:
                time.sleep(SLOW_S)
            if f.step != step:
                continue
            print(f"fault: injecting '{f.kind}' on rank {self.rank} at step {step} ({VARIABLE})", flush=True)
            if f.kind == "raise":
                raise InjectedFault(f"injected fault at step {step} on rank {self.rank} ({VARIABLE})")
            if f.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if f.kind == "hang":
                while True:
                    time.sleep(3600)

    def fails_preflight(self) -> bool:
        """The start-up check of this rank must fail (preflight.run asks)."""
        return any(f.kind == "preflight" for f in self.mine)

    def corrupts_loss(self, step: int) -> bool:
        return any(f.kind == "nan" and f.step == step for f in self.mine)
