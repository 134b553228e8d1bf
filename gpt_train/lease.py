"""One writer per run directory: RUN/lease.json names the trainer that writes the run now.

Object stores have no create-if-absent through fsspec, so a lease is claimed the same way everywhere (one code
path, local disk included): write a record with a fresh random token, pause settle_s, read it back, and hold the
lease only if the token read back is ours. Of claimants that raced, the last writer wins and the others see its
live lease. A claimant that stalled for longer than the pause between its read and its write could still
overwrite a winner; the heartbeat, which reads the file before renewing it, then finds the other token within a
quarter of stale_after_s, and `lost` tells the trainer to stop writing.

Ages are wall-clock differences (time.time()) between the holder's host and ours, since they are different
machines: their clocks must be roughly in sync (NTP), and stale_after_s must be far above any skew.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping

from gpt_train import protocol, recovery, rundir
from gpt_train.errors import UserError
from gpt_train.storage import Store


class RunDirBusy(UserError):
    """Another trainer that is still alive writes this run directory."""


def _pid_namespace() -> str | None:
    # A container can share the host's name but not its pids: a pid is only judged where both match.
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _who(holder: dict) -> str:
    who = f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}"
    if holder.get("slurm_job"):
        who += f" (SLURM job {holder['slurm_job']}, attempt {holder.get('attempt', 0)})"
    return who


def _age(holder: dict, now: float) -> str:
    beat = holder.get("heartbeat")
    return f"{max(0.0, now - beat):.0f}s ago" if isinstance(beat, (int, float)) else "unknown"


class Lease:
    """The lease of one trainer on one run directory (rank 0 only).

    acquire() holds it or raises RunDirBusy; a daemon thread then renews the heartbeat every stale_after_s / 4;
    release() stops the thread and removes the file if it is still ours. `lost` turns true when the heartbeat
    finds the lease taken by another trainer."""

    def __init__(self, store: Store, stale_after_s: float = 120.0, wait_s: float = 600.0, settle_s: float = 1.0,
                 log: Callable[[str], None] = print, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.store = store
        self.stale_after_s, self.wait_s, self.settle_s = stale_after_s, wait_s, settle_s
        self.poll_s = min(1.0, stale_after_s / 4)
        self.log = log
        self.lost = False
        self.token = uuid.uuid4().hex
        self.record = {
            "token": self.token, "host": socket.gethostname(), "pid_ns": _pid_namespace(), "pid": os.getpid(),
            "slurm_job": env.get("SLURM_JOB_ID") or None, "attempt": int(env.get("SLURM_RESTART_COUNT") or 0),
            "allocation": recovery.allocation(env), "heartbeat": None, "started": None,
        }
        # The launcher saw the attempt before this one in the allocation end (a crash, a hang, SIGKILL): its
        # lease is stale now, not lease_stale_s later.
        self.previous_exit = env.get(protocol.PREVIOUS_EXIT_VAR)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        """The lease on file; None when there is none, {} when it cannot be parsed."""
        try:
            text = self.store.read_text(rundir.LEASE)
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def _stale(self, holder: dict, now: float) -> str | None:
        """Why the holder is gone, or None while it may still be writing."""
        beat = holder.get("heartbeat")
        if self.previous_exit and holder.get("allocation") and holder.get("allocation") == self.record["allocation"]:
            return f"the attempt before this one in the allocation ended (exit {self.previous_exit})"
        if not isinstance(beat, (int, float)):
            return "its lease file has no readable heartbeat"
        if now - beat > self.stale_after_s:
            return f"no heartbeat for {now - beat:.0f}s (stale after {self.stale_after_s:g}s)"
        pid = holder.get("pid")
        if (isinstance(pid, int) and pid > 0 and holder.get("host") == self.record["host"]
                and holder.get("pid_ns") == self.record["pid_ns"]):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"process {pid} is gone"
            except (OSError, OverflowError):
                pass  # alive under another user, or not a pid we can judge: the heartbeat decides
        return None

    def _earlier_attempt(self, holder: dict) -> bool:
        """A requeue of our own job that started while the attempt before it still writes its last checkpoint."""
        job, attempt = self.record["slurm_job"], holder.get("attempt")
        return (job is not None and holder.get("slurm_job") == job and isinstance(attempt, int)
                and attempt < self.record["attempt"])

    def _claim(self) -> bool:
        self.record["heartbeat"] = time.time()
        self.store.write_text(rundir.LEASE, json.dumps(self.record))
        time.sleep(self.settle_s)
        back = self._read()
        return back is not None and back.get("token") == self.token

    def acquire(self) -> str | None:
        """Hold the lease. Returns a note for the events log when it waited for an earlier attempt or took over
        a stale lease, None otherwise; raises RunDirBusy naming the holder when another live trainer has it."""
        self.record["started"] = self.record["started"] or time.time()
        began = time.monotonic()
        waited_for: dict | None = None
        while True:
            holder = self._read()
            read_at, now = time.monotonic(), time.time()
            if holder is None or holder.get("token") == self.token:
                note = None
            elif (why := self._stale(holder, now)) is not None:
                note = f"took over the lease of {_who(holder)}: {why}"
            elif self._earlier_attempt(holder) and time.monotonic() - began < self.wait_s:
                if waited_for is None:
                    self.log(f"lease: {self.store.url} is held by {_who(holder)}, an earlier attempt of this job; "
                             f"waiting up to {self.wait_s:g}s for it to finish")
                waited_for = holder
                time.sleep(self.poll_s)
                continue
            else:
                raise RunDirBusy(self._busy(holder, now, time.monotonic() - began if waited_for else None))
            # The pause after the write protects only a claimant whose read and write came close together:
            # after a stall in between (scheduler, GC), what we read may be outdated.
            if time.monotonic() - read_at > self.settle_s / 2:
                continue
            if not self._claim():
                continue  # another claimant wrote after us and won: judge its lease
            self.lost = False
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._beat, name="run-dir-lease", daemon=True)
                self._thread.start()
            if waited_for is not None:
                waited = f"waited {time.monotonic() - began:.0f}s for {_who(waited_for)} to finish"
                note = waited if note is None else f"{waited}; {note}"
            return note

    def _busy(self, holder: dict, now: float, waited_s: float | None) -> str:
        msg = f"run directory {self.store.url} is in use by {_who(holder)}, heartbeat {_age(holder, now)}"
        if waited_s is not None:
            return f"{msg}; still held after waiting {waited_s:.0f}s for that earlier attempt of this job"
        return (f"{msg}; stop that trainer or use another run_dir (a lease without a heartbeat for "
                f"{self.stale_after_s:g}s is taken over)")

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after_s / 4):
            try:
                holder = self._read()
                if holder is not None and holder.get("token") != self.token:
                    self.lost = True
                    self.log(f"lease: {self.store.url} was taken over by {_who(holder)}; this trainer must stop "
                             "writing to it")
                    return
                if holder is None:
                    self.log(f"lease: {self.store.url}/{rundir.LEASE} vanished; writing it again")
                self.record["heartbeat"] = time.time()
                self.store.write_text(rundir.LEASE, json.dumps(self.record))
            except Exception as e:  # a dead thread would let the lease go stale unnoticed: keep trying
                self.log(f"lease: heartbeat on {self.store.url} failed ({type(e).__name__}: {e}); retrying")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if it is still ours."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if not self.lost and (self._read() or {}).get("token") == self.token:
            self.store.remove(rundir.LEASE)
