"""`gpt-train runs`, `logs` and `cancel`: the table of many runs (fabricated run directories, one in each state, and
a real SLURM job), the logs of every attempt as one stream (a shared SLURM-style file; -f across a restart), and a
clean stop through SLURM and through the local supervisor, each ending in a checkpoint and a cancelled event."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_cli import imported_after
from test_slurm import SBATCH_CPU, job_env, jobs, sbatch, wait_progress  # noqa: F401

from gpt_train import rundir
from gpt_train.runs import KEYS, discover, row, table
from gpt_train.status import read_run
from gpt_train.storage import Store
from helpers import REPO, cli, tiny_data, train_args  # noqa: F401

HOST = socket.gethostname()


# -- fabricated run directories -------------------------------------------------------------------------------

def checkpoint(run: Path, step: int, final: bool = False, age_s: float = 60.0) -> None:
    """A checkpoint folder that verifies, written the way the checkpointer writes one (without torch)."""
    store = Store(str(run))
    meta = {"step": step, "final": final, "time": time.time() - age_s, "tokens": step * 256}
    files = {"model.pt": f"weights of step {step}".encode(), "meta.json": json.dumps(meta).encode()}
    for name, data in files.items():
        store.write_bytes(f"{rundir.step_folder(step)}/{name}", data)
    manifest = {"format": rundir.FORMAT, "step": step,
                "files": {n: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}}
    store.write_text(f"{rundir.step_folder(step)}/{rundir.MANIFEST}", json.dumps(manifest))


def make_run(path: Path, events: list[dict], steps: int = 0, max_steps: int = 40, ckpts: tuple = (),
             final: bool = False, last_metric_age_s: float = 5.0) -> Path:
    """A run directory with these events (times are seconds before now), `steps` training metrics ending
    last_metric_age_s ago, and verifying checkpoints of the steps `ckpts`."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"train:\n  max_steps: {max_steps}\n")
    (path / "events.jsonl").write_text("".join(json.dumps({**e, "time": time.time() - e["time"]}) + "\n" for e in events))
    metrics = [{"step": s, "loss": 5.0 - s / 100, "tokens": s * 256, "tokens_per_s": 2560.0, "step_ms": 100.0,
                "time": time.time() - last_metric_age_s - (steps - s) * 0.1} for s in range(1, steps + 1)]
    if steps >= 5:
        metrics.append({"step": 5, "val_loss": 4.5, "time": metrics[4]["time"]})
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    for s in ckpts:
        checkpoint(path, s, final=final and s == max(ckpts))
    return path


def start(t: float, step: int = 0, attempt: int = 1, **extra) -> dict:
    return {"event": "start" if step == 0 else "resume", "time": t, "step": step, "attempt": attempt, **extra}


@pytest.fixture
def fleet(tmp_path) -> Path:
    """A root with one run in each state the table tells apart without a scheduler (one of them two levels down)."""
    root = tmp_path / "runs"
    make_run(root / "done", [start(100), {"event": "finish", "time": 50, "step": 40}], steps=40, ckpts=(40,),
             final=True, last_metric_age_s=50)
    make_run(root / "busy", [start(300), {"event": "preempted", "time": 250, "step": 4, "cause": "SIGTERM",
                                          "checkpoint_landed": True},
                             start(200, 4, 2), {"event": "crash", "time": 150, "step": 6, "cause": "exit 1",
                                                "exit_code": 1, "recorded_by": "the next start"},
                             start(100, 6, 3, hosts=["node7"])], steps=12, ckpts=(6, 10))
    make_run(root / "waiting", [start(100), {"event": "preempted", "time": 50, "step": 4, "cause": "deadline",
                                             "checkpoint_landed": True}], steps=4, ckpts=(4,), last_metric_age_s=50)
    make_run(root / "team" / "crashed", [start(100), {"event": "crash", "time": 50, "step": 3,
                                                      "cause": "RuntimeError: boom", "exit_code": 1}], steps=3)
    make_run(root / "hung", [start(100), {"event": "hang", "time": 50, "step": 3, "cause": "no progress for 300 s",
                                          "exit_code": 76}], steps=3)
    crash = {"event": "crash", "step": 2, "cause": "exit 1", "exit_code": 1}
    make_run(root / "gave-up", [start(100), {**crash, "time": 90}, start(80, 0, 2), {**crash, "time": 70},
                                {"event": "gave_up", "time": 60, "cause": "2 attempts in a row failed at step 2"}],
             steps=2)
    make_run(root / "cancelled", [start(100), {"event": "preempted", "time": 50, "step": 4, "cause": "SIGTERM",
                                               "checkpoint_landed": True},
                                  {"event": "cancelled", "time": 45, "step": 4, "by": "ann@login1"}], steps=4,
             ckpts=(4,), last_metric_age_s=50)
    (root / "notes").mkdir()  # not a run: skipped
    return root


