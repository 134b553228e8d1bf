"""The hang watchdog (gpt_train/watchdog.py): how it chooses its timeout, what a rank dumps and what rank 0 makes of
the dumps, in one process with a fake exit, and then in two real processes of a gloo group, one of them hung."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from gpt_train.config import FaultConfig
from gpt_train.protocol import EXIT_HANG
from gpt_train.storage import Store
from gpt_train.watchdog import Watchdog, diagnostics_folder

REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def watchdog(tmp_path: Path, cfg: FaultConfig, **kw) -> Watchdog:
    kw.setdefault("clock", FakeClock())
    return Watchdog(cfg, Store(str(tmp_path / "run")), kw.pop("rank", 0), kw.pop("world_size", 1), 1, "node-a", None,
                    **kw)


def report_steps(dog: Watchdog, clock: FakeClock, intervals: list[float]) -> None:
    """A progress report, then one more after each interval."""
    dog.progress("step", 1)
    for step, seconds in enumerate(intervals, start=2):
        clock.advance(seconds)
        dog.progress("step", step)


# -- the timeout -------------------------------------------------------------------------------------------------

def test_not_armed_before_the_second_progress_report(tmp_path):
    clock = FakeClock()
    dog = watchdog(tmp_path, FaultConfig(hang_timeout_s=5.0), clock=clock)
    assert dog.timeout_s() is None
    dog.progress("step", 1)
    clock.advance(3600)  # a first step that compiles for an hour
    assert dog.timeout_s() is None
    dog.progress("step", 2)
    assert dog.timeout_s() == 5.0


def test_the_floor_wins_over_short_steps(tmp_path):
    clock = FakeClock()
    dog = watchdog(tmp_path, FaultConfig(hang_floor_s=300.0), clock=clock)
    report_steps(dog, clock, [1.0, 2.0, 1.5])
    assert dog.timeout_s() == 300.0


def test_five_times_the_longest_interval_wins_and_the_first_interval_is_left_out(tmp_path):
    clock = FakeClock()
    dog = watchdog(tmp_path, FaultConfig(hang_floor_s=10.0), clock=clock)
    report_steps(dog, clock, [1000.0, 2.0, 7.0, 3.0])  # the first: compilation and warm-up
    assert dog.timeout_s() == 35.0
    dog.progress("checkpoint", 5)  # a phase counts as progress too: its interval counts
    clock.advance(9.0)
    dog.progress("step", 6)
    assert dog.timeout_s() == 45.0


def test_an_explicit_timeout_wins(tmp_path):
    clock = FakeClock()
    dog = watchdog(tmp_path, FaultConfig(hang_timeout_s=42.0, hang_floor_s=10.0), clock=clock)
    report_steps(dog, clock, [100.0, 100.0, 100.0])
    assert dog.timeout_s() == 42.0


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_stop_prevents_a_dump(tmp_path):
    """Two watchdogs alike but that one is stopped: the other one's dump shows that the silence was a hang."""
    dogs, clocks, exits = [], [], []
    for name in ("stopped", "running"):
        clock = FakeClock()
        dogs.append(watchdog(tmp_path / name, FaultConfig(hang_timeout_s=1.0), clock=clock, collect_s=0.1,
                             _exit=lambda code, name=name: exits.append((name, code))))
        clocks.append(clock)
    for dog, clock in zip(dogs, clocks):
        dog.start()
        report_steps(dog, clock, [1.0])
    dogs[0].stop()
    for clock in clocks:
        clock.advance(60.0)
    assert wait_for(lambda: exits), "the watchdog that was not stopped saw no hang"
    dogs[1].stop()
    assert exits == [("running", EXIT_HANG)]
    assert (tmp_path / "running/run/diagnostics/attempt-1/rank-0.txt").exists()
    assert not (tmp_path / "stopped/run").exists()


# -- a hang, in this process ---------------------------------------------------------------------------------

def stuck_here(release: threading.Event) -> None:
    release.wait(30)


def thread_stack(stacks: str, thread: threading.Thread) -> str:
    """One thread's part of faulthandler's output."""
    return next(block for block in stacks.split("\n\n") if f"hread 0x{thread.ident:016x} " in block)


def test_a_hang_dumps_the_stacks_and_rank_0_reports_the_missing_rank(tmp_path):
    store = Store(str(tmp_path / "run"))
    released, exits, reports = threading.Event(), [], []

    def fake_exit(code: int) -> None:
        exits.append(code)
        released.set()

    dog = Watchdog(FaultConfig(hang_timeout_s=0.3), store, 0, 2, 3, "node-a", "gloo", on_hang=reports.append,
                   collect_s=0.5, _exit=fake_exit)
    dog.start()
    dog.progress("step", 6)
    dog.progress("eval", 7)
    start = time.monotonic()
    stuck_here(released)
    took = time.monotonic() - start
    dog.stop()
    assert exits == [EXIT_HANG]
    assert took >= 0.3 + 0.5, "rank 0 did not wait collect_s for rank 1's dump"

    folder = diagnostics_folder(3)
    head, stacks = store.read_text(f"{folder}/rank-0.txt").split("\n\n", 1)
    fields = dict(line.split(": ", 1) for line in head.splitlines()[1:])
    assert fields["rank"] == "0" and fields["host"] == "node-a" and fields["attempt"] == "3"
    assert fields["pid"] == str(os.getpid())
    assert re.fullmatch(r"phase eval at step 7, \d+\.\d s ago", fields["last progress"]), fields["last progress"]
    assert fields["timeout"] == "0.3 s (fault.hang_timeout_s)"
    # Event.wait's innermost frame is in threading.py: not a collective
    assert re.fullmatch(r".*threading\.py:\d+ wait", fields["main thread"]), fields["main thread"]
    assert fields["main thread in a collective"] == "no"
    main = thread_stack(stacks, threading.main_thread())
    assert "in stuck_here" in main and "in test_a_hang_dumps" in main
    assert "stuck_here" not in stacks.replace(main, "")
    assert not store.exists(f"{folder}/rank-0.nccl-trace.txt")  # gloo: no NCCL trace asked for

    assert len(reports) == 1
    report = reports[0]
    assert report["step"] == 7 and report["phase"] == "eval" and report["timeout_s"] == 0.3
    assert report["timeout_rule"] == "fault.hang_timeout_s"
    assert report["dumps"] == [0] and report["missing"] == [1]
    assert report["where"] == {0: fields["main thread"]} and report["in_collective"] == []
    assert report["suspects"] == [0, 1]
    assert report["diagnostics"] == f"{store.url}/{folder}"
    assert 0.3 < report["silent_s"] < 5
    assert json.loads(store.read_text(f"{folder}/report.json")) == json.loads(json.dumps(report))


