"""The run directory's lease: one live writer, takeover of a dead one, a requeue that waits for its previous
attempt, renewal, loss, and a race of real processes, on local disk and on moto's S3."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gpt_train import rundir
from gpt_train.lease import Lease, RunDirBusy
from gpt_train.storage import Store

REPO = Path(__file__).resolve().parent.parent
FAST = {"settle_s": 0.05}

# Holds the lease of argv[1] until its stdin closes.
HOLD = """
import sys
from gpt_train.lease import Lease
from gpt_train.storage import Store
lease = Lease(Store(sys.argv[1]), settle_s=0.05, log=lambda m: None)
lease.acquire()
print("held", flush=True)
sys.stdin.read()
lease.release()
"""

# Tries for the lease of argv[1] at the wall time read from stdin; a winner holds it until every loser decided.
RACE = """
import sys, time
from gpt_train.lease import Lease, RunDirBusy
from gpt_train.storage import Store
lease = Lease(Store(sys.argv[1]), settle_s=0.5, log=lambda m: None)
print("ready", flush=True)
time.sleep(max(0.0, float(sys.stdin.readline()) - time.time()))
try:
    lease.acquire()
except RunDirBusy:
    print("busy")
else:
    print("won", flush=True)
    time.sleep(1.5)
    lease.release()
"""


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def run_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{request.getfixturevalue('s3_bucket')}/runs/leased"


def start_holder(url: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, url], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def plant(store: Store, **fields) -> None:
    """A lease file of another trainer: this process's record with the given fields changed."""
    record = {**Lease(store).record, "token": "theirs", "heartbeat": time.time(), **fields}
    store.write_text(rundir.LEASE, json.dumps(record))


def on_file(store: Store) -> dict:
    return json.loads(store.read_text(rundir.LEASE))


def test_a_live_holder_refuses_a_second_trainer_until_it_releases_and_a_killed_one_is_taken_over(run_url):
    store = Store(run_url)
    holder = start_holder(run_url)
    try:
        with pytest.raises(RunDirBusy) as busy:
            Lease(store, **FAST).acquire()
        message = str(busy.value)
        assert "\n" not in message
        assert f"host {socket.gethostname()} pid {holder.pid}" in message
        assert re.search(r"heartbeat \d+s ago", message)
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert not store.exists(rundir.LEASE)
    after = Lease(store, **FAST)
    assert after.acquire() is None
    assert on_file(store)["token"] == after.token
    after.release()
    assert not store.exists(rundir.LEASE)

    killed = start_holder(run_url)
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    successor = Lease(store, **FAST)
    note = successor.acquire()
    assert note is not None and f"pid {killed.pid}" in note and f"process {killed.pid} is gone" in note
    successor.release()


def test_a_lease_of_a_process_that_is_gone_on_this_host_is_taken_over(tmp_path):
    store = Store(str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant(store, pid=dead.pid)
    lease = Lease(store, **FAST)
    note = lease.acquire()
    assert note == (f"took over the lease of host {socket.gethostname()} pid {dead.pid}: "
                    f"process {dead.pid} is gone")
    assert on_file(store)["token"] == lease.token
    lease.release()


def test_a_fresh_lease_of_another_host_holds_and_a_stale_one_is_taken_over(tmp_path):
    store = Store(str(tmp_path))
    plant(store, host="elsewhere", pid=4242, slurm_job="9", attempt=2)
    with pytest.raises(RunDirBusy, match=r"host elsewhere pid 4242 \(SLURM job 9, attempt 2\), heartbeat 0s ago"):
        Lease(store, **FAST).acquire()
    assert on_file(store)["token"] == "theirs"
    plant(store, host="elsewhere", pid=4242, heartbeat=time.time() - 500)
    lease = Lease(store, stale_after_s=120, **FAST)
    note = lease.acquire()
    assert note is not None and "host elsewhere pid 4242" in note and "no heartbeat for 500s" in note
    assert on_file(store)["token"] == lease.token
    lease.release()


def test_a_requeue_waits_for_the_previous_attempt_of_its_job_and_refuses_other_jobs(tmp_path):
    store = Store(str(tmp_path))
    previous = Lease(store, stale_after_s=4, log=lambda m: None, environ={"SLURM_JOB_ID": "77"}, **FAST)
    assert previous.acquire() is None
    released = threading.Timer(1.0, previous.release)
    released.start()
    logged: list[str] = []
    requeued = Lease(store, stale_after_s=4, wait_s=20, log=logged.append,
                     environ={"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}, **FAST)
    t0 = time.monotonic()
    note = requeued.acquire()
    took = time.monotonic() - t0
    released.join()
    assert 0.9 < took < 15  # it waited for the release, and not for wait_s
    assert note is not None and note.startswith("waited ") and "(SLURM job 77, attempt 0) to finish" in note
    assert any("an earlier attempt of this job" in m for m in logged)
    assert on_file(store)["attempt"] == 1

    t0 = time.monotonic()
    with pytest.raises(RunDirBusy, match="attempt 1"):
        Lease(store, wait_s=20, environ={"SLURM_JOB_ID": "78", "SLURM_RESTART_COUNT": "2"}, **FAST).acquire()
    assert time.monotonic() - t0 < 10, "another job is refused at once, not after wait_s"
    with pytest.raises(RunDirBusy, match="still held after waiting"):
        Lease(store, stale_after_s=4, wait_s=1.5, log=lambda m: None,
              environ={"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "2"}, **FAST).acquire()
    requeued.release()


def test_the_heartbeat_keeps_a_lease_live_past_stale_after_s(tmp_path):
    store = Store(str(tmp_path))
    lease = Lease(store, stale_after_s=2.0, **FAST)
    lease.acquire()
    beats = set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # held for more than twice stale_after_s, never stale
        record = on_file(store)
        assert time.time() - record["heartbeat"] < 2.0
        beats.add(record["heartbeat"])
        time.sleep(0.1)
    assert len(beats) >= 4
    with pytest.raises(RunDirBusy):
        Lease(store, stale_after_s=2.0, **FAST).acquire()
    assert lease.acquire() is None, "our own lease, re-acquired"
    assert not lease.lost
    lease.release()
    assert not store.exists(rundir.LEASE)


def test_a_lease_taken_by_another_writer_is_reported_lost_and_left_alone(tmp_path):
    store = Store(str(tmp_path))
    logged: list[str] = []
    lease = Lease(store, stale_after_s=0.4, log=logged.append, **FAST)
    lease.acquire()
    plant(store, host="intruder", pid=7)
    deadline = time.monotonic() + 3
    while not lease.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lease.lost
    assert any("taken over by host intruder pid 7" in m for m in logged)
    lease.release()
    assert on_file(store)["token"] == "theirs"


def test_of_trainers_started_at_the_same_moment_exactly_one_holds_the_lease(run_url):
    procs = [subprocess.Popen([sys.executable, "-c", RACE, run_url], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 3
    start = time.time() + 0.2
    for p in procs:
        p.stdin.write(f"{start}\n")
        p.stdin.close()
    outcomes = sorted(p.stdout.read().strip() for p in procs)
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    assert outcomes == ["busy", "busy", "won"]