EXPECTED = {
    "done": ("finished", None), "busy": ("running", None), "waiting": ("preempted and waiting", "time limit"),
    "team/crashed": ("failed", "crash"), "hung": ("failed", "hang"), "gave-up": ("stopped by the restart policy", None),
    "cancelled": ("stopped (cancelled)", None),
}


def test_runs_table_shows_each_state_in_json_and_text(fleet):
    p = cli("runs", str(fleet), "--json")
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)}
    assert {n: (r["state"], r["cause"]) for n, r in rows.items()} == EXPECTED
    assert all(tuple(r) == KEYS for r in rows.values())  # stable keys, in a stable order
    busy = rows["busy"]
    assert (busy["step"], busy["max_steps"], busy["train_loss"], busy["val_loss"]) == (12, 40, 4.88, 4.5)
    assert busy["restarts"] == 2 and busy["restart_causes"] == ["preempted", "crash"] and busy["hosts"] == ["node7"]
    assert busy["checkpoint_step"] == 10 and 55 < busy["checkpoint_age_s"] < 120
    assert busy["eta_s"] == pytest.approx(28 * 0.1) and busy["tokens_per_s"] == 2560.0
    assert busy["slurm_job"] is None and busy["launcher"] is None
    assert rows["done"]["eta_s"] is None and "cancelled by ann@login1 at step 4" in rows["cancelled"]["detail"]
    assert "RuntimeError: boom" in rows["team/crashed"]["detail"]

    text = cli("runs", str(fleet))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split()[:3] == ["RUN", "STATE", "JOB"] and len(lines) == 1 + len(EXPECTED)
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert "running" in by_name["busy"] and "12/40" in by_name["busy"] and "2: preempted, crash" in by_name["busy"]
    assert "2.6k" in by_name["busy"] and "node7" in by_name["busy"]
    assert "failed (hang)" in by_name["hung"] and "stopped (cancelled)" in by_name["cancelled"]
    assert "preempted and waiting (time limit)" in by_name["waiting"]

    # a run named directly, and a glob
    one = json.loads(cli("runs", str(fleet / "team" / "crashed"), str(fleet / "d*"), "--json").stdout)
    assert [r["name"] for r in one] == ["crashed", "done"]


def test_runs_reads_the_slurm_state_into_the_run_state(tmp_path):
    """The scheduler's answer against the records: injected here (slurm_states() is what `runs` asks)."""
    job = {"slurm_job": "990001", "launcher": "slurm", "allocation": "slurm:990001:0"}
    pre = make_run(tmp_path / "pre", [start(100, **job), {"event": "preempted", "time": 50, "step": 4,
                                                         "cause": "SIGTERM", "checkpoint_landed": True}], steps=4)
    crashed = make_run(tmp_path / "crashed", [start(100, **job), {"event": "crash", "time": 50, "step": 3,
                                                                 "cause": "exit 1"}], steps=3)
    live = make_run(tmp_path / "live", [start(100, **job)], steps=3, last_metric_age_s=5000)
    refused = make_run(tmp_path / "refused", [{"event": "bad_node", "time": 100, "cause": "n1: no GPU", **job}])

    def state(path: Path, slurm: str) -> tuple[str, str | None]:
        r = row(path.name, read_run(str(path)), {"990001": slurm}, time.time())
        assert r["slurm_job"] == "990001" and r["slurm_state"] == slurm
        return r["state"], r["cause"]

    assert state(pre, "PENDING") == ("preempted and waiting", "preempted")
    assert state(pre, "CANCELLED") == ("stopped (cancelled)", None)  # scancel by hand: the same to the table
    assert state(crashed, "RUNNING") == ("running", "restarting")  # in-job restart
    assert state(crashed, "FAILED") == ("failed", "failed")
    assert state(live, "RUNNING") == ("running", None)  # quiet for long, but SLURM says it runs
    assert state(refused, "PENDING") == ("queued", None)  # requeued without the bad node before any attempt