def test_another_rank_dumps_and_waits_for_rank_0s_report_without_calling_on_hang(tmp_path):
    reports, exits = [], []
    clock = FakeClock()
    dog = watchdog(tmp_path, FaultConfig(hang_timeout_s=1.0), rank=1, world_size=2, clock=clock, collect_s=0.3,
                   on_hang=reports.append, _exit=exits.append)
    dog.start()
    report_steps(dog, clock, [0.5])
    start = time.monotonic()
    clock.advance(2.0)
    assert wait_for(lambda: exits)
    dog.stop()
    assert exits == [EXIT_HANG] and reports == []
    assert time.monotonic() - start >= 2 * 0.3, "it did not wait for rank 0's report"
    assert (tmp_path / "run/diagnostics/attempt-1/rank-1.txt").read_text().startswith("gpt-train hang dump\nrank: 1\n")
    assert not (tmp_path / "run/diagnostics/attempt-1/report.json").exists()


@pytest.mark.skipif(dist.is_nccl_available(), reason="the failure of NCCL's trace, on a torch without NCCL")
def test_a_failed_nccl_trace_says_why_and_the_stacks_stand(tmp_path):
    clock, exits = FakeClock(), []
    dog = Watchdog(FaultConfig(hang_timeout_s=1.0), Store(str(tmp_path / "run")), 0, 1, 1, "node-a", "nccl",
                   collect_s=0.1, clock=clock, _exit=exits.append)
    dog.start()
    report_steps(dog, clock, [0.5])
    clock.advance(2.0)
    assert wait_for(lambda: exits)
    dog.stop()
    folder = tmp_path / "run/diagnostics/attempt-1"
    assert "backend: nccl\n" in (folder / "rank-0.txt").read_text()
    assert not (folder / "rank-0.nccl-trace.pkl").exists()
    why = (folder / "rank-0.nccl-trace.txt").read_text()
    assert why.startswith("NCCL's Flight Recorder trace could not be taken: ") and "_dump_nccl_trace" in why


# -- a hang, in two real processes ---------------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import json
    import os
    import sys
    import time
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from gpt_train.config import FaultConfig
    from gpt_train.storage import Store
    from gpt_train.watchdog import Watchdog

    run_dir, reports = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])


    def write_report(report):
        with open(f"{reports}/report-{rank}.json", "w") as f:
            json.dump(report, f)


    def stuck_in_step():
        while True:
            time.sleep(3600)


    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    dog = Watchdog(FaultConfig(hang_timeout_s=3), Store(run_dir), rank, 2, 1, "localhost", "gloo",
                   on_hang=write_report, collect_s=10)
    dog.start()
    for step in (1, 2):
        dog.progress("step", step)
        dist.all_reduce(torch.ones(1))
    if rank == 1:
        stuck_in_step()
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for rank 1
    print("the all_reduce returned", flush=True)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_one_hung_both_dump_and_exit_and_rank_0_names_the_hung_one(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    run_dir = tmp_path / "run"
    port = free_port()
    procs = []
    start = time.monotonic()
    try:
        for rank in (0, 1):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
            procs.append(subprocess.Popen([sys.executable, str(worker), str(run_dir), str(tmp_path)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    took = time.monotonic() - start
    log = "\n".join(f"--- rank {r}:\n{out[-3000:]}" for r, out in enumerate(outputs))
    assert [p.returncode for p in procs] == [EXIT_HANG, EXIT_HANG], log
    assert took < 60, log  # starting torch included; the hang itself: 3 s, then the dumps
    assert "the all_reduce returned" not in log

    folder = run_dir / "diagnostics/attempt-1"
    dumps = {rank: (folder / f"rank-{rank}.txt").read_text() for rank in (0, 1)}
    assert "in stuck_in_step" in dumps[1] and "main thread in a collective: no\n" in dumps[1]
    assert re.search(r"^main thread: worker\.py:\d+ stuck_in_step$", dumps[1], re.M), dumps[1][:2000]
    assert "in all_reduce" in dumps[0] and "main thread in a collective: yes\n" in dumps[0]

    assert not (tmp_path / "report-1.json").exists(), "rank 1 called on_hang"
    report = json.loads((tmp_path / "report-0.json").read_text())
    assert report["dumps"] == [0, 1] and report["missing"] == []
    assert report["suspects"] == [1] and report["in_collective"] == [0]
    assert "torch/distributed/" in report["where"]["0"] and report["where"]["1"].endswith(" stuck_in_step")
    assert report["step"] == 2 and report["timeout_s"] == 3 and 3 < report["silent_s"] < 10
    assert json.loads((folder / "report.json").read_text()) == report
