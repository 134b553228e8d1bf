"""`gpt-train logs RUN [-f] [--rank K] [--attempt N]`: the output of every attempt of a run as one stream, in
order, each under a line that says how it started and why the one before it ended (from events.jsonl):

    --- attempt 2, resumed at step 5 after: crash (exit 1) ---

Where the output is: each start event's "log", the rank-0 output file of that attempt (the SLURM output file, the
local launcher's log). Several attempts share one SLURM file (it is opened for append, and a requeue keeps the
job id): the file is cut at the lines that begin each start of the job and each restart in its allocation,

    gpt-train: job 1234 start 2 at 2025-01-01 12:00:00 ...          (the batch shell: SLURM_RESTART_COUNT + 1)
    gpt-train: the ranks crashed (exit 1): restart 1 in this allocation   (the batch shell, or the local supervisor)

and each part goes under its attempt, once: the part of start N of job J, restart K, belongs to the K-th attempt
(from 0) whose allocation is slurm:J:N-1. A file without start lines (a local log) is cut at its restart lines and
its parts go to its attempts in order. A part that no start event claims (a start that was refused, or that died
before it could write its event) is shown where it is, under a line that says so.

--rank K reads rank K's file where the path says which rank it is (submitit's JOBID_0_log.out, or a %t).
-f follows the newest attempt, and the next one after a requeue, until the run is over: finished, cancelled,
stopped by the restart policy, or its owner (the SLURM job, the local launcher, the container) is gone.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import TextIO

from gpt_train import owner, rundir
from gpt_train.errors import UserError
from gpt_train.recovery import ENDS, REFUSALS, STARTS, Attempt, attempts
from gpt_train.runlog import read_jsonl
from gpt_train.runs import CANCELLED, after_newest_start, newest_start
from gpt_train.status import restart_cause
from gpt_train.storage import Store

# The lines a part begins with: a start of the SLURM job (groups 1, 2), a restart in the allocation (group 3).
MARK = re.compile(rb"^gpt-train: (?:job (\d+) start (\d+) at |the ranks (?:crashed|hung) \(exit \d+[^)\n]*\): "
                  rb"restart (\d+))", re.M)
SUBMITIT_RANK = re.compile(r"_0_log\.(out|err)$")  # submitit's FOLDER/JOBID_RANK_log.out
POLL_S = 1.0
OWNER_POLL_S = 5.0  # squeue, docker inspect: not every second
HOLD_S = 60.0  # -f: how long the output of a start waits for its start event before it is shown without one


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory (local path or fsspec URL)")
    parser.add_argument("-f", "--follow", action="store_true",
                        help="follow the newest attempt, and the next one after a requeue, until the run is over")
    parser.add_argument("--rank", type=int, default=0, metavar="K", help="the output of rank K (default 0)")
    parser.add_argument("--attempt", type=int, default=None, metavar="N", help="only attempt N (as numbered in the "
                        "events and in `gpt-train status`)")


def run(args: argparse.Namespace) -> int:
    store = Store(args.run)
    if not store.exists():
        raise UserError(f"no run at '{args.run}'")
    stream = Stream(store, args.rank, args.attempt)
    try:
        while args.follow and not stream.over():
            stream.show(final=False)
            time.sleep(POLL_S)
        stream.show(final=True)
    except KeyboardInterrupt:  # the way out of -f
        pass
    return 0


# -- cutting a log file into the parts of its attempts ------------------------------------------------------------

@dataclass
class Part:
    start: int  # byte offset of its first line (a start or restart line, or 0)
    end: int | None  # where the next part begins; None: the file's end, as it grows
    allocation: str | None  # slurm:JOB:RESTART_COUNT, from the start line above it; None above any
    restart: int  # the restart in the allocation (0: the start itself)

    @property
    def key(self) -> tuple[str, int] | None:
        return (self.allocation, self.restart) if self.allocation else None


class LogFile:
    """One output file, cut into parts; scanned as it grows (only whole lines), so that -f reads each byte once."""

    def __init__(self, path: str):
        self.path = path
        self.parts = [Part(0, None, None, 0)]
        self.scanned = 0

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def size(self) -> int:
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def read(self, start: int, end: int | None) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                return f.read(-1 if end is None else max(0, end - start))
        except OSError:
            return b""

    def scan(self) -> None:
        data = self.read(self.scanned, None)
        whole = data[:data.rfind(b"\n") + 1]
        for m in MARK.finditer(whole):
            current = self.parts[-1]
            if m.group(1):
                allocation, restart = f"slurm:{m.group(1).decode()}:{int(m.group(2)) - 1}", 0
            else:
                allocation, restart = current.allocation, int(m.group(3))
            part = Part(self.scanned + m.start(), None, allocation, restart)
            if current.start == part.start:  # nothing above the first line: no empty part before it
                self.parts[-1] = part
            else:
                current.end = part.start
                self.parts.append(part)
        self.scanned += len(whole)

    def assign(self, mine: list[tuple[int, Attempt]]) -> dict[int, int]:
        """Which part (index) is the output of each of the attempts that name this file: {attempt index: part}."""
        keyed: dict[tuple[str, int], int] = {}
        for i, p in enumerate(self.parts):
            if p.key is not None:
                keyed.setdefault(p.key, i)
        allocations = {p.allocation for p in self.parts if p.allocation}
        plain = [i for i, p in enumerate(self.parts) if p.allocation is None]
        seen: Counter[str] = Counter()
        out = {}
        for index, a in mine:
            if a.allocation in allocations:
                hit = keyed.get((a.allocation, seen[a.allocation]))
                seen[a.allocation] += 1
            else:
                hit = plain.pop(0) if plain else None
            if hit is not None:
                out[index] = hit
        return out


def log_path(start: dict, rank: int) -> tuple[str | None, str | None]:
    """(the file of `rank` for this start event, or None with why)."""
    path = start.get("log")
    if not path:
        return None, "its start event names no log file"
    if "%t" in path:
        return path.replace("%t", str(rank)), None
    if rank == 0:
        return path, None
    m = SUBMITIT_RANK.search(path)
    if m is None:
        return None, f"the log of rank {rank} is not known: {path} names no rank (submitit's JOBID_0_log.out, or %t)"
    return f"{path[:m.start()]}_{rank}_log.{m.group(1)}", None


# -- the stream ----------------------------------------------------------------------------------------------------

@dataclass
class Segment:
    key: tuple  # what its header line is printed once for
    header: str
    file: LogFile | None = None
    part: Part | None = None
    note: str | None = None  # a line under the header instead of output (no file, a missing file)
    unclaimed: bool = False  # output that no start event claims (yet)


def separator(history: list[Attempt], i: int) -> str:
    a = history[i]
    how = "started" if a.kind == "start" else "resumed"
    line = f"--- attempt {a.number}, {how} at step {a.start_step}"
    if i > 0:
        cause, detail = restart_cause(history[i - 1])
        line += f" after: {cause}" + (f" ({detail})" if detail else "")
    return line + " ---"


def ending(events: list[dict], history: list[Attempt]) -> str | None:
    """The line after the newest attempt's output, when something ended it."""
    since = after_newest_start(events)
    done = next((e for e in reversed(since) if e.get("event") in (CANCELLED, *REFUSALS)), None)
    if done is not None and done["event"] == CANCELLED:
        return f"--- cancelled by {done.get('by', '?')} at step {done.get('step')} ---"
    if done is not None:
        return f"--- then: {ENDS[done['event']]}: {done.get('cause', '')} ---"
    last = history[-1] if history else None
    if last is None or last.end is None:
        return None
    return f"--- attempt {last.number} ended: {ENDS[last.end]} at step {last.last_step}" + \
        (f" ({last.end_cause})" if last.end_cause else "") + " ---"


