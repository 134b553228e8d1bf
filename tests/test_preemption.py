"""A real signal to a real training process: checkpoint at the next step, exit to be requeued, resume exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gpt_train.preemption import Preemption, slurm_end_time
from gpt_train.protocol import EXIT_REQUEUE as REQUEUE_EXIT
from helpers import REPO, cli, losses, tiny_data, train_args  # noqa: F401


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_signal_checkpoints_exits_for_requeue_and_the_resume_is_exact(tmp_path, tiny_data, sig):
    steps = ["max_steps=14", "checkpoint.interval=5", "eval_interval=7", "sample_tokens=4"]
    ref = tmp_path / "ref"
    assert cli(*train_args(tiny_data, str(ref), *steps)).returncode == 0

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "gpt_train", *train_args(tiny_data, str(run), *steps)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = []
    for line in proc.stdout:
        out.append(line)
        if "step      6/14 | loss" in line:  # between two checkpoints
            proc.send_signal(sig)
    proc.wait()
    text = "".join(out)
    assert proc.returncode == REQUEUE_EXIT, text[-2000:]
    assert f"preemption: {sig.name}" in text
    stopped = max(losses(run))
    # The signal lands during step 6 or 7; the ranks agree on it a step later (no step waits for the all-reduce).
    assert stopped in (7, 8)
    assert (run / "checkpoints" / "LATEST").read_text().strip() == f"step-{stopped:08d}"
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "preempted" and events[-1]["cause"] == sig.name and events[-1]["checkpoint_landed"]

    resumed = cli(*train_args(tiny_data, str(run), *steps))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"(step {stopped})" in resumed.stdout
    assert losses(run) == losses(ref)


def test_deadline_acts_like_an_early_signal(tmp_path, tiny_data):
    run = tmp_path / "run"
    env = {"GPT_TRAIN_DEADLINE": str(time.time() + 200)}
    # the margin leaves ~5 s: a few steps, far fewer than max_steps even on a fast machine
    result = cli(*train_args(tiny_data, str(run), "max_steps=1000", "preemption.deadline_margin_s=195"), env=env)
    assert result.returncode == REQUEUE_EXIT, result.stdout[-2000:]
    assert "preemption: deadline" in result.stdout and "deadline:" in result.stdout
    assert 1 <= max(losses(run)) < 1000


def test_handler_only_records(monkeypatch):
    p = Preemption(["TERM", "usr1"], deadline=None, margin_s=0)
    try:
        assert p.reason() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert p.reason() == "SIGUSR1"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_deadline_sources():
    assert slurm_end_time({"GPT_TRAIN_DEADLINE": "123.5"}) == 123.5
    assert slurm_end_time({"SLURM_JOB_END_TIME": "1000"}) == 1000.0
    assert slurm_end_time({}) is None


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler for `sig` (the SigCgt mask of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(mask >> (sig - 1) & 1)


@pytest.mark.parametrize("when", ["importing", "starting"])
def test_a_signal_before_the_first_step_still_exits_for_requeue(tmp_path, tiny_data, when):
    run = tmp_path / "run"
    assert cli(*train_args(tiny_data, str(run), "max_steps=2")).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "gpt_train", *train_args(tiny_data, str(run), "max_steps=4")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = []
    if when == "importing":  # as soon as the process listens, long before torch has loaded
        while not catches(proc.pid, signal.SIGUSR2) and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGUSR2)
    for line in proc.stdout:
        out.append(line)
        if when == "starting" and line.startswith("run: "):  # resumed, the loop not begun
            proc.send_signal(signal.SIGUSR2)
    proc.wait()
    text = "".join(out)
    assert proc.returncode == REQUEUE_EXIT, text[-2000:]
    assert "preemption: SIGUSR2 before the first step" in text
    assert max(losses(run)) == 2 and (run / "checkpoints" / "LATEST").read_text().strip() == "step-00000002"
    assert cli(*train_args(tiny_data, str(run), "max_steps=4")).returncode == 0


def test_a_sigterm_in_a_step_that_cannot_end_in_the_grace_time_exits_for_requeue(tmp_path, tiny_data):
    steps = ["max_steps=6", "checkpoint.interval=2"]
    ref = tmp_path / "ref"
    assert cli(*train_args(tiny_data, str(ref), *steps)).returncode == 0
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "gpt_train", *train_args(tiny_data, str(run), *steps,
                                                                             "preemption.grace_s=2")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "GPT_TRAIN_FAULT": "hang@step=4"})
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("fault: injecting 'hang'"):  # step 4 will never end
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
    proc.wait()
    text = "".join(out)
    assert proc.returncode == REQUEUE_EXIT and time.monotonic() - signalled < 30, text[-2000:]
    assert "did not reach the step boundary where they stop within preemption.grace_s=2 s: exiting 75 without" in text
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step-00000002"  # the last one stands
    assert cli(*train_args(tiny_data, str(run), *steps)).returncode == 0
    assert losses(run) == losses(ref)
