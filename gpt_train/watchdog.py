"""The hang watchdog: a rank that reports no progress for too long dumps the stacks of all its threads into the run
directory and exits protocol.EXIT_HANG, to be restarted long before the collective timeout (the backstop) would
end it, and with a record of where every rank was.

    RUN/diagnostics/attempt-N/rank-K.txt              a header (who, the last progress, the timeout and the rule
                                                     that chose it, the main thread's innermost frame), then the
                                                     stack of every thread
    RUN/diagnostics/attempt-N/rank-K.nccl-trace.pkl   backend nccl: NCCL's Flight Recorder, the rank's recent
                                                     collectives (rank-K.nccl-trace.txt says why, when it failed)
    RUN/diagnostics/attempt-N/report.json             rank 0's reading of every dump: missing ranks, where each main
                                                     thread is, the suspects

Why a thread: a hung rank's main thread is stuck in a collective, a CUDA synchronisation or a read that never
returns. Only another thread of the same process can still look at it and end the process; a signal would not
help, since Python runs signal handlers on the main thread. Reporting progress to a thread costs the training loop
one assignment.

Why faulthandler: it writes every thread's stack from C, to a file descriptor, without running Python code (no
repr, no source line read from a file system that may itself be what hangs) and with no depth limit. It needs a real
file, so it writes to a temporary one, whose text then goes through the Store: the run directory may be s3://.

Why the first interval does not count: the first step compiles the model (torch.compile) and warms up the allocator
and the communicators; it can take minutes, and a timeout derived from it would let a real hang run for an hour.
For the same reason the watchdog is not armed before the second report: a slow first step is never a hang, and a
hang in the rendezvous or the first collective is the collective timeout's job.

Why rank 0 collects: a rank sees only itself. The rank that hangs is usually the one whose main thread is not
waiting in a collective (its peers wait there for it), or one that cannot write a dump at all (a dead host, a C call
that holds the GIL). Rank 0 reads the headers of all the dumps and names those suspects in one report, for on_hang
and for report.json. The other ranks wait for that report before they exit, since a launcher (torchrun, srun
--kill-on-bad-exit) kills the remaining ranks as soon as one exits: an early exit would cut rank 0's collection, or
a slower rank's dump, short.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import re
import sys
import tempfile
import threading
import time
import traceback
from types import FrameType
from typing import Callable, NamedTuple

from gpt_train import protocol, rundir
from gpt_train.config import FaultConfig
from gpt_train.errors import StorageError
from gpt_train.storage import Store

MARGIN = 5  # a derived timeout: this many times the longest interval between two progress reports
# A main thread whose innermost frame is in one of these waits for its peers: a collective, DDP, a backward pass
# (whose gradient all-reduces it waits for), or this project's collectives (where a CUDA rank waits for the result).
COLLECTIVE_PATHS = ("torch/distributed/", "torch/nn/parallel/", "torch/autograd/", "gpt_train/collectives.py")
REPORT = "report.json"
_DUMP = re.compile(r"rank-(\d+)\.txt")
_POLL_S = 0.5  # listing the run directory: on an object store, each poll is a request
# The writes of a dump and the waits for the other ranks get this much beyond 2 x collect_s; then the process
# exits all the same, so that a run directory that hangs too cannot keep a hung process alive.
_SPARE_S = 60.0


def diagnostics_folder(attempt: int) -> str:
    """The dumps of one attempt, relative to the run directory."""
    return f"{rundir.DIAGNOSTICS}/attempt-{attempt}"


class _Progress(NamedTuple):
    phase: str
    step: int
    at: float  # clock() of the report
    calls: int  # reports so far
    longest: float  # the longest interval between two reports, the first interval left out


class Watchdog:
    """Watches one rank's progress reports from a daemon thread; see the top of this module.

    clock measures the progress and the silence (tests pass a fake one); the waits for the other ranks' files use
    real time. _exit ends the process (tests pass a function that records the code)."""

    def __init__(self, cfg: FaultConfig, store: Store, rank: int, world_size: int, attempt: int, host: str,
                 backend: str | None, on_hang: Callable[[dict], None] | None = None, collect_s: float = 20.0,
                 clock: Callable[[], float] = time.monotonic, _exit: Callable[[int], object] = os._exit):
        self.cfg, self.store, self.rank, self.world_size = cfg, store, rank, world_size
        self.attempt, self.host, self.backend = attempt, host, backend
        self.on_hang, self.collect_s = on_hang, collect_s
        self.folder = diagnostics_folder(attempt)
        self._clock, self._exit = clock, _exit
        self._last: _Progress | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def progress(self, phase: str, step: int) -> None:
        """The main thread got somewhere: a step begun, an evaluation, a sample, a phase of a checkpoint."""
        now = self._clock()
        last = self._last
        if last is None:
            self._last = _Progress(phase, step, now, 1, 0.0)
        else:
            # The interval that ends at the second report holds compilation and warm-up: left out.
            longest = max(last.longest, now - last.at) if last.calls >= 2 else 0.0
            # One assignment of a new tuple: the watchdog thread reads the old report or the new one, never half.
            self._last = _Progress(phase, step, now, last.calls + 1, longest)

    def timeout_s(self) -> float | None:
        """The silence that counts as a hang now; None while not armed (before the second report)."""
        chosen = self._timeout(self._last)
        return chosen[0] if chosen else None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="gpt-train-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """A clean end (finished, preempted, failed): the thread ends without dumping anything."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    # -- the watchdog thread ---------------------------------------------------------------------------------

    def _timeout(self, last: _Progress | None) -> tuple[float, str] | None:
        """The timeout and the rule that chose it, in words."""
        if last is None or last.calls < 2:
            return None
        if self.cfg.hang_timeout_s > 0:
            return self.cfg.hang_timeout_s, "fault.hang_timeout_s"
        floor, derived = self.cfg.hang_floor_s, MARGIN * last.longest
        seen = f"{MARGIN} x the longest interval between progress reports after the first ({last.longest:.1f} s)"
        if derived > floor:
            return derived, f"derived: {seen}, more than fault.hang_floor_s ({floor:g} s)"
        return floor, f"derived: fault.hang_floor_s, more than {seen}"

    def _watch(self) -> None:
        while True:
            chosen = self._timeout(self._last)
            if self._stopped.wait(min(1.0, chosen[0] / 10) if chosen else 1.0):
                return
            last = self._last
            chosen = self._timeout(last)
            if chosen and self._clock() - last.at > chosen[0]:
                self._hang(last, *chosen)
                return

    def _hang(self, last: _Progress, timeout: float, rule: str) -> None:
        silent = self._clock() - last.at
        guard = threading.Timer(2 * self.collect_s + _SPARE_S, self._leave)
        guard.name, guard.daemon = "gpt-train-watchdog-exit", True
        guard.start()
        try:
            self._say(f"no progress for {silent:.1f} s since phase {last.phase} at step {last.step}, more than the "
                      f"timeout of {timeout:g} s ({rule}): dumping the stacks of all threads into "
                      f"{self.store.url}/{self.folder}/, then exiting {protocol.EXIT_HANG}")
            mine = self._dump(last, silent, timeout, rule)
            if self.rank == 0:
                self._report(self._collect(mine), last, silent, timeout, rule)
            else:
                self._await_report()
        except Exception:
            traceback.print_exc()
            self._say(f"the dump failed (above); exiting {protocol.EXIT_HANG} all the same")
        finally:
            guard.cancel()
            self._leave()

    def _dump(self, last: _Progress, silent: float, timeout: float, rule: str) -> dict:
        """This rank's stacks into rank-K.txt (and NCCL's trace); what rank 0 needs of it: where the main thread is,
        and whether that is a collective."""
        frame: FrameType | None = sys._current_frames().get(threading.main_thread().ident)
        if frame is None:
            where, waiting = "(the main thread has ended)", False
        else:
            code = frame.f_code
            where, waiting = f"{_short(code.co_filename)}:{frame.f_lineno} {code.co_name}", _waits(code.co_filename)
        with tempfile.TemporaryFile() as f:
            faulthandler.dump_traceback(f, all_threads=True)
            f.seek(0)
            stacks = f.read().decode(errors="replace")
        header = {
            "rank": self.rank, "world size": self.world_size, "host": self.host, "pid": os.getpid(),
            "attempt": self.attempt, "backend": self.backend or "none", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "last progress": f"phase {last.phase} at step {last.step}, {silent:.1f} s ago",
            "timeout": f"{timeout:g} s ({rule})",
            "main thread": where, "main thread in a collective": "yes" if waiting else "no",
            # faulthandler names threads by id only
            "threads": ", ".join(f"{t.name} 0x{t.ident:016x}" for t in threading.enumerate() if t.ident),
        }
        text = "gpt-train hang dump\n" + "".join(f"{k}: {v}\n" for k, v in header.items()) + "\n" + stacks
        name = f"{self.folder}/rank-{self.rank}.txt"
        try:
            self.store.write_text(name, text)
        except StorageError as e:
            self._say(f"{e}: the dump, here instead:\n{text}")
        if self.backend == "nccl":
            self._nccl_trace()
        return {"where": where, "in_collective": waiting}

    def _nccl_trace(self) -> None:
        base = f"{self.folder}/rank-{self.rank}.nccl-trace"
        try:
            from torch._C import _distributed_c10d

            self.store.write_bytes(f"{base}.pkl", _distributed_c10d._dump_nccl_trace())
        except Exception as e:  # a torch without it, NCCL in a bad state, a failed write: the stacks stand
            why = f"NCCL's Flight Recorder trace could not be taken: {type(e).__name__}: {e}"
            self._say(why)
            with contextlib.suppress(StorageError):
                self.store.write_text(f"{base}.txt", why + "\n")

    def _collect(self, mine: dict) -> dict[int, dict]:
        """rank -> what its dump says, for the dumps that arrive within collect_s."""
        found = {self.rank: mine}
        deadline = time.monotonic() + self.collect_s
        while True:
            for name in self.store.listdir(self.folder):
                m = _DUMP.fullmatch(name)
                rank = int(m.group(1)) if m else -1
                if 0 <= rank < self.world_size and rank not in found:
                    found[rank] = self._read_dump(name)
            if len(found) == self.world_size or time.monotonic() >= deadline:
                return found
            time.sleep(_POLL_S)

    def _read_dump(self, name: str) -> dict:
        try:
            head = self.store.read_text(f"{self.folder}/{name}").split("\n\n", 1)[0]
        except Exception as e:
            return {"where": f"(unreadable: {type(e).__name__}: {e})", "in_collective": False}
        fields = dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)
        return {"where": fields.get("main thread", "?"),
                "in_collective": fields.get("main thread in a collective") == "yes"}

    def _report(self, found: dict[int, dict], last: _Progress, silent: float, timeout: float, rule: str) -> None:
        missing = [r for r in range(self.world_size) if r not in found]
        waiting = sorted(r for r, d in found.items() if d["in_collective"])
        report = {
            "step": last.step, "phase": last.phase, "silent_s": round(silent, 1), "timeout_s": timeout,
            "timeout_rule": rule, "dumps": sorted(found), "missing": missing,
            "where": {r: found[r]["where"] for r in sorted(found)}, "in_collective": waiting,
            "suspects": sorted(set(missing) | (set(found) - set(waiting))),
            "diagnostics": f"{self.store.url}/{self.folder}",
        }
        outside = "; ".join(f"rank {r} at {found[r]['where']}" for r in sorted(set(found) - set(waiting)))
        why = []
        if missing:
            why.append(f"no dump from ranks {missing} within {self.collect_s:g} s (usually the culprit)")
        if outside:
            why.append(f"not waiting in a collective: {outside}")
        self._say(f"suspects {report['suspects']}: {'; '.join(why) or 'none, every rank waits in a collective'}; "
                  f"diagnostics in {report['diagnostics']}/")
        if self.on_hang is not None:
            try:
                self.on_hang(report)
            except Exception:
                traceback.print_exc()
                self._say("on_hang failed (above)")
        # Last: the other ranks exit once it is there.
        self.store.write_text(f"{self.folder}/{REPORT}", json.dumps(report, indent=2) + "\n")

    def _await_report(self) -> None:
        # Twice as long as rank 0 collects: its own timeout may have run out a little later than this rank's.
        deadline = time.monotonic() + 2 * self.collect_s
        while REPORT not in self.store.listdir(self.folder) and time.monotonic() < deadline:
            time.sleep(_POLL_S)

    def _say(self, message: str) -> None:
        print(f"hang watchdog: rank {self.rank}: {message}", file=sys.stderr, flush=True)

    def _leave(self) -> None:
        # os._exit skips the buffers' flush at exit: what this rank printed last would be lost
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        self._exit(protocol.EXIT_HANG)


def _short(path: str) -> str:
    """A source file relative to the sys.path entry it was imported from: gpt_train/faults.py, torch/distributed/..."""
    roots = [r for r in (os.path.join(os.path.abspath(p), "") for p in sys.path) if path.startswith(r)]
    return path[len(max(roots, key=len)):] if roots else path


def _waits(path: str) -> bool:
    """Whether a frame in this file waits in a collective (see COLLECTIVE_PATHS)."""
    path = "/" + path.replace(os.sep, "/")
    return any("/" + part in path for part in COLLECTIVE_PATHS)