def test_runs_finds_runs_in_an_object_store_through_a_glob(fleet):
    """fsspec URLs: the runs copied into memory://, found one and two levels down and through a glob."""
    url = f"memory://fleet-{os.getpid()}"
    store = Store(url)
    for path in fleet.rglob("*"):
        if path.is_file():
            store.write_bytes(str(path.relative_to(fleet.parent)), path.read_bytes())
    try:
        found = discover([f"{url}/runs"])
        assert sorted(name for name, _ in found) == sorted(EXPECTED)
        rows = {r["name"]: r["state"] for r in table(found)}
        assert rows == {name: state for name, (state, _) in EXPECTED.items()}
        # team/ matches too: a folder, searched below
        assert [name for name, _ in discover([f"{url}/runs/*a*"])] == ["cancelled", "gave-up", "crashed", "waiting"]
    finally:
        store.remove("")


def test_the_commands_import_no_torch_and_watch_redraws_until_ctrl_c(fleet):
    for argv in (["runs", str(fleet)], ["logs", str(fleet / "busy")], ["cancel", str(fleet / "done")]):
        loaded = imported_after(*argv)
        assert "torch" not in loaded and f"gpt_train.{argv[0]}" in loaded, argv

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "gpt_train", "runs", str(fleet), "--watch=0.3"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    time.sleep(4)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    frames = [f for f in out.split("\n\n") if f.startswith("gpt-train runs: ")]
    assert len(frames) >= 2, out  # not a terminal: plain lines, each refresh separated, no escape codes
    assert "\x1b" not in out and all("busy" in f for f in frames)


# -- logs ---------------------------------------------------------------------------------------------------------

SHARED = """\
gpt-train: job 77 start 1 at 2025-01-01 10:00:00 on n1, 1 task(s), master n1:20077, ends ?
one: step 1
one: RuntimeError: boom
gpt-train: the ranks crashed (exit 1): restart 1 in this allocation
two: step 3
two: checkpoint at step 5; exit 75
gpt-train: the ranks checkpointed and exited 75: requeueing job 77 (restart 1 of at most 10)
gpt-train: job 77 start 2 at 2025-01-01 10:05:00 on n2, 1 task(s), master n2:20077, ends ?
refused: n2 failed its start-up check
gpt-train: job 77 start 3 at 2025-01-01 10:09:00 on n1, 1 task(s), master n1:20077, ends ?
four: step 6
four: done: step 8
"""