def _unclaimed(file: LogFile, part: Part, refusals: dict[str, dict]) -> Segment:
    """Output that no start event claims: a start refused (the refusal event names its allocation), or one that
    is still starting or died before it could write its event."""
    where = file.path
    if part.allocation:
        _, job, count = part.allocation.split(":")
        where = f"SLURM job {job} start {int(count) + 1}" + (f", restart {part.restart}" if part.restart else "")
    refusal = refusals.get(part.allocation or "")
    why = (f"refused: {ENDS[refusal['event']]}: {refusal.get('cause', '')}" if refusal else
           "output with no start event (still starting, refused, or it died before writing one)")
    return Segment(("part", file.path, part.start), f"--- {where}: {why} ---", file, part, unclaimed=True)


class Stream:
    """The run's output as segments, each printed once and then only what was added to it (for -f)."""

    def __init__(self, store: Store, rank: int, only: int | None, out: TextIO = sys.stdout):
        self.store, self.rank, self.only, self.out = store, rank, only, out
        self.files: dict[str, LogFile] = {}
        self.headers: set[tuple] = set()
        self.printed: dict[tuple[str, int], int] = {}  # (path, part start) -> bytes of it printed
        self.first_seen: dict[tuple, float] = {}
        self.events: list[dict] = []
        self._owner_checked, self._alive = 0.0, None

    def plan(self) -> list[Segment]:
        self.events = read_jsonl(self.store, rundir.EVENTS)
        # attempts' ends and causes are all that is needed here: the metrics (large) only fill in last steps
        history = attempts(self.events, [])
        starts = [e for e in self.events if e.get("event") in STARTS]
        if self.only is not None and self.only not in {a.number for a in history}:
            raise UserError(f"{self.store.url} has no attempt {self.only} (attempts: "
                            f"{', '.join(str(a.number) for a in history) or 'none'})")
        paths = []
        for start in starts:
            path, why = log_path(start, self.rank)
            paths.append((path, why))
            if path and path not in self.files:
                self.files[path] = LogFile(path)
        for f in self.files.values():
            f.scan()
        claims: dict[str, dict[int, int]] = {}
        for path, f in self.files.items():
            claims[path] = f.assign([(i, a) for i, a in enumerate(history) if paths[i][0] == path])
        refusals = {e["allocation"]: e for e in self.events if e.get("event") in REFUSALS and e.get("allocation")}
        shown = {path: -1 for path in self.files}  # the last part of each file placed in the stream
        taken = {path: set(c.values()) for path, c in claims.items()}
        out: list[Segment] = []
        for i, a in enumerate(history):
            if self.only is not None and a.number != self.only:
                continue
            path, why = paths[i]
            head = separator(history, i)
            if path is None:
                out.append(Segment(("attempt", i), head, note=f"(no output of attempt {a.number}: {why})"))
            elif not self.files[path].exists():
                out.append(Segment(("attempt", i), head, note=f"(the log of attempt {a.number} is missing: expected "
                                                              f"at {path})"))
            elif i not in claims[path]:
                out.append(Segment(("attempt", i), head, note=f"(nothing of attempt {a.number} in {path}: it holds "
                                                              "no start line for it)"))
            else:
                f, p = self.files[path], claims[path][i]
                if self.only is None:  # output between the previous attempt's and this one's: refused starts
                    out += [_unclaimed(f, f.parts[j], refusals) for j in range(shown[path] + 1, p)
                            if j not in taken[path]]
                out.append(Segment(("attempt", i), head, f, f.parts[p]))
                shown[path] = max(shown[path], p)
        if self.only is None:
            for path, f in self.files.items():
                out += [_unclaimed(f, f.parts[j], refusals) for j in range(shown[path] + 1, len(f.parts))
                        if j not in taken[path] and f.exists() and f.parts[j].start < f.size()]
        return out

    def over(self) -> bool:
        """-f: nothing more will be written: its owner is gone, or the newest attempt has a final record and its
        owner cannot be asked (or, with --attempt, that attempt is over)."""
        self.events = read_jsonl(self.store, rundir.EVENTS)
        start = newest_start(self.events)
        if start is None:
            return False
        if time.monotonic() - self._owner_checked > OWNER_POLL_S:
            self._alive, self._owner_checked = owner.alive(owner.of(start)), time.monotonic()
        final = any(e.get("event") in (CANCELLED, *ENDS) for e in after_newest_start(self.events))
        if self.only is not None:
            return self._alive is False or final or any(a.number > self.only for a in attempts(self.events, []))
        return self._alive is False or (final and self._alive is None)

    def show(self, final: bool) -> None:
        """Print what is new. final: everything, half-written lines too; else whole lines only, and the output of
        a start whose event has not come yet waits (HOLD_S at most) for the line that names its attempt."""
        segments = self.plan()
        now = time.monotonic()
        for n, seg in enumerate(segments):
            if seg.key not in self.headers:
                held = now - self.first_seen.setdefault(seg.key, now) < HOLD_S
                if not final and seg.unclaimed and n == len(segments) - 1 and held:
                    break
                self.out.write(seg.header + "\n" + (seg.note + "\n" if seg.note else ""))
                self.headers.add(seg.key)
            if seg.file is not None and seg.part is not None:
                key = (seg.file.path, seg.part.start)
                done = self.printed.get(key, 0)
                data = seg.file.read(seg.part.start + done, seg.part.end)
                if not final and seg.part.end is None:
                    data = data[:data.rfind(b"\n") + 1]
                if data:
                    self.out.write(data.decode(errors="replace"))
                    if final and not data.endswith(b"\n"):
                        self.out.write("\n")
                    self.printed[key] = done + len(data)
        if final and self.only is None:
            line = ending(self.events, attempts(self.events, []))
            if line and ("end", line) not in self.headers:
                self.out.write(line + "\n")
                self.headers.add(("end", line))
        self.out.flush()