def shared_file_run(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "logs" / "77_0_log.out"
    log.parent.mkdir()
    log.write_text(SHARED)
    job = {"slurm_job": "77", "launcher": "slurm", "log": str(log)}
    run = make_run(tmp_path / "run", [
        start(100, 0, 1, allocation="slurm:77:0", **job),
        {"event": "crash", "time": 95, "step": 2, "cause": "exit 1", "exit_code": 1, "recorded_by": "the next start"},
        start(94, 2, 2, allocation="slurm:77:0", **job),
        {"event": "preempted", "time": 90, "step": 5, "cause": "SIGTERM", "checkpoint_landed": True},
        {"event": "bad_node", "time": 80, "cause": "n2: CUDA error", "slurm_job": "77", "allocation": "slurm:77:1"},
        start(70, 5, 4, allocation="slurm:77:2", **job),
        {"event": "finish", "time": 60, "step": 8},
    ], steps=8)
    return run, log


def test_logs_of_a_shared_slurm_file_show_each_attempt_once_in_order_with_the_reason_between(tmp_path):
    run, log = shared_file_run(tmp_path)
    p = cli("logs", str(run))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    expected = [
        "--- attempt 1, started at step 0 ---", "gpt-train: job 77 start 1", "one: step 1", "one: RuntimeError: boom",
        "--- attempt 2, resumed at step 2 after: crash (exit 1) ---", "gpt-train: the ranks crashed (exit 1)",
        "two: step 3", "two: checkpoint", "gpt-train: the ranks checkpointed",
        "--- SLURM job 77 start 2: refused: a node failed its start-up check: n2: CUDA error ---",
        "gpt-train: job 77 start 2", "refused:",
        "--- attempt 4, resumed at step 5 after: preempted (SIGTERM) ---", "gpt-train: job 77 start 3", "four: step 6",
        "four: done", "--- attempt 4 ended: finished at step 8 ---",
    ]
    assert len(lines) == len(expected), p.stdout
    for line, want in zip(lines, expected):
        assert line.startswith(want), p.stdout

    only = cli("logs", str(run), "--attempt", "2")
    assert only.returncode == 0, only.stderr
    assert only.stdout.splitlines()[0] == "--- attempt 2, resumed at step 2 after: crash (exit 1) ---"
    assert "two: step 3" in only.stdout and "one:" not in only.stdout and "four:" not in only.stdout

    (log.parent / "77_1_log.out").write_text("rank one says hello\n")  # submitit's naming: JOBID_RANK_log.out
    ranked = cli("logs", str(run), "--rank", "1", "--attempt", "1")
    assert ranked.returncode == 0 and "rank one says hello" in ranked.stdout, ranked.stdout + ranked.stderr

    log.unlink()
    missing = cli("logs", str(run), "--attempt", "1")
    assert missing.returncode == 0 and "Traceback" not in missing.stderr
    assert missing.stdout.splitlines()[1] == f"(the log of attempt 1 is missing: expected at {log})"
    bad = cli("logs", str(run), "--attempt", "9")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "no attempt 9" in bad.stderr


class Reader:
    """A child's stdout, read as it comes, on a thread."""

    def __init__(self, proc: subprocess.Popen):
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.text += line

    def wait_for(self, fragment: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while fragment not in self.text:
            assert time.monotonic() < deadline, f"{fragment!r} not in:\n{self.text}"
            time.sleep(0.1)


def test_logs_follow_moves_on_to_the_next_attempt_and_stops_when_the_launcher_is_gone(tmp_path):
    # A real launcher that lives until it is stopped: the run's owner while the log is followed.
    launcher = subprocess.Popen([sys.executable, "-m", "gpt_train.supervise", "--", "sleep", "120"], cwd=REPO)
    try:
        log = tmp_path / "train.log"
        log.write_text("a1: step 1\n")
        own = {"launcher": "local", "supervisor_pid": launcher.pid, "hosts": [HOST], "log": str(log),
               "allocation": "local:abc"}
        run = make_run(tmp_path / "run", [start(10, 0, 1, **own)], steps=1)
        follower = subprocess.Popen([sys.executable, "-m", "gpt_train", "logs", str(run), "-f"], cwd=REPO, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out = Reader(follower)
        out.wait_for("a1: step 1")
        with log.open("a") as f:
            f.write("a1: half a li")
        time.sleep(1.5)
        assert "half a li" not in out.text  # whole lines only while following
        with log.open("a") as f:
            f.write("ne\ngpt-train: the ranks crashed (exit 1): restart 1\na2: step 2\n")
        with (run / "events.jsonl").open("a") as f:
            f.write(json.dumps({"event": "crash", "time": time.time(), "step": 1, "cause": "exit 1"}) + "\n")
            f.write(json.dumps({**start(0, 1, 2, **own), "time": time.time()}) + "\n")
        out.wait_for("a2: step 2")
        with (run / "events.jsonl").open("a") as f:
            f.write(json.dumps({"event": "preempted", "time": time.time(), "step": 2, "cause": "SIGTERM",
                                "checkpoint_landed": True}) + "\n")
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 143  # sleep passed the SIGTERM on: 128 + 15
        assert follower.wait(timeout=30) == 0, follower.stderr.read()
    finally:
        if launcher.poll() is None:
            launcher.kill()
    lines = out.text.splitlines()
    assert lines == ["--- attempt 1, started at step 0 ---", "a1: step 1", "a1: half a line",
                     "--- attempt 2, resumed at step 1 after: crash (exit 1) ---",
                     "gpt-train: the ranks crashed (exit 1): restart 1", "a2: step 2",
                     "--- attempt 2 ended: checkpointed and stopped to be requeued at step 2 (SIGTERM) ---"], out.text


# -- cancel, for real -----------------------------------------------------------------------------------------------

def read_events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def wait_steps(run: Path, steps: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and sum('"loss"' in line for line in path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.3)
    raise TimeoutError(f"{run} did not log {steps} steps in {timeout}s")


@pytest.mark.slurm
def test_cancel_a_slurm_job_checkpoints_and_it_does_not_come_back(slurm_cluster, tiny_data, tmp_path, jobs):
    run, out = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(slurm_cluster, *SBATCH_CPU, "-J", "gt-cancel", "-o", str(out), "slurm/pretrain.sbatch",
                 *train_args(tiny_data, str(run), "max_steps=100000", "checkpoint.interval=1000")[1:],
                 env=job_env(slurm_cluster))
    jobs.append(job)
    wait_progress(out, 1, steps=3)
    p = cli("runs", str(run), "--json", env=slurm_cluster.env)
    assert p.returncode == 0, p.stderr
    (r,) = json.loads(p.stdout)
    assert (r["state"], r["slurm_job"], r["slurm_state"], r["launcher"]) == ("running", job, "RUNNING", "slurm"), r

    c = cli("cancel", str(run), "--wait", "120", env=slurm_cluster.env)
    assert c.returncode == 0, c.stdout + c.stderr + out.read_text()[-3000:]
    assert f"ran scancel {job}" in c.stdout and "with a checkpoint" in c.stdout
    time.sleep(3)  # time for a requeue, were there one
    assert slurm_cluster.history(job) == ["CANCELLED"]
    ev = read_events(run)
    assert [e["event"] for e in ev] == ["start", "preempted", "cancelled"], ev
    assert ev[1]["cause"] == "SIGTERM" and ev[1]["checkpoint_landed"] is True and ev[2]["step"] == ev[1]["step"]
    assert (run / "checkpoints" / f"step-{ev[1]['step']:08d}" / "MANIFEST.json").exists()
    assert not (run / "lease.json").exists() and "@" in ev[2]["by"]
    (r,) = json.loads(cli("runs", str(run), "--json", env=slurm_cluster.env).stdout)
    assert r["state"] == "stopped (cancelled)" and r["slurm_state"] == "CANCELLED", r
    again = cli("cancel", str(run), env=slurm_cluster.env)
    assert again.returncode == 0 and "already cancelled" in again.stdout


def test_cancel_a_local_run_stops_its_supervisor_with_exit_75(tiny_data, tmp_path):
    run = tmp_path / "run"
    train = [sys.executable, "-m", "gpt_train", *train_args(tiny_data, str(run), "max_steps=100000",
                                                                  "checkpoint.interval=1000")]
    # The launcher's pid reaches the trainer as GPT_TRAIN_SUPERVISOR_PID (exec keeps the shell's pid).
    script = 'export GPT_TRAIN_SUPERVISOR_PID=$$; exec "$@"'
    sup = subprocess.Popen(["sh", "-c", script, "sh", sys.executable, "-m", "gpt_train.supervise", "--", *train],
                           cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_steps(run, 3)
        first = read_events(run)[0]
        assert (first["launcher"], first["supervisor_pid"], first["hosts"]) == ("local", sup.pid, [HOST]), first
        c = cli("cancel", str(run), "--wait", "120")
        assert c.returncode == 0, c.stdout + c.stderr
        assert f"sent SIGTERM to launcher pid {sup.pid}" in c.stdout and "with a checkpoint" in c.stdout
        assert sup.wait(timeout=60) == 75
    finally:
        if sup.poll() is None:
            sup.kill()
    ev = read_events(run)
    assert [e["event"] for e in ev] == ["start", "preempted", "cancelled"], ev
    assert ev[1]["checkpoint_landed"] is True and ev[2]["step"] == ev[1]["step"]
    (r,) = json.loads(cli("runs", str(run), "--json").stdout)
    assert r["state"] == "stopped (cancelled)" and r["launcher"] == "local"
    gone = cli("cancel", str(tmp_path / "nowhere"))
    assert gone.returncode != 0 and len(gone.stderr.strip().splitlines()) == 1 and "no run at" in gone.stderr
